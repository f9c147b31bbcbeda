"""Relay quotas shared by every node of a PostgreSQL ledger.

With one process (SQLite), :class:`~invite_mailer.delivery.ratelimit.Quotas`
counts in memory and reads the sends of earlier runs once at the start.
Several nodes sending at the same time must count each other's sends as
they happen, so here every send takes its place in the database first.

A place is a row of ``send_slots``: taken before the send starts (``ended``
empty, held for ``lease`` seconds in case its node dies), and ended when
the relay has answered. A send may start only while fewer than *limit*
places count for each window: those in flight and those that ended less
than a window ago, the rule :mod:`~invite_mailer.delivery.ratelimit`
proves sufficient. Taking a place is one transaction under an advisory
lock, so two nodes never both take the last one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from invite_mailer.delivery.database import Database, transaction
from invite_mailer.delivery.ledger_pg import advisory_lock
from invite_mailer.delivery.ledger_thread import LedgerThread

__all__ = ["Limit", "Reservation", "SendSlots"]

# Ends older than this count for no window (the longest is a day).
_KEPT_SECONDS = 86400.0


@dataclass(frozen=True, slots=True)
class Limit:
    setting: str  # e.g. "smtp.rate_per_minute", for messages
    limit: int
    window: float  # seconds


@dataclass(frozen=True, slots=True)
class Reservation:
    """A place taken (*slot*), or none and how long until one opens under *limit*."""

    slot: int | None
    wait: float = 0.0
    limit: Limit | None = None


class SendSlots:
    """The places of one node in the ledger's shared send windows."""

    def __init__(
        self, thread: LedgerThread, node: str, clock: Callable[[], float], lease: float
    ) -> None:
        self._thread = thread
        self._node = node
        self._clock = clock
        self._lease = lease

    async def reserve(self, limits: Sequence[Limit]) -> Reservation:
        """Take a place in every window at once, or say which one is full and for how long."""
        now = self._clock()
        node, lease_until = self._node, now + self._lease
        return await self._thread.call(lambda db: _reserve(db, limits, node, now, lease_until))

    async def end(self, slot: int) -> None:
        """The send in *slot* has ended (answered, or failed): it counts from now."""
        now = self._clock()
        await self._thread.call(lambda db: _end(db, slot, now))


def _reserve(
    db: Database, limits: Sequence[Limit], node: str, now: float, lease_until: float
) -> Reservation:
    with transaction(db):
        advisory_lock(db, "send_slots")
        db.execute(
            "DELETE FROM send_slots WHERE coalesce(ended, lease_until) < ?", (now - _KEPT_SECONDS,)
        )
        for limit in limits:
            wait = _wait(db, limit, now)
            if wait > 0:
                return Reservation(None, wait, limit)
        row = db.execute(
            "INSERT INTO send_slots (node, started, lease_until) VALUES (?, ?, ?) RETURNING id",
            (node, now, lease_until),
        ).fetchone()
    return Reservation(int(row[0]))


def _wait(db: Database, limit: Limit, now: float) -> float:
    """Seconds until *limit* allows one more send (0: now)."""
    since = now - limit.window
    in_flight = db.execute(
        "SELECT count(*) FROM send_slots WHERE ended IS NULL AND lease_until >= ?", (now,)
    ).fetchone()[0]
    ended = db.execute("SELECT count(*) FROM send_slots WHERE ended >= ?", (since,)).fetchone()[0]
    surplus = in_flight + ended - limit.limit
    if surplus < 0:
        return 0.0
    if surplus >= ended:
        # Every place is in flight: one opens a window after the first of them ends.
        return limit.window
    # The window reopens when the (surplus+1)-th oldest end has left it.
    oldest = db.execute(
        "SELECT ended FROM send_slots WHERE ended >= ? ORDER BY ended LIMIT 1 OFFSET ?",
        (since, surplus),
    ).fetchone()[0]
    return max(float(oldest) + limit.window - now, 1e-3)


def _end(db: Database, slot: int, now: float) -> None:
    with transaction(db):
        db.execute("UPDATE send_slots SET ended = ? WHERE id = ?", (now, slot))
        # Also where plan's forecast and a later SQLite-style reading look.
        db.execute("INSERT INTO sends (at) VALUES (?)", (now,))
