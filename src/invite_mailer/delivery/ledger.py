"""The delivery ledger: one row per (series, kind, event, recipient), in SQLite or PostgreSQL.

The ledger is the truth about what went out. A mail is sent only after its
claim (the row as ``sending``) is committed; its outcome is committed after
the relay answers. A process killed in between leaves the row in
``sending``, and :meth:`Ledger.recover` turns it into ``uncertain`` at the
next start: only mails that were in flight can ever be in doubt. A delivery
pass writes claims and outcomes in batches through
:class:`~invite_mailer.delivery.window.LedgerWindow`, which bounds how many
mails can be in flight at once (see there).

SQLite runs in WAL mode with ``synchronous=NORMAL``: every committed state
change survives a crash of the process (SIGKILL included); only a power cut
may lose the last few commits. All statements run on the ledger's own thread
(:mod:`~invite_mailer.delivery.ledger_thread`), with the standard library's
``sqlite3``.

With SQLite one process at a time may send: :func:`state_lock` takes an
exclusive lock next to the database, and together with :meth:`Ledger.claim`
that keeps two ``send-due`` runs from ever sending the same mail twice. With
PostgreSQL (:mod:`~invite_mailer.delivery.ledger_pg`) any number of nodes
send from one ledger: a claim holds a lease that the node's heartbeat renews
(:mod:`~invite_mailer.delivery.ledger_nodes`), and :meth:`Ledger.recover`
takes back only the claims whose lease has run out.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Collection, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, AbstractContextManager, asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from invite_mailer.core.registrations import Registration
from invite_mailer.delivery import bounce_sql
from invite_mailer.delivery import ledger_registrations as regs
from invite_mailer.delivery import ledger_sql as sql
from invite_mailer.delivery.bounce_sql import BounceOverview, BounceRecord, Recorded
from invite_mailer.delivery.bounces import Report
from invite_mailer.delivery.database import Database
from invite_mailer.delivery.ledger_file import SCHEMA_VERSION, lock_path, state_lock
from invite_mailer.delivery.ledger_nodes import NodeIdentity, NodeMembership, NodeRow
from invite_mailer.delivery.ledger_open import opening
from invite_mailer.delivery.ledger_sql import Claim, Finish
from invite_mailer.delivery.ledger_thread import LedgerThread
from invite_mailer.delivery.records import (
    DateHistory,
    Delivery,
    DeliveryKey,
    DeliveryState,
    LedgerView,
    OptOut,
    format_version,
    parse_version,
)
from invite_mailer.errors import LedgerError
from invite_mailer.inputs.state_settings import StateSettings

__all__ = [
    "SCHEMA_VERSION",
    "Claim",
    "DateHistory",
    "Delivery",
    "DeliveryKey",
    "DeliveryState",
    "Finish",
    "Ledger",
    "LedgerError",
    "LedgerView",
    "NodeIdentity",
    "NodeRow",
    "OptOut",
    "format_version",
    "lock_path",
    "open_sending",
    "parse_version",
    "sending_lock",
    "state_lock",
]

# Sends older than this are forgotten.
_SENDS_KEPT_SECONDS = 86400.0

log = logging.getLogger("invite_mailer.delivery.ledger")


class Ledger(NodeMembership):
    """Async access to the state database. Open it with :meth:`Ledger.open`.

    Every method that changes a row commits before it returns and takes the
    time to record as *now* (aware): the ledger never reads the clock.
    """

    def __init__(
        self,
        thread: LedgerThread,
        where: str,
        *,
        path: Path | None = None,
        shared: bool = False,
        node: NodeIdentity | None = None,
        lease_seconds: float = 120.0,
        heartbeat_seconds: float = 10.0,
        clock: Any = time.time,
    ) -> None:
        self._thread = thread
        self.where = where  # the file or the database, for messages
        self.path = path if path is not None else Path(where)
        # PostgreSQL: other nodes may send from this ledger at the same time.
        self.shared = shared
        self.node = node
        self.lease_seconds = lease_seconds
        self._heartbeat_seconds = heartbeat_seconds
        self._clock = clock
        self._renewed_at = clock()

    @classmethod
    @asynccontextmanager
    async def open(
        cls,
        target: Path | str,
        *,
        lock_wait: float = 10.0,
        node: NodeIdentity | None = None,
        lease_seconds: float = 120.0,
        heartbeat_seconds: float = 10.0,
        clock: Any = time.time,
    ) -> AsyncIterator[Ledger]:
        """Open (creating if needed) the ledger at *target*: an SQLite file, or a
        ``postgresql://`` URL.

        A database that exists but is not an invite-mailer ledger is refused:
        taken as a new, empty ledger it would have every mail sent again.
        *lock_wait* is how many seconds to wait for another process's lock.
        With PostgreSQL, a *node* that sends beats every *heartbeat_seconds*
        while the ledger is open, renewing the leases of its claims.
        """
        thread, where, opener, ledger_kwargs = opening(target, lock_wait)
        try:
            await thread.start(opener)
            ledger = cls(
                thread,
                where,
                node=node,
                lease_seconds=lease_seconds,
                heartbeat_seconds=heartbeat_seconds,
                clock=clock,
                **ledger_kwargs,
            )
            async with ledger._beating(heartbeat_seconds):
                yield ledger
        finally:
            await thread.close()

    # -- sends, for the rate limit ---------------------------------------------------

    async def recent_sends(self, since: float) -> list[float]:
        """Wall-clock times (Unix seconds) of the sends recorded at or after *since*."""

        def work(db: Database) -> list[float]:
            db.execute("DELETE FROM sends WHERE at < ?", (since - _SENDS_KEPT_SECONDS,))
            rows = db.execute("SELECT at FROM sends WHERE at >= ? ORDER BY at", (since,))
            return [float(row[0]) for row in rows]

        return await self._thread.call(work)

    async def record_send(self, at: float) -> None:
        """One send ended (the relay answered or the attempt failed) at *at*."""
        await self._thread.call(lambda db: db.execute("INSERT INTO sends (at) VALUES (?)", (at,)))

    # -- changing rows ---------------------------------------------------------

    async def recover(self, now: datetime) -> list[Delivery]:
        """After a crash: every delivery left in ``sending`` becomes ``uncertain``.

        With PostgreSQL only those whose lease has run out: the others belong
        to nodes that are alive and still sending them.
        """
        stamp, lease_before = sql.iso(now), self._clock() if self.shared else None
        rows = await self._thread.call(lambda db: sql.recover_rows(db, stamp, lease_before))
        return sorted(
            (sql.delivery_of(row) for row in rows), key=lambda d: (d.kind, d.event, d.email)
        )

    async def claim(
        self, key: DeliveryKey, message_id: str, now: datetime, *, version: str = ""
    ) -> bool:
        """Mark *key* as being sent, unless it is ``sent``, ``failed`` or ``sending``.

        Inserts the row when it is new and counts the attempt. Returns whether
        the caller may send; the claim is committed before this returns. For an
        ``uncertain`` delivery, pass its previous Message-ID so that a resent
        copy can be recognised as the same mail.
        """
        claim = Claim(key, message_id, now, version)
        sql.iso(now)  # refuse a naive time here, in the caller's task
        holder = self._holder()
        return await self._thread.call(lambda db: sql.claim_one(db, claim, holder))

    async def apply(self, finishes: Sequence[Finish], claims: Sequence[Claim]) -> list[bool]:
        """Write outcomes, then claims, in one transaction; whether each claim holds.

        All or nothing: when it raises, nothing of the batch was written.
        """
        holder = self._holder()
        return await self._thread.call(lambda db: sql.apply_batch(db, finishes, claims, holder))

    async def mark_sent(self, key: DeliveryKey, response: str, now: datetime) -> None:
        """The relay accepted the claimed delivery."""
        await self.finish(Finish(key, DeliveryState.SENT, response, now))

    async def mark_failed(self, key: DeliveryKey, response: str, now: datetime) -> None:
        """The relay refused the claimed delivery for good; it is never retried."""
        await self.finish(Finish(key, DeliveryState.FAILED, response, now))

    async def mark_retry(
        self, key: DeliveryKey, response: str, now: datetime, next_attempt_at: datetime
    ) -> None:
        """A temporary failure: back to ``pending``, to be tried at *next_attempt_at*."""
        await self.finish(Finish(key, DeliveryState.PENDING, response, now, next_attempt_at))

    async def mark_uncertain(
        self,
        key: DeliveryKey,
        response: str,
        now: datetime,
        next_attempt_at: datetime | None = None,
    ) -> None:
        """The data went out but no answer came back: the mail may have arrived."""
        await self.finish(Finish(key, DeliveryState.UNCERTAIN, response, now, next_attempt_at))

    async def release(
        self, key: DeliveryKey, now: datetime, next_attempt_at: datetime | None = None
    ) -> None:
        """Undo a claim when nothing was handed to the transport (e.g. on shutdown)."""
        await self.finish(release(key, now, next_attempt_at))

    async def finish(self, outcome: Finish) -> None:
        """Record *outcome* of a claimed delivery; LedgerError if it was not claimed."""
        outcome.params()  # refuse a naive time here, in the caller's task
        await self._thread.call(lambda db: sql.finish_one(db, outcome))

    # -- reading ---------------------------------------------------------------

    async def get(self, key: DeliveryKey) -> Delivery | None:
        """The row of *key*, or None (one indexed lookup)."""
        statement = f"SELECT {sql.COLUMNS} FROM deliveries WHERE {sql.KEY}"
        params = (key.series, key.kind, key.event, key.email)
        row = await self._thread.call(lambda db: db.execute(statement, params).fetchone())
        return None if row is None else sql.delivery_of(row)

    async def view(self, series: str) -> LedgerView:
        """A snapshot of every delivery state of *series*, for the planner."""
        return await self._thread.call(lambda db: sql.view_of(db, series))

    # -- versions of dates -------------------------------------------------------

    async def observe_dates(
        self, series: str, dates: Mapping[str, tuple[str, Mapping[str, str]]], now: datetime
    ) -> None:
        """Record the version each date has in the config now.

        A version that differs from the one observed last starts (or restarts,
        when an edit is reverted) the update grace period at *now*.
        """
        await self._thread.call(lambda db: sql.observe_dates(db, series, dates, now))

    async def issue_sequence(self, series: str, event: str, version: str) -> int:
        """The calendar SEQUENCE for mail describing *version*, recorded on first use."""
        return await self._thread.call(lambda db: sql.issue_sequence(db, series, event, version))

    async def deliveries(
        self,
        series: str,
        *,
        states: Collection[DeliveryState] | None = None,
        kind: str | None = None,
        event: str | None = None,
        tried: bool = False,
    ) -> list[Delivery]:
        """Rows of *series*, optionally filtered, ordered by kind, event, email.

        *tried*: only rows with at least one attempt (a pending retry, not a
        mail nobody has tried yet).
        """
        return await self._thread.call(
            lambda db: sql.select_deliveries(db, series, states, kind, event, tried)
        )

    async def counts(self, series: str) -> dict[tuple[str, str], Counter[DeliveryState]]:
        """How many deliveries of each mailing ((kind, event)) are in each state."""
        statement = (
            "SELECT kind, event, state, count(*) FROM deliveries WHERE series = ? "
            "GROUP BY kind, event, state"
        )
        rows = await self._thread.call(lambda db: db.execute(statement, (series,)).fetchall())
        result: dict[tuple[str, str], Counter[DeliveryState]] = {}
        for kind, event, state, count in rows:
            result.setdefault((kind, event), Counter())[sql.STATES[state]] = count
        return result

    # -- registrations -----------------------------------------------------------

    async def register(
        self, series: str, event: str, email: str, *, source: str, now: datetime
    ) -> bool:
        """Register *email* for *event* (idempotent); False if it was registered already."""
        return await self._thread.call(
            lambda db: regs.register(db, series, event, email, source, now)
        )

    async def withdraw(
        self, series: str, event: str, email: str, *, by: str, now: datetime
    ) -> bool:
        """Withdraw *email* from *event* (idempotent); False if it was withdrawn already."""
        return await self._thread.call(lambda db: regs.withdraw(db, series, event, email, by, now))

    async def observe_registrations(
        self, series: str, listed: Mapping[str, frozenset[str]], now: datetime
    ) -> int:
        """Record the contact list's registrations not known yet (at *now*); how many."""
        return await self._thread.call(lambda db: regs.observe_csv(db, series, listed, now))

    async def registrations(self, series: str) -> dict[str, dict[str, Registration]]:
        """email -> date -> registration row, for *series*."""
        return await self._thread.call(lambda db: regs.registrations_of(db, series))

    # -- opt-outs --------------------------------------------------------------

    async def add_optout(self, series: str, email: str, *, source: str, now: datetime) -> bool:
        """Record that *email* must never be mailed again; False if it already was."""
        statement = (
            "INSERT INTO optouts (series, email, source, created_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (series, email) DO NOTHING RETURNING email"
        )
        params = (series, email.strip().lower(), source, sql.iso(now))
        return await self._exists(statement, params)

    async def remove_optout(self, series: str, email: str) -> bool:
        """Forget an opt-out; False if there was none."""
        statement = "DELETE FROM optouts WHERE series = ? AND email = ? RETURNING email"
        return await self._exists(statement, (series, email.strip().lower()))

    async def optouts(self, series: str) -> frozenset[str]:
        """Every address that opted out of *series* here (one-click, CLI, ...)."""
        statement = "SELECT email FROM optouts WHERE series = ?"
        rows = await self._thread.call(lambda db: db.execute(statement, (series,)).fetchall())
        return frozenset(row[0] for row in rows)

    async def is_opted_out(self, series: str, email: str) -> bool:
        """Whether *email* has opted out of *series* (one indexed lookup)."""
        statement = "SELECT 1 FROM optouts WHERE series = ? AND email = ?"
        return await self._exists(statement, (series, email.strip().lower()))

    async def optout_entries(self, series: str) -> list[OptOut]:
        """Every opt-out of *series* with its source and time, oldest first."""
        statement = (
            "SELECT email, source, created_at FROM optouts WHERE series = ? "
            "ORDER BY created_at, email"
        )
        rows = await self._thread.call(lambda db: db.execute(statement, (series,)).fetchall())
        return [OptOut(row[0], row[1], datetime.fromisoformat(row[2])) for row in rows]

    # -- bounces ---------------------------------------------------------------

    async def record_report(
        self,
        series: str,
        report: Report,
        *,
        fingerprint: str,
        source: str,
        now: datetime,
        soft_limit: int,
    ) -> list[Recorded]:
        """Record a bounce or complaint report and suppress what it calls for."""
        sql.iso(now)  # refuse a naive time here, in the caller's task
        return await self._thread.call(
            lambda db: bounce_sql.record_report(
                db,
                series,
                report,
                fingerprint=fingerprint,
                source=source,
                now=now,
                soft_limit=soft_limit,
            )
        )

    async def recipients(self, series: str) -> list[str]:
        """Every address this series has mailed (or tried to)."""
        statement = "SELECT DISTINCT email FROM deliveries WHERE series = ?"
        rows = await self._thread.call(lambda db: db.execute(statement, (series,)).fetchall())
        return [row[0] for row in rows]

    async def bounce_overview(self, series: str, limit: int) -> BounceOverview:
        """The bounces of *series* counted, and the first *limit* addresses they suppressed."""
        return await self._thread.call(lambda db: bounce_sql.bounce_overview(db, series, limit))

    async def bounces(self, series: str) -> list[BounceRecord]:
        """Every recorded bounce and complaint of *series*, oldest first."""
        return await self._thread.call(lambda db: bounce_sql.bounce_rows(db, series))

    async def _exists(self, statement: str, params: tuple[str | None, ...]) -> bool:
        """Whether *statement* returns a row (and for a change: commits it)."""

        def work(db: Database) -> bool:
            # fetchall, not fetchone: a RETURNING statement is done only once stepped through.
            return bool(db.execute(statement, params).fetchall())

        return await self._thread.call(work)


def sending_lock(state: StateSettings) -> AbstractContextManager[None]:
    """SQLite: the lock that lets one process send. PostgreSQL: none, any number may."""
    if state.is_postgresql:
        return contextlib.nullcontext()
    state.path.parent.mkdir(parents=True, exist_ok=True)
    return state_lock(state.path)


def open_sending(state: StateSettings, role: str) -> AbstractAsyncContextManager[Ledger]:
    """The ledger of a process that sends (*role*: "daemon", "send-due"): a node that
    beats, with PostgreSQL."""
    return Ledger.open(
        state.target,
        node=NodeIdentity.here(role),
        lease_seconds=state.lease_seconds,
        heartbeat_seconds=state.heartbeat_seconds,
    )


def release(key: DeliveryKey, now: datetime, next_attempt_at: datetime | None = None) -> Finish:
    """The outcome that gives a claimed mail back unsent (e.g. on shutdown)."""
    return Finish(
        key, DeliveryState.PENDING, "not sent: stopped before sending", now, next_attempt_at
    )
