"""Cancellations that a library swallowed, raised where they belong.

On Python 3.11 :func:`asyncio.wait_for` returns the awaited result when that
operation finishes in the same turn of the event loop as a ``cancel()`` of
the waiting task: the cancellation is lost (CPython gh-86296, fixed in
3.12). aiosmtplib waits with it for the connect and for every reply, so a
sender stopped just as the relay answered would go on: wait a minute for a
rate-limit slot, or take the next mail of a pass that was stopped. The task
still counts the request (:meth:`asyncio.Task.cancelling`), so it is raised
again at the next point where stopping loses nothing.
"""

from __future__ import annotations

import asyncio

__all__ = ["raise_lost_cancellation"]


def raise_lost_cancellation() -> None:
    """Raise CancelledError when this task was cancelled and nobody saw it.

    Code that stops a cancellation on purpose calls ``uncancel()`` (as
    :func:`asyncio.timeout` does); a count left means the request was lost.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
