"""``invite-mailer migrate``: schema upgrades, and moving an SQLite ledger to PostgreSQL.

An SQLite ledger is upgraded whenever it is opened (one host, one process
at a time). A PostgreSQL ledger is upgraded only here, explicitly: several
nodes may run on it, and the operator stops them, backs up, migrates and
starts the new version everywhere (docs/operations.md).

Moving copies every row of every table in one transaction on PostgreSQL
and compares the counts before it commits: either the whole ledger arrives,
or nothing does. The SQLite file is only read, under the lock that keeps
``send-due`` and ``run`` away meanwhile, and stays as it was (keep it as
the backup). A target that already holds a ledger's rows is refused: two
ledgers merged would forget which mails went out.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from invite_mailer.delivery.database import transaction
from invite_mailer.delivery.ledger_file import SCHEMA_VERSION, check_file, ledger_error, state_lock
from invite_mailer.delivery.ledger_open import open_file, safe_url
from invite_mailer.delivery.ledger_pg import PgDatabase, connect_pg, migrate_pg, pg_error
from invite_mailer.errors import LedgerError

__all__ = ["COPIED_TABLES", "Moved", "Upgraded", "move_to_postgres", "upgrade"]

# Every table that holds the series' history, parents first. Not ``nodes``:
# which processes were alive on the old host says nothing on the new one.
COPIED_TABLES = (
    "deliveries",
    "optouts",
    "date_versions",
    "sends",
    "registrations",
    "registration_imports",
    "bounces",
)
_IDENTITY_TABLES = ("deliveries", "sends", "bounces")
_CHUNK = 5000


@dataclass(frozen=True, slots=True)
class Upgraded:
    where: str
    before: int
    after: int


@dataclass(frozen=True, slots=True)
class Moved:
    source: str
    target: str
    rows: dict[str, int]


def upgrade(target: Path | str) -> Upgraded:
    """Apply the migrations this invite-mailer knows to the ledger at *target*."""
    if isinstance(target, Path):
        before = 0
        try:
            check_file(target)  # a file that is no SQLite database is named as such
            if target.is_file():
                with _sqlite(target) as db:
                    before = int(db.execute("PRAGMA user_version").fetchone()[0])
            open_file(target, 10.0).close()  # opening an SQLite ledger migrates it
        except (OSError, sqlite3.Error) as exc:
            raise ledger_error(target, exc) from exc
        return Upgraded(str(target), before, SCHEMA_VERSION)
    where = safe_url(target)
    try:
        with closing(connect_pg(target, timeout=10.0)) as db:
            before, after = migrate_pg(db, where)
    except Exception as exc:
        raise pg_error(where, exc) from exc
    return Upgraded(where, before, after)


def move_to_postgres(source: Path, target: str) -> Moved:
    """Copy the SQLite ledger *source* into the empty PostgreSQL ledger *target*."""
    if not source.is_file():
        raise LedgerError(
            f"{source}: no SQLite ledger there",
            hint="name the file that [state] url pointed at: --from sqlite:///state/invite-mailer.db",
        )
    upgrade(source)  # the same schema version on both sides
    where = safe_url(target)
    with state_lock(source), _sqlite(source) as old:
        try:
            with closing(connect_pg(target, timeout=10.0)) as new:
                migrate_pg(new, where)
                rows = _copy(old, new, where)
        except LedgerError:
            raise
        except Exception as exc:
            raise pg_error(where, exc) from exc
    return Moved(str(source), where, rows)


def _sqlite(path: Path) -> closing[sqlite3.Connection]:
    return closing(sqlite3.connect(path, isolation_level=None))


def _copy(old: sqlite3.Connection, new: PgDatabase, where: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    with transaction(new):
        for table in COPIED_TABLES:
            if new.execute(f"SELECT 1 FROM {table} LIMIT 1").fetchone() is not None:
                raise LedgerError(
                    f"{where}: the target already holds a ledger (rows in '{table}'). "
                    "Nothing was copied",
                    hint="move into a new, empty database (or schema); never merge two ledgers",
                )
        for table in COPIED_TABLES:
            counts[table] = _copy_table(old, new, table)
            found = new.execute(f"SELECT count(*) FROM {table}").fetchone()
            copied = None if found is None else found[0]
            if copied != counts[table]:
                raise LedgerError(
                    f"{where}: {table}: {copied} of {counts[table]} rows arrived; nothing was kept"
                )
        for table in _IDENTITY_TABLES:
            # The next row written on PostgreSQL gets an id after the copied ones.
            new.execute(
                f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                f"coalesce((SELECT max(id) FROM {table}), 0) + 1, false)"
            )
    return counts


def _copy_table(old: sqlite3.Connection, new: PgDatabase, table: str) -> int:
    cursor = old.execute(f"SELECT * FROM {table}")
    columns = [column[0] for column in cursor.description]
    insert = f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"
    total = 0
    for chunk in _chunks(cursor):
        new.executemany(insert, chunk)
        total += len(chunk)
    return total


def _chunks(cursor: sqlite3.Cursor) -> Iterator[list[Any]]:
    while rows := cursor.fetchmany(_CHUNK):
        yield rows
