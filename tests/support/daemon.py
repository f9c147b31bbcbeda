"""The daemon in a task of the test's own event loop, as ``invite-mailer run`` wires it.

For tests that drive the daemon's clock themselves: the wall-clock sweep is
pushed an hour out, so only the test wakes it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path

from invite_mailer.delivery.ledger import Ledger
from invite_mailer.delivery.transport import Transport
from invite_mailer.inputs.config import Config
from invite_mailer.service.daemon import Daemon


def make_daemon(
    config: Config,
    ledger: Ledger,
    transport: Transport,
    project: Path,
    clock: Callable[[], datetime],
) -> Daemon:
    """A daemon on *project*'s config folder and *clock*; not serving yet."""
    return Daemon(
        config,
        ledger,
        transport,
        config_dir=project / "config",
        templates_dir=None,
        clock=clock,
        sweep_seconds=3600,
    )


@asynccontextmanager
async def serving(daemon: Daemon) -> AsyncIterator[asyncio.Task[None]]:
    """*daemon* serving in a task: entered once it has caught up, stopped on exit."""
    task = asyncio.create_task(daemon.serve())
    try:
        async with asyncio.timeout(60):
            started = asyncio.create_task(daemon.caught_up.wait())
            await asyncio.wait({started, task}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            started.cancel()
            task.result()
            raise AssertionError("the daemon stopped while starting")
        yield task
    finally:
        daemon.request_stop()
        async with asyncio.timeout(30):
            await task
