"""A real SMTP server for tests: aiosmtpd in a thread, recording what it receives.

Tune :attr:`SmtpServer.behaviour` per test to make it answer 4xx/5xx, stall,
drop connections or slow down; read :attr:`SmtpServer.received` and
:attr:`SmtpServer.connections` afterwards. ``pipelining=True`` makes it
announce PIPELINING (aiosmtpd reads pipelined commands but does not say so);
``record=True`` keeps, per connection, what arrived per read and each reply
(:attr:`SmtpServer.transcripts`), to count round trips.

    def test_something(smtp_server):
        smtp_server.behaviour.reject_recipients["nobody@example.org"] = "550 5.1.1 unknown"
        ...
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from invite_mailer.inputs.settings import SmtpSettings

HOSTNAME = "127.0.0.1"


@dataclass(frozen=True)
class Received:
    """One accepted message: the envelope and the exact DATA bytes (dot-unstuffed)."""

    mail_from: str
    rcpt_tos: tuple[str, ...]
    mail_options: tuple[str, ...]
    data: bytes


@dataclass
class Behaviour:
    """What the server does wrong. Counters count down as they are used."""

    # Answer MAIL with temp_fail_reply for the next N transactions.
    temp_fail: int = 0
    temp_fail_reply: str = "451 4.3.0 Temporary local problem - please try later"
    # RCPT address (lower case) -> reply, e.g. "550 5.1.1 <x>: Recipient address rejected"
    reject_recipients: dict[str, str] = field(default_factory=dict)
    # RCPT address (lower case) -> raw bytes sent as the first line(s) of its
    # multi-line reply, before the line from reject_recipients; e.g.
    # b"550-\xff\xfe binary" for a relay that answers in anything but text.
    raw_reply_lines: dict[str, bytes] = field(default_factory=dict)
    # Replaces "250 ..." after the data of the next N messages.
    data_reply: str = "554 5.7.1 Message rejected"
    data_fail: int = 0
    # Answer nothing for stall_seconds at MAIL or after the DATA of the next N messages.
    stall_at: str = "DATA"
    stall: int = 0
    stall_seconds: float = 5.0
    # Close the connection when the next N MAIL commands arrive.
    drop_at_mail: int = 0
    # Close the connection after reading the next N messages' data, without answering.
    drop_after_data: int = 0
    # Close the connection when the next N DATA commands arrive (before any data).
    drop_at_data_command: int = 0
    # Answer the next N DATA commands (before any data) with data_command_reply.
    data_command_fail: int = 0
    data_command_reply: str = "554 5.5.1 Error: no valid recipients"
    # Sleep this long before answering each message's data.
    data_delay: float = 0.0


class _Handler:
    def __init__(self, server: SmtpServer) -> None:
        self.server = server

    async def handle_MAIL(
        self, smtp: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        behaviour = self.server.behaviour
        if self.server._take("drop_at_mail"):
            return await _drop(smtp)
        if behaviour.stall_at == "MAIL" and self.server._take("stall"):
            await asyncio.sleep(behaviour.stall_seconds)
        if self.server._take("temp_fail"):
            reply = behaviour.temp_fail_reply
            if reply.startswith("421"):
                # A relay that says 421 closes the connection right after.
                await smtp.push(reply)
                return await _drop(smtp)
            return reply
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(
        self, smtp: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        reply = self.server.behaviour.reject_recipients.get(address.lower())
        if reply is not None:
            raw = self.server.behaviour.raw_reply_lines.get(address.lower())
            if raw is not None:
                await smtp.push(raw)
            return reply
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, smtp: SMTP, session: Session, envelope: Envelope) -> str:
        behaviour = self.server.behaviour
        if self.server._take("drop_after_data"):
            return await _drop(smtp)
        if behaviour.stall_at == "DATA" and self.server._take("stall"):
            await asyncio.sleep(behaviour.stall_seconds)
        if behaviour.data_delay:
            await asyncio.sleep(behaviour.data_delay)
        if self.server._take("data_fail"):
            return behaviour.data_reply
        assert envelope.mail_from is not None
        assert isinstance(envelope.original_content, bytes)
        with self.server._lock:
            self.server.received.append(
                Received(
                    envelope.mail_from,
                    tuple(envelope.rcpt_tos),
                    tuple(envelope.mail_options),
                    envelope.original_content,
                )
            )
            number = len(self.server.received)
        return f"250 2.0.0 Ok: queued as TEST{number:05d}"


class _PipeliningHandler(_Handler):
    async def handle_EHLO(
        self, smtp: SMTP, session: Session, envelope: Envelope, hostname: str, responses: list[str]
    ) -> list[str]:
        # With this hook aiosmtpd leaves remembering the EHLO name to it.
        session.host_name = hostname
        return [*responses[:-1], "250-PIPELINING", responses[-1]]


@dataclass
class Transcript:
    """One connection as the server saw it: ("client", bytes read) and ("server", reply)."""

    events: list[tuple[str, bytes]] = field(default_factory=list)

    def client_bytes(self) -> bytes:
        return b"".join(data for side, data in self.events if side == "client")

    def turns(self) -> list[bytes]:
        """What the client sent between two waits for the server, in order."""
        turns: list[bytes] = []
        previous = "server"
        for side, data in self.events:
            if side == "client":
                if previous == "server":
                    turns.append(b"")
                turns[-1] += data
            previous = side
        return turns


async def _drop(smtp: SMTP) -> str:
    assert smtp.transport is not None
    smtp.transport.close()
    # Closing cancels the session's task, and with it this wait.
    await asyncio.sleep(3600)
    raise AssertionError("unreachable")


class _RecordingSMTP(SMTP):
    """aiosmtpd's SMTP session, counting connections as they open and close."""

    def __init__(self, server: SmtpServer, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._server = server

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self.transport is None
        super().connection_made(transport)
        if first:  # STARTTLS calls this a second time for the same connection
            self._server._opened(self)

    def connection_lost(self, error: Exception | None) -> None:
        self._server._closed(self)
        super().connection_lost(error)

    def data_received(self, data: bytes) -> None:
        self._server._record(self, "client", data)
        super().data_received(data)

    async def push(self, status: Any) -> None:
        line = status.encode("utf-8", "surrogateescape") if isinstance(status, str) else status
        self._server._record(self, "server", line)
        await super().push(status)

    async def smtp_DATA(self, arg: str) -> None:
        if self._server._take("drop_at_data_command"):
            await _drop(self)
        if self._server._take("data_command_fail"):
            await self.push(self._server.behaviour.data_command_reply)
            return
        await super().smtp_DATA(arg)


class _Controller(Controller):
    def __init__(self, server: SmtpServer, port: int, **kwargs: Any) -> None:
        super().__init__(server._handler, hostname=HOSTNAME, port=port, **kwargs)
        self._server = server

    def factory(self) -> SMTP:
        return _RecordingSMTP(self._server, self.handler, **self.SMTP_kwargs)

    def _trigger_server(self) -> None:
        # Bound to port 0: learn the real port before the controller's self-test.
        assert isinstance(self.server, asyncio.Server)
        self.port = self.server.sockets[0].getsockname()[1]
        super()._trigger_server()  # type: ignore[no-untyped-call]


class SmtpServer:
    """An in-process SMTP server on 127.0.0.1 and a free port (or *port*)."""

    def __init__(
        self, *, port: int = 0, pipelining: bool = False, record: bool = False, **smtp_kwargs: Any
    ) -> None:
        self.behaviour = Behaviour()
        self.received: list[Received] = []
        self.connections = 0  # opened since start()
        self.max_parallel = 0  # most connections open at the same time
        self.record = record
        # With record=True: one per connection opened since start(), in order.
        self.transcripts: list[Transcript] = []
        self._transcript_of: dict[_RecordingSMTP, Transcript] = {}
        self._live: set[_RecordingSMTP] = set()
        self._lock = threading.Lock()
        self._handler = _PipeliningHandler(self) if pipelining else _Handler(self)
        smtp_kwargs.setdefault("server_hostname", "mx.test.invalid")
        self._controller = _Controller(self, port, **smtp_kwargs)

    @property
    def host(self) -> str:
        return HOSTNAME

    @property
    def port(self) -> int:
        return int(self._controller.port)

    def start(self) -> None:
        self._controller.start()
        self.reset()  # forget the controller's own self-test connection

    def stop(self) -> None:
        # Close sessions first: the loop is closed right after it stops.
        self.close_connections()
        self._controller.stop()

    def reset(self) -> None:
        with self._lock:
            self.connections = 0
            self.max_parallel = len(self._live)
            self.received.clear()
            self.transcripts.clear()
            self._transcript_of.clear()

    def close_connections(self) -> None:
        """Close every open session from the server side (as an idle timeout would)."""
        loop = self._controller.loop
        if loop.is_closed() or not loop.is_running():
            return

        async def close_all() -> None:
            for session in list(self._live):
                if session.transport is not None:
                    session.transport.close()
            # Give connection_lost callbacks a turn.
            for _ in range(10):
                await asyncio.sleep(0)

        asyncio.run_coroutine_threadsafe(close_all(), loop).result(timeout=5)

    @property
    def open_connections(self) -> int:
        with self._lock:
            return len(self._live)

    def _take(self, counter: str) -> bool:
        """Use one unit of a countdown in :attr:`behaviour`; False when none is left."""
        with self._lock:
            left = getattr(self.behaviour, counter)
            if left <= 0:
                return False
            setattr(self.behaviour, counter, left - 1)
            return True

    def _opened(self, session: _RecordingSMTP) -> None:
        with self._lock:
            self.connections += 1
            self._live.add(session)
            self.max_parallel = max(self.max_parallel, len(self._live))

    def _record(self, session: _RecordingSMTP, side: str, data: bytes) -> None:
        if not self.record:
            return
        with self._lock:
            transcript = self._transcript_of.get(session)
            if transcript is None:
                transcript = self._transcript_of[session] = Transcript()
                self.transcripts.append(transcript)
            transcript.events.append((side, data))

    def _closed(self, session: _RecordingSMTP) -> None:
        with self._lock:
            self._live.discard(session)


def make_server(
    *,
    port: int = 0,
    tls_context: ssl.SSLContext | None = None,
    pipelining: bool = False,
    record: bool = False,
    **smtp_kwargs: Any,
) -> SmtpServer:
    """A started server; *tls_context* offers STARTTLS with that context."""
    if tls_context is not None:
        smtp_kwargs["tls_context"] = tls_context
    server = SmtpServer(port=port, pipelining=pipelining, record=record, **smtp_kwargs)
    server.start()
    return server


def server_on(port: int) -> SmtpServer:
    """A started server on a given port (the relay coming back where it was)."""
    return make_server(port=port)


def free_port() -> int:
    """A port on 127.0.0.1 where nothing listens (right now)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOSTNAME, 0))
        return int(sock.getsockname()[1])


ServerFactory = Callable[..., SmtpServer]


def smtp_settings(server: SmtpServer, **overrides: Any) -> SmtpSettings:
    """Settings for the transport to talk plain SMTP to *server*, with short timeouts."""
    values: dict[str, Any] = {
        "host": server.host,
        "port": server.port,
        "security": "none",
        "timeout": 2,
        "local_hostname": "client.test.invalid",
    }
    values.update(overrides)
    return SmtpSettings(**values)


def smtp_env(port: int, **overrides: object) -> dict[str, str]:
    """Environment that points the shipped settings at a plain SMTP server on 127.0.0.1.

    Retries are short, so a test of a failing relay takes a second, not minutes.
    *overrides* are ``section__key=value`` pairs, e.g. ``smtp__timeout=1``.
    """
    env = {
        "INVITE_MAILER_TRANSPORT__KIND": "smtp",
        "INVITE_MAILER_SMTP__HOST": HOSTNAME,
        "INVITE_MAILER_SMTP__PORT": str(port),
        "INVITE_MAILER_SMTP__SECURITY": "none",
        "INVITE_MAILER_SMTP__TIMEOUT": "5",
        "INVITE_MAILER_LIMITS__RETRY_INITIAL_SECONDS": "0.05",
        "INVITE_MAILER_LIMITS__RETRY_MAX_SECONDS": "0.4",
        "INVITE_MAILER_LIMITS__RETRY_IN_PASS_SECONDS": "15",
    }
    for key, value in overrides.items():
        env[f"INVITE_MAILER_{key.upper()}"] = str(value)
    return env
