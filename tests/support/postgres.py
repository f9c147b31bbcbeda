"""A real PostgreSQL for the ledger tests: a fresh schema per test.

The server is ``TEST_POSTGRESQL_URL`` (default: 127.0.0.1:5432,
database ``test``, trust authentication, as ``.ci/run`` sets it up). Every
test gets its own schema (``search_path`` in the URL's ``options``), dropped
afterwards, so tests never see each other's rows. Without a server the test
is skipped, except under ``CI=true``, where that is a failure.
"""

from __future__ import annotations

import os
import secrets
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psycopg
import pytest

from invite_mailer.delivery.ledger_pg import PgDatabase

SERVER = os.environ.get("TEST_POSTGRESQL_URL", "postgresql://postgres@127.0.0.1:5432/test")


def require_postgres() -> None:
    """Skip the calling test without a PostgreSQL server, or fail it under ``CI=true``."""
    try:
        with psycopg.connect(SERVER, connect_timeout=3):
            return
    except psycopg.Error as exc:
        reason = f"no PostgreSQL at {SERVER}: {' '.join(str(exc).split())}"
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true but {reason} (.ci/run starts one)")
    pytest.skip(reason)


@contextmanager
def fresh_schema() -> Iterator[str]:
    """A URL whose tables live in a new, empty schema, dropped at the end."""
    require_postgres()
    schema = f"t_{secrets.token_hex(6)}"
    with psycopg.connect(SERVER, autocommit=True) as admin:
        admin.execute(f"CREATE SCHEMA {schema}")
    separator = "&" if "?" in SERVER else "?"
    url = f"{SERVER}{separator}options={quote(f'-csearch_path={schema}')}"
    try:
        yield url
    finally:
        with psycopg.connect(SERVER, autocommit=True) as admin:
            admin.execute(f"DROP SCHEMA {schema} CASCADE")


def query(target: Path | str, statement: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    """Run *statement* (``?`` placeholders) on the ledger at *target* outside invite-mailer."""
    if isinstance(target, str):
        with psycopg.connect(target, autocommit=True) as connection:
            cursor = PgDatabase(connection).execute(statement, params)
            return [tuple(row) for row in cursor.fetchall()] if cursor.description else []
    with sqlite3.connect(target) as db:
        return [tuple(row) for row in db.execute(statement, params).fetchall()]


def move_sends_back(target: Path | str, seconds: float) -> None:
    """Move the ledger's record of every send *seconds* into the past, as if time passed."""
    query(target, "UPDATE sends SET at = at - ?", (seconds,))
    if isinstance(target, str):
        # PostgreSQL counts the shared quota windows in send_slots as well.
        query(
            target,
            "UPDATE send_slots SET started = started - ?, ended = ended - ?, "
            "lease_until = lease_until - ?",
            (seconds, seconds, seconds),
        )


def end_leases(target: Path | str) -> None:
    """On PostgreSQL: let the leases of every claimed mail run out, as after
    ``state.lease_seconds`` without a heartbeat from a node that was killed.

    SQLite has no leases (one process at a time takes the ledger over whole).
    """
    if isinstance(target, str):
        query(
            target,
            "UPDATE deliveries SET lease_until = lease_until - 86400 WHERE state = 'sending'",
        )


def ledger_written(target: Path | str) -> bool:
    """Whether invite-mailer has set the ledger at *target* up (a file, or its tables)."""
    if isinstance(target, str):
        return query(target, "SELECT to_regclass('deliveries')") != [(None,)]
    return target.exists()
