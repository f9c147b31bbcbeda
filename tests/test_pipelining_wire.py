"""The pieces below aiosmtplib's API that PIPELINING needs, and replies aiosmtpd never gives.

A tiny scripted SMTP server on 127.0.0.1 answers from a table and logs each
read, so replies can come all in one packet or a byte at a time, a server can
say 354 after refusing every recipient (RFC 2920 3.1), close after a refusal,
or answer with something that is no reply.
"""

from __future__ import annotations

import asyncio
import random
import re
from collections.abc import AsyncIterator

import aiosmtplib
import pytest
from aiosmtplib.protocol import PERIOD_REGEX, SMTPProtocol, normalize_message_line_endings

from invite_mailer.delivery.smtp_wire import data_block, data_segments, parse_reply
from invite_mailer.delivery.transport import SmtpTransport, UncertainFailure
from invite_mailer.errors import PermanentFailure, SenderRefused, TemporaryFailure
from invite_mailer.inputs.settings import SmtpSettings
from invite_mailer.mail.mime import Wire

SENDER = "transferreihe@example.org"
MESSAGE = b"Subject: Einladung\r\n\r\n.Punkt am Anfang\r\nText\r\n"
STUFFED = b"Subject: Einladung\r\n\r\n..Punkt am Anfang\r\nText\r\n"
EHLO = b"250-scripted.test.invalid\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SIZE 1000000\r\n"
CLOSE = "CLOSE"  # a reply that closes the connection instead of answering


class Scripted:
    """An SMTP server that answers each command from :attr:`replies` and logs what arrives."""

    def __init__(self, *, trickle: bool = False) -> None:
        # Command (first word, or "." for the end of the data) -> replies, used
        # in turn; the last one stays.
        self.replies: dict[str, list[str]] = {}
        self.trickle = trickle  # send replies a byte at a time
        self.reads: list[list[bytes]] = []  # per connection, each read
        self.messages: list[bytes] = []  # the data as it arrived, without the final "."
        self.port = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> Scripted:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    def settings(self) -> SmtpSettings:
        return SmtpSettings(
            host="127.0.0.1", port=self.port, security="none", timeout=2, local_hostname="c.test"
        )

    def _reply(self, command: str) -> str | bytes:
        defaults = {
            "EHLO": EHLO,
            "DATA": "354 go ahead",
            ".": "250 2.0.0 queued",
            "QUIT": "221 bye",
        }
        planned = self.replies.get(command)
        if planned:
            return planned.pop(0) if len(planned) > 1 else planned[0]
        return defaults.get(command, "250 2.0.0 ok")

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        reads: list[bytes] = []
        self.reads.append(reads)
        writer.write(b"220 scripted.test.invalid ESMTP\r\n")
        buffer, body = b"", None
        try:
            while chunk := await reader.read(65536):
                reads.append(chunk)
                buffer += chunk
                out: list[str | bytes] = []
                while True:
                    if body is not None:
                        end = (b"\r\n" + buffer).find(b"\r\n.\r\n")
                        if end == -1:
                            break
                        self.messages.append(buffer[:end])
                        buffer, body = buffer[end + 3 :], None
                        out.append(self._reply("."))
                        continue
                    line, crlf, rest = buffer.partition(b"\r\n")
                    if not crlf:
                        break
                    buffer = rest
                    command = line.split(b" ", 1)[0].split(b":", 1)[0].decode().upper()
                    reply = self._reply(command)
                    out.append(reply)
                    if command == "DATA" and str(reply).startswith("354"):
                        body = b""
                if await self._send(writer, out):
                    return
        finally:
            writer.close()

    async def _send(self, writer: asyncio.StreamWriter, replies: list[str | bytes]) -> bool:
        """Write *replies*; True when one of them closes the connection."""
        data = b""
        closing = False
        for reply in replies:
            if reply == CLOSE:
                closing = True
                break
            data += reply if isinstance(reply, bytes) else reply.encode() + b"\r\n"
        if self.trickle:
            for byte in data:
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.sleep(0)
        else:
            writer.write(data)
        await writer.drain()
        return closing


@pytest.fixture(params=[False, True], ids=["one-packet", "a-byte-at-a-time"])
async def scripted(request: pytest.FixtureRequest) -> AsyncIterator[Scripted]:
    async with Scripted(trickle=request.param) as server:
        yield server


async def send(server: Scripted, recipients: list[str], data: bytes = MESSAGE) -> str:
    async with SmtpTransport(server.settings()) as transport:
        return await transport.send(Wire("<1@x>", data), sender=SENDER, recipients=recipients)


async def test_replies_in_one_packet_or_a_byte_at_a_time(scripted: Scripted) -> None:
    scripted.replies["RCPT"] = ["250-first line\r\n250 2.1.5 ok", "251 2.1.5 will forward"]
    answer = await send(scripted, ["a@example.org", "b@example.org"])
    assert answer == "250 2.0.0 queued"
    assert scripted.messages == [STUFFED]
    [reads] = scripted.reads
    # EHLO, then the whole envelope in one read, then the data, then QUIT.
    assert reads[1] == (
        f"MAIL FROM:<transferreihe@example.org> SIZE={len(MESSAGE)}\r\n".encode()
        + b"RCPT TO:<a@example.org>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n"
    )
    assert reads[2] == STUFFED + b".\r\n"


async def test_354_after_every_recipient_was_refused(scripted: Scripted) -> None:
    """RFC 2920 3.1: the client ends the empty message, then the envelope is reset."""
    scripted.replies["RCPT"] = ["550 5.1.1 unknown", "551 5.1.6 moved"]
    scripted.replies["."] = ["554 5.5.1 no valid recipients", "250 2.0.0 queued"]
    async with SmtpTransport(scripted.settings()) as transport:
        with pytest.raises(PermanentFailure) as caught:
            await transport.send(
                Wire("<1@x>", MESSAGE), sender=SENDER, recipients=["a@x.org", "b@x.org"]
            )
        assert caught.value.code == 550
        assert not isinstance(caught.value, SenderRefused)
        scripted.replies["RCPT"] = ["250 ok"]
        await transport.send(Wire("<2@x>", MESSAGE), sender=SENDER, recipients=["a@x.org"])
    [reads] = scripted.reads  # one connection for both
    sent = b"".join(reads)
    assert b"DATA\r\n.\r\nRSET\r\n" in sent
    assert scripted.messages == [b"", STUFFED]  # the empty one, then the real one


async def test_a_refused_sender_stands_when_the_server_then_closes(scripted: Scripted) -> None:
    scripted.replies["MAIL"] = ["550 5.7.1 go away", CLOSE]
    with pytest.raises(SenderRefused) as caught:
        await send(scripted, ["a@example.org"])
    assert caught.value.code == 550


async def test_421_at_rcpt_is_temporary(scripted: Scripted) -> None:
    scripted.replies["RCPT"] = ["421 4.3.2 shutting down", CLOSE]
    with pytest.raises(TemporaryFailure) as caught:
        await send(scripted, ["a@example.org", "b@example.org"])
    assert caught.value.code == 421
    assert not isinstance(caught.value, UncertainFailure)


async def test_a_server_gone_mid_pipeline_is_a_plain_temporary_failure(
    scripted: Scripted,
) -> None:
    scripted.replies["RCPT"] = ["250 ok", CLOSE]
    with pytest.raises(TemporaryFailure) as caught:
        await send(scripted, ["a@example.org", "b@example.org"])
    assert not isinstance(caught.value, UncertainFailure)
    assert "RCPT" in str(caught.value)
    assert scripted.messages == []


async def test_a_reply_that_is_no_reply_drops_the_connection(scripted: Scripted) -> None:
    scripted.replies["MAIL"] = [b"hello there\r\n250 ok\r\n"]  # type: ignore[list-item]
    with pytest.raises(TemporaryFailure) as caught:
        await send(scripted, ["a@example.org"])
    assert "Malformed SMTP response line" in str(caught.value)
    assert scripted.messages == []


# -- the reply parser against aiosmtplib's own -------------------------------------------


async def aiosmtplib_reads(data: bytes) -> aiosmtplib.SMTPResponse | str:
    """What aiosmtplib's protocol makes of *data* as the reply to one command."""
    protocol = SMTPProtocol()
    protocol.connection_made(asyncio.Transport())  # never written to
    protocol.data_received(data)
    try:
        return await protocol.read_response(timeout=0.01)
    except aiosmtplib.SMTPResponseException as exc:
        return f"{exc.code} {exc.message}"
    except aiosmtplib.SMTPTimeoutError:
        return "incomplete"


def ours(data: bytes) -> aiosmtplib.SMTPResponse | str:
    try:
        reply = parse_reply(bytearray(data))
    except aiosmtplib.SMTPResponseException as exc:
        return f"{exc.code} {exc.message}"
    return "incomplete" if reply is None else reply


async def test_replies_parse_as_aiosmtplib_parses_them() -> None:
    rng = random.Random(5)
    pieces = [b"250", b"550", b"-", b" ", b"ok", b"\r\n", b"\n", b"\xc3\xa4", b"\xff", b"x" * 9000]
    checked = 0
    for _ in range(400):
        data = b"".join(rng.choice(pieces) for _ in range(rng.randint(1, 8)))
        if not data.endswith(b"\n"):
            data += b"\r\n"
        assert ours(data) == await aiosmtplib_reads(data), data
        checked += isinstance(ours(data), aiosmtplib.SMTPResponse)
    assert checked > 50


def test_several_replies_come_off_the_buffer_in_order() -> None:
    buffer = bytearray(b"250 a\r\n250-b\r\n250 c\r\n354 go\r\n25")
    assert parse_reply(buffer) == (250, "a")
    assert parse_reply(buffer) == (250, "b\nc")
    assert parse_reply(buffer) == (354, "go")
    assert parse_reply(buffer) is None and buffer == b"25"


# -- the message on the wire: views, not copies ------------------------------------------


def oracle(data: bytes) -> bytes:
    """aiosmtplib's own DATA bytes."""
    return PERIOD_REGEX.sub(b"..", normalize_message_line_endings(data)) + b".\r\n"


@pytest.mark.parametrize(
    "data",
    [
        b"a\r\n",
        b".\r\n",
        b".a\r\n.b\r\n",
        b"a\r\n.\r\nb\r\n",
        b"a\r\n..b\r\n...\r\n",
        MESSAGE,
        b"x" * 31_000 + b"\r\n",
    ],
)
def test_segments_are_what_aiosmtplib_sends(data: bytes) -> None:
    segments = data_segments(data)
    assert segments is not None
    assert b"".join(segments) == oracle(data) == data_block(data)
    # Every piece of the message is a view of it (or the message itself), no copy.
    for piece in segments:
        if isinstance(piece, memoryview):
            assert piece.obj is data
        else:
            assert piece in (b".", b".\r\n") or piece is data
    dots = len(re.findall(rb"(?m)^\.", data))
    assert len(segments) == 2 + 2 * dots - (1 if data.startswith(b".") else 0)


def test_segments_refuse_other_line_ends() -> None:
    for data in (b"a\n", b"a\r", b"a", b"a\r\nb"):
        assert data_segments(data) is None
