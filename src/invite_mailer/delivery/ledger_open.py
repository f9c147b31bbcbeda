"""Opening the ledger: an SQLite file or a PostgreSQL database, on the ledger's thread."""

from __future__ import annotations

import functools
import os
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

from invite_mailer.delivery.database import Database
from invite_mailer.delivery.ledger_file import (
    check_file,
    check_ours,
    connect,
    create,
    ledger_error,
    migrate,
)
from invite_mailer.delivery.ledger_pg import connect_pg, ensure_schema, pg_error
from invite_mailer.delivery.ledger_thread import LedgerThread

__all__ = ["as_target", "is_postgres_url", "ledger_exists", "opening", "safe_url"]


def opening(
    target: Path | str, lock_wait: float
) -> tuple[LedgerThread, str, Callable[[], Database], dict[str, Any]]:
    """The thread, the name for messages, the opener and the Ledger's keywords for *target*."""
    if is_postgres_url(target):
        url = str(target)
        where = safe_url(url)
        thread = LedgerThread(functools.partial(pg_error, where))
        return thread, where, functools.partial(_open_postgres, url, lock_wait), {"shared": True}
    path = Path(target)
    thread = LedgerThread(functools.partial(ledger_error, path))
    return thread, str(path), functools.partial(open_file, path, lock_wait), {"path": path}


def as_target(value: Path | str) -> Path | str:
    """A PostgreSQL URL as it is, anything else as the path of an SQLite file."""
    return value if is_postgres_url(value) else Path(value)


def ledger_exists(target: Path | str) -> bool:
    """Whether a ledger may be there to read (a database server is asked when opened)."""
    return is_postgres_url(target) or Path(target).exists()


def is_postgres_url(target: Path | str) -> bool:
    return isinstance(target, str) and target.startswith(("postgresql://", "postgres://"))


def _open_postgres(url: str, lock_wait: float) -> Database:
    """Connect and check the schema (a new database is set up); on the ledger's thread."""
    db = connect_pg(url, timeout=lock_wait)
    try:
        ensure_schema(db, safe_url(url))
    except BaseException:
        db.close()
        raise
    return db


def safe_url(url: str) -> str:
    """*url* for messages: the settings refuse a password, this drops any that slipped in."""
    scheme, _, rest = url.partition("://")
    who, at, where = rest.rpartition("@")
    return f"{scheme}://{who.partition(':')[0]}{at}{where}" if at else url


def open_file(path: Path, lock_wait: float) -> sqlite3.Connection:
    """Open (creating if needed) and migrate the database; runs on the ledger's thread."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not os.path.lexists(path):
        create(path)
    check_file(path)
    db = connect(path, timeout=lock_wait)
    try:
        db.execute(f"PRAGMA busy_timeout = {int(lock_wait * 1000):d}")
        # Before anything is written: never convert another program's database.
        check_ours(db, path)
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = NORMAL")
        migrate(db, path)
    except BaseException:
        db.close()
        raise
    return db
