"""SMTP with and without PIPELINING (RFC 2920), against a real aiosmtpd server.

Every outcome the dispatcher sees (sent, refused sender, refused recipients,
temporary or permanent, uncertain) is the same whether the relay announces
PIPELINING or not; with it, the envelope and DATA arrive in one read and a
mail on a reused connection takes two round trips instead of four or more.
"""

from __future__ import annotations

import email.policy
import time
from collections.abc import Iterator
from email.message import EmailMessage

import pytest

from invite_mailer.delivery.transport import SmtpTransport, UncertainFailure
from invite_mailer.errors import (
    PermanentFailure,
    SenderRefused,
    TemporaryFailure,
    TransportError,
)
from invite_mailer.mail.mime import Wire, crlf_checked
from support.smtp import SmtpServer, make_server
from support.smtp import smtp_settings as settings_for

SENDER = "transferreihe@example.org"
GOOD = "anna.mueller@example.org"
OTHER = "bernd.schmidt@example.org"


@pytest.fixture(params=[True, False], ids=["pipelining", "lock-step"])
def relay(request: pytest.FixtureRequest) -> Iterator[SmtpServer]:
    """An aiosmtpd server that announces PIPELINING, or does not; recording every read."""
    server = make_server(pipelining=request.param, record=True)
    try:
        yield server
    finally:
        server.stop()


def pipelined(server: SmtpServer) -> bool:
    return b"250-PIPELINING" in b"".join(
        data for side, data in server.transcripts[0].events if side == "server"
    )


def wire(number: int = 1, *, to: str = GOOD) -> Wire:
    """A mail of about 31 KB, with lines that start with a dot, as the composer makes it."""
    msg = EmailMessage()
    msg["From"] = f"KomKomIn Transferreihe <{SENDER}>"
    msg["To"] = f"Dr. Anna Müller <{to}>"
    msg["Subject"] = f"Einladung Nr. {number}: Kreislaufwirtschaft stärken"
    msg["Message-ID"] = f"<{number}.einladung@example.org>"
    text = "".join(
        f"Zeile {n}: Grüße aus Göttingen, die Transferreihe lädt ein.\n" for n in range(8)
    )
    msg.set_content(".erste Zeile mit Punkt\n" + text + "..zwei Punkte\n.\n")
    msg.add_attachment(bytes(range(256)) * 90, maintype="application", subtype="pdf")
    msg.set_boundary(f"grenze-{number}")  # the same bytes for the same number
    data = msg.as_bytes(policy=email.policy.SMTP)
    return Wire(msg["Message-ID"], crlf_checked(data))


def stuffed(data: bytes) -> bytes:
    """What goes on the wire after 354 (RFC 5321 4.5.2), built the plain way."""
    lines = data.split(b"\r\n")[:-1]
    return b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines)


async def test_exact_bytes_and_round_trips(relay: SmtpServer) -> None:
    mails = [wire(1), wire(2)]
    assert 30_000 < len(mails[0].data) < 33_000
    assert b"\r\n.erste Zeile" in mails[0].data and b"\r\n.\r\n" in mails[0].data
    async with SmtpTransport(settings_for(relay)) as transport:
        for mail in mails:
            answer = await transport.send(mail, sender=SENDER, recipients=[GOOD, OTHER])
            assert answer.startswith("250 2.0.0 Ok")
    assert [r.data for r in relay.received] == [m.data for m in mails]
    assert all(r.rcpt_tos == (GOOD, OTHER) for r in relay.received)
    [transcript] = relay.transcripts
    turns = transcript.turns()
    assert turns[0] == b"EHLO client.test.invalid\r\n" and turns[-1] == b"QUIT\r\n"
    envelope = [
        f"MAIL FROM:<{SENDER}> SIZE={len(mails[0].data)} BODY=8BITMIME\r\n".encode(),
        f"RCPT TO:<{GOOD}>\r\n".encode(),
        f"RCPT TO:<{OTHER}>\r\n".encode(),
        b"DATA\r\n",
    ]
    per_mail: list[bytes]
    if pipelined(relay):
        per_mail = [b"".join(envelope)]  # one write, one round trip
    else:
        per_mail = envelope
    expected = [turns[0]]
    for mail in mails:
        expected += [*per_mail, stuffed(mail.data) + b".\r\n"]
    assert turns == [*expected, b"QUIT\r\n"]
    # Two round trips per mail with PIPELINING, five (MAIL, 2 RCPT, DATA, data) without.
    assert len(turns) == 2 + len(mails) * (2 if pipelined(relay) else 5)


async def test_a_refused_sender_is_refused_and_the_connection_lives_on(relay: SmtpServer) -> None:
    relay.behaviour.temp_fail = 1
    relay.behaviour.temp_fail_reply = "553 5.7.1 <transferreihe@example.org>: Sender rejected"
    async with SmtpTransport(settings_for(relay)) as transport:
        with pytest.raises(SenderRefused) as caught:
            await transport.send(wire(1), sender=SENDER, recipients=[GOOD, OTHER])
        assert caught.value.code == 553
        assert "Sender rejected" in str(caught.value)
        await transport.send(wire(2), sender=SENDER, recipients=[GOOD])
    assert relay.connections == 1
    assert [r.data for r in relay.received] == [wire(2).data]
    turns = relay.transcripts[0].turns()
    # The envelope was cleared before the next mail.
    assert b"RSET\r\n" in turns
    assert turns.index(b"RSET\r\n") < len(turns) - 3


# Where the relay fails (a countdown of Behaviour), its reply, the failure, its
# code, and how many connections the two mails of the test took.
FAILURES = {
    "451 at MAIL": ("temp_fail", "451 4.3.0 later", TemporaryFailure, 451, 1),
    "452 at MAIL": ("temp_fail", "452 4.3.1 full", TemporaryFailure, 452, 1),
    "553 at MAIL": ("temp_fail", "553 5.7.1 not you", SenderRefused, 553, 1),
    "421 at MAIL": ("temp_fail", "421 4.7.0 closing", TemporaryFailure, 421, 2),
    "451 at DATA": ("data_command_fail", "451 4.3.0 later", TemporaryFailure, 451, 1),
    "554 at DATA": ("data_command_fail", "554 5.7.1 not you", PermanentFailure, 554, 1),
    "452 after the data": ("data_fail", "452 4.3.1 full", TemporaryFailure, 452, 1),
    "554 after the data": ("data_fail", "554 5.7.1 spam", PermanentFailure, 554, 1),
    "hang-up at MAIL": ("drop_at_mail", "", TemporaryFailure, None, 2),
    "hang-up at DATA": ("drop_at_data_command", "", TemporaryFailure, None, 2),
    "hang-up after the data": ("drop_after_data", "", UncertainFailure, None, 2),
}
REPLY_OF = {
    "temp_fail": "temp_fail_reply",
    "data_command_fail": "data_command_reply",
    "data_fail": "data_reply",
}


@pytest.mark.parametrize("case", FAILURES, ids=str)
async def test_a_failure_means_what_it_means_without_pipelining(
    relay: SmtpServer, case: str
) -> None:
    countdown, reply, failure, code, connections = FAILURES[case]
    setattr(relay.behaviour, countdown, 1)
    if reply:
        setattr(relay.behaviour, REPLY_OF[countdown], reply)
    async with SmtpTransport(settings_for(relay)) as transport:
        with pytest.raises(TransportError) as caught:
            await transport.send(wire(1), sender=SENDER, recipients=[GOOD, OTHER])
        # The next mail goes out, on the same connection unless the relay closed it.
        assert (await transport.send(wire(2), sender=SENDER, recipients=[GOOD])).startswith("250")
    assert type(caught.value) is failure
    assert caught.value.code == code
    assert relay.connections == connections
    assert [r.data for r in relay.received] == [wire(2).data]


async def test_one_refused_recipient_of_two_is_left_out(relay: SmtpServer) -> None:
    relay.behaviour.reject_recipients[OTHER] = "550 5.1.1 <x>: Recipient address rejected"
    async with SmtpTransport(settings_for(relay)) as transport:
        answer = await transport.send(wire(1), sender=SENDER, recipients=[OTHER, GOOD])
    assert answer.startswith("250 ")
    [received] = relay.received
    assert received.rcpt_tos == (GOOD,)
    assert received.data == wire(1).data


@pytest.mark.parametrize(
    ("replies", "failure", "code"),
    [
        (["550 5.1.1 unknown", "550 5.1.1 unknown"], PermanentFailure, 550),
        (["550 5.1.1 unknown", "450 4.2.0 mailbox busy"], TemporaryFailure, 450),
    ],
    ids=["both-5xx", "5xx-and-4xx"],
)
async def test_every_recipient_refused(
    relay: SmtpServer, replies: list[str], failure: type[Exception], code: int
) -> None:
    for address, reply in zip([GOOD, OTHER], replies, strict=True):
        relay.behaviour.reject_recipients[address] = reply
    async with SmtpTransport(settings_for(relay)) as transport:
        with pytest.raises(failure) as caught:
            await transport.send(wire(1), sender=SENDER, recipients=[GOOD, OTHER])
        assert getattr(caught.value, "code", None) == code
        assert not isinstance(caught.value, (SenderRefused, UncertainFailure))
        relay.behaviour.reject_recipients.clear()
        await transport.send(wire(2), sender=SENDER, recipients=[GOOD])
    assert relay.connections == 1
    assert [r.data for r in relay.received] == [wire(2).data]
    transcript = relay.transcripts[0]
    sent = transcript.client_bytes()
    # No message data went out for the refused mail; the envelope was reset.
    assert sent.count(b"Kreislaufwirtschaft") == 1
    assert b"RSET\r\n" in transcript.turns()
    if pipelined(relay):
        # DATA went out with the envelope; aiosmtpd refused it (no recipients).
        server_lines = [data for side, data in transcript.events if side == "server"]
        assert any(line.startswith(b"503 ") for line in server_lines)


async def test_a_drop_at_mail_on_a_reused_connection_is_retried(relay: SmtpServer) -> None:
    async with SmtpTransport(settings_for(relay)) as transport:
        await transport.send(wire(1), sender=SENDER, recipients=[GOOD])
        relay.behaviour.drop_at_mail = 1
        assert (await transport.send(wire(2), sender=SENDER, recipients=[GOOD])).startswith("250")
    assert relay.connections == 2
    assert [r.data for r in relay.received] == [wire(1).data, wire(2).data]


@pytest.mark.slow
@pytest.mark.parametrize("stall_at", ["MAIL", "DATA"])
async def test_a_stall_is_a_timeout(relay: SmtpServer, stall_at: str) -> None:
    relay.behaviour.stall = 1
    relay.behaviour.stall_at = stall_at
    relay.behaviour.stall_seconds = 2
    async with SmtpTransport(settings_for(relay, timeout=0.3)) as transport:
        started = time.monotonic()
        with pytest.raises(TemporaryFailure) as caught:
            await transport.send(wire(1), sender=SENDER, recipients=[GOOD])
        assert time.monotonic() - started < 1.5
        # A stall before the data is a plain failure; after it, the mail may have arrived.
        assert isinstance(caught.value, UncertainFailure) is (stall_at == "DATA")
        await transport.send(wire(2), sender=SENDER, recipients=[GOOD])
    assert relay.connections == 2


@pytest.mark.parametrize(
    "recipient", ['"a\x00"@x.org', '"a\x01b"@x.org', "a\x7fb@x.org", '"a\tb"@x.org']
)
async def test_a_control_character_in_an_address_never_reaches_the_wire(
    relay: SmtpServer, recipient: str
) -> None:
    # Refused before anything of the envelope is written, pipelined or not.
    async with SmtpTransport(settings_for(relay)) as transport:
        with pytest.raises(PermanentFailure, match="invalid address"):
            await transport.send(wire(1), sender=SENDER, recipients=[GOOD, recipient])
        await transport.send(wire(2), sender=SENDER, recipients=[GOOD])
    sent = relay.transcripts[0].client_bytes()
    assert recipient.encode() not in sent and b"@x.org" not in sent
    assert [r.rcpt_tos for r in relay.received] == [(GOOD,)]
