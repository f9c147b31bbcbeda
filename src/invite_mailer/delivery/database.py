"""What the ledger's statements need of a database connection.

The standard library's :class:`sqlite3.Connection` has this shape, and
:class:`~invite_mailer.delivery.ledger_pg.PgDatabase` gives a PostgreSQL
connection the same, so one set of statements serves both engines.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Protocol

__all__ = ["Cursor", "Database", "transaction"]


class Cursor(Protocol):
    @property
    def rowcount(self) -> int: ...
    def fetchone(self) -> Any: ...
    def fetchall(self) -> list[Any]: ...
    def __iter__(self) -> Iterator[Any]: ...


class Database(Protocol):
    def execute(self, sql: str, parameters: Sequence[Any] = ..., /) -> Cursor: ...
    def executemany(self, sql: str, parameters: Iterable[Sequence[Any]], /) -> Cursor: ...
    @property
    def in_transaction(self) -> bool: ...
    def close(self) -> None: ...


@contextmanager
def transaction(db: Database) -> Iterator[None]:
    """The block as one transaction: committed when it ends, all or nothing.

    ``BEGIN IMMEDIATE`` takes SQLite's write lock before the first read, so
    what the block reads is still true when it writes (PostgreSQL locks rows
    as they are written; see ``ledger_pg.advisory_lock`` for reads).
    """
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
