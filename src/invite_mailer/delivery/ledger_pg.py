"""The ledger in PostgreSQL: the same tables, statements and migrations as in SQLite.

Several daemons and ``send-due`` runs on several hosts share one ledger
here. The statements of :mod:`~invite_mailer.delivery.ledger_sql` run
unchanged: :class:`PgDatabase` gives a psycopg 3 connection the interface
of the standard library's ``sqlite3`` connection that they are written
against (``?`` placeholders, ``BEGIN IMMEDIATE``), on the ledger's own
thread like SQLite's, so both engines run one set of statements.

What keeps two processes from sending one mail: a claim is one conditional
upsert (``INSERT … ON CONFLICT DO UPDATE … WHERE state IN ('pending',
'uncertain')``). PostgreSQL locks the row for it; a second claimer waits for
the first one's commit, finds the row ``sending`` and gets nothing back.
Every transaction that reads before it writes (the date versions, the
registrations of a contact list, the schema) first takes a transaction-level
advisory lock, so two nodes never decide on the same stale reading.

Schema changes are explicit here (``invite-mailer migrate``): a fresh, empty
database is set up on first use, but an older schema is not upgraded by
whichever node happens to start first while others still run the old code.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterable, Sequence
from typing import Any

import psycopg
from psycopg import pq

from invite_mailer.delivery.database import transaction
from invite_mailer.delivery.ledger_file import MIGRATIONS, SCHEMA_VERSION, refuse_newer
from invite_mailer.errors import LedgerError

__all__ = ["PgDatabase", "advisory_lock", "connect_pg", "ensure_schema", "migrate_pg", "pg_error"]

# One row: the schema version, as SQLite's PRAGMA user_version. Its presence
# also marks the database as an invite-mailer ledger.
_VERSION_TABLE = "invite_mailer_schema"

_PLACEHOLDER = re.compile(r"\?")


class PgDatabase:
    """A psycopg connection that runs the ledger's SQLite-style statements."""

    def __init__(self, connection: psycopg.Connection[Any]) -> None:
        self.connection = connection
        self._translated: dict[str, str] = {}

    def execute(self, statement: str, parameters: Sequence[Any] = (), /) -> psycopg.Cursor[Any]:
        return self.connection.execute(self._translate(statement), tuple(parameters))

    def executemany(
        self, statement: str, parameters: Iterable[Sequence[Any]], /
    ) -> psycopg.Cursor[Any]:
        cursor = self.connection.cursor()
        cursor.executemany(self._translate(statement), (tuple(p) for p in parameters))
        return cursor

    @property
    def in_transaction(self) -> bool:
        return self.connection.info.transaction_status != pq.TransactionStatus.IDLE

    def close(self) -> None:
        self.connection.close()

    def _translate(self, statement: str) -> str:
        translated = self._translated.get(statement)
        if translated is None:
            text = statement.strip()
            if text.upper() == "BEGIN IMMEDIATE":
                # PostgreSQL locks rows as they are written; a transaction that
                # reads first takes an advisory lock (see advisory_lock).
                text = "BEGIN"
            translated = _PLACEHOLDER.sub("%s", text.replace("%", "%%"))
            self._translated[statement] = translated
        return translated


def advisory_lock(db: object, name: str) -> None:
    """Serialise the current transaction with every other one that locks *name*.

    A no-op for SQLite, whose ``BEGIN IMMEDIATE`` already takes the one write lock.
    """
    if isinstance(db, PgDatabase):
        key = zlib.crc32(name.encode("utf-8"))
        # Per schema: two ledgers in one database (tests, staging) do not block each other.
        db.execute("SELECT pg_advisory_xact_lock(hashtext(current_schema()), ?)", (key - 2**31,))


def connect_pg(url: str, *, timeout: float) -> PgDatabase:
    """Connect in autocommit mode: explicit BEGIN/COMMIT mean what they say, as in SQLite."""
    connection = psycopg.connect(
        url, autocommit=True, connect_timeout=max(int(timeout), 2), application_name="invite-mailer"
    )
    db = PgDatabase(connection)
    # A lock held by a stuck transaction elsewhere fails the statement instead
    # of hanging the pass; the error says what to do.
    db.execute(f"SET lock_timeout = '{int(timeout * 1000):d}ms'")
    return db


def _schema_version(db: PgDatabase) -> int | None:
    row = db.execute("SELECT to_regclass(?)", (_VERSION_TABLE,)).fetchone()
    if row is None or row[0] is None:
        return None
    found = db.execute(f"SELECT version FROM {_VERSION_TABLE}").fetchone()
    return 0 if found is None else int(found[0])


def _has_ledger_tables(db: PgDatabase) -> bool:
    row = db.execute("SELECT to_regclass('deliveries')").fetchone()
    return row is not None and row[0] is not None


def ensure_schema(db: PgDatabase, where: str) -> None:
    """Use the database at *where* as it is, or set up a new empty one.

    Refuses a schema older or newer than this invite-mailer's, and tables of
    another program.
    """
    version = _schema_version(db)
    if version is None:
        if _has_ledger_tables(db):
            raise LedgerError(
                f"{where}: the database has a table 'deliveries' but no invite-mailer schema "
                "version; it was not written by invite-mailer. Nothing was sent",
                hint="point [state] url at the right database or schema",
            )
        migrate_pg(db, where)
        return
    refuse_newer(version, where, " on this host")
    if version < SCHEMA_VERSION:
        raise LedgerError(
            f"{where}: the ledger has schema version {version}, this invite-mailer needs "
            f"{SCHEMA_VERSION}. Nothing was sent",
            hint="stop every invite-mailer on this ledger, back it up (pg_dump), run "
            "'invite-mailer migrate', then start the new version everywhere",
        )


def migrate_pg(db: PgDatabase, where: str) -> tuple[int, int]:
    """Bring the schema to ``SCHEMA_VERSION`` in one transaction; (from, to)."""
    with transaction(db):
        advisory_lock(db, _VERSION_TABLE)
        db.execute(f"CREATE TABLE IF NOT EXISTS {_VERSION_TABLE} (version INTEGER NOT NULL)")
        found = db.execute(f"SELECT version FROM {_VERSION_TABLE}").fetchone()
        version = 0 if found is None else int(found[0])
        refuse_newer(version, where, " on this host")
        if found is None:
            db.execute(f"INSERT INTO {_VERSION_TABLE} (version) VALUES (0)")
        for number in range(version + 1, SCHEMA_VERSION + 1):
            for statement in MIGRATIONS[number - 1]:
                ddl = postgres_ddl(statement)
                if ddl:
                    db.execute(ddl)
            db.execute(f"UPDATE {_VERSION_TABLE} SET version = ?", (number,))
    return version, SCHEMA_VERSION


def postgres_ddl(statement: str) -> str:
    """A migration statement written for SQLite, in PostgreSQL's words ('' to skip).

    Text compares and sorts byte by byte as in SQLite (``COLLATE "C"``), so
    both engines list rows in the same order.
    """
    text = statement.strip()
    if text.upper().startswith("PRAGMA"):
        return ""  # SQLite's own settings (the application id)
    text = re.sub(
        r"\bINTEGER PRIMARY KEY\b", "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY", text
    )
    text = re.sub(r"\bREAL\b", "DOUBLE PRECISION", text)
    return re.sub(r"\bTEXT\b", 'TEXT COLLATE "C"', text)


def pg_error(where: str, exc: BaseException) -> LedgerError:
    """What a PostgreSQL error means to an operator."""
    if isinstance(exc, LedgerError):
        return exc
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, psycopg.OperationalError):
        if "password" in text or "authentication" in text:
            return LedgerError(
                f"{where}: PostgreSQL refused the login ({text})",
                hint="set PGPASSWORD in the environment, or use ~/.pgpass or a service "
                "file; the user needs rights on the ledger's tables",
            )
        return LedgerError(
            f"{where}: cannot reach the state database ({text})",
            hint="check that PostgreSQL runs and [state] url names its host, port and "
            "database; nothing is sent until the ledger can be written",
            temporary=True,
        )
    if isinstance(exc, psycopg.errors.LockNotAvailable | psycopg.errors.QueryCanceled):
        return LedgerError(
            f"{where}: the state database is locked by another transaction ({text})",
            hint="a long transaction (a migration, a manual session) holds the ledger's "
            "rows; let it finish, then run again",
            temporary=True,
        )
    return LedgerError(f"{where}: the state database refused a statement: {text}")
