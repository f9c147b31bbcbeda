"""A small pool of reusable aiosmtplib connections, and what their errors mean.

One :class:`aiosmtplib.SMTP` client carries one mail transaction at a time, so
parallel sending needs several clients. Each is connected lazily, reused for
many messages, and opened again when the relay has dropped it.

A failure is only retried here, once, when it is certain that nothing was
delivered: the relay dropped a connection that had been lying idle, before the
message data went out. Every other failure is raised to the caller as
:class:`~invite_mailer.errors.TemporaryFailure` or
:class:`~invite_mailer.errors.PermanentFailure`; a failure after the data went
out, with no answer from the relay, is an :class:`UncertainFailure`.

One mail transaction (lock-step, or pipelined where the relay offers it) is
:mod:`~invite_mailer.delivery.smtp_transaction`, whose commands go onto the
wire through :mod:`~invite_mailer.delivery.smtp_wire`; what the relay's
answers mean is in :mod:`~invite_mailer.delivery.answers`.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Sequence

import aiosmtplib
from aiosmtplib import (
    SMTPAuthenticationError,
    SMTPException,
    SMTPResponseException,
)

from invite_mailer.delivery.answers import cause_of, failure_from_response, plain, response_text
from invite_mailer.delivery.cancellation import raise_lost_cancellation
from invite_mailer.delivery.handover import check_fence
from invite_mailer.delivery.ratelimit import Quotas, RateLimiter
from invite_mailer.delivery.smtp_transaction import Phase, Transaction, exchange
from invite_mailer.errors import (
    PermanentFailure,
    SenderRefused,
    SetupFailure,
    TemporaryFailure,
    TransportError,
    UncertainFailure,
)
from invite_mailer.inputs.settings import Security, SmtpSettings

log = logging.getLogger(__name__)

# Seconds to wait for answers to the housekeeping commands (RSET, QUIT).
_HOUSEKEEPING_TIMEOUT = 5.0


class _StaleConnection(Exception):
    """A reused connection was found dead before anything of the message went out."""

    def __init__(self, failure: TransportError) -> None:
        super().__init__(str(failure))
        self.failure = failure


class _Connection:
    """One pooled client and how many messages it carried."""

    __slots__ = ("client", "messages")

    def __init__(self) -> None:
        self.client: aiosmtplib.SMTP | None = None
        self.messages = 0

    @property
    def is_open(self) -> bool:
        return self.client is not None and self.client.is_connected

    def drop(self) -> None:
        """Close without QUIT; for connections in an unknown state."""
        if self.client is not None:
            self.client.close()
        self.client = None
        self.messages = 0

    async def quit(self) -> None:
        client, self.client, self.messages = self.client, None, 0
        if client is None or not client.is_connected:
            return
        sock = client.get_transport_info("socket")
        try:
            await client.quit(timeout=_HOUSEKEEPING_TIMEOUT)
        except (SMTPException, OSError):
            pass
        finally:
            client.close()
        # A TLS connection finishes closing (close_notify) a moment after
        # close(); wait for it, so that stopping the event loop right after a
        # shutdown does not leave a socket open. aiosmtplib offers nothing to
        # await for that, hence the short poll.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 1.0
        while sock is not None and sock.fileno() != -1 and loop.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.005)


def tls_context(settings: SmtpSettings) -> ssl.SSLContext:
    """The context that verifies the relay's certificate (unless told not to)."""
    if not settings.verify_certificates:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    cafile = str(settings.ca_file) if settings.ca_file is not None else None
    return ssl.create_default_context(cafile=cafile)


class SmtpPool:
    """Up to ``max_connections`` clients to one relay, shared by concurrent senders."""

    def __init__(
        self, settings: SmtpSettings, *, limiter: RateLimiter | Quotas | None = None
    ) -> None:
        self.settings = settings
        self.limiter = limiter
        self.connections_opened = 0
        self._all = [_Connection() for _ in range(settings.max_connections)]
        # Last in, first out: a lone sender keeps reusing the connection it just
        # used instead of opening all of them in turn.
        self._idle: asyncio.LifoQueue[_Connection] = asyncio.LifoQueue()
        for connection in self._all:
            self._idle.put_nowait(connection)
        self._tls: ssl.SSLContext | None = None

    @property
    def address(self) -> str:
        return f"{self.settings.host}:{self.settings.port}"

    async def send(self, sender: str, recipients: Sequence[str], data: bytes) -> str:
        """Send *data* (already in wire form) and return the relay's final answer."""
        connection = await self._idle.get()
        try:
            return await self._send_on(connection, sender, recipients, data)
        except TransportError:
            raise  # the connection was already tidied up or dropped
        except BaseException:
            # Cancelled mid-transaction or failed in an unexpected way: the
            # protocol state is unknown, so this connection is not reused.
            connection.drop()
            raise
        finally:
            self._idle.put_nowait(connection)

    async def close(self) -> None:
        """QUIT every open connection."""
        await asyncio.gather(*(connection.quit() for connection in self._all))

    async def _send_on(
        self, connection: _Connection, sender: str, recipients: Sequence[str], data: bytes
    ) -> str:
        limit = self.settings.messages_per_connection
        if limit and connection.messages >= limit and connection.is_open:
            await connection.quit()
        reused = connection.is_open
        if not reused:
            await self._connect(connection)
        # Nothing has left yet: a stop that came with the relay's greeting
        # gives the mail back here instead of waiting for a rate-limit slot.
        raise_lost_cancellation()
        if self.limiter is None:
            return await self._send_once(connection, sender, recipients, data, reused=reused)
        # The slot counts from the relay's answer: see ratelimit.
        async with self.limiter.slot():
            check_fence()  # a wait for the slot can outlast a node's lease
            return await self._send_once(connection, sender, recipients, data, reused=reused)

    async def _send_once(
        self,
        connection: _Connection,
        sender: str,
        recipients: Sequence[str],
        data: bytes,
        *,
        reused: bool,
    ) -> str:
        try:
            return await self._transact(connection, sender, recipients, data, reused=reused)
        except _StaleConnection as stale:
            log.info("connection to %s was closed by the relay; reconnecting", self.address)
            connection.drop()
            await self._connect(connection)
            # No new rate slot: the relay never saw the first try.
            try:
                return await self._transact(connection, sender, recipients, data, reused=False)
            except _StaleConnection:  # pragma: no cover - reused=False never raises it
                raise stale.failure from None

    async def _connect(self, connection: _Connection) -> None:
        settings = self.settings
        if self._tls is None and settings.security is not Security.NONE:
            try:
                self._tls = tls_context(settings)
            except (OSError, ssl.SSLError) as exc:
                # Checked when the settings were loaded; gone or broken since.
                raise SetupFailure(
                    f"cannot load the CA file {settings.ca_file}: {plain(str(exc))}",
                    hint="check smtp.ca_file (a readable PEM file) / smtp.verify_certificates",
                ) from exc
        client = aiosmtplib.SMTP(
            hostname=settings.host,
            port=settings.port,
            username=settings.username or None,
            password=settings.password.get_secret_value() if settings.username else None,
            local_hostname=settings.local_hostname,
            timeout=settings.timeout,
            use_tls=settings.security is Security.TLS,
            start_tls=settings.security is Security.STARTTLS,
            validate_certs=settings.verify_certificates,
            tls_context=self._tls,
        )
        try:
            await client.connect()
        except (SMTPException, OSError, ValueError) as exc:
            client.close()
            # Whatever the code, a refused connection or login is no verdict on
            # a message: it is retried later, never recorded as permanent.
            raise self._connect_failure(exc) from exc
        connection.client = client
        connection.messages = 0
        self.connections_opened += 1
        log.debug("connected to %s (%d opened so far)", self.address, self.connections_opened)

    def _connect_failure(self, exc: BaseException) -> TemporaryFailure:
        """What a failed connect means; setup problems stop the whole pass."""
        code = exc.code if isinstance(exc, SMTPResponseException) else None
        text = response_text(exc)
        settings = self.settings
        if isinstance(exc, SMTPAuthenticationError):
            return SetupFailure(
                f"authentication failed ({text}) at {self.address} as {settings.username!r}",
                code=code,
                hint="check smtp.username and the password in INVITE_MAILER_SMTP__PASSWORD",
            )
        if isinstance(cause_of(exc, ssl.SSLCertVerificationError), ssl.SSLCertVerificationError):
            return SetupFailure(
                f"could not connect to {self.address}: TLS certificate verification failed: {text}",
                hint="check smtp.ca_file / smtp.verify_certificates and smtp.host "
                "(the name must match the certificate)",
            )
        if isinstance(cause_of(exc, ssl.SSLError), ssl.SSLError):
            return SetupFailure(
                f"could not connect to {self.address}: TLS failed: {text}",
                hint='check smtp.security ("tls" for port 465, "starttls" for 587) and smtp.port',
            )
        if isinstance(exc, SMTPException) and "STARTTLS extension not supported" in exc.message:
            # Also what an attacker stripping STARTTLS from the greeting looks like.
            return SetupFailure(
                f"{self.address} does not offer STARTTLS; nothing was sent unencrypted",
                hint='check smtp.port and smtp.security ("tls" for port 465); never switch '
                'to "none" for a relay outside this host',
            )
        if isinstance(exc, SMTPException) and "AUTH extension is not supported" in exc.message:
            return SetupFailure(
                f"{self.address} does not offer AUTH, but smtp.username is set",
                hint="leave smtp.username empty for a relay without login, or check "
                "smtp.security: many relays offer AUTH only after STARTTLS",
            )
        return TemporaryFailure(f"could not connect to {self.address}: {text}", code=code)

    async def _transact(
        self,
        connection: _Connection,
        sender: str,
        recipients: Sequence[str],
        data: bytes,
        *,
        reused: bool,
    ) -> str:
        """One mail transaction on *connection*; the relay's final answer as text."""
        client = connection.client
        assert client is not None
        tx = Transaction()
        try:
            response = await exchange(client, tx, sender, recipients, data)
        except PermanentFailure:
            await self._reset(connection)
            raise
        except ValueError as exc:
            # aiosmtplib refuses addresses it cannot put on the wire safely.
            await self._reset(connection)
            raise PermanentFailure(f"invalid address: {exc}") from exc
        except SMTPResponseException as exc:
            raise await self._answered(connection, client, tx, exc) from exc
        except (SMTPException, OSError) as exc:
            connection.drop()
            raise self._lost(tx, exc, reused=reused) from exc
        connection.messages += 1
        if tx.refused or tx.unsendable:
            log.warning(
                "%s refused some recipients: %s",
                self.address,
                "; ".join(
                    [
                        *(f"{exc.recipient}: {response_text(exc)}" for exc in tx.refused),
                        *tx.unsendable,
                    ]
                ),
            )
        return plain(f"{response.code} {response.message}")

    async def _answered(
        self,
        connection: _Connection,
        client: aiosmtplib.SMTP,
        tx: Transaction,
        exc: SMTPResponseException,
    ) -> TransportError:
        """What the relay's refusal means, with the connection tidied up for reuse."""
        if exc.code == 421 or not client.is_connected:
            connection.drop()  # 421: the relay is closing this connection
        else:
            await self._reset(connection)
        if tx.written.started and not 400 <= exc.code <= 599:
            return self._uncertain(exc)
        if tx.phase is Phase.MAIL and 500 <= exc.code <= 599 and exc.code != 552:
            # 552 at MAIL is "message too large" (SIZE=): this message only.
            return SenderRefused(response_text(exc), code=exc.code)
        return failure_from_response(exc)

    def _lost(
        self, tx: Transaction, exc: SMTPException | OSError, *, reused: bool
    ) -> TransportError | _StaleConnection:
        """What a broken connection means for the message in flight."""
        if tx.written.started:
            return self._uncertain(exc)
        failure = TemporaryFailure(
            f"connection to {self.address} failed at {tx.phase}: {response_text(exc)}"
        )
        if reused and isinstance(exc, ConnectionError):
            return _StaleConnection(failure)
        return failure

    def _uncertain(self, exc: BaseException) -> UncertainFailure:
        return UncertainFailure(
            f"no valid answer from {self.address} after the message data was sent "
            f"(it may have been delivered): {response_text(exc)}"
        )

    async def _reset(self, connection: _Connection) -> None:
        """Clear the envelope after a refusal so the connection can be reused."""
        client = connection.client
        if client is None or not client.is_connected:
            connection.drop()
            return
        try:
            await client.rset(timeout=_HOUSEKEEPING_TIMEOUT)
        except (SMTPException, OSError):
            connection.drop()
