"""``invite-mailer run`` as a real process, on the real clock, against a real SMTP server.

The series is written with its dates a few seconds around now, so the daemon
has to wake up by itself; the SMTP server runs in a thread of this process
and records when each message arrived.
"""

from __future__ import annotations

import re
import signal
import subprocess
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from support.cli import start_process, status_json, wait_for
from support.contacts import write_contacts
from support.mails import ORGANISER, duplicates, mails, split
from support.postgres import query
from support.project import ledger_of
from support.smtp import Received, SmtpServer, free_port, smtp_env

BERLIN = ZoneInfo("Europe/Berlin")
CONTACTS = ("anna.alt@example.org", "bernd.berg@example.org", "clara.chen@example.org")

SERIES = """\
id: daemon-probe
title: Probereihe
organiser:
  name: "KomKomIn – Wissenschaftliches Begleitvorhaben"
  email: transferreihe@example.org
timezone: Europe/Berlin
registration_url: https://example.org/probe/anmeldung
imprint: |
  KomKomIn – Wissenschaftliches Begleitvorhaben
  Musterstraße 1, 10115 Berlin
events:
  - id: gestern
    title: "Gestern – Ergebnisse sichern"
    date: {yesterday}
    start: "10:00"
    end: "12:00"
    join_url: https://example.org/probe/gestern
    materials: []
  - id: bald
    title: "Bald – Erfahrungen teilen"
    date: {soon}
    start: "14:00"
    end: "16:00"
    join_url: https://example.org/probe/bald
    materials: []
mailings:
  invitation: {{send_at: "{send_at}", until: "{until}", audience: all}}
  reminder:   {{before: 1 day, audience: registered}}
  followup:   {{after: 1 hour, at: null, audience: registered, wait_for_materials: 14 days}}
"""

MATERIALS = """\
    materials:
      - title: Folien
        url: https://example.org/probe/gestern/folien.pdf
"""


class StampedList(list[Received]):
    """The server's list of received messages, remembering when each arrived."""

    def __init__(self) -> None:
        super().__init__()
        self.times: list[float] = []

    def append(self, item: Received) -> None:
        self.times.append(time.time())
        super().append(item)

    def clear(self) -> None:
        self.times.clear()
        super().clear()


def local(moment: datetime) -> str:
    return moment.astimezone(BERLIN).strftime("%Y-%m-%d %H:%M:%S")


def series_text(invitation_at: datetime, *, materials: bool = False) -> str:
    today = datetime.now(BERLIN).date()
    text = SERIES.format(
        yesterday=today - timedelta(days=1),
        soon=today + timedelta(days=3),
        send_at=local(invitation_at),
        until=local(invitation_at + timedelta(hours=1)),
    )
    if materials:
        text = text.replace("    materials: []\n", MATERIALS, 1)
    return text


@pytest.fixture
def project(project: Path) -> Path:
    write_contacts(
        project / "config" / "contacts.csv",
        ((address, "", address.split(".")[0].title(), "Probe", "alle") for address in CONTACTS),
    )
    return project


@pytest.fixture
def stamped_server(smtp_server: SmtpServer) -> SmtpServer:
    smtp_server.received = StampedList()
    return smtp_server


class Daemon:
    """The daemon process and its log."""

    def __init__(self, project: Path, env: dict[str, str]) -> None:
        self.log = project / f"daemon-{time.monotonic_ns()}.log"
        self.process = start_process(["run", "--config", "config"], env, project, stderr=self.log)

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8")

    def wait_for_log(self, needle: str, timeout: float = 10, after: int = 0) -> int:
        """Wait until *needle* is logged (after offset *after*); return where it ended."""
        found: list[int] = []

        def logged() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"daemon exited ({self.process.returncode}):\n{self.output()}")
            position = self.output().find(needle, after)
            if position >= 0:
                found.append(position + len(needle))
            return position >= 0

        wait_for(logged, timeout, f"{needle!r} in the daemon's log")
        return found[0]

    def stop(self, timeout: float = 10) -> tuple[int, float]:
        started = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=timeout)
        return code, time.monotonic() - started

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        assert self.process.stdout is not None
        self.process.stdout.close()


@pytest.fixture
def daemons() -> Any:
    started: list[Daemon] = []

    def start(project: Path, env: dict[str, str]) -> Daemon:
        daemon = Daemon(project, env)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.kill()


def ledger_rows(project: Path) -> list[tuple[str, str, str, str]]:
    return query(ledger_of(project), "SELECT kind, event, email, state FROM deliveries")


@pytest.mark.both_ledgers
@pytest.mark.system
@pytest.mark.slow
def test_daemon_fires_on_time_reloads_edits_survives_broken_ones_and_stops(
    project: Path, stamped_server: SmtpServer, daemons: Any
) -> None:
    server = stamped_server
    config = project / "config"
    series = config / "series.yaml"
    # The invitation far ahead for now; an edit brings it close.
    series.write_text(series_text(datetime.now(BERLIN) + timedelta(days=1)), encoding="utf-8")
    daemon = daemons(project, smtp_env(server.port))

    # Catch-up at start: yesterday's follow-up is due but has no materials.
    offset = daemon.wait_for_log("scheduled")
    daemon.wait_for_log("gestern is waiting for materials")
    assert server.received == []

    # An organiser adds the materials and moves the invitation to a few
    # seconds from now: the waiting follow-up goes out at once.
    due = datetime.now(BERLIN).replace(microsecond=0) + timedelta(seconds=5)
    offset = edit_until_reloaded(daemon, series, series_text(due, materials=True), after=offset)
    wait_for(lambda: len(server.received) >= 4, 5, "the follow-up and its summary")
    followups, summaries = split(mails(server.received))
    assert sorted(m.key for m in followups) == [("followup", "gestern", a) for a in CONTACTS]
    assert [s.to for s in summaries] == [ORGANISER]

    # A broken edit is reported with file and line; the last good config keeps running.
    broken = series_text(due, materials=True).replace(
        'title: "Bald – Erfahrungen teilen"', 'title: "Bald – Erfahrungen teilen'
    )
    series.write_text(broken, encoding="utf-8")
    offset = daemon.wait_for_log("rejected", after=offset)
    rejected_at = datetime.now(BERLIN)
    assert rejected_at < due, "the broken edit was only noticed after the invitation was due"
    message = daemon.output()[offset:]
    broken_line = broken.splitlines().index('    title: "Bald – Erfahrungen teilen') + 1
    reported = re.search(r"config/series\.yaml, line (\d+): YAML", message)
    assert reported is not None, message
    # The parser notices an unclosed quote where the next value begins.
    assert broken_line <= int(reported.group(1)) <= broken_line + 2, message

    wait_for(lambda: len(server.received) >= 8, 10, "the invitation and its summary")
    received = server.received
    assert isinstance(received, StampedList)
    invitations = [
        (mail, at)
        for mail, at in zip(mails(received), received.times, strict=True)
        if mail.kind == "invitation"
    ]
    assert sorted(m.to for m, _ in invitations) == sorted(CONTACTS)
    for _, at in invitations:
        late = at - due.timestamp()
        assert 0 <= late < 1.0, f"invitation arrived {late:+.2f}s after its due time"
    assert daemon.process.poll() is None

    code, took = daemon.stop()
    assert code == 0, daemon.output()
    assert took < 5
    assert "daemon stopped" in daemon.output()
    rows = ledger_rows(project)
    assert not [row for row in rows if row[3] != "sent"], rows
    assert not duplicates(m.key for m in mails(server.received))


@pytest.mark.both_ledgers
@pytest.mark.system
@pytest.mark.slow
@pytest.mark.parametrize("trigger", ["catch-up", "scheduled", "reload"])
def test_sigterm_during_a_pass_records_what_was_in_flight(
    project: Path, smtp_server: SmtpServer, daemons: Any, trigger: str
) -> None:
    """However a pass was started, SIGTERM lets the mails in flight finish and be recorded."""
    many = [f"person{n:03d}@example.org" for n in range(60)]
    write_contacts(
        project / "config" / "contacts.csv", ((a, "", "Vorname", "Probe", "alle") for a in many)
    )
    series = project / "config" / "series.yaml"
    now = datetime.now(BERLIN)
    series.write_text(
        series_text(
            now - timedelta(minutes=1) if trigger == "catch-up" else now + timedelta(days=1)
        ),
        encoding="utf-8",
    )
    smtp_server.behaviour.data_delay = 0.05  # 4 connections: at most 80 mails a second
    env = smtp_env(smtp_server.port)
    daemon = daemons(project, env)
    if trigger == "scheduled":
        # The invitation is moved to two seconds from now: a scheduler job sends it.
        offset = daemon.wait_for_log("scheduled")
        due = datetime.now(BERLIN) + timedelta(seconds=2)
        edit_until_reloaded(daemon, series, series_text(due), after=offset)
    elif trigger == "reload":
        # The follow-up waits; the reload that brings its materials sends it.
        offset = daemon.wait_for_log("waiting for materials")
        text = series_text(now + timedelta(days=1), materials=True)
        edit_until_reloaded(daemon, series, text, after=offset)
    wait_for(lambda: len(smtp_server.received) >= 12, 15, "a pass to be under way")
    code, took = daemon.stop()
    assert code == 0, daemon.output()
    assert took < 5, daemon.output()
    first = [m.to for m in split(mails(smtp_server.received))[0]]
    assert len(first) < len(many), "the pass ended before SIGTERM; nothing was in flight"

    # Nothing was left in flight: what arrived is recorded as sent, nothing else is.
    rows = ledger_rows(project)
    assert not [row for row in rows if row[3] not in ("sent", "pending")], rows
    assert {row[2] for row in rows if row[3] == "sent"} == set(first)
    assert status_json(env)["uncertain"] == []
    if trigger != "catch-up":
        return

    # The next start sends the rest, and nothing twice.
    again = daemons(project, env)
    wait_for(lambda: len(smtp_server.received) >= len(many) + 1, 15, "the rest and the summary")
    code, _ = again.stop()
    assert code == 0, again.output()
    got, summaries = split(mails(smtp_server.received))
    assert sorted(m.to for m in got) == many
    assert len(summaries) == 1


@pytest.mark.both_ledgers
@pytest.mark.system
@pytest.mark.slow
def test_an_edit_during_a_long_catch_up_is_not_missed(
    project: Path, smtp_server: SmtpServer, daemons: Any
) -> None:
    # 80 invitations to catch up with; three of the contacts registered, so
    # yesterday's follow-up (waiting for materials) would go to them.
    many = [f"person{n:03d}@example.org" for n in range(80)]
    write_contacts(
        project / "config" / "contacts.csv",
        ((a, "", "Vorname", "Probe", "alle" if n < 3 else "") for n, a in enumerate(many)),
    )
    series = project / "config" / "series.yaml"
    invitation_at = datetime.now(BERLIN) - timedelta(minutes=1)
    series.write_text(series_text(invitation_at), encoding="utf-8")
    smtp_server.behaviour.data_delay = 0.05
    daemon = daemons(project, smtp_env(smtp_server.port))
    wait_for(lambda: len(smtp_server.received) >= 10, 15, "the catch-up to be under way")
    series.write_text(series_text(invitation_at, materials=True), encoding="utf-8")

    def followups() -> list[str]:
        return [m.to for m in split(mails(smtp_server.received))[0] if m.kind == "followup"]

    wait_for(lambda: len(followups()) == 3, 15, "the follow-up after the edit")
    assert sorted(followups()) == many[:3]
    code, _ = daemon.stop()
    assert code == 0, daemon.output()


@pytest.mark.both_ledgers
@pytest.mark.system
def test_sigterm_while_retries_wait_exits_at_once(project: Path, daemons: Any) -> None:
    """A relay that is down: the pass waits to retry; SIGTERM must not wait for it."""
    (project / "config" / "series.yaml").write_text(
        series_text(datetime.now(BERLIN) - timedelta(minutes=1)), encoding="utf-8"
    )
    env = smtp_env(
        free_port(),
        smtp__timeout=20,
        limits__retry_initial_seconds=2,
        limits__retry_in_pass_seconds=60,
    )
    daemon = daemons(project, env)
    daemon.wait_for_log("temporary failure")
    code, took = daemon.stop()
    assert code == 0, daemon.output()
    assert took < 5, daemon.output()
    rows = ledger_rows(project)
    assert {row[2] for row in rows} == set(CONTACTS)
    assert {row[3] for row in rows} == {"pending"}


def edit_until_reloaded(daemon: Daemon, path: Path, text: str, *, after: int) -> int:
    """Write *path* and wait for the daemon to reload it.

    The daemon starts watching its files while it starts up; an edit made in
    the very first moment may come before the watch, so it is written again
    until the daemon reports the reload (what an organiser would do, too).
    """
    for _ in range(5):
        path.write_text(text, encoding="utf-8")
        try:
            return daemon.wait_for_log("config reloaded", timeout=3, after=after)
        except AssertionError:
            if daemon.process.poll() is not None:
                raise
    raise AssertionError(f"the daemon never reloaded {path}:\n{daemon.output()}")


@pytest.mark.both_ledgers
@pytest.mark.system
def test_sigterm_right_after_start_exits_cleanly(project: Path, smtp_server: SmtpServer) -> None:
    (project / "config" / "series.yaml").write_text(
        series_text(datetime.now(BERLIN) + timedelta(days=1)), encoding="utf-8"
    )
    process = start_process(["run"], smtp_env(smtp_server.port), project)
    try:
        assert process.stderr is not None
        # Wait for the start message, then stop.
        lines = []
        for line in process.stderr:
            lines.append(line)
            if "daemon started" in line:
                break
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    assert process.returncode == 0, "".join(lines) + err


# --- a reload that outlives its timeout ----------------------------------------------------


@pytest.mark.slow
async def test_slow_reloads_never_pile_up_threads(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reload that times out leaves its thread reading; later edits wait for it
    instead of starting one thread each, and are read as soon as it ends."""
    import asyncio
    import threading

    from invite_mailer.delivery.ledger import Ledger
    from invite_mailer.delivery.transport import OutboxTransport
    from invite_mailer.inputs.config import load_config
    from invite_mailer.service import daemon as daemon_module
    from support.contacts import write_contacts

    config = load_config(project / "config")
    write_contacts(
        project / "config" / "contacts.csv",
        ((f"p{n}@example.org", "", "Vor", "Nach", "alle") for n in range(40_000)),
    )

    def readers() -> int:
        return sum(t.name == "config-reload" for t in threading.enumerate())

    monkeypatch.setattr(daemon_module, "RELOAD_TIMEOUT", 0.05)
    async with Ledger.open(project / "state" / "invite-mailer.db") as ledger:
        daemon = daemon_module.Daemon(
            config,
            ledger,
            OutboxTransport(project / "outbox"),
            config_dir=project / "config",
            templates_dir=None,
        )
        daemon.state = daemon_module.RunState.RUNNING
        assert await daemon.reload("first edit") is False  # timed out, still reading
        for n in range(5):
            assert await daemon.reload(f"edit {n}") is False
        assert readers() == 1
        # The next read may take its time: it is the one that picks up the edits.
        monkeypatch.setattr(daemon_module, "RELOAD_TIMEOUT", 120)
        for _ in range(600):  # the thread's work, not the clock, is waited for
            if daemon.reloads:
                break
            await asyncio.sleep(0.1)
        assert daemon.reloads == 1
        assert len(daemon.config.contacts) == 40_000
        assert readers() == 0
