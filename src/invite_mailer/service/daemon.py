"""``invite-mailer run``: the unattended daemon.

APScheduler only wakes things up. The plan is derived from the config, the
ledger is the truth, and every wake-up runs an ordinary delivery pass (the
same code as ``send-due``). Jobs are rebuilt from the plan at start and after
every reload with stable ids, so no stale job survives a config edit.

Every "now" of the daemon (planning, the jobs' dates, recovery and catch-up
at start, reloads, the heartbeat) comes from its *clock*. A wake-up at the
wrong moment is harmless: the pass sends what is due at the clock's time and
nothing else, which is also what lets tests drive the daemon on virtual time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.date import DateTrigger

from invite_mailer.core.plan import Mailing, MailingState, PlanInput, plan
from invite_mailer.core.registrations import with_registrations
from invite_mailer.delivery.dispatch import Dispatcher, Outcome
from invite_mailer.delivery.ledger import Ledger, open_sending, sending_lock
from invite_mailer.delivery.transport import Transport, make_transport
from invite_mailer.errors import (
    EXIT_INVALID,
    EXIT_OK,
    EXIT_SOFTWARE,
    EXIT_TEMPFAIL,
    ConfigError,
    InviteMailerError,
)
from invite_mailer.inputs.config import Config, load_config
from invite_mailer.mail.checks import validate_sample
from invite_mailer.service import soon as wakeups
from invite_mailer.service.bounce_poll import poll_mailbox
from invite_mailer.service.health import heartbeat_path, write_heartbeat
from invite_mailer.service.threads import in_thread
from invite_mailer.service.watch import ConfigWatcher
from invite_mailer.service.web import start_unsubscribe

__all__ = [
    "Clock",
    "Daemon",
    "RunState",
    "describe_failure",
    "main",
    "plan_at",
    "run_daemon",
    "wall_clock",
]

log = logging.getLogger("invite_mailer.service.daemon")

SWEEP_JOB = "sweep"
HEARTBEAT_JOB = "heartbeat"
BOUNCES_JOB = "bounces"  # reading the [imap] bounce mailbox
KEPT_JOBS = (SWEEP_JOB, HEARTBEAT_JOB, BOUNCES_JOB)
HEARTBEAT_SECONDS = 30
SWEEP_SECONDS = 60
STOP_TIMEOUT = 30.0
RELOAD_TIMEOUT = 120.0
"""A reload that takes longer is given up; the last good config keeps running."""

# Exit codes of ``invite-mailer run``. 1 is "invalid config" as for every
# command; the systemd unit does not restart on it (RestartPreventExitStatus=1),
# since a broken config stays broken until someone edits it. Everything else
# is worth another start, so it must never exit 1 by accident.
EXIT_INVALID_CONFIG = EXIT_INVALID

NOT_RESTARTING = "not restarting: fix the config and start again"

Clock = Callable[[], datetime]
"""Returns the current moment, timezone-aware."""


def wall_clock() -> datetime:
    """The system clock, in UTC."""
    return datetime.now(UTC)


def describe_failure(exc: BaseException) -> str:
    """One line for a failure that is not a :class:`ConfigError`: no traceback in the log."""
    text = str(exc).strip().splitlines()
    detail = f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
    return (
        f"the config could not be loaded ({detail}); "
        "run `invite-mailer validate` to see which file and line"
    )


def _problems(exc: ConfigError) -> str:
    count = len(exc.problems)
    lines = "\n".join(f"- {problem}" for problem in exc.problems)
    return f"{count} problem{'s' if count != 1 else ''} found:\n{lines}"


def _load(config_dir: Path, templates_dir: Path | None) -> Config:
    config = load_config(config_dir, templates_dir)
    validate_sample(config)
    return config


async def plan_at(config: Config, ledger: Ledger, now: datetime) -> list[Mailing]:
    """The plan of *config* at *now*, with the opt-outs of the file and the ledger."""
    series_id = config.series.id
    optouts = await ledger.optouts(series_id)
    view = await ledger.view(series_id)
    merged = with_registrations(config, view.registrations())
    return plan(PlanInput.of(merged, optouts), view, now)


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
        clock: Clock = wall_clock,
        sweep_seconds: float = SWEEP_SECONDS,
    ) -> None:
        self.config = config
        self.ledger = ledger
        self.transport = transport
        self.config_dir = config_dir
        self.templates_dir = templates_dir
        self.clock = clock
        self.sweep_seconds = sweep_seconds
        self.state = RunState.STARTING
        self.scheduler = AsyncIOScheduler(timezone=config.series.zone)
        self.caught_up = asyncio.Event()
        """Set once the catch-up pass at start is over and its mailings are scheduled."""
        self._pass_lock = asyncio.Lock()
        self._dispatcher: Dispatcher | None = None
        self._stopped = asyncio.Event()
        self._last_waiting_warning: dict[str, datetime] = {}
        self._reload_lock = asyncio.Lock()
        # At most one thread reads the config: one that outlived its timeout
        # keeps running, and a new one per edit would pile up threads and memory.
        self._reading = False
        self._read_again = False
        self._tasks: set[asyncio.Task[object]] = set()
        self.failed_permanently = 0
        self.reloads = 0

    def now(self) -> datetime:
        """The clock's moment in the series' time zone."""
        return self.clock().astimezone(self.config.series.zone)

    # --- lifecycle -------------------------------------------------------------

    async def serve(self) -> None:
        """Run until :meth:`request_stop`; returns after a clean shutdown."""
        await self._recover()
        self._start_scheduler()
        self.state = RunState.RUNNING
        self.beat()
        log.info("daemon started for series %s", self.config.series.id)
        await self.reschedule()
        # Watch before catching up: an edit made during a long catch-up pass
        # must not go unnoticed (it is reloaded when that pass is over).
        watcher = ConfigWatcher(
            self._watched,
            running=lambda: self.state is RunState.RUNNING,
            stopped=self._stopped,
            reload=self.reload,
        )
        watching = asyncio.create_task(watcher.run())
        try:
            # Catch up: whatever is due and still open goes out now; then schedule
            # again, since the pass has recorded any dates changed while we were down.
            await self.run_pass()
            await self.reschedule()
            self.caught_up.set()
            await self._stopped.wait()
        finally:
            # The watcher may be running a reload's pass: let it finish first.
            await self._shutdown()
            for task in (watching, *self._tasks):
                task.cancel()
            for task in (watching, *self._tasks):
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _recover(self) -> None:
        for delivery in await self.ledger.recover(self.now()):
            log.warning(
                "uncertain: %s %s to %s was in flight when the last run stopped; sending again",
                delivery.kind,
                delivery.event or "(series)",
                delivery.email,
            )

    def _start_scheduler(self) -> None:
        zone, imap = self.config.series.zone, self.config.settings.imap
        self.scheduler.start()
        wakeups.every(self.scheduler, self.run_pass, SWEEP_JOB, self.sweep_seconds, zone)
        # The heartbeat has its own timer: a long catch-up pass (a slow relay)
        # must not make a busy daemon look dead.
        wakeups.every(self.scheduler, self.beat, HEARTBEAT_JOB, HEARTBEAT_SECONDS, zone)
        if imap.enabled:
            wakeups.every(self.scheduler, self.poll_bounces, BOUNCES_JOB, imap.poll_seconds, zone)

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
        """Stop (SIGTERM, SIGINT): the mails in flight are finished first."""
        if self.state in (RunState.STOPPING, RunState.STOPPED):
            return
        log.info("stopping: finishing the mails in flight")
        self.state = RunState.STOPPING
        if self._dispatcher is not None:
            self._dispatcher.stop.set()
        self._stopped.set()

    def request_reload(self, reason: str) -> None:
        """Reload in the background (SIGHUP)."""
        if self.state is not RunState.RUNNING:
            return
        task: asyncio.Task[object] = asyncio.create_task(self.reload(reason))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _read_ended(self) -> None:
        self._reading = False
        if self._read_again:
            self._read_again = False
            self.request_reload("edits made while an earlier reload was reading")

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
        # The last beat says so: `health` must not call a stopped daemon alive
        # for the minutes its last beat is still young.
        self.beat()
        log.info("daemon stopped")

    # --- scheduling ------------------------------------------------------------

    async def reschedule(self) -> None:
        """One date job per future mailing, rebuilt from the plan at the clock's time."""
        mailings = await plan_at(self.config, self.ledger, self.now())
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
            if job.id not in (*KEPT_JOBS, *wakeups.WAKE_UPS) and job.id not in wanted:
                job.remove()
        log.info("scheduled %d mailing(s)", len(wanted))

    async def run_pass(self) -> None:
        """A delivery pass at the clock's time; passes never overlap."""
        if self.state is not RunState.RUNNING:
            return
        async with self._pass_lock:
            if self.state is not RunState.RUNNING:
                return
            now = self.now()
            self._dispatcher = Dispatcher(self.config, self.ledger, self.transport)
            try:
                if self.ledger.shared:  # a dead node's claims, once their lease ran out
                    await self._recover()
                result = await self._dispatcher.run_pass(now)
            except InviteMailerError as exc:
                # A known reason (the relay, the setup, the ledger): one line, no traceback.
                log.error("delivery pass stopped: %s; retrying at the next wake-up", exc)
                return
            except Exception:
                log.exception("delivery pass failed; retrying at the next wake-up")
                return
            finally:
                self._dispatcher = None
            self.failed_permanently += result.total(Outcome.FAILED)
            mailings = await plan_at(self.config, self.ledger, now)
            wakeups.warn_waiting(mailings, now, self._last_waiting_warning)
            wakeups.wake_for_confirmations(self.scheduler, self.run_pass, mailings, now)
            wakeups.wake_for_quota(self.scheduler, self.run_pass, result.quota)
            await wakeups.wake_for_leases(self.scheduler, self.run_pass, self.ledger)

    async def poll_bounces(self) -> None:
        """Read the bounce mailbox; what it suppresses counts from the next pass."""
        if self.state is RunState.RUNNING:
            await poll_mailbox(self.config, self.ledger, self.now())

    def registration_changed(self) -> None:
        """A registration link was used: a pass now records it and plans its confirmation."""
        if self.state is RunState.RUNNING:
            wakeups.soon(self.scheduler, self.run_pass, wakeups.REGISTRATION_JOB, 0.0)

    # --- reloading -------------------------------------------------------------

    async def reload(self, reason: str) -> bool:
        """Load the config again; keep the last good one if the new one is broken.

        Never raises: whatever goes wrong is logged, and the daemon keeps
        running (and watching) with the config it had.
        """
        async with self._reload_lock:
            try:
                return await self._reload(reason)
            except Exception as exc:
                log.error(
                    "reload (%s) failed, the last good config keeps running: %s",
                    reason,
                    describe_failure(exc),
                )
                return False

    async def _reload(self, reason: str) -> bool:
        rejected = "reload (%s) rejected, the last good config keeps running: %s"
        if self._reading:
            self._read_again = True
            log.warning(
                "reload (%s) postponed: an earlier reload is still reading the config; "
                "this edit is read as soon as it ends",
                reason,
            )
            return False
        self._reading = True
        try:
            async with asyncio.timeout(RELOAD_TIMEOUT):
                config = await in_thread(
                    lambda: _load(self.config_dir, self.templates_dir),
                    "config-reload",
                    finished=self._read_ended,
                )
            # The plan of the new config is worked out before it replaces the old:
            # dates at the calendar's limits only fail there.
            await plan_at(config, self.ledger, self.now())
        except ConfigError as exc:
            log.error(rejected, reason, _problems(exc))
            return False
        except TimeoutError:
            log.error(
                rejected,
                reason,
                f"reading the config took more than {RELOAD_TIMEOUT:.0f} s; "
                "check the size of the files just edited",
            )
            return False
        except Exception as exc:
            log.error(rejected, reason, describe_failure(exc))
            return False
        if self.state is not RunState.RUNNING:
            return False
        if (config.settings.transport, config.settings.smtp) != (
            self.config.settings.transport,
            self.config.settings.smtp,
        ):
            log.warning("transport or SMTP settings changed: they take effect after a restart")
        self.config = config
        self.reloads += 1
        log.info("config reloaded (%s)", reason)
        # The pass records changed dates first, so update mails are scheduled
        # from the moment the edit was seen.
        await self.run_pass()
        try:
            await self.reschedule()
        except Exception as exc:
            log.error(
                "config reloaded, but its mailings could not be scheduled (%s: %s); "
                "the sweep every minute still sends what is due",
                type(exc).__name__,
                exc,
            )
        return True

    def _watched(self) -> list[Path]:
        paths = [self.config_dir]
        if self.templates_dir is not None:
            paths.append(self.templates_dir)
        elif self.config.templates_dir.exists():
            paths.append(self.config.templates_dir)
        return [path.resolve() for path in paths]


async def run_daemon(config: Config, *, config_dir: Path, templates_dir: Path | None) -> int:
    """Run the daemon with a loaded *config*; returns the exit code.

    Failures are logged here and become exit codes (see ``EXIT_*``), so the
    service manager can tell a config to fix from a fault worth a restart.
    """
    try:
        return await _run(config, config_dir=config_dir, templates_dir=templates_dir)
    except ConfigError as exc:
        log.error("invalid config, %s\n%s", NOT_RESTARTING, _problems(exc))
        return EXIT_INVALID_CONFIG
    except (InviteMailerError, OSError) as exc:
        log.error("the daemon cannot run: %s", exc)
        return EXIT_TEMPFAIL
    except Exception:
        log.exception("the daemon stopped on an unexpected error")
        return EXIT_SOFTWARE


async def _run(config: Config, *, config_dir: Path, templates_dir: Path | None) -> int:
    loop = asyncio.get_running_loop()
    with sending_lock(config.settings.state):
        async with (
            open_sending(config.settings.state, "daemon") as ledger,
            make_transport(config.settings) as transport,
        ):
            daemon = Daemon(
                config, ledger, transport, config_dir=config_dir, templates_dir=templates_dir
            )
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, daemon.request_stop)
            loop.add_signal_handler(signal.SIGHUP, daemon.request_reload, "SIGHUP")
            web = None
            try:
                now, on_change = daemon.now, daemon.registration_changed
                web = await start_unsubscribe(
                    config,
                    series=lambda: daemon.config.series,
                    on_registration=on_change,
                    clock=now,
                )
                await daemon.serve()
            finally:
                if web is not None:
                    await web.stop()
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                    loop.remove_signal_handler(sig)
    return EXIT_OK


def main(config_dir: Path, templates_dir: Path | None) -> int:
    """``invite-mailer run``: load and check the config, run the daemon, return the exit code.

    Everything goes to the log (so ``--log-format json`` holds for start-up
    errors too). A config that is invalid at start exits
    :data:`EXIT_INVALID_CONFIG` and says that a restart will not help.
    """
    try:
        config = _load(config_dir, templates_dir)
    except ConfigError as exc:
        log.error("invalid config, %s\n%s", NOT_RESTARTING, _problems(exc))
        return EXIT_INVALID_CONFIG
    except OSError as exc:
        log.error("cannot read the config: %s", exc)
        return EXIT_TEMPFAIL
    except Exception as exc:
        log.error("invalid config, %s: %s", NOT_RESTARTING, describe_failure(exc))
        return EXIT_INVALID_CONFIG
    for warning in config.warnings:
        log.warning("%s", warning)
    return asyncio.run(run_daemon(config, config_dir=config_dir, templates_dir=templates_dir))
