"""Watching the config and template folders: every edit becomes a reload.

The watcher outlives its own failures: watchfiles raising, or a watched folder
deleted or replaced (a deployment swapping ``config/``), start it again after a
pause, and the config is reloaded once it watches again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path

from watchfiles import Change, DefaultFilter, awatch

__all__ = ["WATCH_RETRY_SECONDS", "ConfigFilter", "ConfigWatcher", "changed_names"]

# The watcher's records are the daemon's: they answer the organiser's edits.
log = logging.getLogger("invite_mailer.service.daemon")

WATCH_RETRY_SECONDS = (1.0, 2.0, 5.0, 15.0, 60.0)
"""Pauses before the file watcher is started again after a failure."""


class ConfigFilter(DefaultFilter):
    """Only real config files: editors' swap, backup, lock and test files are ignored.

    vim writes ``.series.yaml.swp`` and a test file ``4913``; emacs
    ``.#series.yaml`` and ``#series.yaml#``; many editors ``series.yaml~``;
    LibreOffice and Excel lock files ``.~lock.contacts.csv#`` and
    ``~$contacts.xlsx``; ``sed -i`` a ``sedXXXXXX``. None of them is config,
    and a reload they trigger would only name them in the log.
    """

    ignore_entity_patterns = (
        *DefaultFilter.ignore_entity_patterns,
        r"^\.",  # hidden files: swap files, lock files, gedit's .goutputstream-*
        r"~$",
        r"^~",
        r"^#.*#$",
        r"^\d+$",  # every config file has an extension
        r"^sed[A-Za-z0-9]{6}$",
        r"\.(swp|swx|swo|tmp|temp|bak|orig|rej|part|crdownload|kate-swp)$",
    )


def _printable(name: str) -> str:
    """A file name as it can go into a log line (no line breaks, no undecodable bytes)."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in name)


class ConfigWatcher:
    """Calls *reload* with a reason for every edit under *roots*, while *running*.

    *roots* is asked again at every restart of the watch (a reload may change
    the template folder); *stopped* ends the watch.
    """

    def __init__(
        self,
        roots: Callable[[], list[Path]],
        *,
        running: Callable[[], bool],
        stopped: asyncio.Event,
        reload: Callable[[str], Awaitable[object]],
    ) -> None:
        self.roots = roots
        self.running = running
        self.stopped = stopped
        self.reload = reload

    async def run(self) -> None:
        """Reload on every edit, for as long as the daemon runs.

        The watcher is started again when it fails (watchfiles raising, a
        watched folder deleted or replaced), and the config is reloaded once
        it watches again, so an edit made meanwhile is not missed.
        """
        failures = 0
        catch_up = False
        while self.running():
            loop = asyncio.get_running_loop()
            started = loop.time()
            try:
                await self._watch_once(catch_up)
            except Exception as exc:
                problem = f"the file watcher failed ({type(exc).__name__}: {exc})"
            else:
                if not self.running():
                    return
                problem = "a watched folder was removed or replaced"
            if loop.time() - started > WATCH_RETRY_SECONDS[-1]:
                failures = 0
            pause = WATCH_RETRY_SECONDS[min(failures, len(WATCH_RETRY_SECONDS) - 1)]
            failures += 1
            catch_up = True
            log.error("%s; watching again in %.0f s (SIGHUP reloads at any time)", problem, pause)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(pause):
                    await self.stopped.wait()

    async def _watch_once(self, catch_up: bool) -> None:
        """Watch until stopped; returns early when a watched folder itself goes away.

        With *catch_up*, the config is reloaded as soon as the watch is set up
        (watchfiles yields an empty set then): edits made while nothing
        watched are picked up, and none made after it can slip through.
        """
        roots = self.roots()
        async for changes in awatch(
            *roots,
            watch_filter=ConfigFilter(),
            stop_event=self.stopped,
            debounce=500,
            rust_timeout=1000,
            yield_on_timeout=catch_up,
        ):
            # inotify watches the folder, not its name: once it is deleted or
            # renamed (a deployment swapping config/), nothing more is seen.
            if any(Path(p) in roots for change, p in changes if change is Change.deleted):
                return
            names = changed_names(roots, (p for _, p in changes))
            if catch_up:
                catch_up = False
                await self.reload("file watcher restarted")
            elif names:
                await self.reload("changed: " + ", ".join(names))


def changed_names(roots: list[Path], paths: Iterable[str]) -> list[str]:
    """Changed files as the organiser knows them: relative to the watched folder."""
    names = set()
    for raw in paths:
        path = Path(raw)
        for root in roots:
            if path.is_relative_to(root) and path != root:
                names.add(_printable(path.relative_to(root).as_posix()))
                break
        else:
            names.add(_printable(path.name))
    return sorted(names)
