"""The delivery ledger: one row per (series, kind, event, recipient), in SQLite.

The ledger is the truth about what went out. A mail is sent only after
:meth:`Ledger.claim` has committed its row as ``sending``; the result is
committed right after the relay answers. A process killed in between leaves
the row in ``sending``, and :meth:`Ledger.recover` turns it into ``uncertain``
at the next start: only mails that were in flight can ever be in doubt.

SQLite runs in WAL mode with ``synchronous=NORMAL``: every committed state
change survives a crash of the process (SIGKILL included); only a power cut
may lose the last few commits.

One process at a time may send: :func:`state_lock` takes an exclusive lock
next to the database, and together with :meth:`Ledger.claim` that keeps two
``send-due`` runs from ever sending the same mail twice.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
from collections import Counter
from collections.abc import AsyncIterator, Collection, Mapping
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any

import aiosqlite

from invite_mailer.delivery.ledger_file import (
    SCHEMA_VERSION,
    check_file,
    check_ours,
    create,
    ledger_error,
    lock_path,
    migrate,
    state_lock,
)
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

__all__ = [
    "SCHEMA_VERSION",
    "DateHistory",
    "Delivery",
    "DeliveryKey",
    "DeliveryState",
    "Ledger",
    "LedgerError",
    "LedgerView",
    "OptOut",
    "format_version",
    "lock_path",
    "parse_version",
    "state_lock",
]

_STATES = {state.value: state for state in DeliveryState}

# Sends older than this are forgotten.
_SENDS_KEPT_SECONDS = 86400.0

_COLUMNS = (
    "series, kind, event, email, state, attempts, last_response, message_id, "
    "first_attempt_at, last_attempt_at, next_attempt_at, version, updated_at"
)
_KEY = "series = ? AND kind = ? AND event = ? AND email = ?"

_CLAIM = f"""
    INSERT INTO deliveries (series, kind, event, email, state, attempts, message_id, version,
                            first_attempt_at, last_attempt_at, updated_at)
    VALUES (?, ?, ?, ?, 'sending', 1, ?, ?, ?, ?, ?)
    ON CONFLICT (series, kind, event, email) DO UPDATE SET
        state = 'sending',
        attempts = attempts + 1,
        message_id = excluded.message_id,
        version = excluded.version,
        first_attempt_at = coalesce(first_attempt_at, excluded.first_attempt_at),
        last_attempt_at = excluded.last_attempt_at,
        next_attempt_at = NULL,
        updated_at = excluded.updated_at
    WHERE state IN ('{DeliveryState.PENDING}', '{DeliveryState.UNCERTAIN}')
    RETURNING id
"""

# Moves a claimed ('sending') delivery on; RETURNING tells whether it was claimed.
_FINISH = f"""
    UPDATE deliveries
    SET state = ?, last_response = ?, next_attempt_at = ?, updated_at = ?
    WHERE {_KEY} AND state = '{DeliveryState.SENDING}'
    RETURNING id
"""


def _iso(moment: datetime | None) -> str | None:
    if moment is None:
        return None
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"the ledger records aware datetimes only, got {moment!r}")
    return moment.astimezone(UTC).isoformat()


def _parse(text: str | None) -> datetime | None:
    return None if text is None else datetime.fromisoformat(text)


def _delivery(row: sqlite3.Row | tuple[Any, ...]) -> Delivery:
    return Delivery(
        series=row[0],
        kind=row[1],
        event=row[2],
        email=row[3],
        state=_STATES[row[4]],
        attempts=row[5],
        last_response=row[6],
        message_id=row[7],
        first_attempt_at=_parse(row[8]),
        last_attempt_at=_parse(row[9]),
        next_attempt_at=_parse(row[10]),
        version=row[11],
        updated_at=_parse(row[12]),
    )


class Ledger:
    """Async access to the state database. Open it with :meth:`Ledger.open`.

    Every method that changes a row commits before it returns, one small
    transaction per mail, and takes the time to record as *now* (aware): the
    ledger never reads the clock.
    """

    def __init__(self, db: aiosqlite.Connection, path: Path) -> None:
        self._db = db
        self.path = path

    @classmethod
    @asynccontextmanager
    async def open(cls, path: Path | str, *, lock_wait: float = 10.0) -> AsyncIterator[Ledger]:
        """Open (creating if needed) and migrate the database at *path*.

        A file that exists but is not an invite-mailer ledger is refused: taken
        as a new, empty ledger it would have every mail sent again. *lock_wait*
        is how many seconds to wait for another process's lock.
        """
        path = Path(path)
        try:
            await asyncio.to_thread(path.parent.mkdir, parents=True, exist_ok=True)
            if not await asyncio.to_thread(os.path.lexists, path):
                await create(path)
            await asyncio.to_thread(check_file, path)
            # isolation_level=None: autocommit, so each statement is its own
            # transaction and explicit BEGIN/COMMIT mean what they say.
            db = await aiosqlite.connect(path, isolation_level=None, timeout=lock_wait)
        except (OSError, sqlite3.Error) as exc:
            raise ledger_error(path, exc) from exc
        try:
            try:
                await db.execute(f"PRAGMA busy_timeout = {int(lock_wait * 1000):d}")
                # Before anything is written: never convert another program's database.
                await check_ours(db, path)
                await db.execute("PRAGMA journal_mode = WAL")
                await db.execute("PRAGMA synchronous = NORMAL")
                await migrate(db, path)
            except sqlite3.Error as exc:
                raise ledger_error(path, exc) from exc
            yield cls(db, path)
        finally:
            await db.close()

    async def _fetch(self, sql: str, params: Any = ()) -> list[Any]:
        try:
            return list(await self._db.execute_fetchall(sql, params))
        except sqlite3.Error as exc:
            raise ledger_error(self.path, exc) from exc

    async def _execute(self, sql: str, params: Any = ()) -> None:
        try:
            await self._db.execute(sql, params)
        except sqlite3.Error as exc:
            raise ledger_error(self.path, exc) from exc

    # -- sends, for the rate limit ---------------------------------------------------

    async def recent_sends(self, since: float) -> list[float]:
        """Wall-clock times (Unix seconds) of the sends recorded at or after *since*."""
        await self._execute("DELETE FROM sends WHERE at < ?", (since - _SENDS_KEPT_SECONDS,))
        rows = await self._fetch("SELECT at FROM sends WHERE at >= ? ORDER BY at", (since,))
        return [float(row[0]) for row in rows]

    async def record_send(self, at: float) -> None:
        """One send ended (the relay answered or the attempt failed) at *at*."""
        await self._execute("INSERT INTO sends (at) VALUES (?)", (at,))

    # -- changing rows ---------------------------------------------------------

    async def recover(self, now: datetime) -> list[Delivery]:
        """After a crash: every delivery left in ``sending`` becomes ``uncertain``."""
        rows = await self._fetch(
            f"""
            UPDATE deliveries
            SET state = '{DeliveryState.UNCERTAIN}', updated_at = ?,
                last_response = 'interrupted while sending; the relay may have accepted it'
            WHERE state = '{DeliveryState.SENDING}'
            RETURNING {_COLUMNS}
            """,
            (_iso(now),),
        )
        return sorted((_delivery(row) for row in rows), key=lambda d: (d.kind, d.event, d.email))

    async def claim(
        self, key: DeliveryKey, message_id: str, now: datetime, *, version: str = ""
    ) -> bool:
        """Mark *key* as being sent, unless it is ``sent``, ``failed`` or ``sending``.

        Inserts the row when it is new and counts the attempt. Returns whether
        the caller may send; the claim is committed before this returns. For an
        ``uncertain`` delivery, pass its previous Message-ID so that a resent
        copy can be recognised as the same mail.
        """
        stamp = _iso(now)
        rows = await self._fetch(
            _CLAIM,
            (key.series, key.kind, key.event, key.email, message_id, version, stamp, stamp, stamp),
        )
        return bool(rows)

    async def mark_sent(self, key: DeliveryKey, response: str, now: datetime) -> None:
        """The relay accepted the claimed delivery."""
        await self._finish(key, DeliveryState.SENT, response, now, None)

    async def mark_failed(self, key: DeliveryKey, response: str, now: datetime) -> None:
        """The relay refused the claimed delivery for good; it is never retried."""
        await self._finish(key, DeliveryState.FAILED, response, now, None)

    async def mark_retry(
        self, key: DeliveryKey, response: str, now: datetime, next_attempt_at: datetime
    ) -> None:
        """A temporary failure: back to ``pending``, to be tried at *next_attempt_at*."""
        await self._finish(key, DeliveryState.PENDING, response, now, next_attempt_at)

    async def mark_uncertain(
        self,
        key: DeliveryKey,
        response: str,
        now: datetime,
        next_attempt_at: datetime | None = None,
    ) -> None:
        """The data went out but no answer came back: the mail may have arrived."""
        await self._finish(key, DeliveryState.UNCERTAIN, response, now, next_attempt_at)

    async def release(
        self, key: DeliveryKey, now: datetime, next_attempt_at: datetime | None = None
    ) -> None:
        """Undo a claim when nothing was handed to the transport (e.g. on shutdown)."""
        await self._finish(
            key, DeliveryState.PENDING, "not sent: stopped before sending", now, next_attempt_at
        )

    async def _finish(
        self,
        key: DeliveryKey,
        state: DeliveryState,
        response: str,
        now: datetime,
        next_attempt_at: datetime | None,
    ) -> None:
        rows = await self._fetch(
            _FINISH,
            (
                state.value,
                response,
                _iso(next_attempt_at),
                _iso(now),
                key.series,
                key.kind,
                key.event,
                key.email,
            ),
        )
        if not rows:
            current = await self.get(key)
            found = "no such delivery" if current is None else f"it is {current.state}"
            raise LedgerError(f"cannot mark {key} as {state}: it was not claimed ({found})")

    # -- reading ---------------------------------------------------------------

    async def get(self, key: DeliveryKey) -> Delivery | None:
        rows = list(
            await self._fetch(
                f"SELECT {_COLUMNS} FROM deliveries WHERE {_KEY}",
                (key.series, key.kind, key.event, key.email),
            )
        )
        return _delivery(rows[0]) if rows else None

    async def view(self, series: str) -> LedgerView:
        """A snapshot of every delivery state of *series*, for the planner."""
        rows = await self._fetch(
            "SELECT kind, event, email, state, next_attempt_at, version, attempts "
            "FROM deliveries WHERE series = ? ORDER BY last_attempt_at",
            (series,),
        )
        states: dict[tuple[str, str], dict[str, DeliveryState]] = {}
        upcoming: dict[tuple[str, str, str], datetime] = {}
        seen: dict[str, dict[str, str]] = {}
        parsed: dict[str, dict[str, str]] = {}
        attempts_made: dict[tuple[str, str, str], int] = {}
        for kind, event, email, state, next_attempt_at, version, attempts in rows:
            mailing = states.get((kind, event))
            if mailing is None:
                mailing = states[(kind, event)] = {}
            mailing[email] = _STATES[state]
            if next_attempt_at is not None:
                upcoming[(kind, event, email)] = datetime.fromisoformat(next_attempt_at)
                attempts_made[(kind, event, email)] = attempts
            if version and state == DeliveryState.SENT:
                # Rows come oldest first, so the latest mail about a date wins.
                described = parsed.get(version)
                if described is None:
                    described = parsed[version] = parse_version(version)
                for date, digest in described.items():
                    seen.setdefault(date, {})[email] = digest
        return LedgerView(
            series,
            MappingProxyType({key: MappingProxyType(value) for key, value in states.items()}),
            MappingProxyType(upcoming),
            MappingProxyType({key: MappingProxyType(value) for key, value in seen.items()}),
            MappingProxyType(await self._date_histories(series)),
            MappingProxyType(attempts_made),
        )

    # -- versions of dates -------------------------------------------------------

    async def _date_histories(self, series: str) -> dict[str, DateHistory]:
        rows = await self._fetch(
            "SELECT event, version, details, observed_since, sequence FROM date_versions "
            "WHERE series = ? ORDER BY event, observed_since",
            (series,),
        )
        grouped: dict[str, list[tuple[str, str, str, int | None]]] = {}
        for event, version, details, since, sequence in rows:
            grouped.setdefault(event, []).append((version, details, since, sequence))
        histories = {}
        for event, versions in grouped.items():
            current, _, since, _ = versions[-1]
            histories[event] = DateHistory(
                current=current,
                observed_since=datetime.fromisoformat(since),
                sequences={v: seq for v, _, _, seq in versions if seq is not None},
                details={v: json.loads(d) for v, d, _, _ in versions},
            )
        return histories

    async def observe_dates(
        self, series: str, dates: Mapping[str, tuple[str, Mapping[str, str]]], now: datetime
    ) -> None:
        """Record the version each date has in the config now.

        A version that differs from the one observed last starts (or restarts,
        when an edit is reverted) the update grace period at *now*.
        """
        histories = await self._date_histories(series)
        changed = {
            event: entry
            for event, entry in dates.items()
            if (history := histories.get(event)) is None or history.current != entry[0]
        }
        if not changed:
            return
        await self._execute("BEGIN IMMEDIATE")
        try:
            for event, (version, details) in changed.items():
                await self._observe(series, event, version, details, now)
        except BaseException:
            await self._execute("ROLLBACK")
            raise
        await self._execute("COMMIT")

    async def _observe(
        self, series: str, event: str, version: str, details: Mapping[str, str], now: datetime
    ) -> None:
        await self._execute(
            "INSERT INTO date_versions (series, event, version, details, observed_since) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT (series, event, version) DO UPDATE SET "
            "observed_since = excluded.observed_since, details = excluded.details",
            (series, event, version, json.dumps(dict(details), sort_keys=True), _iso(now)),
        )

    async def issue_sequence(self, series: str, event: str, version: str) -> int:
        """The calendar SEQUENCE for mail describing *version*, recorded on first use."""
        histories = await self._date_histories(series)
        history = histories.get(event)
        sequence = 0 if history is None else history.sequence_for(version)
        if history is None or history.sequences.get(version) != sequence:
            await self._execute(
                "UPDATE date_versions SET sequence = ? "
                "WHERE series = ? AND event = ? AND version = ?",
                (sequence, series, event, version),
            )
        return sequence

    async def deliveries(
        self,
        series: str,
        *,
        states: Collection[DeliveryState] | None = None,
        kind: str | None = None,
        event: str | None = None,
    ) -> list[Delivery]:
        """Rows of *series*, optionally filtered, ordered by kind, event, email."""
        where = ["series = ?"]
        params: list[str] = [series]
        if states is not None:
            if not states:
                return []
            where.append(f"state IN ({', '.join('?' * len(states))})")
            params.extend(DeliveryState(state).value for state in states)
        if kind is not None:
            where.append("kind = ?")
            params.append(kind)
        if event is not None:
            where.append("event = ?")
            params.append(event)
        rows = await self._fetch(
            f"SELECT {_COLUMNS} FROM deliveries WHERE {' AND '.join(where)} "
            "ORDER BY kind, event, email",
            params,
        )
        return [_delivery(row) for row in rows]

    async def counts(self, series: str) -> dict[tuple[str, str], Counter[DeliveryState]]:
        """How many deliveries of each mailing ((kind, event)) are in each state."""
        rows = await self._fetch(
            "SELECT kind, event, state, count(*) FROM deliveries WHERE series = ? "
            "GROUP BY kind, event, state",
            (series,),
        )
        result: dict[tuple[str, str], Counter[DeliveryState]] = {}
        for kind, event, state, count in rows:
            result.setdefault((kind, event), Counter())[_STATES[state]] = count
        return result

    # -- opt-outs --------------------------------------------------------------

    async def add_optout(self, series: str, email: str, *, source: str, now: datetime) -> bool:
        """Record that *email* must never be mailed again; False if it already was."""
        rows = await self._fetch(
            "INSERT INTO optouts (series, email, source, created_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (series, email) DO NOTHING RETURNING email",
            (series, email.strip().lower(), source, _iso(now)),
        )
        return bool(rows)

    async def remove_optout(self, series: str, email: str) -> bool:
        """Forget an opt-out; False if there was none."""
        rows = await self._fetch(
            "DELETE FROM optouts WHERE series = ? AND email = ? RETURNING email",
            (series, email.strip().lower()),
        )
        return bool(rows)

    async def optouts(self, series: str) -> frozenset[str]:
        rows = await self._fetch("SELECT email FROM optouts WHERE series = ?", (series,))
        return frozenset(row[0] for row in rows)

    async def is_opted_out(self, series: str, email: str) -> bool:
        """Whether *email* has opted out of *series* (one indexed lookup)."""
        rows = list(
            await self._fetch(
                "SELECT 1 FROM optouts WHERE series = ? AND email = ?",
                (series, email.strip().lower()),
            )
        )
        return bool(rows)

    async def optout_entries(self, series: str) -> list[OptOut]:
        """Every opt-out of *series* with its source and time, oldest first."""
        rows = await self._fetch(
            "SELECT email, source, created_at FROM optouts WHERE series = ? "
            "ORDER BY created_at, email",
            (series,),
        )
        return [OptOut(row[0], row[1], datetime.fromisoformat(row[2])) for row in rows]
