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
import errno
import fcntl
import json
import os
import sqlite3
import stat
from collections import Counter
from collections.abc import AsyncIterator, Collection, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from types import MappingProxyType
from typing import Any

import aiosqlite

from invite_mailer.errors import InviteMailerError, LockedError

__all__ = [
    "Delivery",
    "DeliveryKey",
    "DeliveryState",
    "Ledger",
    "LedgerError",
    "LedgerView",
    "SCHEMA_VERSION",
    "state_lock",
]


class DeliveryState(StrEnum):
    PENDING = "pending"  # not sent yet, or to be tried again at next_attempt_at
    SENDING = "sending"  # claimed: handed to the transport, no answer recorded yet
    SENT = "sent"  # the relay accepted it
    FAILED = "failed"  # the relay refused it for good
    UNCERTAIN = "uncertain"  # in flight when the process died or the line went dead


_STATES = {state.value: state for state in DeliveryState}


class LedgerError(InviteMailerError, RuntimeError):
    """The state database cannot be used, or was asked for an impossible change."""

    def __init__(self, message: str, *, hint: str | None = None, temporary: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.temporary = temporary

    def __str__(self) -> str:
        return f"{self.message}\n  hint: {self.hint}" if self.hint else self.message


@dataclass(frozen=True, slots=True)
class DeliveryKey:
    """What makes a mail unique: a series, a kind, a date ('' = series-wide), a recipient."""

    series: str
    kind: str
    event: str
    email: str

    def __post_init__(self) -> None:
        # Addresses compare case-insensitively everywhere in invite-mailer.
        object.__setattr__(self, "email", self.email.strip().lower())


@dataclass(frozen=True)
class Delivery:
    """One row of the ledger."""

    series: str
    kind: str
    event: str
    email: str
    state: DeliveryState
    attempts: int = 0
    last_response: str = ""
    message_id: str = ""
    first_attempt_at: datetime | None = None
    last_attempt_at: datetime | None = None
    next_attempt_at: datetime | None = None
    version: str = ""
    updated_at: datetime | None = None

    @property
    def key(self) -> DeliveryKey:
        return DeliveryKey(self.series, self.kind, self.event, self.email)


_EMPTY_STATES: Mapping[str, DeliveryState] = MappingProxyType({})
_EMPTY_SEEN: Mapping[str, str] = MappingProxyType({})


@dataclass(frozen=True)
class LedgerView:
    """An immutable snapshot of one series' deliveries, for planning."""

    series: str
    _states: Mapping[tuple[str, str], Mapping[str, DeliveryState]] = field(
        default_factory=dict, repr=False
    )
    _next: Mapping[tuple[str, str, str], datetime] = field(default_factory=dict, repr=False)
    _seen: Mapping[str, Mapping[str, str]] = field(default_factory=dict, repr=False)
    _dates: Mapping[str, DateHistory] = field(default_factory=dict, repr=False)
    _attempts: Mapping[tuple[str, str, str], int] = field(default_factory=dict, repr=False)

    @classmethod
    def empty(cls, series: str) -> LedgerView:
        return cls(series)

    def states(self, kind: str, event: str = "") -> Mapping[str, DeliveryState]:
        """Email → state for one mailing; recipients without a row are absent."""
        return self._states.get((kind, event), _EMPTY_STATES)

    def next_attempt(self, kind: str, event: str, email: str) -> datetime | None:
        """When a pending or uncertain delivery should be tried again, if set."""
        return self._next.get((kind, event, email.lower()))

    def attempts(self, kind: str, event: str, email: str) -> int:
        """How often a delivery waiting for its retry has been tried already."""
        return self._attempts.get((kind, event, email.lower()), 0)

    def seen(self, event: str) -> Mapping[str, str]:
        """Email → version of *event* described by the latest mail they got about it."""
        return self._seen.get(event, _EMPTY_SEEN)

    def date(self, event: str) -> DateHistory | None:
        """What the ledger knows about the versions of one date."""
        return self._dates.get(event)


@dataclass(frozen=True)
class DateHistory:
    """The versions of one date the ledger has seen in the config.

    ``current`` is the version the config described most recently, and since
    when (the start of the update grace period). ``sequences`` maps each
    version that mail went out about to its calendar ``SEQUENCE``.
    """

    current: str
    observed_since: datetime
    sequences: Mapping[str, int]
    details: Mapping[str, Mapping[str, str]]

    @property
    def last_sequence(self) -> int | None:
        return max(self.sequences.values(), default=None)

    def sequence_for(self, version: str) -> int:
        """The SEQUENCE a mail describing *version* must carry."""
        last = self.last_sequence
        if last is None:
            return 0
        known = self.sequences.get(version)
        return known if known == last else last + 1


def format_version(versions: Mapping[str, str]) -> str:
    """``event=hash,event=hash``: what a mail described, stored with its delivery."""
    return ",".join(f"{event}={digest}" for event, digest in sorted(versions.items()))


def parse_version(text: str) -> dict[str, str]:
    result = {}
    for item in text.split(","):
        event, sep, digest = item.partition("=")
        if sep:
            result[event] = digest
    return result


# Marks the file as an invite-mailer ledger ("IMLG" in PRAGMA application_id).
APPLICATION_ID = 0x494D4C47

# Migration n (1-based) brings the schema from version n-1 to n. Append only;
# never edit a migration that has shipped.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """
        CREATE TABLE deliveries (
            id INTEGER PRIMARY KEY,
            series TEXT NOT NULL,
            kind TEXT NOT NULL,
            event TEXT NOT NULL DEFAULT '',
            email TEXT NOT NULL,
            state TEXT NOT NULL
                CHECK (state IN ('pending', 'sending', 'sent', 'failed', 'uncertain')),
            attempts INTEGER NOT NULL DEFAULT 0,
            last_response TEXT NOT NULL DEFAULT '',
            message_id TEXT NOT NULL DEFAULT '',
            version TEXT NOT NULL DEFAULT '',
            first_attempt_at TEXT,
            last_attempt_at TEXT,
            next_attempt_at TEXT,
            updated_at TEXT NOT NULL,
            UNIQUE (series, kind, event, email)
        )
        """,
        """
        CREATE TABLE optouts (
            series TEXT NOT NULL,
            email TEXT NOT NULL,
            source TEXT NOT NULL DEFAULT '',
            created_at TEXT NOT NULL,
            PRIMARY KEY (series, email)
        )
        """,
    ),
    (
        # The versions of each date that the config has described (issue:
        # updates and cancellations). A row per (date, version); SEQUENCE is
        # set when the first mail describing that version goes out.
        """
        CREATE TABLE date_versions (
            series TEXT NOT NULL,
            event TEXT NOT NULL,
            version TEXT NOT NULL,
            details TEXT NOT NULL,
            observed_since TEXT NOT NULL,
            sequence INTEGER,
            PRIMARY KEY (series, event, version)
        )
        """,
    ),
    (
        # Every send handed to the relay, by wall-clock time (Unix seconds),
        # so that a rate limit holds across processes and restarts. Kept for
        # a day, long enough for per-hour and per-day quotas too.
        """
        CREATE TABLE sends (
            id INTEGER PRIMARY KEY,
            at REAL NOT NULL
        )
        """,
        "CREATE INDEX sends_at ON sends (at)",
        # See _check_ours.
        f"PRAGMA application_id = {APPLICATION_ID:d}",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)
# Sends older than this are forgotten.
_SENDS_KEPT_SECONDS = 86400.0
_SQLITE_HEADER = b"SQLite format 3\x00"

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
                await _create(path)
            await asyncio.to_thread(_check_file, path)
            # isolation_level=None: autocommit, so each statement is its own
            # transaction and explicit BEGIN/COMMIT mean what they say.
            db = await aiosqlite.connect(path, isolation_level=None, timeout=lock_wait)
        except (OSError, sqlite3.Error) as exc:
            raise _ledger_error(path, exc) from exc
        try:
            try:
                await db.execute(f"PRAGMA busy_timeout = {int(lock_wait * 1000):d}")
                # Before anything is written: never convert another program's database.
                await _check_ours(db, path)
                await db.execute("PRAGMA journal_mode = WAL")
                await db.execute("PRAGMA synchronous = NORMAL")
                await _migrate(db, path)
            except sqlite3.Error as exc:
                raise _ledger_error(path, exc) from exc
            yield cls(db, path)
        finally:
            await db.close()

    async def _fetch(self, sql: str, params: Any = ()) -> list[Any]:
        try:
            return list(await self._db.execute_fetchall(sql, params))
        except sqlite3.Error as exc:
            raise _ledger_error(self.path, exc) from exc

    async def _execute(self, sql: str, params: Any = ()) -> None:
        try:
            await self._db.execute(sql, params)
        except sqlite3.Error as exc:
            raise _ledger_error(self.path, exc) from exc

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


@dataclass(frozen=True, slots=True)
class OptOut:
    """One address that must never be mailed again, and how that came about."""

    email: str
    source: str  # "one-click", "web form", "cli", ...
    created_at: datetime


async def _create(path: Path) -> None:
    """Create a new ledger beside *path* and put it in place only when complete.

    SQLite creates an empty file the moment it connects: a process killed
    before its first migration would leave a 0-byte ledger that every later
    start (rightly) refuses as not ours.
    """
    draft = path.with_name(f".{path.name}.{os.getpid()}.new")
    await asyncio.to_thread(draft.unlink, missing_ok=True)
    try:
        db = await aiosqlite.connect(draft, isolation_level=None)
        try:
            # As every later open does, so a full disk fails here the same way.
            await db.execute("PRAGMA journal_mode = WAL")
            await _migrate(db, draft)
        finally:
            await db.close()
        try:
            # A hard link, not a rename: never replaces a ledger that another
            # process put in place meanwhile.
            await asyncio.to_thread(os.link, draft, path)
        except FileExistsError:
            pass
    finally:
        await asyncio.to_thread(draft.unlink, missing_ok=True)


def _check_file(path: Path) -> None:
    """Refuse a file at *path* that cannot be an SQLite database at all."""
    try:
        info = path.stat()
    except FileNotFoundError:
        return  # a new ledger
    if not stat.S_ISREG(info.st_mode):
        raise LedgerError(
            f"{path}: the state database is not a regular file",
            hint="set [state] url to a file path, e.g. sqlite:///state/invite-mailer.db",
        )
    with path.open("rb") as file:
        header = file.read(len(_SQLITE_HEADER))
    if info.st_size == 0 or header != _SQLITE_HEADER:
        what = "is empty (0 bytes)" if info.st_size == 0 else "is not an SQLite database"
        raise LedgerError(
            f"{path}: cannot use this file as the state database: it {what}, so it is not "
            "an invite-mailer ledger. Nothing was sent: starting with an empty ledger would "
            "send every mail again",
            hint=_FOREIGN_HINT,
        )


_FOREIGN_HINT = (
    "restore the ledger from a backup, or point [state] url at the right file; only if "
    "no mail of this series was ever sent, move the file away and run again"
)


async def _check_ours(db: aiosqlite.Connection, path: Path) -> None:
    """Refuse an SQLite database that another program wrote."""
    version = await _user_version(db)
    application = int(list(await db.execute_fetchall("PRAGMA application_id"))[0][0])
    tables = {
        str(row[0])
        for row in await db.execute_fetchall("SELECT name FROM sqlite_master WHERE type = 'table'")
    }
    if version == 0 and not tables and application == 0:
        return  # new and empty: ours to create
    if application not in (0, APPLICATION_ID) or (version == 0 and tables):
        foreign = True
    else:
        # Ledgers written before the application id was set are known by their tables.
        foreign = "deliveries" not in tables
    if foreign:
        raise LedgerError(
            f"{path}: cannot use this file as the state database: it is an SQLite database "
            "of another program (no invite-mailer ledger tables). Nothing was sent",
            hint=_FOREIGN_HINT,
        )


def _ledger_error(path: Path, exc: BaseException) -> LedgerError:
    """The cause of an SQLite or file error, for an operator."""
    if isinstance(exc, LedgerError):
        return exc
    text = str(exc)
    if "locked" in text or "busy" in text:
        return LedgerError(
            f"{path}: the state database is locked by another process ({text})",
            hint="wait until the other program (a backup, an sqlite3 shell, another "
            "invite-mailer) has finished, then run again",
        )
    if "malformed" in text or "not a database" in text or "corrupt" in text:
        return LedgerError(
            f"{path}: the state database is damaged ({text})",
            hint="stop invite-mailer and restore the file from a backup (sqlite3 "
            "'.recover' can rescue the readable rows); do not delete it: an empty ledger "
            "would send every mail again",
        )
    passing = "disk is full" in text or "disk I/O" in text
    errno_ = getattr(exc, "errno", None)
    if passing or errno_ in _PASSING_ERRNOS:
        return LedgerError(
            f"{path}: cannot write the state database ({text})",
            hint="free disk space (or wait for the storage to come back), then run again",
            temporary=True,
        )
    access = _access_problem(path)
    if access is not None or errno_ is not None or "readonly" in text or "unable to open" in text:
        why = access or f"the file or its folder cannot be opened for writing ({text})"
        return LedgerError(
            f"{path}: cannot open the state database: {why}",
            hint="invite-mailer reads and writes the state folder and the database in it "
            "(SQLite also creates the -wal and -shm files beside it): run as the user that "
            "owns them, fix the permissions or the mount, or point [state] url at a "
            "writable place",
        )
    return LedgerError(f"{path}: cannot use this file as the state database: {text}")


# A full disk or a failing device may pass; a permission stays until someone fixes it.
_PASSING_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO}


def _access_problem(path: Path) -> str | None:
    """What the file system says against writing the ledger at *path*, if anything."""
    folder = path.parent
    try:
        read_only = bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except OSError:
        read_only = False
    if read_only:
        return f"the state folder {folder} is read-only (a read-only file system)"
    if folder.is_dir() and not os.access(folder, os.W_OK | os.X_OK):
        return f"the state folder {folder} is not writable (permission denied)"
    if path.exists() and not os.access(path, os.R_OK | os.W_OK):
        return f"the database file {path} cannot be read and written (permission denied)"
    return None


async def _migrate(db: aiosqlite.Connection, path: Path) -> None:
    version = await _user_version(db)
    if version == SCHEMA_VERSION:
        return
    _refuse_newer(version, path)
    # IMMEDIATE takes the write lock first, so two processes opening a fresh
    # database at once cannot both run a migration.
    await db.execute("BEGIN IMMEDIATE")
    try:
        version = await _user_version(db)
        _refuse_newer(version, path)
        for number in range(version + 1, SCHEMA_VERSION + 1):
            for statement in MIGRATIONS[number - 1]:
                await db.execute(statement)
            await db.execute(f"PRAGMA user_version = {number:d}")
        await db.execute("COMMIT")
    except BaseException:
        await db.execute("ROLLBACK")
        raise


async def _user_version(db: aiosqlite.Connection) -> int:
    rows = list(await db.execute_fetchall("PRAGMA user_version"))
    return int(rows[0][0])


def _refuse_newer(version: int, path: Path) -> None:
    if version > SCHEMA_VERSION:
        raise LedgerError(
            f"{path}: the state database has schema version {version}, but this "
            f"invite-mailer only knows versions up to {SCHEMA_VERSION}. It was written "
            "by a newer invite-mailer: upgrade invite-mailer, or set [state] url to "
            "another file."
        )


def lock_path(database: Path) -> Path:
    return database.with_name(database.name + ".lock")


@contextmanager
def state_lock(database: Path | str) -> Iterator[None]:
    """Hold the exclusive lock that lets this process send from *database*.

    Raises :class:`~invite_mailer.errors.LockedError` at once when another
    process holds it. The lock dies with the process, so a crash never leaves
    a stale lock behind.
    """
    path = lock_path(Path(database))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            who = f" (process {holder})" if holder.isdigit() else ""
            raise LockedError(
                f"another invite-mailer (send-due or run){who} is working on the state "
                f"database {database}; wait for it to finish or stop it first"
            ) from None
        # The holder's PID, for the message above; informational only.
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock
