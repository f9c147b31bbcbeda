"""The ledger's statements, run on its thread: rows in, records out.

Every function here takes the open :class:`sqlite3.Connection` first and is
called through :class:`~invite_mailer.delivery.ledger_thread.LedgerThread`,
never from the event loop. The batch functions write many rows in one
transaction: the ledger's cost per mail is a share of one commit.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any

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


def _claim(db: sqlite3.Connection, claim: Claim) -> bool:
    key = claim.key
    if claim.unless_opted_out and db.execute(_OPTED_OUT, (key.series, key.email)).fetchone():
        return False
    # fetchall: a RETURNING statement is complete (and in autocommit, committed)
    # only once stepped to its end.
    return bool(db.execute(_CLAIM, claim.params()).fetchall())


def claim_one(db: sqlite3.Connection, claim: Claim) -> bool:
    """Write one claim (autocommit); whether the caller may send."""
    return _claim(db, claim)


def finish_one(db: sqlite3.Connection, finish: Finish) -> None:
    """Write one outcome (autocommit); LedgerError when the row was not claimed."""
    if db.execute(_FINISH, finish.params()).rowcount != 1:
        _not_claimed(db, finish)


def apply_batch(
    db: sqlite3.Connection, finishes: Sequence[Finish], claims: Sequence[Claim]
) -> list[bool]:
    """Write *finishes*, then *claims*, in one transaction; whether each claim holds.

    Outcomes first: a retry put back to ``pending`` may be claimed again in
    the same batch. All or nothing: on any error nothing of the batch is kept.
    """
    db.execute("BEGIN IMMEDIATE")
    try:
        if finishes:
            changed = db.executemany(_FINISH, [f.params() for f in finishes]).rowcount
            if changed != len(finishes):
                for finish in finishes:  # which one? (rare: a bug, so the cost is fine)
                    current = _state_of(db, finish.key)
                    if current is not DeliveryState.SENDING and finish.state is not current:
                        _not_claimed(db, finish)
                raise LedgerError(f"{changed} of {len(finishes)} outcomes could be recorded")
        granted = [_claim(db, claim) for claim in claims]
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    return granted


def _state_of(db: sqlite3.Connection, key: DeliveryKey) -> DeliveryState | None:
    row = db.execute(
        f"SELECT state FROM deliveries WHERE {KEY}", (key.series, key.kind, key.event, key.email)
    ).fetchone()
    return None if row is None else STATES[row[0]]


def _not_claimed(db: sqlite3.Connection, finish: Finish) -> None:
    current = _state_of(db, finish.key)
    found = "no such delivery" if current is None else f"it is {current}"
    raise LedgerError(f"cannot mark {finish.key} as {finish.state}: it was not claimed ({found})")


def view_of(db: sqlite3.Connection, series: str) -> LedgerView:
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


def date_histories(db: sqlite3.Connection, series: str) -> dict[str, DateHistory]:
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
    db: sqlite3.Connection,
    series: str,
    dates: Mapping[str, tuple[str, Mapping[str, str]]],
    now: datetime,
) -> None:
    """Record the version each date has now (see Ledger.observe_dates), in one transaction."""
    histories = date_histories(db, series)
    changed = {
        event: entry
        for event, entry in dates.items()
        if (history := histories.get(event)) is None or history.current != entry[0]
    }
    if not changed:
        return
    db.execute("BEGIN IMMEDIATE")
    try:
        for event, (version, details) in changed.items():
            db.execute(
                "INSERT INTO date_versions (series, event, version, details, observed_since) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (series, event, version) DO UPDATE SET "
                "observed_since = excluded.observed_since, details = excluded.details",
                (series, event, version, json.dumps(dict(details), sort_keys=True), iso(now)),
            )
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


def issue_sequence(db: sqlite3.Connection, series: str, event: str, version: str) -> int:
    """The calendar SEQUENCE for mail describing *version*, recorded on first use."""
    history = date_histories(db, series).get(event)
    sequence = 0 if history is None else history.sequence_for(version)
    if history is None or history.sequences.get(version) != sequence:
        db.execute(
            "UPDATE date_versions SET sequence = ? WHERE series = ? AND event = ? AND version = ?",
            (sequence, series, event, version),
        )
    return sequence
