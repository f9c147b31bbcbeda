"""A send-rate limit that a relay's "N mails per minute" rule can never catch.

Relays count what arrives in a window of time. A token bucket with a full
minute of burst lets N mails through after an idle minute and N more as the
bucket refills, so one 60-second window can hold almost 2·N mails. Spacing
every start 60/N seconds apart would hold the rule too, but sleep overshoot
adds up and the achieved rate drifts below N.

:class:`RateLimiter` keeps a log of the last N start times instead and lets a
start happen only when the oldest of them is at least a full window old. So
for any start ``s[k]``, ``s[k] >= s[k-N] + window``: no half-open window
``[t, t + window)`` can hold N + 1 starts, after idle time or not, and under
steady demand exactly N starts fall into each window (the full rate).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[object]]


class RateLimiter:
    """At most *limit* starts in any *window* seconds; ``limit=0`` means no limit.

    *clock* and *sleep* are injectable so tests can run minutes of demand in
    virtual time. The clock must be monotonic (the default is
    :func:`time.monotonic`).
    """

    def __init__(
        self,
        limit: int,
        window: float = 60.0,
        *,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        if limit < 0:
            raise ValueError("limit must be 0 (no limit) or positive")
        if window <= 0:
            raise ValueError("window must be positive")
        self.limit = limit
        self.window = window
        self._clock = clock
        self._sleep = sleep
        self._starts: deque[float] = deque(maxlen=limit or None)
        # Waiters queue on the lock, so they get their slots in arrival order.
        self._lock = asyncio.Lock()

    async def acquire(self) -> None:
        """Wait until one more start is allowed, and record it as started now.

        A cancelled wait records nothing.
        """
        if self.limit == 0:
            return
        async with self._lock:
            while len(self._starts) == self.limit:
                # Re-read the clock after every sleep: it may have overslept or
                # woken early, and only the recorded times make the guarantee.
                wait = self._starts[0] + self.window - self._clock()
                if wait <= 0:
                    break
                await self._sleep(wait)
            self._starts.append(self._clock())
