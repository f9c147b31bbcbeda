"""A send-rate limit that a relay's "N mails per minute" rule can never catch.

Relays count what arrives in a window of time. A token bucket with a full
minute of burst lets N mails through after an idle minute and N more as the
bucket refills, so one 60-second window can hold almost 2·N mails. Spacing
every start 60/N seconds apart would hold the rule too, but sleep overshoot
adds up and the achieved rate drifts below N.

:class:`RateLimiter` counts instead, for every moment a send wants to start,
the sends that could still be counted by the relay within a window from then:
those in flight and those that ended less than a window ago. A send starts
only while there are fewer than N of them. A send *ends* when the relay has
answered it; the relay counts it at some moment between its start and its end.
Take any window ``[t, t + window)`` at the relay and the send in it that
started last, at ``s``: every other mail in that window was counted after
``t > s - window``, so it had not ended by ``s - window`` and was among the
fewer than N that allowed the start. So no window holds N + 1 mails, however
long a send takes, after idle time or not. A slow or stalled send holds one
place, never the others. Under steady demand N mails go out in every window
plus the duration of one send (a few milliseconds): the full rate for any
practical purpose.

The relay's window does not start again when invite-mailer does: with a
:class:`SendJournal` (the ledger), each end is also written down with its
wall-clock time, and a new process starts with the ends of the last window
already counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Protocol

from invite_mailer.delivery.send_slots import Limit, Reservation
from invite_mailer.errors import QuotaReached

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[object]]

log = logging.getLogger(__name__)


class SendJournal(Protocol):
    """Where sends are counted beyond one process: wall-clock times (Unix seconds)."""

    async def recent_sends(self, since: float) -> Sequence[float]:
        """The recorded ends at or after *since*."""
        ...

    async def record_send(self, at: float) -> None: ...


class RateLimiter:
    """At most *limit* sends in any *window* seconds; ``limit=0`` means no limit.

    Use ``async with limiter.slot(): <send>``. *clock* and *sleep* are
    injectable so tests can run minutes of demand in virtual time. The clock
    must be monotonic (the default is :func:`time.monotonic`).
    """

    def __init__(
        self,
        limit: int,
        window: float = 60.0,
        *,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
        wall_clock: Clock = time.time,
        max_wait: float | None = None,
        setting: str = "smtp.rate_per_minute",
    ) -> None:
        if limit < 0:
            raise ValueError("limit must be 0 (no limit) or positive")
        if window <= 0:
            raise ValueError("window must be positive")
        self.limit = limit
        self.window = window
        # A wait longer than this raises QuotaReached instead (None: wait).
        self.max_wait = max_wait
        self.setting = setting
        self._clock = clock
        self._sleep = sleep
        self._wall_clock = wall_clock
        self._journal: SendJournal | None = None  # where our sends are recorded
        self._shared: SendJournal | None = None  # whose sends are counted
        self._recording: set[asyncio.Task[None]] = set()
        self._in_flight = 0
        self._ended: deque[float] = deque()  # end times, oldest first
        self._one_ended = asyncio.Event()
        # Waiters queue on the lock, so they get their slots in arrival order.
        self._lock = asyncio.Lock()

    async def share(self, journal: SendJournal, *, record: bool = True) -> None:
        """Count the sends *journal* recorded in the last window, and (*record*) ours there.

        Of several limiters counting the same sends only one records them.
        """
        if self.limit == 0 or journal is self._shared:
            return
        async with self._lock:
            wall, now = self._wall_clock(), self._clock()
            recorded = await journal.recent_sends(wall - self.window)
            # Wall-clock times onto this limiter's monotonic clock; one from
            # the "future" (the clock was set back) counts as ending now.
            ends = sorted(now - max(wall - at, 0.0) for at in recorded)
            self._ended = deque(sorted([*self._ended, *ends]))
            self._shared = journal
            if record:
                self._journal = journal

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Wait until one more send may start, and hold its place while it runs.

        The send counts from the moment the block is left (the relay has
        answered, or the send failed). A cancelled wait records nothing.
        """
        if self.limit == 0:
            yield
            return
        await self._reserve()
        try:
            yield
        finally:
            self._in_flight -= 1
            self._ended.append(self._clock())
            self._one_ended.set()
            if self._journal is not None:
                # Written in the background: awaited here, it would stand between
                # the relay's answer and the ledger's "sent", where a cancellation
                # turns a delivered mail into an uncertain one.
                task = asyncio.get_running_loop().create_task(
                    self._record(self._journal, self._wall_clock())
                )
                self._recording.add(task)
                task.add_done_callback(self._recording.discard)

    async def flush(self) -> None:
        """Wait until every send so far is written to the journal (before it closes)."""
        while self._recording:
            await asyncio.gather(*self._recording, return_exceptions=True)

    async def _record(self, journal: SendJournal, at: float) -> None:
        try:
            await journal.record_send(at)
        except Exception as exc:
            # The send itself is recorded elsewhere; this only shortens the
            # wait of a process started within the next minute.
            log.warning("could not record a send for the rate limit: %s", exc)

    async def acquire(self) -> None:
        """Wait for a slot for a send that takes no time (its start is its end)."""
        async with self.slot():
            pass

    def check(self) -> None:
        """Raise QuotaReached when a send now would have to wait past ``max_wait``."""
        if self.limit == 0 or self.max_wait is None:
            return
        now = self._clock()
        while self._ended and self._ended[0] + self.window <= now:
            self._ended.popleft()
        self._too_long(now)

    def _too_long(self, now: float) -> None:
        if self.max_wait is None or self._in_flight + len(self._ended) < self.limit:
            return
        # Full: the window reopens when enough ends have left it for one more.
        surplus = self._in_flight + len(self._ended) - self.limit
        if surplus < len(self._ended):
            wait = self._ended[surplus] + self.window - now
        else:  # all places in flight: at least a window from now
            wait = self.window
        if wait > self.max_wait:
            raise QuotaReached(self.setting, self.limit, self._wall_clock() + wait)

    async def _reserve(self) -> None:
        async with self._lock:
            while True:
                # Re-read the clock after every wait: it may have overslept or
                # woken early, and only the recorded times make the guarantee.
                now = self._clock()
                while self._ended and self._ended[0] + self.window <= now:
                    self._ended.popleft()  # can no longer share a window with us
                if self._in_flight + len(self._ended) < self.limit:
                    break
                self._too_long(now)
                if self._ended:
                    # At least a microsecond: a clock that lands a rounding
                    # error short of the moment must still move on.
                    await self._sleep(max(self._ended[0] + self.window - now, 1e-6))
                else:  # all in flight: wait until one ends, then a window on
                    self._one_ended.clear()
                    await self._one_ended.wait()
            self._in_flight += 1


class Quotas:
    """A relay's limits per minute, hour and day, each held like :class:`RateLimiter`.

    A send takes a place in every window, the longest first, so that a full
    day is noticed before a minute's place is taken. The per-minute limit
    waits (at most a minute); a longer window that would make a send wait
    more than *max_wait* raises :class:`QuotaReached`, and the pass stops
    cleanly instead of sleeping for hours.
    """

    WINDOWS = (("smtp.rate_per_day", 86400.0), ("smtp.rate_per_hour", 3600.0))

    def __init__(
        self,
        per_minute: int,
        per_hour: int = 0,
        per_day: int = 0,
        *,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
        wall_clock: Clock = time.time,
        max_wait: float = 60.0,
    ) -> None:
        self.limiters = [
            RateLimiter(
                limit,
                window,
                clock=clock,
                sleep=sleep,
                wall_clock=wall_clock,
                max_wait=max_wait,
                setting=setting,
            )
            for (setting, window), limit in zip(self.WINDOWS, (per_day, per_hour), strict=True)
            if limit
        ]
        if per_minute:
            self.limiters.append(
                RateLimiter(per_minute, 60.0, clock=clock, sleep=sleep, wall_clock=wall_clock)
            )
        self.max_wait = max_wait
        self._sleep = sleep
        self._wall_clock = wall_clock
        # With several nodes (PostgreSQL): the places are taken in the ledger instead.
        self._slots: SharedSlots | None = None
        self._ending: set[asyncio.Task[None]] = set()

    def __bool__(self) -> bool:
        return bool(self.limiters)

    async def share(self, journal: SendJournal) -> None:
        """Count the sends of *journal*'s longest window in each; record ours once.

        A journal shared by several nodes (a PostgreSQL ledger) hands out the
        places itself, so that all nodes together keep every limit.
        """
        shared = getattr(journal, "send_slots", None)
        slots = shared() if callable(shared) else None
        if slots is not None:
            self._slots = slots
            return
        for number, limiter in enumerate(self.limiters):
            await limiter.share(journal, record=number == 0)

    def check(self) -> None:
        """Raise QuotaReached when a send now would have to wait for a long window."""
        if self._slots is not None:
            return  # asked of the ledger when the place is taken (see _shared_slot)
        for limiter in self.limiters:
            limiter.check()

    async def acquire(self) -> None:
        """Wait for a place for a send that takes no time (its start is its end)."""
        async with self.slot():
            pass

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        if self._slots is not None:
            async with self._shared_slot(self._slots):
                yield
            return
        async with contextlib.AsyncExitStack() as stack:
            for limiter in self.limiters:
                await stack.enter_async_context(limiter.slot())
            yield

    @contextlib.asynccontextmanager
    async def _shared_slot(self, slots: SharedSlots) -> AsyncIterator[None]:
        limits = [Limit(lim.setting, lim.limit, lim.window) for lim in self.limiters]
        while True:
            reservation = await _settled(slots.reserve(limits), self._end_later, slots)
            if reservation.slot is not None:
                break
            full = reservation.limit
            assert full is not None
            if full.window > 60.0 and reservation.wait > self.max_wait:
                reopens = self._wall_clock() + reservation.wait
                raise QuotaReached(full.setting, full.limit, reopens)
            # Other nodes' sends end meanwhile too: look again within seconds.
            await self._sleep(min(reservation.wait, _SHARED_POLL))
        try:
            yield
        finally:
            # In the background, as RateLimiter records its ends (see slot there).
            self._end_later(slots, reservation.slot)

    def _end_later(self, slots: SharedSlots, slot: int) -> None:
        task = asyncio.get_running_loop().create_task(_end(slots, slot))
        self._ending.add(task)
        task.add_done_callback(self._ending.discard)

    async def flush(self) -> None:
        while self._ending:
            await asyncio.gather(*self._ending, return_exceptions=True)
        for limiter in self.limiters:
            await limiter.flush()


# How often a node waiting for a shared quota place looks again, at most.
_SHARED_POLL = 2.0


class SharedSlots(Protocol):
    async def reserve(self, limits: Sequence[Limit]) -> Reservation: ...
    async def end(self, slot: int) -> None: ...


async def _settled(
    reserving: Awaitable[Reservation],
    end_later: Callable[[SharedSlots, int], None],
    slots: SharedSlots,
) -> Reservation:
    """The reservation, also when the waiting sender is stopped meanwhile (then a
    place that was taken is given back at once instead of when its lease ends)."""
    task = asyncio.ensure_future(reserving)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await asyncio.wait([task])
        if not task.cancelled() and task.exception() is None:
            taken = task.result().slot
            if taken is not None:
                end_later(slots, taken)
        raise


async def _end(slots: SharedSlots, slot: int) -> None:
    try:
        await slots.end(slot)
    except Exception as exc:
        # Its lease ends it for the other nodes' count; the send itself is recorded.
        log.warning("could not record the end of a send for the shared quota: %s", exc)
