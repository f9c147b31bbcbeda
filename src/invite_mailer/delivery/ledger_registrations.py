"""The ledger's registration statements, run on its thread (see ``ledger_sql``).

One row per (series, date, address): registered by a link, the contact list
or the CLI, or withdrawn. Withdrawing keeps the row, so that a contact list
that still names the person does not register them again.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from datetime import UTC, datetime

from invite_mailer.core.registrations import SOURCE_CSV, Registration
from invite_mailer.delivery.database import Database, transaction
from invite_mailer.delivery.ledger_pg import advisory_lock

__all__ = ["observe_csv", "register", "registrations_of", "withdraw"]

_COLUMNS = "event, email, source, registered_at, withdrawn_at, withdrawn_by, confirm"


def _iso(moment: datetime) -> str:
    """As ``ledger_sql.iso``: aware times only, stored in UTC."""
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"the ledger records aware datetimes only, got {moment!r}")
    return moment.astimezone(UTC).isoformat()


def _row(row: tuple[str, str, str, str, str | None, str, int]) -> Registration:
    event, email, source, registered_at, withdrawn_at, withdrawn_by, confirm = row
    return Registration(
        event=event,
        email=email,
        source=source,
        registered_at=datetime.fromisoformat(registered_at),
        withdrawn_at=None if withdrawn_at is None else datetime.fromisoformat(withdrawn_at),
        withdrawn_by=withdrawn_by,
        confirm=bool(confirm),
    )


# What a plan needs: rows that change who is registered (links, CLI,
# withdrawals) or still want a confirmation. The contact list's baseline rows
# (the bulk of a big list) change neither and are left out of the view.
_PLANNED = "AND (source != 'csv' OR withdrawn_at IS NOT NULL OR confirm = 1)"


def registrations_of(
    db: Database, series: str, *, planned_only: bool = False
) -> dict[str, dict[str, Registration]]:
    """email -> event -> registration, for every row of *series* (with
    *planned_only*, the rows a plan needs)."""
    rows = db.execute(
        f"SELECT {_COLUMNS} FROM registrations WHERE series = ? "
        f"{_PLANNED if planned_only else ''} ORDER BY registered_at",
        (series,),
    )
    found: dict[str, dict[str, Registration]] = {}
    for row in rows:
        registration = _row(row)
        found.setdefault(registration.email, {})[registration.event] = registration
    return found


def register(db: Database, series: str, event: str, email: str, source: str, now: datetime) -> bool:
    """Register *email* for *event*; False when that registration was active already
    (a contact-list registration confirmed by a link or the CLI then takes that source)."""
    address = email.strip().lower()
    stamp = _iso(now)
    with transaction(db):
        advisory_lock(db, f"registrations:{series}")
        row = db.execute(
            "SELECT withdrawn_at FROM registrations WHERE series = ? AND event = ? AND email = ?",
            (series, event, address),
        ).fetchone()
        if row is None:
            db.execute(
                "INSERT INTO registrations (series, event, email, source, registered_at) "
                "VALUES (?, ?, ?, ?, ?)",
                (series, event, address, source, stamp),
            )
        elif row[0] is not None:
            db.execute(
                "UPDATE registrations SET source = ?, registered_at = ?, withdrawn_at = NULL, "
                "withdrawn_by = '', confirm = 1 WHERE series = ? AND event = ? AND email = ?",
                (source, stamp, series, event, address),
            )
        elif source != SOURCE_CSV:
            # The person (or the organiser) said so: it no longer hangs on the list.
            db.execute(
                "UPDATE registrations SET source = ? WHERE series = ? AND event = ? "
                "AND email = ? AND source = ?",
                (source, series, event, address, SOURCE_CSV),
            )
    return row is None or row[0] is not None


def withdraw(db: Database, series: str, event: str, email: str, by: str, now: datetime) -> bool:
    """Withdraw *email* from *event*; False when it was withdrawn already.

    Without a row (a registration only the contact list knows, or none at
    all) a withdrawn row is written, which outweighs the contact list.
    """
    address = email.strip().lower()
    stamp = _iso(now)
    changed = db.execute(
        "INSERT INTO registrations "
        "(series, event, email, source, registered_at, withdrawn_at, withdrawn_by) "
        "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (series, event, email) DO UPDATE SET "
        "withdrawn_at = excluded.withdrawn_at, withdrawn_by = excluded.withdrawn_by "
        "WHERE registrations.withdrawn_at IS NULL RETURNING email",
        (series, event, address, by, stamp, stamp, by),
    ).fetchall()
    return bool(changed)


def observe_csv(
    db: Database, series: str, listed: Mapping[str, frozenset[str]], now: datetime
) -> int:
    """Record the contact list's registrations the ledger does not have yet; how many.

    The first reading of a series is its baseline: those rows need no
    confirmation. Every later one is a new registration, made at *now*. A
    list whose registrations did not change since the last reading (its
    digest) costs one lookup; a changed one is inserted row by row without
    reading the table.
    """
    digest = _digest(listed)
    if _digest_read(db, series) == (True, digest):
        return 0
    with transaction(db):
        # Again under the lock: of two nodes reading a changed list, one records it.
        advisory_lock(db, f"registrations:{series}")
        known, last = _digest_read(db, series)
        if last == digest:
            return 0
        stamp = _iso(now)
        confirm = 1 if known else 0  # the first reading is the baseline
        db.execute(
            "INSERT INTO registration_imports (series, first_at, digest) VALUES (?, ?, ?) "
            "ON CONFLICT (series) DO UPDATE SET digest = excluded.digest",
            (series, stamp, digest),
        )
        added = db.executemany(
            "INSERT INTO registrations "
            "(series, event, email, source, registered_at, confirm) VALUES (?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (series, event, email) DO NOTHING",
            (
                (series, event, email, SOURCE_CSV, stamp, confirm)
                for email, dates in listed.items()
                for event in sorted(dates)
            ),
        ).rowcount
    return added


def _digest_read(db: Database, series: str) -> tuple[bool, str | None]:
    """Whether the list of *series* was read before, and its digest then."""
    row = db.execute(
        "SELECT digest FROM registration_imports WHERE series = ?", (series,)
    ).fetchone()
    return (False, None) if row is None else (True, str(row[0]))


def _digest(listed: Mapping[str, frozenset[str]]) -> str:
    """A fingerprint of the list's registrations (in the list's order)."""
    digest = hashlib.sha256()
    for email, dates in listed.items():
        digest.update(f"{email}:{','.join(sorted(dates))}\n".encode())
    return digest.hexdigest()
