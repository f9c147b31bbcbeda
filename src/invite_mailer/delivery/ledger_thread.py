"""The ledger's own thread: one database connection, used by one thread only.

Every ledger call is one function run on this thread, so a call costs one
hop from the event loop and back however many statements it runs, and the
statements of one batch share one transaction. The standard library's
``sqlite3`` and psycopg both release the GIL while the database works, so
the event loop keeps running meanwhile.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import psycopg

from invite_mailer.delivery.database import Database
from invite_mailer.errors import LedgerError

__all__ = ["LedgerThread"]

_T = TypeVar("_T")


class LedgerThread:
    """Runs functions of one connection on one dedicated thread.

    *error* says what a database or file error means, for the engine in use.
    """

    def __init__(self, error: Callable[[BaseException], LedgerError]) -> None:
        self._error = error
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ledger")
        self._db: Database | None = None

    async def start(self, opener: Callable[[], Database]) -> None:
        """Open the connection on the thread with *opener*."""

        def begin() -> None:
            self._db = opener()

        await self._submit(begin)

    async def call(self, work: Callable[[Database], _T]) -> _T:
        """Run ``work(connection)`` on the thread; database errors become LedgerError."""

        def run() -> _T:
            assert self._db is not None, "the ledger is closed"
            return work(self._db)

        return await self._submit(run)

    async def close(self) -> None:
        """Close the connection and end the thread (after every call queued so far)."""

        def end() -> None:
            if self._db is not None:
                self._db.close()
                self._db = None

        try:
            await self._submit(end)
        finally:
            self._executor.shutdown(wait=False)

    async def _submit(self, work: Callable[[], _T]) -> _T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, work)
        except (OSError, sqlite3.Error, psycopg.Error) as exc:
            raise self._error(exc) from exc
