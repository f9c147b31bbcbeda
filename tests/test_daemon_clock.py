"""The daemon in this process, on a fake clock: no test waits for the wall clock.

Every "now" of the daemon comes from the clock it is given, so these tests
move time by setting the clock and wake the daemon the way its jobs do. The
series lies years ahead of the wall clock, so APScheduler's own timers never
fire a mailing while a test runs; a wake-up at any other moment would only
send what is due at the clock's time anyway. What was sent is read from the
ledger, which is the truth, and from the outbox the transport writes.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from invite_mailer.core.plan import Mailing, MailingState
from invite_mailer.delivery.ledger import Delivery, DeliveryState, Ledger
from invite_mailer.delivery.transport import OutboxTransport
from invite_mailer.inputs.config import load_config
from invite_mailer.service.daemon import HEARTBEAT_JOB, SWEEP_JOB, Daemon, RunState, plan_at
from invite_mailer.service.health import check_heartbeat, heartbeat_path
from support.clock import FakeClock
from support.contacts import write_contacts
from support.daemon import make_daemon, serving
from support.mails import ORGANISER
from support.project import clean_environ, copy_project

BERLIN = ZoneInfo("Europe/Berlin")
CONTACTS = ("anna.alt@example.org", "bernd.berg@example.org", "clara.chen@example.org")
SERIES_ID = "uhr-probe"
START = datetime(2031, 3, 3, 8, 0, tzinfo=BERLIN)
"""The fake clock's first moment: before every mailing of the series."""

SERIES = """\
id: uhr-probe
title: Probereihe auf der Uhr
organiser:
  name: "KomKomIn – Wissenschaftliches Begleitvorhaben"
  email: transferreihe@example.org
timezone: Europe/Berlin
registration_url: https://example.org/probe/anmeldung
imprint: |
  KomKomIn – Wissenschaftliches Begleitvorhaben
  Musterstraße 1, 10115 Berlin
events:
  - id: erster
    title: "Erster Termin – Ergebnisse sichern"
    date: 2031-03-05
    start: "10:00"
    end: "12:00"
    join_url: https://example.org/probe/erster
    materials: []
  - id: zweiter
    title: "Zweiter Termin – Erfahrungen teilen"
    date: {second_date}
    start: "14:00"
    end: "16:00"
    join_url: https://example.org/probe/zweiter
    materials: []
mailings:
  invitation: {{send_at: "2031-03-03 09:00", until: "2031-03-04 09:00", audience: all}}
  reminder:   {{before: 1 day, audience: registered}}
  followup:   {{after: 1 hour, at: null, audience: registered, wait_for_materials: 14 days}}
"""

MATERIALS = """\
    materials:
      - title: Folien
        url: https://example.org/probe/erster/folien.pdf
"""


def series_text(*, materials: bool = False, second_date: str = "2031-03-12") -> str:
    text = SERIES.format(second_date=second_date)
    if materials:
        text = text.replace("    materials: []\n", MATERIALS, 1)
    return text


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    copy_project(tmp_path)
    monkeypatch.chdir(tmp_path)
    for name in os.environ.keys() - clean_environ().keys():
        monkeypatch.delenv(name)
    write_contacts(
        tmp_path / "config" / "contacts.csv",
        ((address, "", address.split(".")[0].title(), "Probe", "alle") for address in CONTACTS),
    )
    (tmp_path / "config" / "series.yaml").write_text(series_text(), encoding="utf-8")
    yield tmp_path


class Running:
    """A daemon serving in a task of this event loop, with its clock and ledger."""

    def __init__(self, daemon: Daemon, clock: FakeClock, task: asyncio.Task[None]) -> None:
        self.daemon = daemon
        self.clock = clock
        self.task = task

    async def plan(self) -> list[Mailing]:
        return await plan_at(self.daemon.config, self.daemon.ledger, self.clock())

    async def mailing(self, mailing_id: str) -> Mailing:
        return next(m for m in await self.plan() if m.id == mailing_id)

    def jobs(self) -> dict[str, datetime]:
        """The mailings' wake-ups: job id and when it fires."""
        return {
            job.id: job.next_run_time
            for job in self.daemon.scheduler.get_jobs()
            if job.id not in (SWEEP_JOB, HEARTBEAT_JOB)
        }

    async def wake(self, job_id: str) -> None:
        """What APScheduler does when the job's time has come."""
        job = self.daemon.scheduler.get_job(job_id)
        assert job is not None, f"no job {job_id}; jobs: {self.jobs()}"
        await job.func()

    async def sent(self) -> list[Delivery]:
        deliveries = await self.daemon.ledger.deliveries(SERIES_ID)
        return [d for d in deliveries if d.state is DeliveryState.SENT]

    async def sent_keys(self, kind: str) -> list[tuple[str, str]]:
        return sorted((d.event, d.email) for d in await self.sent() if d.kind == kind)

    async def stop(self) -> None:
        self.daemon.request_stop()
        async with asyncio.timeout(30):
            await self.task


@asynccontextmanager
async def running(project: Path, at: datetime) -> AsyncIterator[Running]:
    """Start the daemon with its clock at *at*; returns once it has caught up."""
    clock = FakeClock(at)
    config = load_config(project / "config")
    async with (
        Ledger.open(project / "state" / "invite-mailer.db") as ledger,
        OutboxTransport(project / "outbox") as transport,
    ):
        daemon = make_daemon(config, ledger, transport, project, clock)
        async with serving(daemon) as task:
            yield Running(daemon, clock, task)


def heartbeat(project: Path) -> dict[str, object]:
    path = heartbeat_path(project / "state" / "invite-mailer.db")
    data: dict[str, object] = json.loads(path.read_text(encoding="utf-8"))
    return data


def outbox(project: Path) -> list[Path]:
    return sorted((project / "outbox").glob("*.eml"))


async def test_jobs_are_the_future_mailings_of_the_plan_and_fire_at_the_clocks_time(
    project: Path,
) -> None:
    async with running(project, START) as run:
        scheduled = {m.id: m.due for m in await run.plan() if m.state is MailingState.SCHEDULED}
        assert "invitation:series" in scheduled and "reminder:zweiter" in scheduled
        assert run.jobs() == scheduled
        assert await run.sent() == [] and outbox(project) == []
        assert heartbeat(project)["time"] == START.isoformat()

        # A wake-up before the due time (a timer firing early, the sweep) sends nothing.
        invitation = await run.mailing("invitation:series")
        run.clock.set(invitation.due - timedelta(seconds=1))
        await run.wake("invitation:series")
        assert await run.sent() == []

        run.clock.set(invitation.due + timedelta(seconds=5))
        await run.wake("invitation:series")
        assert await run.sent_keys("invitation") == [("", address) for address in CONTACTS]
        for delivery in await run.sent():
            assert delivery.first_attempt_at is not None
            assert abs(delivery.first_attempt_at - run.clock()) < timedelta(minutes=1)
        # The organiser's report is the fourth mail.
        assert len(outbox(project)) == len(CONTACTS) + 1
        assert [d.email for d in await run.sent() if d.kind == "summary"] == [ORGANISER]

        # The plan after the pass schedules the rest; the invitation's job is gone.
        await run.daemon.reschedule()
        assert "invitation:series" not in run.jobs()
        reminder = await run.mailing("reminder:erster")
        assert run.jobs()["reminder:erster"] == reminder.due

        run.clock.set(reminder.due)
        await run.wake("reminder:erster")
        assert await run.sent_keys("reminder") == [("erster", address) for address in CONTACTS]
        # Sending again at the same moment sends nothing twice: the ledger is the truth.
        await run.daemon.run_pass()
        assert len(await run.sent_keys("reminder")) == len(CONTACTS)


async def test_catch_up_after_downtime_sends_what_is_due_and_open(project: Path) -> None:
    # Down from before the invitation until after the first date's reminder was due.
    down_until = datetime(2031, 3, 4, 12, 0, tzinfo=BERLIN)
    async with running(project, down_until) as run:
        # The invitation's window closed while the daemon was down (until 09:00);
        # the reminder of the first date is still open, and goes out at once.
        invitation = await run.mailing("invitation:series")
        assert invitation.state is MailingState.CLOSED
        assert await run.sent_keys("invitation") == []
        assert await run.sent_keys("reminder") == [("erster", address) for address in CONTACTS]
        for delivery in await run.sent():
            assert delivery.first_attempt_at is not None
            assert delivery.first_attempt_at >= down_until
        # What is still ahead is scheduled from the clock's time, not the wall clock's.
        assert set(run.jobs()) == {
            m.id for m in await run.plan() if m.state is MailingState.SCHEDULED
        }
        assert "reminder:zweiter" in run.jobs() and "reminder:erster" not in run.jobs()
        assert heartbeat(project)["time"] == down_until.isoformat()


async def test_an_edit_is_reloaded_sent_and_scheduled_at_the_clocks_time(project: Path) -> None:
    # After the first date: its follow-up is due, but series.yaml lists no materials.
    after_first = datetime(2031, 3, 5, 14, 0, tzinfo=BERLIN)
    async with running(project, after_first) as run:
        followup = await run.mailing("followup:erster")
        assert followup.state is MailingState.WAITING
        assert await run.sent_keys("followup") == []
        old_reminder = run.jobs()["reminder:zweiter"]

        # An hour later the organiser lists the materials and moves the second date.
        run.clock.set(after_first + timedelta(hours=1))
        series = project / "config" / "series.yaml"
        series.write_text(series_text(materials=True, second_date="2031-03-13"), encoding="utf-8")
        assert await run.daemon.reload("changed: series.yaml") is True
        assert run.daemon.config.series.event("zweiter").date.isoformat() == "2031-03-13"

        assert await run.sent_keys("followup") == [("erster", address) for address in CONTACTS]
        for delivery in await run.sent():
            if delivery.kind == "followup":
                assert delivery.first_attempt_at is not None
                assert delivery.first_attempt_at >= run.clock()
        # The jobs were rebuilt from the new plan: the reminder moved with its date.
        reminder = await run.mailing("reminder:zweiter")
        assert run.jobs()["reminder:zweiter"] == reminder.due
        assert reminder.due - old_reminder == timedelta(days=1)
        assert set(run.jobs()) == {
            m.id for m in await run.plan() if m.state is MailingState.SCHEDULED
        }

        # A broken edit is rejected; the last good config keeps running.
        series.write_text("events: [\n", encoding="utf-8")
        assert await run.daemon.reload("changed: series.yaml") is False
        assert run.daemon.config.series.event("zweiter").date.isoformat() == "2031-03-13"
        assert run.jobs()["reminder:zweiter"] == reminder.due


async def test_shutdown_beats_a_last_time_at_the_clocks_time(project: Path) -> None:
    async with running(project, START) as run:
        assert run.daemon.state is RunState.RUNNING
        assert run.daemon.scheduler.get_job(SWEEP_JOB) is not None
        assert check_heartbeat(heartbeat_path(project / "state" / "invite-mailer.db"), run.clock())[
            0
        ]

        run.clock.set(START + timedelta(minutes=30))
        await run.stop()
        assert run.daemon.state is RunState.STOPPED
        assert not run.daemon.scheduler.running
        beat = heartbeat(project)
        assert beat["state"] == "stopped"
        assert beat["time"] == (START + timedelta(minutes=30)).isoformat()
        ok, message = check_heartbeat(
            heartbeat_path(project / "state" / "invite-mailer.db"), run.clock()
        )
        assert not ok, message

        # A timer that still fires after the stop sends nothing, even when a mailing is due.
        invitation = await run.mailing("invitation:series")
        run.clock.set(invitation.due + timedelta(minutes=1))
        await run.daemon.run_pass()
        assert await run.sent() == [] and outbox(project) == []
