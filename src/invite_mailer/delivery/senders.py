"""The concurrent senders of one delivery pass and the queue they share.

The dispatcher decides what happens to one mail; this module only runs those
decisions side by side, puts a mail that may be retried within the pass back
into the queue after its delay, and on a stop lets the sends whose data is
already out finish while every other one gives its mail back at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from invite_mailer.core.forecast import priority
from invite_mailer.core.plan import Mailing
from invite_mailer.delivery.cancellation import raise_lost_cancellation
from invite_mailer.delivery.handover import Handover
from invite_mailer.delivery.results import Outcome, PassResult, ProgressCallback
from invite_mailer.errors import InviteMailerError, LedgerError

__all__ = ["Deliver", "Item", "SenderPool", "by_priority", "log_counts", "log_start"]

# Logged as the dispatcher, whose pass this runs.
log = logging.getLogger("invite_mailer.delivery.dispatch")


@dataclass(frozen=True, slots=True)
class Item:
    """One mail of the pass: a mailing, a recipient's key and which try this is."""

    mailing: Mailing
    key: str
    attempt: int = 1


# Sends one mail (item, the pass's time now, its result, its start on the
# clock); returns the outcome and, for a retry within the pass, the delay.
Deliver = Callable[[Item, datetime, PassResult, float], Awaitable[tuple[Outcome, float | None]]]


class SenderPool:
    """Runs *deliver* for every item with up to *workers* senders at a time.

    The pass has finished when every mail has had its last attempt, or when
    *stop* is set. *handovers* tells, for a sender's task, whether the mail
    in its hands has begun to leave.
    """

    def __init__(
        self,
        items: list[Item],
        result: PassResult,
        now: datetime,
        *,
        deliver: Deliver,
        halt: Callable[[InviteMailerError], None],
        stop: asyncio.Event,
        workers: int,
        clock: Callable[[], float],
        on_progress: ProgressCallback | None,
        handovers: Mapping[asyncio.Task[object], Handover],
        drain_timeout: float,
    ) -> None:
        self.items = items
        self.result = result
        self.deliver = deliver
        self.halt = halt
        self.stop = stop
        self.workers = workers
        self.clock = clock
        self.on_progress = on_progress
        self.handovers = handovers
        self.drain_timeout = drain_timeout
        self.started = clock()
        self._now_utc, self._zone = now.astimezone(UTC), now.tzinfo
        self._queue: asyncio.Queue[Item] = asyncio.Queue()
        for item in items:
            self._queue.put_nowait(item)
        self._remaining = len(items)
        self._finished = asyncio.Event()
        self._delayed: set[asyncio.Task[object]] = set()
        self._busy: set[asyncio.Task[object]] = set()  # senders with a mail in hand
        self._draining = False

    def now(self) -> datetime:
        """The pass's start time plus the time elapsed on *clock*."""
        elapsed = timedelta(seconds=self.clock() - self.started)
        # Elapsed time is added in UTC (same-zone aware arithmetic is wall-clock).
        return (self._now_utc + elapsed).astimezone(self._zone)

    async def run(self) -> None:
        """Send every mail of the pass; on a stop, let the mails already out finish."""
        tasks: list[asyncio.Task[object]] = [
            asyncio.create_task(self._sender()) for _ in range(min(self.workers, len(self.items)))
        ]
        stop_wait: asyncio.Task[object] = asyncio.create_task(self.stop.wait())
        finish_wait: asyncio.Task[object] = asyncio.create_task(self._finished.wait())
        try:
            await asyncio.wait({stop_wait, finish_wait}, return_when=asyncio.FIRST_COMPLETED)
            if self.stop.is_set():
                await self._wind_down()
        finally:
            pending: list[asyncio.Task[object]] = [*tasks, stop_wait, finish_wait, *self._delayed]
            for waiter in pending:
                waiter.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    def drain(self) -> None:
        """Take no further mail: the senders finish the mails in hand, the rest stays
        for a later pass (a relay's quota is full). Not a stop: nothing is cut off."""
        self._draining = True
        while not self._queue.empty():
            self._queue.get_nowait()
            self._done_one()

    async def _wind_down(self) -> None:
        # Let sends whose data is out finish and be recorded; the others
        # (waiting for a connection or a rate-limit slot, connecting)
        # stop at once and give their mail back. Take nothing new.
        self.result.stopped = True
        for task in self._delayed:
            task.cancel()
        for task in self._busy:
            handover = self.handovers.get(task)
            if handover is None or not handover.started:
                task.cancel()
        # Idle senders wait on the queue for ever: wait for the busy ones only.
        if self._busy:
            await asyncio.wait(set(self._busy), timeout=self.drain_timeout)

    async def _sender(self) -> None:
        while not self.stop.is_set():
            item = await self._queue.get()
            if self.stop.is_set():
                self._done_one()
                return
            me = asyncio.current_task()
            assert me is not None
            self._busy.add(me)
            try:
                outcome, delay = await self._attempt(item)
            finally:
                self._busy.discard(me)
            self._record(item, outcome, delay)
            # A stop that came with the relay's answer: this mail is recorded,
            # the next one is not taken.
            raise_lost_cancellation()

    async def _attempt(self, item: Item) -> tuple[Outcome, float | None]:
        try:
            return await self.deliver(item, self.now(), self.result, self.started)
        except LedgerError as exc:
            # Nothing can be recorded: no further mail may go out.
            self.halt(exc)
            return Outcome.RETRY, None
        except Exception:
            # A bug must not hang the pass: the other mails go on,
            # this one is left to a later pass.
            log.exception("mailing %s: unexpected error", item.mailing.id)
            return Outcome.RETRY, None

    def _record(self, item: Item, outcome: Outcome, delay: float | None) -> None:
        if outcome is Outcome.RETRY and delay is not None:
            # Counted at its last attempt; the outcome is listed (at zero) meanwhile.
            self.result.mailings[item.mailing.id].counts[outcome] += 0
            retry = Item(item.mailing, item.key, item.attempt + 1)
            task = asyncio.create_task(self._requeue_later(retry, delay))
            self._delayed.add(task)
            task.add_done_callback(self._delayed.discard)
            return
        self.result.mailings[item.mailing.id].counts[outcome] += 1
        if self.on_progress is not None:
            self.on_progress(item.mailing, item.key, outcome)
        self._done_one()

    async def _requeue_later(self, item: Item, delay: float) -> None:
        try:
            await asyncio.sleep(delay)
        except asyncio.CancelledError:
            self._retry_later(item)  # the pass stops
            raise
        if self.stop.is_set() or self._draining:
            self._retry_later(item)
        else:
            self._queue.put_nowait(item)

    def _retry_later(self, item: Item) -> None:
        """Not tried again in this pass: its temporary failure was its last attempt."""
        self.result.mailings[item.mailing.id].counts[Outcome.RETRY] += 1
        self._done_one()

    def _done_one(self) -> None:
        self._remaining -= 1
        if self._remaining == 0:
            self._finished.set()


def by_priority(items: list[Item]) -> list[Item]:
    """*items* with what is time-critical first, plan order kept within (a tight
    quota then holds back the invitation backlog, not tomorrow's reminder)."""
    return sorted(items, key=lambda item: priority(item.mailing.kind))


def log_start(result: PassResult, items: list[Item]) -> None:
    for mailing_id in result.mailings:
        todo = sum(1 for i in items if i.mailing.id == mailing_id)
        if todo:
            log.info(
                "mailing %s: sending to %d recipient(s)",
                mailing_id,
                todo,
                extra={"mailing": mailing_id, "recipients": todo},
            )


def log_counts(result: PassResult) -> None:
    for mailing_id, mailing_result in result.mailings.items():
        counts = mailing_result.counts
        if counts[Outcome.SENT] or counts[Outcome.FAILED] or counts[Outcome.RETRY]:
            log.info(
                "mailing %s: %d sent, %d failed, %d to retry",
                mailing_id,
                counts[Outcome.SENT],
                counts[Outcome.FAILED],
                counts[Outcome.RETRY],
                extra={"mailing": mailing_id, **{str(k): v for k, v in counts.items()}},
            )
