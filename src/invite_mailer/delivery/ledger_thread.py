"""The ledger's own thread: one SQLite connection, used by one thread only.

Every ledger call is one function run on this thread, so a call costs one
hop from the event loop and back however many statements it runs, and the
statements of one batch share one transaction. The standard library's
``sqlite3`` releases the GIL while SQLite works, so the event loop keeps
running meanwhile.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from invite_mailer.delivery.ledger_file import ledger_error

__all__ = ["LedgerThread"]

_T = TypeVar("_T")


class LedgerThread:
    """Runs functions of one :class:`sqlite3.Connection` on one dedicated thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ledger")
        self._db: sqlite3.Connection | None = None

    async def start(self, opener: Callable[[], sqlite3.Connection]) -> None:
        """Open the connection on the thread with *opener*."""

        def begin() -> None:
            self._db = opener()

        await self._submit(begin)

    async def call(self, work: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run ``work(connection)`` on the thread; SQLite errors become LedgerError."""

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
        except (OSError, sqlite3.Error) as exc:
            raise ledger_error(self.path, exc) from exc
