"""Transports against a real in-process SMTP server, and the rate limit in virtual time."""

from __future__ import annotations

import asyncio
import bisect
import email.policy
import heapq
import itertools
import os
import random
import shutil
import socket
import ssl
import subprocess
import time
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import AuthResult
from aiosmtplib.protocol import normalize_message_line_endings

from invite_mailer.delivery.handover import track_handover
from invite_mailer.delivery.ratelimit import RateLimiter
from invite_mailer.delivery.transport import (
    OutboxTransport,
    SmtpTransport,
    UncertainFailure,
    make_transport,
)
from invite_mailer.errors import LedgerError, PermanentFailure, TemporaryFailure
from invite_mailer.inputs.settings import Settings, SmtpSettings, TransportSettings
from invite_mailer.mail import mime
from support.smtp import SmtpServer
from support.smtp import smtp_settings as settings_for

SENDER = "transferreihe@example.org"


def message(number: int = 1, to: str = "anna.mueller@example.org") -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "KomKomIn Transferreihe <transferreihe@example.org>"
    msg["To"] = f"Dr. Anna Müller <{to}>"
    msg["Subject"] = f"Einladung Nr. {number}: Kreislaufwirtschaft stärken – Ressourcen schonen"
    msg["Message-ID"] = f"<{number}.einladung@example.org>"
    msg.set_content(
        "Sehr geehrte Frau Dr. Müller,\n\nwir laden Sie herzlich ein. Grüße aus Göttingen!\n"
        ".eine Zeile mit Punkt am Anfang\n"
    )
    msg.add_alternative("<p>Sehr geehrte Frau Dr. Müller,</p><p>Grüße – Ihr Team</p>\n", "html")
    msg.add_attachment(
        b"BEGIN:VCALENDAR\r\nEND:VCALENDAR\r\n",
        maintype="text",
        subtype="calendar",
        filename="transferreihe-verwaltung.ics",
    )
    return msg


async def send(transport: SmtpTransport, number: int = 1, to: str = "a@example.org") -> str:
    return await transport.send(mime.wire(message(number, to)), sender=SENDER, recipients=[to])


# -- outbox ---------------------------------------------------------------------


async def test_outbox_writes_exact_bytes_named_by_message_id(tmp_path: Path) -> None:
    msg = message(7)
    async with OutboxTransport(tmp_path / "outbox") as outbox:
        answer = await outbox.send(mime.wire(msg), sender=SENDER, recipients=["a@example.org"])
    path = tmp_path / "outbox" / "7.einladung@example.org.eml"
    assert answer == f"250 written to {path}"
    assert path.read_bytes() == msg.as_bytes(policy=email.policy.SMTP)
    assert os.listdir(tmp_path / "outbox") == [path.name]  # no temp files left


async def test_outbox_name_is_safe_and_stable(tmp_path: Path) -> None:
    evil = message()
    del evil["Message-ID"]
    evil["Message-ID"] = "<../../etc/passwd@x>"
    anonymous = message()
    del anonymous["Message-ID"]
    async with OutboxTransport(tmp_path) as outbox:
        await outbox.send(mime.wire(evil), sender=SENDER, recipients=["a@example.org"])
        await outbox.send(mime.wire(anonymous), sender=SENDER, recipients=["a@example.org"])
        await outbox.send(mime.wire(anonymous), sender=SENDER, recipients=["a@example.org"])
    names = sorted(os.listdir(tmp_path))
    assert len(names) == 2  # the same message without an ID lands in the same file
    assert "_.._etc_passwd@x.eml" in names
    assert all(Path(tmp_path, name).parent == tmp_path for name in names)


async def test_outbox_replaces_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async with OutboxTransport(tmp_path) as outbox:
        await outbox.send(mime.wire(message(1)), sender=SENDER, recipients=["a@example.org"])
        before = (tmp_path / "1.einladung@example.org.eml").read_bytes()

        def crash(src: str, dst: str) -> None:
            raise OSError("disk gone")

        monkeypatch.setattr(os, "replace", crash)
        changed = message(1)
        changed.replace_header("Subject", "Geändert")
        with pytest.raises(OSError, match="disk gone"):
            await outbox.send(mime.wire(changed), sender=SENDER, recipients=["a@example.org"])
    # The old file is whole and no half-written temp file is left behind.
    assert (tmp_path / "1.einladung@example.org.eml").read_bytes() == before
    assert os.listdir(tmp_path) == ["1.einladung@example.org.eml"]


def test_make_transport_follows_settings(tmp_path: Path) -> None:
    outbox = Settings(transport=TransportSettings(kind="outbox", outbox_dir=tmp_path))
    assert isinstance(make_transport(outbox), OutboxTransport)
    smtp = Settings(transport=TransportSettings(kind="smtp"))
    assert isinstance(make_transport(smtp), SmtpTransport)


# -- SMTP: the happy path ---------------------------------------------------------


async def test_smtp_delivers_exact_bytes(smtp_server: SmtpServer) -> None:
    msg = message(1, "anna.mueller@example.org")
    async with SmtpTransport(settings_for(smtp_server)) as transport:
        answer = await transport.send(
            mime.wire(msg), sender=SENDER, recipients=["anna.mueller@example.org"]
        )
    assert answer == "250 2.0.0 Ok: queued as TEST00001"
    [received] = smtp_server.received
    assert received.mail_from == SENDER
    assert received.rcpt_tos == ("anna.mueller@example.org",)
    expected = msg.as_bytes(policy=email.policy.SMTP)
    assert expected == mime.wire(msg).data
    assert b"\n.eine Zeile" in expected  # dot-stuffing was exercised
    # SMTP can only end the data with CRLF; everything else is byte-identical.
    assert received.data == normalize_message_line_endings(expected)
    if not expected.isascii():
        assert "BODY=8BITMIME" in received.mail_options


@pytest.mark.slow
async def test_connections_are_reused(smtp_server: SmtpServer) -> None:
    smtp_server.behaviour.data_delay = 0.002
    async with SmtpTransport(settings_for(smtp_server, max_connections=2)) as transport:
        answers = await asyncio.gather(*(send(transport, n) for n in range(100)))
        assert transport.connections_opened <= 2
    assert len(answers) == 100
    assert len(smtp_server.received) == 100
    assert smtp_server.connections <= 2
    assert smtp_server.max_parallel <= 2
    assert smtp_server.open_connections == 0  # QUIT on exit


async def test_a_lone_sender_keeps_one_connection(smtp_server: SmtpServer) -> None:
    async with SmtpTransport(settings_for(smtp_server, max_connections=4)) as transport:
        for n in range(10):
            await send(transport, n)
    assert smtp_server.connections == 1


async def test_reopens_after_messages_per_connection(smtp_server: SmtpServer) -> None:
    settings = settings_for(smtp_server, max_connections=1, messages_per_connection=3)
    async with SmtpTransport(settings) as transport:
        for n in range(7):
            await send(transport, n)
    assert smtp_server.connections == 3
    assert len(smtp_server.received) == 7


async def test_reconnects_after_the_server_closed_an_idle_connection(
    smtp_server: SmtpServer,
) -> None:
    async with SmtpTransport(settings_for(smtp_server)) as transport:
        await send(transport, 1)
        smtp_server.close_connections()
        await send(transport, 2)
    assert smtp_server.connections == 2
    assert len(smtp_server.received) == 2


async def test_dead_idle_connection_is_retried_once_on_a_fresh_one(
    smtp_server: SmtpServer,
) -> None:
    async with SmtpTransport(settings_for(smtp_server)) as transport:
        await send(transport, 1)
        # The relay dropped the connection, and we only learn it at MAIL.
        smtp_server.behaviour.drop_at_mail = 1
        assert (await send(transport, 2)).startswith("250 ")
        assert len(smtp_server.received) == 2
        assert smtp_server.connections == 2

        # A fresh connection that fails too is not retried again.
        smtp_server.behaviour.drop_at_mail = 2
        with pytest.raises(TemporaryFailure) as caught:
            await send(transport, 3)
        assert not isinstance(caught.value, UncertainFailure)
        assert smtp_server.connections == 3
    assert len(smtp_server.received) == 2


# -- SMTP: failures ---------------------------------------------------------------


@pytest.mark.parametrize(
    "reply",
    [
        "421 4.7.0 mx.test.invalid Too many connections, try again later",
        "451 4.3.0 Temporary local problem - please try later",
    ],
)
async def test_4xx_is_a_temporary_failure(smtp_server: SmtpServer, reply: str) -> None:
    smtp_server.behaviour.temp_fail = 1
    smtp_server.behaviour.temp_fail_reply = reply
    async with SmtpTransport(settings_for(smtp_server)) as transport:
        with pytest.raises(TemporaryFailure) as caught:
            await send(transport, 1)
        assert caught.value.code == int(reply[:3])
        assert reply[4:] in str(caught.value)
        assert not isinstance(caught.value, UncertainFailure)
        await send(transport, 2)  # and the transport carries on
    assert len(smtp_server.received) == 1


async def test_rejected_recipient_is_a_permanent_failure(smtp_server: SmtpServer) -> None:
    reply = "550 5.1.1 <nobody@example.org>: Recipient address rejected: User unknown"
    smtp_server.behaviour.reject_recipients["nobody@example.org"] = reply
    async with SmtpTransport(settings_for(smtp_server)) as transport:
        with pytest.raises(PermanentFailure) as caught:
            await send(transport, 1, "nobody@example.org")
        assert caught.value.code == 550
        assert "550" in str(caught.value)
        assert "Recipient address rejected: User unknown" in str(caught.value)
        await send(transport, 2)  # the envelope was reset; the connection lives on
    assert smtp_server.connections == 1
    assert [r.rcpt_tos for r in smtp_server.received] == [("a@example.org",)]


async def test_refused_data_is_a_permanent_failure(smtp_server: SmtpServer) -> None:
    smtp_server.behaviour.data_fail = 1
    smtp_server.behaviour.data_reply = "554 5.7.1 Message rejected as spam"
    async with SmtpTransport(settings_for(smtp_server)) as transport:
        with pytest.raises(PermanentFailure) as caught:
            await send(transport, 1)
        assert caught.value.code == 554
        assert "rejected as spam" in str(caught.value)
        await send(transport, 2)
    assert len(smtp_server.received) == 1


async def test_temporary_refusal_after_data_is_not_uncertain(smtp_server: SmtpServer) -> None:
    smtp_server.behaviour.data_fail = 1
    smtp_server.behaviour.data_reply = "452 4.3.1 Insufficient system storage"
    async with SmtpTransport(settings_for(smtp_server)) as transport:
        with pytest.raises(TemporaryFailure) as caught:
            await send(transport, 1)
    assert caught.value.code == 452
    assert not isinstance(caught.value, UncertainFailure)


@pytest.mark.slow
async def test_stall_after_data_is_an_uncertain_temporary_failure(
    smtp_server: SmtpServer,
) -> None:
    smtp_server.behaviour.stall = 1
    smtp_server.behaviour.stall_seconds = 3
    async with SmtpTransport(settings_for(smtp_server, timeout=0.3)) as transport:
        started = time.monotonic()
        with pytest.raises(UncertainFailure) as caught:
            await send(transport, 1)
        assert time.monotonic() - started < 2
        assert isinstance(caught.value, TemporaryFailure)
        await send(transport, 2)  # on a new connection
    assert smtp_server.connections == 2


@pytest.mark.slow
async def test_stall_before_data_is_a_plain_temporary_failure(smtp_server: SmtpServer) -> None:
    smtp_server.behaviour.stall = 1
    smtp_server.behaviour.stall_at = "MAIL"
    smtp_server.behaviour.stall_seconds = 3
    async with SmtpTransport(settings_for(smtp_server, timeout=0.3)) as transport:
        with pytest.raises(TemporaryFailure) as caught:
            await send(transport, 1)
    assert not isinstance(caught.value, UncertainFailure)
    assert smtp_server.received == []


async def test_connection_dropped_after_data_is_uncertain(smtp_server: SmtpServer) -> None:
    smtp_server.behaviour.drop_after_data = 1
    async with SmtpTransport(settings_for(smtp_server)) as transport:
        with pytest.raises(UncertainFailure):
            await send(transport, 1)
        await send(transport, 2)
    assert smtp_server.connections == 2


async def test_refused_connection_is_a_temporary_failure() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings = SmtpSettings(host="127.0.0.1", port=port, security="none", timeout=1)
    async with SmtpTransport(settings) as transport:
        with pytest.raises(TemporaryFailure, match="could not connect"):
            await send(transport)


@pytest.mark.slow
async def test_rate_limit_applies_to_smtp_sends(smtp_server: SmtpServer) -> None:
    limiter = RateLimiter(2, window=0.2)
    async with SmtpTransport(settings_for(smtp_server), limiter=limiter) as transport:
        started = time.monotonic()
        await asyncio.gather(*(send(transport, n) for n in range(5)))
        assert time.monotonic() - started >= 0.4  # starts at 0, 0, 0.2, 0.2, 0.4


# -- TLS and AUTH -----------------------------------------------------------------


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl program")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2"]
        + ["-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"]
        + ["-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )
    return cert, key


def server_context(certificate: tuple[Path, Path]) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*certificate)
    return context


@pytest.mark.slow
async def test_starttls_verifies_with_ca_file_and_logs_in(
    smtp_server_factory: Any, certificate: tuple[Path, Path]
) -> None:
    logins: list[tuple[bytes, bytes]] = []

    def authenticator(server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> Any:
        logins.append((data.login, data.password))
        return AuthResult(success=True)

    server = smtp_server_factory(
        tls_context=server_context(certificate),
        require_starttls=True,
        authenticator=authenticator,
        auth_required=True,
    )
    settings = settings_for(
        server,
        security="starttls",
        ca_file=certificate[0],
        username="transferreihe",
        password="geheim-ß",
    )
    async with SmtpTransport(settings) as transport:
        await send(transport)
    assert logins == [(b"transferreihe", "geheim-ß".encode())]
    assert len(server.received) == 1


@pytest.mark.slow
async def test_unverifiable_certificate_is_refused_by_default(
    smtp_server_factory: Any, certificate: tuple[Path, Path]
) -> None:
    server = smtp_server_factory(tls_context=server_context(certificate))
    async with SmtpTransport(settings_for(server, security="starttls")) as transport:
        with pytest.raises(TemporaryFailure, match="(?i)certificate"):
            await send(transport)
    relaxed = settings_for(server, security="starttls", verify_certificates=False)
    async with SmtpTransport(relaxed) as transport:
        await send(transport)
    assert len(server.received) == 1


async def test_implicit_tls(smtp_server_factory: Any, certificate: tuple[Path, Path]) -> None:
    server = smtp_server_factory(ssl_context=server_context(certificate))
    settings = settings_for(server, security="tls", ca_file=certificate[0])
    async with SmtpTransport(settings) as transport:
        await send(transport)
    assert len(server.received) == 1


async def test_pipelining_over_tls(
    smtp_server_factory: Any, certificate: tuple[Path, Path]
) -> None:
    # The replies of a pipelined group are read through the TLS transport too.
    server = smtp_server_factory(
        ssl_context=server_context(certificate), pipelining=True, record=True
    )
    server.behaviour.reject_recipients["nobody@example.org"] = "550 5.1.1 unknown"
    settings = settings_for(server, security="tls", ca_file=certificate[0])
    wires = [mime.wire(message(n)) for n in range(3)]
    async with SmtpTransport(settings) as transport:
        for wire in wires:
            await transport.send(wire, sender=SENDER, recipients=["nobody@example.org", "a@x.org"])
    assert [r.rcpt_tos for r in server.received] == [("a@x.org",)] * 3
    assert [r.data for r in server.received] == [wire.data for wire in wires]
    [transcript] = server.transcripts
    assert len(transcript.turns()) == 2 + 3 * 2  # EHLO, QUIT; envelope and data per mail


# -- the rate limit in virtual time ------------------------------------------------


class VirtualTime:
    """A clock and a sleep that advance only when every task is waiting on them."""

    def __init__(self) -> None:
        self.now = 0.0
        self._timers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._timers, (self.now + max(seconds, 0.0), next(self._order), future))
        await future

    async def run(self, *tasks: asyncio.Task[None]) -> None:
        while not all(task.done() for task in tasks):
            for _ in range(50):  # let every runnable task reach its next sleep
                await asyncio.sleep(0)
            if not self._timers:
                continue
            when, _, future = heapq.heappop(self._timers)
            self.now = max(self.now, when)
            future.set_result(None)
        for task in tasks:
            task.result()


def most_in_any_window(starts: list[float], window: float = 60.0) -> int:
    starts = sorted(starts)
    # The fullest window [t, t + window) begins at some start.
    return max(
        (bisect.bisect_left(starts, t + window) - i for i, t in enumerate(starts)), default=0
    )


@pytest.mark.slow
@pytest.mark.parametrize("per_minute", [1, 30, 120, 600])
async def test_rate_limit_holds_every_window_at_full_rate(per_minute: int) -> None:
    virtual = VirtualTime()
    limiter = RateLimiter(per_minute, clock=virtual.clock, sleep=virtual.sleep)
    starts: list[float] = []
    rng = random.Random(per_minute)

    async def worker() -> None:
        while True:
            await limiter.acquire()
            if virtual.now >= 300:
                return
            starts.append(virtual.now)
            await virtual.sleep(rng.uniform(0.01, 0.1))  # the send itself

    await virtual.run(*(asyncio.create_task(worker()) for _ in range(4)))
    assert most_in_any_window(starts) <= per_minute
    # Five minutes of demand: within 2 % of five minutes' worth.
    assert len(starts) >= 5 * per_minute * 0.98


@pytest.mark.slow
@pytest.mark.parametrize("per_minute", [30, 600])
async def test_rate_limit_holds_at_the_relay_however_long_sends_take(per_minute: int) -> None:
    """The relay counts a mail somewhere between its send's start and end.

    Sends here take 5 to 500 ms, now and then a 20 s stall; wherever inside
    its send each mail is counted, no 60 s window holds more than the limit,
    and a stalled send does not hold up the others.
    """
    virtual = VirtualTime()
    limiter = RateLimiter(per_minute, clock=virtual.clock, sleep=virtual.sleep)
    sends: list[tuple[float, float]] = []
    rng = random.Random(per_minute)

    async def worker() -> None:
        while virtual.now < 300:
            async with limiter.slot():
                started = virtual.now
                stall = rng.random() < 0.01
                await virtual.sleep(20.0 if stall else rng.uniform(0.005, 0.5))
                sends.append((started, virtual.now))

    # Enough senders that demand always exceeds the limit (each sends ~4/s).
    senders = 8 + per_minute // 30
    await virtual.run(*(asyncio.create_task(worker()) for _ in range(senders)))
    for pick in (0.0, 1.0, None):  # counted at the start, the end, anywhere
        counted = [
            start + (end - start) * (rng.random() if pick is None else pick) for start, end in sends
        ]
        assert most_in_any_window(counted) <= per_minute, pick
    done = [end for _, end in sends if end <= 300]
    # Five minutes of demand: within 2 % of five minutes' worth.
    assert len(done) >= 5 * per_minute * 0.98


async def test_rate_limit_allows_no_burst_after_idle_time() -> None:
    virtual = VirtualTime()
    limiter = RateLimiter(10, clock=virtual.clock, sleep=virtual.sleep)
    starts: list[float] = []

    async def at(moment: float, count: int) -> None:
        await virtual.sleep(moment - virtual.now)
        for _ in range(count):
            await limiter.acquire()
            starts.append(virtual.now)

    # 5 at 0 s, idle, 10 at 50 s: a token bucket refilled during the idle time
    # would let all 10 through at once, 15 in a minute.
    async def scenario() -> None:
        await at(0, 5)
        await at(50, 10)

    await virtual.run(asyncio.create_task(scenario()))
    assert starts == [0.0] * 5 + [50.0] * 5 + [60.0] * 5
    assert most_in_any_window(starts) == 10


async def test_rate_limit_zero_means_unlimited() -> None:
    virtual = VirtualTime()
    limiter = RateLimiter(0, clock=virtual.clock, sleep=virtual.sleep)
    for _ in range(1000):
        await limiter.acquire()
    assert virtual.now == 0


async def test_cancelled_wait_records_no_start() -> None:
    virtual = VirtualTime()
    limiter = RateLimiter(1, clock=virtual.clock, sleep=virtual.sleep)
    await limiter.acquire()
    waiting = asyncio.create_task(limiter.acquire())
    await asyncio.sleep(0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    virtual.now = 60.0
    await limiter.acquire()  # the cancelled wait did not take this slot
    assert virtual.now == 60.0


async def test_a_fence_after_the_rate_limit_wait_stops_the_send_before_any_byte(
    smtp_server: SmtpServer,
) -> None:
    allowed = [True]

    def fence() -> None:
        if not allowed[0]:
            raise LedgerError("the lease ran out while waiting")

    limiter = RateLimiter(10)
    async with SmtpTransport(settings_for(smtp_server), limiter=limiter) as transport:
        with track_handover(fence) as handover:
            await send(transport, 1)
        allowed[0] = False
        with track_handover(fence) as handover, pytest.raises(LedgerError):
            await send(transport, 2)
    assert not handover.started
    assert len(smtp_server.received) == 1
