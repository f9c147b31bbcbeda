"""Batched ledger writes with a bounded window of mails in flight.

A delivery pass does not commit each claim and each outcome on its own: the
senders hand them to a :class:`LedgerWindow`, which writes whatever has
gathered in one transaction on the ledger's thread (outcomes first, then
claims). A sender waits for its claim to be committed before the mail goes
to the relay, as before; an outcome is queued and committed with the next
batch, at the latest *interval* seconds later (or at once when *max_rows*
have gathered, a claim is waiting, or the window is full).

The window is the number of mails claimed whose outcome is not committed
yet. It never exceeds *size*: a sender that would claim one more waits until
outcomes are committed. A crash (SIGKILL, a power cut after the last
commit) can therefore leave at most *size* mails ``sending`` (uncertain at
the next start, and sent again), and only those of them that the relay had
already accepted arrive twice. The default size is twice the number of
connections: each sender's next claim shares a commit with its previous
outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from invite_mailer.delivery.ledger import Claim, Finish, Ledger
from invite_mailer.delivery.records import DeliveryKey
from invite_mailer.errors import LedgerError

__all__ = ["DEFAULT_INTERVAL", "DEFAULT_MAX_ROWS", "LedgerWindow", "default_size"]

log = logging.getLogger("invite_mailer.delivery.window")

DEFAULT_INTERVAL = 0.005  # seconds an outcome may wait for company in its commit
DEFAULT_MAX_ROWS = 256  # outcomes that are committed at once without waiting


def default_size(connections: int) -> int:
    """The window for *connections* senders when the settings name none."""
    return 2 * max(connections, 1)


class LedgerWindow:
    """Claims and outcomes of one pass, committed in batches; at most *size* in flight.

    Use as an async context manager (or call :meth:`aclose`): leaving it
    commits every outcome queued so far.
    """

    def __init__(
        self,
        ledger: Ledger,
        size: int,
        *,
        interval: float = DEFAULT_INTERVAL,
        max_rows: int = DEFAULT_MAX_ROWS,
    ) -> None:
        if size < 1:
            raise ValueError(f"the window must hold at least one mail, not {size}")
        self.ledger = ledger
        self.size = size
        self.interval = interval
        self.max_rows = max_rows
        self.in_flight = 0  # claimed (or being claimed), outcome not committed
        self.peak = 0  # the most in flight at once, for tests and logs
        self.batches = 0
        self._claims: list[tuple[Claim, asyncio.Future[bool]]] = []
        self._finishes: list[Finish] = []
        self._open: set[DeliveryKey] = set()  # claimed, no outcome queued yet
        self._error: LedgerError | None = None
        self._wake = asyncio.Event()  # something is queued
        self._urgent = asyncio.Event()  # ... and must not wait for company
        self._room = asyncio.Condition()  # notified after every batch
        self._closing = False
        self._waiting = 0  # claims waiting for room in the window
        self._writer: asyncio.Task[None] | None = None
        self._writing: asyncio.Future[None] | None = None  # the batch being written

    async def __aenter__(self) -> LedgerWindow:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def holds(self, key: DeliveryKey) -> bool:
        """Whether *key* is claimed here and still waits for its outcome."""
        return key in self._open

    async def claim(self, claim: Claim) -> bool:
        """Claim one mail; True once the claim is committed and the mail may go out.

        Waits while the window is full. False when the delivery is not
        claimable (sent, failed, in flight) or, with ``unless_opted_out``, the
        address has opted out; then nothing is held. Raises the LedgerError
        of a failed batch: after it no further mail may go out.
        """
        claim.params()  # a naive time fails here, in the sender, not in the batch
        async with self._room:
            while self.in_flight >= self.size and self._error is None:
                self._waiting += 1
                try:
                    if self._finishes:
                        self._hurry()  # the outcomes queued make room
                    await self._room.wait()
                finally:
                    self._waiting -= 1
            if self._error is not None:
                raise self._error
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
        granted: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._claims.append((claim, granted))
        self._hurry()
        try:
            # Shielded: a sender stopped meanwhile still learns whether its
            # mail is claimed (and gives it back), see Dispatcher._deliver.
            return await asyncio.shield(granted)
        except asyncio.CancelledError:
            await asyncio.wait([granted])
            if not granted.cancelled():
                granted.exception()  # seen: the sender stops either way
            raise

    def finish(self, outcome: Finish) -> None:
        """Queue the outcome of a mail claimed here; committed with the next batch."""
        key = outcome.key
        if key not in self._open:
            raise LedgerError(
                f"cannot mark {key} as {outcome.state}: it is not claimed in this pass"
            )
        outcome.params()  # a naive time fails here, in the sender, not in the batch
        self._open.discard(key)
        self._finishes.append(outcome)
        if len(self._finishes) >= self.max_rows or self._waiting:
            self._hurry()
        else:
            self._wake.set()
            self._start()

    async def flush(self) -> None:
        """Commit everything queued so far; raises the LedgerError of a failed batch."""
        while (self._claims or self._finishes) and self._error is None:
            await self._write()
        if self._error is not None:
            raise self._error

    async def aclose(self) -> None:
        """Commit every outcome queued so far and stop the writer."""
        self._closing = True
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.cancel()
            await asyncio.wait([writer])
        if self._writing is not None:
            await asyncio.wait([self._writing])
        if self._error is not None and not self._claims:
            # One more try for the outcomes of a failed batch (a full disk may pass).
            self._error = None
        await self.flush()

    def _hurry(self) -> None:
        self._urgent.set()
        self._wake.set()
        self._start()

    def _start(self) -> None:
        if self._writer is None and not self._closing:
            self._writer = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            if not self._urgent.is_set():
                # Only outcomes: let a few milliseconds' worth share one commit.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._urgent.wait(), self.interval)
            else:
                # One turn of the event loop: senders ready to run add theirs.
                await asyncio.sleep(0)
            self._wake.clear()
            self._urgent.clear()
            # Shielded: a batch on the ledger's thread always reports back.
            self._writing = asyncio.ensure_future(self._write())
            await asyncio.shield(self._writing)

    async def _write(self) -> None:
        claims, self._claims = self._claims, []
        finishes, self._finishes = self._finishes, []
        if not claims and not finishes:
            return
        try:
            granted = await self.ledger.apply(finishes, [claim for claim, _ in claims])
        except LedgerError as exc:
            self._failed(exc, claims, finishes)
        except Exception as exc:
            # A bug must not leave the senders waiting for ever: it stops the pass.
            log.exception("could not write a batch to the ledger")
            self._failed(LedgerError(f"could not write to the ledger: {exc!r}"), claims, finishes)
        else:
            self.batches += 1
            self.in_flight -= len(finishes)
            for (claim, future), ok in zip(claims, granted, strict=True):
                if ok:
                    self._open.add(claim.key)
                else:
                    self.in_flight -= 1
                future.set_result(ok)
        async with self._room:
            self._room.notify_all()

    def _failed(
        self,
        exc: LedgerError,
        claims: list[tuple[Claim, asyncio.Future[bool]]],
        finishes: list[Finish],
    ) -> None:
        # Nothing of the batch was written: its claims never held, and its
        # outcomes are tried again with the next batch and on closing (a full
        # disk may pass); until then those mails stay 'sending', uncertain
        # after a crash.
        # Reported once, by whoever runs the pass (it halts on this error).
        log.debug(
            "could not record %d outcome(s) and %d claim(s): %s", len(finishes), len(claims), exc
        )
        self._error = exc
        self._finishes[:0] = finishes
        self.in_flight -= len(claims)
        for _, future in claims:
            future.set_exception(exc)
