"""Work that must not hold up the event loop, in threads that never hold up an exit."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import TypeVar

__all__ = ["in_thread"]

T = TypeVar("T")


async def in_thread(
    func: Callable[[], T], name: str, *, finished: Callable[[], None] | None = None
) -> T:
    """Run *func* in a daemon thread and wait for its result.

    Parsing config is CPU work that may take long (a huge or hostile file):
    on the event loop it would stop the heartbeat, the scheduler and the web
    endpoint. Not :func:`asyncio.to_thread`: its executor is joined when the
    loop closes, so a parse that never ends would keep SIGTERM from ending
    the process; a daemon thread is simply left behind. *finished* is called
    on the loop when the thread ends, also after the wait was given up.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if finished is not None:
            finished()
        if future.done():  # given up (timeout, shutdown)
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def work() -> None:
        try:
            result, error = func(), None
        except BaseException as exc:  # handed to the waiting coroutine
            result, error = None, exc
        with contextlib.suppress(RuntimeError):  # the loop has closed meanwhile
            loop.call_soon_threadsafe(settle, result, error)

    try:
        threading.Thread(target=work, name=name, daemon=True).start()
    except BaseException:  # no thread to be had (a thread or memory limit)
        if finished is not None:
            finished()
        raise
    return await future
