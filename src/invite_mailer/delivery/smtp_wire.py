"""MAIL, RCPT and DATA below aiosmtplib's public API: the one file to re-check
on an aiosmtplib upgrade.

aiosmtplib's ``mail``/``rcpt``/``data`` parse every address again and
normalise line ends and dot-stuff with regular expressions over the whole
message, a fifth of the CPU time of sending a mail. The functions here send
the same bytes and raise the same errors by cheaper means: the message goes
out as views of its own bytes (:func:`data_segments`), and with a relay that
announces PIPELINING (RFC 2920) the envelope and DATA go out in one write
(:class:`Pipeline`), whose replies aiosmtplib cannot read (it expects one
reply per write), so a small reader of its own stands in for them.

To do that they rely on aiosmtplib's internals: ``SMTP.protocol`` and its
``execute_command``, ``write``, ``read_response``, ``transport``,
``connection_lost``, ``pause_writing`` and ``resume_writing``,
``SMTP.timeout``, ``aiosmtplib.email.quote_address``,
``aiosmtplib.protocol.normalize_message_line_endings`` and its reply limits
``MAX_LINE_LENGTH`` and ``MAX_RESPONSE_LENGTH``. ``tests/test_smtp_wire.py``
fails when one of them changes; ``CHECKED_VERSIONS`` is the range of
aiosmtplib releases this file was read against.
"""

from __future__ import annotations

import asyncio
import re
from collections import deque
from collections.abc import Sequence
from typing import Self

import aiosmtplib
from aiosmtplib import (
    SMTPDataError,
    SMTPException,
    SMTPReadTimeoutError,
    SMTPRecipientRefused,
    SMTPResponse,
    SMTPResponseException,
    SMTPSenderRefused,
    SMTPServerDisconnected,
    SMTPStatus,
    SMTPTimeoutError,
)
from aiosmtplib.email import quote_address
from aiosmtplib.protocol import (
    MAX_LINE_LENGTH,
    MAX_RESPONSE_LENGTH,
    SMTPProtocol,
    normalize_message_line_endings,
)

from invite_mailer.delivery.handover import Handover, mark_handover
from invite_mailer.mail.mime import crlf_lines

__all__ = [
    "CHECKED_VERSIONS",
    "DOT_ATOM",
    "PROHIBITED",
    "Pipeline",
    "data",
    "data_block",
    "data_segments",
    "mail",
    "parse_reply",
    "quote",
    "rcpt",
    "transmitted_size",
    "write_segments",
]

# The aiosmtplib releases (from, up to but excluding) whose internals were
# checked against this file.
CHECKED_VERSIONS = ("5.1.3", "6")

# A dot-atom address: email.utils.parseaddr, which aiosmtplib's quote_address
# runs on every address, returns it unchanged.
DOT_ATOM = re.compile(
    r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
    r"@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*"
)


def quote(address: str) -> str:
    """``aiosmtplib.email.quote_address(address)``, without parsing plain addresses."""
    return f"<{address}>" if DOT_ATOM.fullmatch(address) else quote_address(address)


def transmitted_size(data: bytes) -> int:
    """Octets of *data* as DATA transmits it, CRLF line ends included (RFC 1870)."""
    return len(data) if crlf_lines(data) else len(normalize_message_line_endings(data))


async def mail(
    client: aiosmtplib.SMTP, sender: str, options: Sequence[str], encoding: str
) -> SMTPResponse:
    """``client.mail(sender, options=options, encoding=encoding)``, same bytes and errors."""
    response = await client.execute_command(
        b"MAIL",
        b"FROM:" + quote(sender).encode(encoding),
        *(option.encode("ascii") for option in options),
    )
    if response.code != SMTPStatus.completed:
        raise SMTPSenderRefused(response.code, response.message, sender)
    return response


async def rcpt(client: aiosmtplib.SMTP, recipient: str, encoding: str) -> SMTPResponse:
    """``client.rcpt(recipient, encoding=encoding)``, same bytes and errors."""
    response = await client.execute_command(b"RCPT", b"TO:" + quote(recipient).encode(encoding))
    if response.code not in (SMTPStatus.completed, SMTPStatus.will_forward):
        raise SMTPRecipientRefused(response.code, response.message, recipient)
    return response


def data_block(data: bytes) -> bytes | None:
    """What follows DATA for *data*: dot-stuffed, ended by ".", or None when
    *data* has line ends other than CRLF (aiosmtplib normalises those)."""
    segments = data_segments(data)
    return None if segments is None else b"".join(segments)


def data_segments(data: bytes) -> list[bytes | memoryview] | None:
    """:func:`data_block` as pieces of *data* itself, to be written in one go.

    RFC 5321 4.5.2: a line that starts with "." gets one more. Instead of a
    stuffed copy of the whole message, the pieces are views of *data* cut
    before each such line's dot, with a lone ``b"."`` between them; a message
    without such a line is ``[data, b".\\r\\n"]``. None when *data* has line
    ends other than CRLF.
    """
    if not crlf_lines(data):
        return None
    segments: list[bytes | memoryview] = []
    view = memoryview(data)
    start = 0
    if data.startswith(b"."):
        segments.append(b".")
    cut = data.find(b"\r\n.")
    while cut != -1:
        segments += (view[start : cut + 2], b".")
        start = cut + 2
        cut = data.find(b"\r\n.", start)
    segments += (view[start:] if start else data, b".\r\n")
    return segments


def write_segments(protocol: SMTPProtocol, segments: Sequence[bytes | memoryview]) -> None:
    """Put *segments* on the connection as one write, without joining them here.

    ``writelines`` hands the pieces to the transport as they are: the TLS
    transport encrypts them one by one, and from Python 3.12 on the plain
    one sends them with a single ``sendmsg``; 3.11's joins them once.
    """
    transport = protocol.transport
    if not isinstance(transport, asyncio.WriteTransport) or transport.is_closing():
        raise SMTPServerDisconnected("Connection lost")
    transport.writelines(segments)


async def data(client: aiosmtplib.SMTP, message: bytes, written: Handover) -> SMTPResponse:
    """``client.data(message)``, with the same answers and errors.

    For a message whose line ends are CRLF already (every message
    invite-mailer composes) the bytes go out as views of *message*
    (:func:`data_segments`); anything else goes through aiosmtplib. *written*
    (and the current send's handover) is marked the moment the data starts
    to leave.
    """
    protocol = client.protocol
    segments = data_segments(message)
    if protocol is None or segments is None:
        # aiosmtplib's own DATA: counted as handed over from the command on.
        written.started = True
        mark_handover()
        return await client.data(message)
    try:
        start = await protocol.execute_command(b"DATA", timeout=client.timeout)
        if start.code != SMTPStatus.start_input:
            raise SMTPDataError(start.code, start.message)
        written.started = True
        mark_handover()
        write_segments(protocol, segments)
        response = await protocol.read_response(timeout=client.timeout)
    except (SMTPServerDisconnected, SMTPTimeoutError):
        client.close()  # as SMTP.data(): the protocol state is unknown
        raise
    if response.code != SMTPStatus.completed:
        raise SMTPDataError(response.code, response.message)
    return response


# -- PIPELINING (RFC 2920) --------------------------------------------------------

# What aiosmtplib's SMTPProtocol.execute_command refuses to put on a command line.
PROHIBITED = re.compile(rb"[\x00-\x1f\x7f]")


def parse_reply(buffer: bytearray) -> SMTPResponse | None:
    """Take the first complete reply off *buffer*, as aiosmtplib's protocol reads it.

    None while the reply is incomplete; :class:`aiosmtplib.SMTPResponseException`
    (code -1) for a line that is no reply or a reply that is too long.
    """
    if len(buffer) > MAX_RESPONSE_LENGTH:
        raise SMTPResponseException(SMTPStatus.invalid_response, "Response too long")
    message = bytearray()
    offset = 0
    while (end := buffer.find(b"\n", offset)) != -1:
        line = bytes(buffer[offset : end + 1])
        if len(line) > MAX_LINE_LENGTH:
            raise SMTPResponseException(SMTPStatus.invalid_response, "Response too long")
        try:
            code = int(line[:3])
        except ValueError:
            text = line.decode("utf-8", errors="ignore")
            raise SMTPResponseException(
                SMTPStatus.invalid_response, f"Malformed SMTP response line: {text}"
            ) from None
        offset = end + 1
        if message:  # as aiosmtplib joins the lines: empty ones leave no mark
            message += b"\n"
        message += line[4:].strip(b" \t\r\n")
        if line[3:4] != b"-":
            del buffer[:offset]
            return SMTPResponse(code, message.decode("utf-8", "surrogateescape"))
    return None


class _ReplyReader(asyncio.Protocol):
    """Stands in for aiosmtplib's protocol while the replies to a group come in.

    aiosmtplib's protocol reads one reply per command it wrote and drops what
    arrives while a reply waits to be picked up, so several replies in flight
    would be lost. This one queues every complete reply; everything but the
    incoming data still goes to aiosmtplib's protocol, so a lost connection
    closes the client as usual.
    """

    def __init__(self, inner: SMTPProtocol) -> None:
        self.inner = inner
        self.buffer = bytearray()
        self.replies: deque[SMTPResponse] = deque()
        self.failure: SMTPException | None = None
        self.waiter: asyncio.Future[None] | None = None

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        try:
            while (reply := parse_reply(self.buffer)) is not None:
                self.replies.append(reply)
        except SMTPResponseException as exc:
            self.buffer.clear()
            self._fail(exc)
        self._wake()

    def eof_received(self) -> bool:
        self._fail(SMTPServerDisconnected("Unexpected EOF received"))
        return False  # close the transport, as aiosmtplib's protocol does

    def connection_lost(self, exc: Exception | None) -> None:
        lost = SMTPServerDisconnected("Connection lost")
        lost.__cause__ = exc
        self._fail(lost)
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def _fail(self, exc: SMTPException) -> None:
        if self.failure is None:
            self.failure = exc
        self._wake()

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def next(self) -> SMTPResponse:
        """The next reply in order; what broke the connection once none is left."""
        while not self.replies:
            if self.failure is not None:
                raise self.failure
            self.waiter = asyncio.get_running_loop().create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
        return self.replies.popleft()


class Pipeline:
    """A mail transaction with PIPELINING: the envelope in one write, replies in order.

    Use as a context manager around one transaction, on a connected client
    that announced PIPELINING. While it is open the replies are read here, not
    by aiosmtplib; on leaving, aiosmtplib reads them again. A lost connection
    or a timeout closes the client (its state is unknown), as aiosmtplib does.
    """

    def __init__(self, client: aiosmtplib.SMTP) -> None:
        protocol = client.protocol
        if protocol is None or not isinstance(protocol.transport, asyncio.Transport):
            raise SMTPServerDisconnected("Server not connected")
        self.client = client
        self.protocol = protocol
        self.transport = protocol.transport
        self.reader = _ReplyReader(protocol)

    def __enter__(self) -> Self:
        self.transport.set_protocol(self.reader)
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.transport.get_protocol() is self.reader:
            self.transport.set_protocol(self.protocol)

    def send_envelope(
        self, sender: str, options: Sequence[str], recipients: Sequence[str], encoding: str
    ) -> None:
        """MAIL FROM, every RCPT TO and DATA as one write (RFC 2920 3.1: DATA last).

        Raises ValueError, before anything is written, for an address that
        cannot go on a command line, as aiosmtplib does.
        """
        mail = b" ".join(
            [b"MAIL FROM:" + quote(sender).encode(encoding), *(o.encode("ascii") for o in options)]
        )
        lines = [mail, *(b"RCPT TO:" + quote(r).encode(encoding) for r in recipients)]
        if any(PROHIBITED.search(line) for line in lines):
            raise ValueError("Command arg contains a prohibited control character")
        lines.append(b"DATA")
        self._write([b"\r\n".join(lines) + b"\r\n"])

    async def reply(self) -> SMTPResponse:
        """The reply to the next command of the group, in the order they were sent."""
        try:
            async with asyncio.timeout(self.client.timeout):
                response = await self.reader.next()
        except (SMTPServerDisconnected, SMTPResponseException):
            # Lost, or a reply that is no reply: what follows cannot be paired.
            self.client.close()
            raise
        except TimeoutError as exc:
            self.client.close()
            raise SMTPReadTimeoutError("Timed out waiting for server response") from exc
        if response.code == SMTPStatus.domain_unavailable:
            self.client.close()  # 421: the relay closes the connection, as aiosmtplib reacts
        return response

    async def end_empty_data(self) -> SMTPResponse:
        """End the data the server asked for after refusing the whole envelope.

        RFC 2920 3.1: a client that sees 354 although no recipient was
        accepted sends a lone "." and reads the answer.
        """
        self._write([b".\r\n"])
        return await self.reply()

    async def data(self, message: bytes, written: Handover) -> SMTPResponse:
        """The message after the server's 354, and its answer; raises
        :class:`aiosmtplib.SMTPDataError` unless it is 250. *written* is
        marked the moment the data starts to leave."""
        segments = data_segments(message)
        if segments is None:
            segments = data_segments(normalize_message_line_endings(message))
            assert segments is not None
        if self.transport.is_closing():
            self.client.close()
            raise SMTPServerDisconnected("Connection lost")
        written.started = True
        mark_handover()
        self._write(segments)
        response = await self.reply()
        if response.code != SMTPStatus.completed:
            raise SMTPDataError(response.code, response.message)
        return response

    def _write(self, segments: Sequence[bytes | memoryview]) -> None:
        try:
            write_segments(self.protocol, segments)
        except SMTPServerDisconnected:
            self.client.close()
            raise
