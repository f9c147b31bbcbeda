"""Where finished mails go: an SMTP relay, or an outbox folder of ``.eml`` files.

Both transports take a :class:`~invite_mailer.mail.mime.Wire` (the bytes the one
mail builder made) and an envelope, nothing else, so what an organiser
inspected with ``preview`` is what goes out; with ``[dkim]`` set they sign
each mail last (``preview`` signs the same way).
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import logging
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Protocol, Self

from invite_mailer.delivery.handover import Handover, mark_handover, track_handover
from invite_mailer.delivery.ratelimit import Quotas, RateLimiter, SendJournal
from invite_mailer.delivery.smtp_pool import SmtpPool
from invite_mailer.errors import SetupFailure, UncertainFailure
from invite_mailer.inputs.settings import Settings, SmtpSettings, TransportKind
from invite_mailer.mail.mime import Wire
from invite_mailer.mail.signing import DkimSigner

log = logging.getLogger(__name__)

__all__ = [
    "Handover",
    "OutboxTransport",
    "SmtpTransport",
    "Transport",
    "UncertainFailure",
    "make_transport",
    "outbox_name",
    "track_handover",
]


class Transport(Protocol):
    """Sends one mail at a time; used as an async context manager."""

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

    async def send(self, wire: Wire, *, sender: str, recipients: Sequence[str]) -> str:
        """Hand *wire* to *recipients*; return the final answer, e.g. ``250 2.0.0 Ok``.

        Raises :class:`~invite_mailer.errors.TemporaryFailure` (4xx, lost
        connection, timeout; its subclass :class:`UncertainFailure` when the data
        went out but no answer came, and
        :class:`~invite_mailer.errors.SetupFailure` when nothing can be sent as
        set up: TLS, login, the outbox folder) or
        :class:`~invite_mailer.errors.PermanentFailure` (5xx for this message).
        Calls :func:`~invite_mailer.delivery.handover.mark_handover` the moment the
        message's bytes start to leave.
        """
        ...


class OutboxTransport:
    """Writes each message to ``<directory>/<Message-ID>.eml`` and sends nothing."""

    def __init__(self, directory: Path, *, signer: DkimSigner | None = None) -> None:
        self.directory = Path(directory)
        self.signer = signer

    async def __aenter__(self) -> Self:
        try:
            await asyncio.to_thread(self.directory.mkdir, parents=True, exist_ok=True)
        except OSError as exc:
            raise _outbox_failure(self.directory, exc) from exc
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None

    async def send(self, wire: Wire, *, sender: str, recipients: Sequence[str]) -> str:
        if self.signer is not None:
            wire = self.signer.sign(wire)
        return await self._write(self.directory / f"{outbox_name(wire)}.eml", wire.data)

    async def _write(self, path: Path, data: bytes) -> str:
        # A thread cannot be stopped half-way: when the send is cancelled, the
        # write still ends, so that whether the file exists is known.
        write = asyncio.ensure_future(asyncio.to_thread(_write_atomically, path, data))
        try:
            await asyncio.shield(write)
        except asyncio.CancelledError:
            await asyncio.wait([write])
            if not write.cancelled() and write.exception() is None:
                # Stopped while the file was being written, and it is there: the
                # mail has gone out, and saying so beats leaving it uncertain.
                task = asyncio.current_task()
                if task is not None:
                    task.uncancel()
                return f"250 written to {path}"
            if not write.cancelled() and write.exception() is not None:
                # Retrieved, or asyncio logs it with a traceback when the task
                # is collected; the mail is pending again either way.
                log.debug("outbox write after cancellation failed: %s", write.exception())
            raise
        except OSError as exc:
            if exc.errno in _OUTBOX_UNUSABLE:
                raise _outbox_failure(self.directory, exc) from exc
            raise  # something in the way of this one file, e.g. a folder of its name
        return f"250 written to {path}"


# The outbox folder as a whole cannot take files: no message is at fault.
_OUTBOX_UNUSABLE = {
    errno.ENOSPC,
    errno.EDQUOT,
    errno.EROFS,
    errno.EACCES,
    errno.EPERM,
    errno.ENOENT,
    errno.ENOTDIR,
    errno.EFBIG,
    errno.EIO,
}


def _outbox_failure(directory: Path, exc: OSError) -> SetupFailure:
    return SetupFailure(
        f"cannot write to the outbox folder {directory}: {type(exc).__name__}: "
        f"{exc.strerror or exc}",
        hint="free disk space, or make transport.outbox_dir a writable folder",
        temporary=exc.errno in _OUTBOX_PASSING,
    )


# Of those, the ones that may pass without a change to the setup.
_OUTBOX_PASSING = {errno.ENOSPC, errno.EDQUOT, errno.EIO}


_UNSAFE = re.compile(r"[^A-Za-z0-9._@+=-]")


def outbox_name(wire: Wire) -> str:
    """A stable file name: the sanitised Message-ID, else a hash of the bytes."""
    name = _UNSAFE.sub("_", wire.message_id.strip().strip("<>")).lstrip(".")[:200]
    return name or hashlib.sha256(wire.data).hexdigest()[:32]


def _write_atomically(path: Path, data: bytes) -> None:
    # A reader (or a crash) sees the old file or the whole new one, never a part.
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    mark_handover()  # the file is there: the message has gone out
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # make the rename itself durable
    finally:
        os.close(directory)


class SmtpTransport:
    """Sends through an SMTP relay over a pool of reused connections, rate limited."""

    def __init__(
        self,
        settings: SmtpSettings,
        *,
        limiter: RateLimiter | Quotas | None = None,
        signer: DkimSigner | None = None,
    ) -> None:
        self.settings = settings
        self.signer = signer
        if limiter is None:
            quotas = Quotas(settings.rate_per_minute, settings.rate_per_hour, settings.rate_per_day)
            limiter = quotas if quotas else None
        self.limiter = limiter
        self._pool: SmtpPool | None = None

    @property
    def connections_opened(self) -> int:
        return self._pool.connections_opened if self._pool is not None else 0

    def check_quota(self) -> None:
        """Raise QuotaReached when an hour's or a day's quota allows no mail for now."""
        if isinstance(self.limiter, Quotas):
            self.limiter.check()

    async def share_rate_limit(self, journal: SendJournal) -> None:
        """Count the rate limit in *journal* (the ledger) too, across processes."""
        if self.limiter is not None:
            await self.limiter.share(journal)

    async def __aenter__(self) -> Self:
        # Connections open lazily on the first send, so entering never fails
        # just because the relay is down for a moment.
        self._pool = SmtpPool(self.settings, limiter=self.limiter)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()
        if self.limiter is not None:
            await self.limiter.flush()

    async def send(self, wire: Wire, *, sender: str, recipients: Sequence[str]) -> str:
        if self._pool is None:
            raise RuntimeError("use the transport as 'async with transport:' before sending")
        if not recipients:
            raise ValueError("no recipients given")
        if self.signer is not None:
            wire = self.signer.sign(wire)
        return await self._pool.send(sender, list(recipients), wire.data)


def make_transport(settings: Settings) -> Transport:
    """The transport the settings ask for, signing with DKIM when ``[dkim]`` says so."""
    signer = DkimSigner.from_settings(settings)
    if settings.transport.kind is TransportKind.SMTP:
        return SmtpTransport(settings.smtp, signer=signer)
    return OutboxTransport(settings.transport.outbox_dir, signer=signer)
