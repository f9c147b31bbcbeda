"""The ledger's statements, run on its thread: rows in, records out.

Every function here takes the open connection first (SQLite's, or
PostgreSQL's in the same shape: :mod:`~invite_mailer.delivery.database`) and is
called through :class:`~invite_mailer.delivery.ledger_thread.LedgerThread`,
never from the event loop. The batch functions write many rows in one
transaction: the ledger's cost per mail is a share of one commit.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any

from invite_mailer.delivery.database import Database, transaction
from invite_mailer.delivery.ledger_pg import advisory_lock
from invite_mailer.delivery.ledger_registrations import registrations_of
from invite_mailer.delivery.records import (
    DateHistory,
    Delivery,
    DeliveryKey,
    DeliveryState,
    LedgerView,
    parse_version,
)
from invite_mailer.errors import LedgerError

__all__ = [
    "COLUMNS",
    "Holder",
    "KEY",
    "STATES",
    "Claim",
    "Finish",
    "apply_batch",
    "claim_one",
    "date_histories",
    "delivery_of",
    "finish_one",
    "iso",
    "issue_sequence",
    "observe_dates",
    "recover_rows",
    "select_deliveries",
    "view_of",
]

STATES = {state.value: state for state in DeliveryState}

# The ledger kind of confirmations, and the states after which the dates a
# confirmation described count as confirmed.
CONFIRMATION = "confirmation"
_SETTLED = frozenset({DeliveryState.SENT.value, DeliveryState.FAILED.value})

COLUMNS = (
    "series, kind, event, email, state, attempts, last_response, message_id, "
    "first_attempt_at, last_attempt_at, next_attempt_at, version, updated_at"
)
KEY = "series = ? AND kind = ? AND event = ? AND email = ?"

_CLAIM = f"""
    INSERT INTO deliveries (series, kind, event, email, state, attempts, message_id, version,
                            first_attempt_at, last_attempt_at, updated_at,
                            claimed_by, lease_until)
    VALUES (?, ?, ?, ?, 'sending', 1, ?, ?, ?, ?, ?, ?, ?)
    ON CONFLICT (series, kind, event, email) DO UPDATE SET
        state = 'sending',
        attempts = deliveries.attempts + 1,
        message_id = excluded.message_id,
        version = excluded.version,
        first_attempt_at = coalesce(deliveries.first_attempt_at, excluded.first_attempt_at),
        last_attempt_at = excluded.last_attempt_at,
        next_attempt_at = NULL,
        updated_at = excluded.updated_at,
        claimed_by = excluded.claimed_by,
        lease_until = excluded.lease_until
    WHERE deliveries.state IN ('{DeliveryState.PENDING}', '{DeliveryState.UNCERTAIN}')
    RETURNING id
"""

# Moves a claimed ('sending') delivery on; a claimed row is changed, any other is not.
_FINISH = f"""
    UPDATE deliveries
    SET state = ?, last_response = ?, next_attempt_at = ?, updated_at = ?
    WHERE {KEY} AND state = '{DeliveryState.SENDING}'
"""

_OPTED_OUT = "SELECT 1 FROM optouts WHERE series = ? AND email = ?"


def iso(moment: datetime | None) -> str | None:
    """*moment* as the ledger stores it (UTC, ISO 8601); aware datetimes only."""
    if moment is None:
        return None
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"the ledger records aware datetimes only, got {moment!r}")
    return moment.astimezone(UTC).isoformat()


def _parse(text: str | None) -> datetime | None:
    return None if text is None else datetime.fromisoformat(text)


def delivery_of(row: Sequence[Any]) -> Delivery:
    """A :class:`Delivery` from a row selected as :data:`COLUMNS`."""
    return Delivery(
        series=row[0],
        kind=row[1],
        event=row[2],
        email=row[3],
        state=STATES[row[4]],
        attempts=row[5],
        last_response=row[6],
        message_id=row[7],
        first_attempt_at=_parse(row[8]),
        last_attempt_at=_parse(row[9]),
        next_attempt_at=_parse(row[10]),
        version=row[11],
        updated_at=_parse(row[12]),
    )


@dataclass(frozen=True, slots=True)
class Claim:
    """A claim to write: *key* is being sent with *message_id* (see Ledger.claim)."""

    key: DeliveryKey
    message_id: str
    now: datetime
    version: str = ""
    unless_opted_out: bool = False  # refuse the claim when the address has opted out

    def params(self) -> tuple[str | None, ...]:
        stamp = iso(self.now)
        key = self.key
        return (key.series, key.kind, key.event, key.email, self.message_id, self.version) + (
            stamp,
            stamp,
            stamp,
        )


@dataclass(frozen=True, slots=True)
class Finish:
    """An outcome to write for a claimed delivery: its new state and the answer."""

    key: DeliveryKey
    state: DeliveryState
    response: str
    now: datetime
    next_attempt_at: datetime | None = None

    def params(self) -> tuple[str | None, ...]:
        key = self.key
        return (
            self.state.value,
            self.response,
            iso(self.next_attempt_at),
            iso(self.now),
            key.series,
            key.kind,
            key.event,
            key.email,
        )


@dataclass(frozen=True, slots=True)
class Holder:
    """Who claims: the node's id, and until when (Unix seconds) its claims hold
    without a heartbeat. With SQLite only one process sends at a time."""

    node: str = ""
    lease_until: float | None = None


def _claim(db: Database, claim: Claim, holder: Holder) -> bool:
    key = claim.key
    if claim.unless_opted_out and db.execute(_OPTED_OUT, (key.series, key.email)).fetchone():
        return False
    # fetchall: a RETURNING statement is complete (and in autocommit, committed)
    # only once stepped to its end.
    params = (*claim.params(), holder.node, holder.lease_until)
    return bool(db.execute(_CLAIM, params).fetchall())


def claim_one(db: Database, claim: Claim, holder: Holder) -> bool:
    """Write one claim (autocommit); whether the caller may send."""
    return _claim(db, claim, holder)


def finish_one(db: Database, finish: Finish) -> None:
    """Write one outcome (autocommit); LedgerError when the row was not claimed."""
    if db.execute(_FINISH, finish.params()).rowcount != 1:
        _not_claimed(db, finish)


def apply_batch(
    db: Database, finishes: Sequence[Finish], claims: Sequence[Claim], holder: Holder
) -> list[bool]:
    """Write *finishes*, then *claims*, in one transaction; whether each claim holds.

    Outcomes first: a retry put back to ``pending`` may be claimed again in
    the same batch. All or nothing: on any error nothing of the batch is kept.
    """
    # Every row in key order, an outcome before a claim of the same row: two
    # nodes writing overlapping batches lock rows in the same order, so
    # PostgreSQL never has to break a deadlock between them.
    steps = sorted(
        [(astuple_key(f.key), 0, n) for n, f in enumerate(finishes)]
        + [(astuple_key(c.key), 1, n) for n, c in enumerate(claims)]
    )
    granted = [False] * len(claims)
    with transaction(db):
        for _, is_claim, n in steps:
            if is_claim:
                granted[n] = _claim(db, claims[n], holder)
            elif db.execute(_FINISH, finishes[n].params()).rowcount != 1:
                _not_claimed(db, finishes[n])
    return granted


def astuple_key(key: DeliveryKey) -> tuple[str, str, str, str]:
    return (key.series, key.kind, key.event, key.email)


def _state_of(db: Database, key: DeliveryKey) -> DeliveryState | None:
    row = db.execute(
        f"SELECT state FROM deliveries WHERE {KEY}", (key.series, key.kind, key.event, key.email)
    ).fetchone()
    return None if row is None else STATES[row[0]]


def _not_claimed(db: Database, finish: Finish) -> None:
    current = _state_of(db, finish.key)
    found = "no such delivery" if current is None else f"it is {current}"
    raise LedgerError(f"cannot mark {finish.key} as {finish.state}: it was not claimed ({found})")


def view_of(db: Database, series: str) -> LedgerView:
    """A snapshot of every delivery state of *series*, for the planner.

    The rows are streamed from the cursor, never held as a list: for a big
    ledger the snapshot is the only copy in memory.
    """
    rows: Iterable[tuple[str, str, str, str, str | None, str, int]] = db.execute(
        "SELECT kind, event, email, state, next_attempt_at, version, attempts "
        "FROM deliveries WHERE series = ? ORDER BY last_attempt_at",
        (series,),
    )
    states: dict[tuple[str, str], dict[str, DeliveryState]] = {}
    upcoming: dict[tuple[str, str, str], datetime] = {}
    seen: dict[str, dict[str, str]] = {}
    parsed: dict[str, dict[str, str]] = {}
    attempts_made: dict[tuple[str, str, str], int] = {}
    confirmed: dict[str, set[str]] = {}
    for kind, event, email, state, next_attempt_at, version, attempts in rows:
        if kind == CONFIRMATION and state in _SETTLED:
            confirmed.setdefault(email, set()).update(parse_version(version) or (event,))
        mailing = states.get((kind, event))
        if mailing is None:
            mailing = states[(kind, event)] = {}
        mailing[email] = STATES[state]
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
        MappingProxyType(date_histories(db, series)),
        MappingProxyType(attempts_made),
        MappingProxyType(registrations_of(db, series, planned_only=True)),
        MappingProxyType({email: frozenset(dates) for email, dates in confirmed.items()}),
    )


def date_histories(db: Database, series: str) -> dict[str, DateHistory]:
    """What the ledger knows about the versions of each date of *series*."""
    rows = db.execute(
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


def observe_dates(
    db: Database,
    series: str,
    dates: Mapping[str, tuple[str, Mapping[str, str]]],
    now: datetime,
) -> None:
    """Record the version each date has now (see Ledger.observe_dates), in one transaction.

    Read again under the lock: two nodes that both saw an edit record it once,
    and the second does not restart the grace period the first one began.
    """
    if not _changed_dates(db, series, dates):
        return
    with transaction(db):
        advisory_lock(db, f"date_versions:{series}")
        changed = _changed_dates(db, series, dates)
        for event, (version, details) in changed.items():
            db.execute(
                "INSERT INTO date_versions (series, event, version, details, observed_since) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (series, event, version) DO UPDATE SET "
                "observed_since = excluded.observed_since, details = excluded.details",
                (series, event, version, json.dumps(dict(details), sort_keys=True), iso(now)),
            )


def _changed_dates(
    db: Database, series: str, dates: Mapping[str, tuple[str, Mapping[str, str]]]
) -> dict[str, tuple[str, Mapping[str, str]]]:
    histories = date_histories(db, series)
    return {
        event: entry
        for event, entry in dates.items()
        if (history := histories.get(event)) is None or history.current != entry[0]
    }


def issue_sequence(db: Database, series: str, event: str, version: str) -> int:
    """The calendar SEQUENCE for mail describing *version*, recorded on first use."""
    history = date_histories(db, series).get(event)
    sequence = 0 if history is None else history.sequence_for(version)
    if history is None or history.sequences.get(version) != sequence:
        db.execute(
            "UPDATE date_versions SET sequence = ? WHERE series = ? AND event = ? AND version = ?",
            (sequence, series, event, version),
        )
    return sequence


def recover_rows(db: Database, stamp: str | None, lease_before: float | None) -> list[Any]:
    """Turn ``sending`` rows into ``uncertain`` (with *lease_before*: only those whose
    lease ran out before then); the rows changed, as :data:`COLUMNS`."""
    expired = "AND (lease_until IS NULL OR lease_until < ?)" if lease_before is not None else ""
    statement = f"""
        UPDATE deliveries
        SET state = '{DeliveryState.UNCERTAIN}', updated_at = ?, claimed_by = '',
            lease_until = NULL,
            last_response = 'interrupted while sending; the relay may have accepted it'
        WHERE state = '{DeliveryState.SENDING}' {expired}
        RETURNING {COLUMNS}
    """
    params = (stamp,) if lease_before is None else (stamp, lease_before)
    return db.execute(statement, params).fetchall()


def select_deliveries(
    db: Database,
    series: str,
    states: Collection[DeliveryState] | None,
    kind: str | None,
    event: str | None,
    tried: bool,
) -> list[Delivery]:
    """Rows of *series*, optionally filtered (see Ledger.deliveries)."""
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
    if tried:
        where.append("attempts > 0")
    statement = (
        f"SELECT {COLUMNS} FROM deliveries WHERE {' AND '.join(where)} ORDER BY kind, event, email"
    )
    return [delivery_of(row) for row in db.execute(statement, params).fetchall()]
