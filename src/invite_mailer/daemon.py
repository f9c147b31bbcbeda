"""``invite-mailer run``: the unattended daemon.

APScheduler only wakes things up. The plan is derived from the config, the
ledger is the truth, and every wake-up runs an ordinary delivery pass (the
same code as ``send-due``). Jobs are rebuilt from the plan at start and after
every reload with stable ids, so no stale job survives a config edit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable
from datetime import datetime, timedelta
from enum import StrEnum
from pathlib import Path

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.date import DateTrigger
from apscheduler.triggers.interval import IntervalTrigger
from watchfiles import awatch

from invite_mailer.app import validate_sample
from invite_mailer.config import Config, load_config
from invite_mailer.dispatch import Dispatcher, Outcome
from invite_mailer.errors import ConfigError
from invite_mailer.health import heartbeat_path, write_heartbeat
from invite_mailer.ledger import Ledger, state_lock
from invite_mailer.plan import MailingState
from invite_mailer.transport import Transport, make_transport
from invite_mailer.web import start_unsubscribe

log = logging.getLogger("invite_mailer.daemon")

SWEEP_JOB = "sweep"
HEARTBEAT_JOB = "heartbeat"
HEARTBEAT_SECONDS = 30
SWEEP_SECONDS = 60
STOP_TIMEOUT = 30.0


class RunState(StrEnum):
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


class Daemon:
    """Owns the scheduler, the ledger, the transport and the current config."""

    def __init__(
        self,
        config: Config,
        ledger: Ledger,
        transport: Transport,
        *,
        config_dir: Path,
        templates_dir: Path | None,
        clock: Callable[[datetime], datetime] | None = None,
        sweep_seconds: float = SWEEP_SECONDS,
    ) -> None:
        self.config = config
        self.ledger = ledger
        self.transport = transport
        self.config_dir = config_dir
        self.templates_dir = templates_dir
        self.sweep_seconds = sweep_seconds
        self.state = RunState.STARTING
        self.scheduler = AsyncIOScheduler(timezone=config.series.zone)
        self._pass_lock = asyncio.Lock()
        self._dispatcher: Dispatcher | None = None
        self._stopped = asyncio.Event()
        self._last_waiting_warning: dict[str, datetime] = {}
        self.failed_permanently = 0

    def now(self) -> datetime:
        return datetime.now(self.config.series.zone)

    # --- lifecycle -------------------------------------------------------------

    async def serve(self) -> None:
        """Run until :meth:`request_stop`; returns after a clean shutdown."""
        now = self.now()
        recovered = await self.ledger.recover(now)
        for delivery in recovered:
            log.warning(
                "uncertain: %s %s to %s was in flight when the last run stopped; sending again",
                delivery.kind,
                delivery.event or "(series)",
                delivery.email,
            )
        self.scheduler.start()
        self.scheduler.add_job(
            self.run_pass,
            IntervalTrigger(seconds=self.sweep_seconds, timezone=self.config.series.zone),
            id=SWEEP_JOB,
            replace_existing=True,
            coalesce=True,
            max_instances=1,
            misfire_grace_time=None,
        )
        # The heartbeat has its own timer: a long catch-up pass (a slow relay)
        # must not make a busy daemon look dead.
        self.scheduler.add_job(
            self.beat,
            IntervalTrigger(seconds=HEARTBEAT_SECONDS, timezone=self.config.series.zone),
            id=HEARTBEAT_JOB,
            replace_existing=True,
            coalesce=True,
            misfire_grace_time=None,
        )
        self.state = RunState.RUNNING
        self.beat()
        log.info("daemon started for series %s", self.config.series.id)
        await self.reschedule()
        # Watch before catching up: an edit made during a long catch-up pass
        # must not go unnoticed (it is reloaded when that pass is over).
        watcher = asyncio.create_task(self._watch())
        try:
            # Catch up: whatever is due and still open goes out now; then schedule
            # again, since the pass has recorded any dates changed while we were down.
            await self.run_pass()
            await self.reschedule()
            await self._stopped.wait()
        finally:
            # The watcher may be running a reload's pass: let it finish first.
            await self._shutdown()
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher

    def beat(self) -> None:
        """Tell ``invite-mailer health`` that this daemon is alive."""
        try:
            write_heartbeat(
                heartbeat_path(self.config.settings.state.path),
                self.now(),
                {"state": str(self.state), "series": self.config.series.id},
            )
        except OSError as exc:
            log.error("cannot write the heartbeat: %s", exc)

    def request_stop(self) -> None:
        if self.state in (RunState.STOPPING, RunState.STOPPED):
            return
        log.info("stopping: finishing the mails in flight")
        self.state = RunState.STOPPING
        if self._dispatcher is not None:
            self._dispatcher.stop.set()
        self._stopped.set()

    async def _shutdown(self) -> None:
        # A pass in progress has been told to stop; wait for it to record what
        # is in flight. Only then stop the scheduler: its shutdown cancels the
        # jobs still running, and a send cancelled mid-way stays 'sending'.
        try:
            async with asyncio.timeout(STOP_TIMEOUT):
                async with self._pass_lock:
                    pass
        except TimeoutError:
            log.error("a delivery pass did not finish within %.0fs", STOP_TIMEOUT)
        self.scheduler.shutdown(wait=False)
        self.state = RunState.STOPPED
        log.info("daemon stopped")

    # --- scheduling ------------------------------------------------------------

    async def reschedule(self) -> None:
        """One date job per future mailing, rebuilt from the current plan."""
        now = self.now()
        dispatcher = Dispatcher(self.config, self.ledger, self.transport)
        mailings = await dispatcher.plan(now)
        wanted = set()
        for mailing in mailings:
            if mailing.state is not MailingState.SCHEDULED:
                continue
            wanted.add(mailing.id)
            window = max(1, int((mailing.deadline - mailing.due).total_seconds()))
            self.scheduler.add_job(
                self.run_pass,
                DateTrigger(run_date=mailing.due),
                id=mailing.id,
                name=f"{mailing.kind} {mailing.event or 'series'}",
                replace_existing=True,
                coalesce=True,
                # APScheduler drops a job that starts more than misfire_grace_time
                # late (default 1 s); the mailing's whole window is the grace.
                misfire_grace_time=window,
            )
        for job in self.scheduler.get_jobs():
            if job.id not in (SWEEP_JOB, HEARTBEAT_JOB) and job.id not in wanted:
                job.remove()
        log.info("scheduled %d mailing(s)", len(wanted))

    async def run_pass(self) -> None:
        """A delivery pass at the current time; passes never overlap."""
        if self.state is not RunState.RUNNING:
            return
        async with self._pass_lock:
            if self.state is not RunState.RUNNING:
                return
            now = self.now()
            self._dispatcher = Dispatcher(self.config, self.ledger, self.transport)
            try:
                result = await self._dispatcher.run_pass(now)
            except Exception:
                log.exception("delivery pass failed; retrying at the next wake-up")
                return
            finally:
                self._dispatcher = None
            self.failed_permanently += result.total(Outcome.FAILED)
            self._warn_waiting(
                await Dispatcher(self.config, self.ledger, self.transport).plan(now), now
            )

    def _warn_waiting(self, mailings: list, now: datetime) -> None:  # type: ignore[type-arg]
        for mailing in mailings:
            if mailing.state is not MailingState.WAITING:
                continue
            last = self._last_waiting_warning.get(mailing.id)
            if last is None or now - last >= timedelta(days=1):
                self._last_waiting_warning[mailing.id] = now
                log.warning(
                    "mailing %s is waiting for materials: add them to series.yaml "
                    "(it goes out as soon as they are listed; deadline %s)",
                    mailing.id,
                    mailing.deadline.isoformat(),
                )

    # --- reloading -------------------------------------------------------------

    async def reload(self, reason: str) -> bool:
        """Load the config again; keep the last good one if the new one is broken."""
        try:
            config = load_config(self.config_dir, self.templates_dir)
            validate_sample(config)
        except ConfigError as exc:
            log.error("reload (%s) rejected, the last good config keeps running:\n%s", reason, exc)
            return False
        if (config.settings.transport, config.settings.smtp) != (
            self.config.settings.transport,
            self.config.settings.smtp,
        ):
            log.warning("transport or SMTP settings changed: they take effect after a restart")
        self.config = config
        log.info("config reloaded (%s)", reason)
        # The pass records changed dates first, so update mails are scheduled
        # from the moment the edit was seen.
        await self.run_pass()
        await self.reschedule()
        return True

    async def _watch(self) -> None:
        paths = [self.config_dir]
        if self.templates_dir is not None:
            paths.append(self.templates_dir)
        elif self.config.templates_dir.exists():
            paths.append(self.config.templates_dir)
        async for changes in awatch(*paths, stop_event=self._stopped, debounce=500):
            names = sorted({Path(p).name for _, p in changes})
            await self.reload("changed: " + ", ".join(names))


async def run_daemon(config: Config, *, config_dir: Path, templates_dir: Path | None) -> int:
    """Entry point of ``invite-mailer run``; returns the exit code."""
    state_path = config.settings.state.path
    state_path.parent.mkdir(parents=True, exist_ok=True)
    loop = asyncio.get_running_loop()
    with state_lock(state_path):
        async with Ledger.open(state_path) as ledger, make_transport(config.settings) as transport:
            daemon = Daemon(
                config, ledger, transport, config_dir=config_dir, templates_dir=templates_dir
            )
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, daemon.request_stop)
            loop.add_signal_handler(
                signal.SIGHUP, lambda: asyncio.ensure_future(daemon.reload("SIGHUP"))
            )
            web = None
            try:
                # The one-click unsubscribe endpoint, when unsubscribe.serve is set.
                web = await start_unsubscribe(config)
                await daemon.serve()
            finally:
                if web is not None:
                    await web.stop()
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                    loop.remove_signal_handler(sig)
    return 0
