"""Replaying the shipped series through the command line against a real SMTP server.

The shipped config is copied, pointed at the in-process server through the
environment (as the README tells an operator to do), and ``send-due --now`` is
run at every moment the series sends something. What each run must deliver is
worked out here from ``contacts.csv``, ``optout.txt`` and the dates of the
product brief, independently of :func:`invite_mailer.core.plan.plan`.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from support.cli import invoke, run_process, status_json
from support.mails import Mail, duplicates, mails, split
from support.smtp import SmtpServer, smtp_env

pytestmark = pytest.mark.both_ledgers

BERLIN = ZoneInfo("Europe/Berlin")
# The four dates of the product brief, 14:00–16:00 each.
DATES = {
    "verwaltung": date(2024, 11, 14),
    "kreislaufwirtschaft": date(2024, 11, 21),
    "allianzen": date(2024, 11, 28),
    "forschung": date(2024, 12, 5),
}
EVENT_DATES = {event: f"{day:%d.%m.%Y}" for event, day in DATES.items()}
TITLES = {
    "verwaltung": "Verwaltung transformieren – Effizienz steigern",
    "kreislaufwirtschaft": "Kreislaufwirtschaft stärken – Ressourcen schonen",
    "allianzen": "Allianzen bilden – Engagement fördern",
    "forschung": "Kommunen und Forschung – Mehrwerte nutzen",
}
OPTED_OUT = ("Thomas.Schmidt@Example.org", "lena.hoffmann@example.com")

Key = tuple[str, str, str]  # kind, event ('' = series), recipient


def at(day: date, hour: int) -> datetime:
    return datetime.combine(day, time(hour), BERLIN)


@dataclass(frozen=True)
class Window:
    kind: str
    event: str
    opens: datetime
    closes: datetime


def windows() -> Iterator[Window]:
    """Every mailing of the shipped rules: due time and deadline, by the brief."""
    yield Window("invitation", "", at(date(2024, 10, 24), 10), at(DATES["verwaltung"], 14))
    for event, day in DATES.items():
        yield Window("reminder", event, at(day - timedelta(days=1), 14), at(day, 14))
        followup_day = day + timedelta(days=1)
        yield Window(
            "followup", event, at(followup_day, 10), at(followup_day + timedelta(days=14), 10)
        )


def windows_of(kind: str) -> Iterator[Window]:
    return (w for w in windows() if w.kind == kind)


@dataclass
class Expectation:
    """What the recipients should have got so far, by the rules of the brief."""

    config: Path
    materials: set[str] = field(default_factory=set)
    delivered: set[Key] = field(default_factory=set)
    summarised: set[tuple[str, str]] = field(default_factory=set)
    # Contacts whose registrations a run saw after the first one, and when:
    # each gets one confirmation, filed under their first date still ahead.
    late: dict[str, datetime] = field(default_factory=dict)

    def registrations(self) -> dict[str, set[str]]:
        with (self.config / "contacts.csv").open(encoding="utf-8-sig", newline="") as file:
            rows = list(csv.DictReader(file, delimiter=";"))
        result = {}
        for row in rows:
            names = {n.strip() for n in (row["anmeldungen"] or "").split(",") if n.strip()}
            result[row["email"].strip().lower()] = set(DATES) if "alle" in names else names
        return result

    def optouts(self) -> set[str]:
        lines = (self.config / "optout.txt").read_text(encoding="utf-8").splitlines()
        return {line.strip().lower() for line in lines if line.strip() and line[0] != "#"}

    def due(self, now: datetime) -> set[Key]:
        """Mails that a run at *now* must send."""
        contacts, optouts = self.registrations(), self.optouts()
        keys = set()
        for window in windows():
            if not window.opens <= now < window.closes:
                continue
            if window.kind == "followup" and window.event not in self.materials:
                continue
            for address, registered in contacts.items():
                if address in optouts:
                    continue
                if window.kind == "invitation" or window.event in registered:
                    keys.add((window.kind, window.event, address))
        for address, seen in self.late.items():
            if address in optouts or now < seen + timedelta(seconds=30):
                continue
            ahead = [e for e, day in DATES.items() if e in contacts[address] and now < at(day, 14)]
            if ahead:
                keys.add(("confirmation", ahead[0], address))
        return keys - self.delivered


@pytest.fixture
def project(project: Path) -> Path:
    optout = project / "config" / "optout.txt"
    optout.write_text(
        optout.read_text(encoding="utf-8") + "\n".join(OPTED_OUT) + "\n", encoding="utf-8"
    )
    return project


def add_materials(project: Path, event: str) -> None:
    """List a link to the slides under *event* in the copy's series.yaml."""
    path = project / "config" / "series.yaml"
    text = path.read_text(encoding="utf-8")
    block = re.compile(rf"(- id: {event}\n(?:(?!  - id:).*\n)*?    )materials: \[\]\n")
    new, count = block.subn(
        rf"\1materials:\n      - title: Folien\n"
        rf"        url: https://example.org/transferreihe/{event}/folien.pdf\n",
        text,
    )
    assert count == 1, f"no 'materials: []' under {event}"
    path.write_text(new, encoding="utf-8")


def add_contact(project: Path, row: str) -> None:
    path = project / "config" / "contacts.csv"
    path.write_text(path.read_text(encoding="utf-8") + row + "\n", encoding="utf-8")


class Replay:
    """Runs ``send-due --now`` and reports what reached the server in that run."""

    def __init__(self, server: SmtpServer, env: dict[str, str]) -> None:
        self.server = server
        self.env = env
        self.seen = 0

    def send_due(self, moment: str) -> tuple[list[Mail], list[Mail], dict[str, Any]]:
        result = invoke(["send-due", "--now", moment, "--json"], self.env)
        assert result.exit_code == 0, result.output
        data: dict[str, Any] = json.loads(result.stdout)
        new = self.server.received[self.seen :]
        self.seen += len(new)
        to_contacts, summaries = split(mails(new, EVENT_DATES))
        assert data["sent"] == len(to_contacts), (data, to_contacts)
        assert data["failed"] == 0 and data["retry_later"] == 0, data
        return to_contacts, summaries, data


@pytest.mark.slow
def test_replaying_the_series_sends_every_mail_once(project: Path, smtp_server: SmtpServer) -> None:
    config = project / "config"
    expect = Expectation(config)
    for event in ("kreislaufwirtschaft", "allianzen", "forschung"):
        add_materials(project, event)
        expect.materials.add(event)
    replay = Replay(smtp_server, smtp_env(smtp_server.port))
    invitation_sent_to: set[str] = set()

    steps: list[tuple[str, Any]] = [
        ("2024-10-24T10:00", None),  # the invitation
        # A contact added after the invitation went out, window still open.
        (
            "2024-11-13T14:00",
            lambda: add_contact(
                project, "nora.spaet@example.org;Frau;;Nora;Spät;Stadtwerke;kreislaufwirtschaft"
            ),
        ),
        # After the invitation's deadline: this one must not get it.
        (
            "2024-11-15T10:00",
            lambda: add_contact(
                project, "zacharias.spaet@example.org;Herr;;Zacharias;Spät;Kreis;alle"
            ),
        ),
        # The follow-up of 14.11. was waiting; materials arrive three days later.
        (
            "2024-11-18T09:00",
            lambda: (add_materials(project, "verwaltung"), expect.materials.add("verwaltung")),
        ),
        ("2024-11-20T14:00", None),
        ("2024-11-22T10:00", None),
        ("2024-11-27T14:00", None),
        ("2024-11-29T10:00", None),
        ("2024-12-04T14:00", None),
        ("2024-12-06T10:00", None),
    ]
    for moment, edit in steps:
        before = set(expect.registrations())
        if edit is not None:
            edit()
        now = datetime.fromisoformat(moment).replace(tzinfo=BERLIN)
        wanted = expect.due(now)
        for address in set(expect.registrations()) - before:
            if expect.registrations()[address]:
                expect.late[address] = now
        got, summaries, data = replay.send_due(moment)
        keys = [m.key for m in got]
        assert not duplicates(keys), moment
        assert set(keys) == wanted, (
            f"{moment}: missing {wanted - set(keys)}, extra {set(keys) - wanted}"
        )
        for mail in got:
            if mail.kind == "confirmation" and "Termine" in mail.subject:
                assert mail.subject.startswith("Anmeldebestätigung: "), mail.subject
            elif mail.event:
                # Subjects shorten a title to its part before the dash.
                short = TITLES[mail.event].split(" – ")[0]
                assert short in mail.subject, (moment, mail.subject)
        expect.delivered |= wanted
        for kind, _, address in wanted:
            if kind == "confirmation":
                del expect.late[address]  # one confirmation covers all their dates
        invitation_sent_to |= {m.to for m in got if m.kind == "invitation"}
        # The organiser hears once about each mailing, when it first went out.
        # (Not about confirmations: a few at a time, all the series long.)
        newly = {(kind, event) for kind, event, _ in wanted if kind != "confirmation"}
        newly -= expect.summarised
        assert sorted((s.kind.removeprefix("summary:"), s.event) for s in summaries) == sorted(
            newly
        ), moment
        assert all(s.to == "transferreihe@example.org" for s in summaries)
        expect.summarised |= newly

        again, again_summaries, data = replay.send_due(moment)
        assert again == [] and again_summaries == [], f"{moment}: repeated run sent {again}"
        assert data["sent"] == 0

    # Every mailing of the series went out and was summarised.
    assert expect.summarised == {(w.kind, w.event) for w in windows()}
    assert len(smtp_server.received) == len(expect.delivered) + 9
    everyone = {m.to for m in mails(smtp_server.received, EVENT_DATES)}
    for address in OPTED_OUT:
        assert address.lower() not in everyone
    # The late contact got the invitation while it was open, the later one never did.
    assert "nora.spaet@example.org" in invitation_sent_to
    assert "zacharias.spaet@example.org" in everyone
    assert "zacharias.spaet@example.org" not in invitation_sent_to
    assert ("reminder", "verwaltung", "zacharias.spaet@example.org") not in expect.delivered
    assert ("followup", "verwaltung", "zacharias.spaet@example.org") in expect.delivered

    status = status_json(replay.env, "--now", "2024-12-21T00:00")
    assert status["failed"] == [] and status["uncertain"] == [] and status["retrying"] == []
    by_mailing = {m["id"]: m for m in status["mailings"]}
    # Nine mailings of the rules, and the late registrations' confirmations.
    assert len(by_mailing) == 9 + 1
    assert by_mailing["confirmation:kreislaufwirtschaft"]["sent"] == 2
    for window in windows():
        row = by_mailing[f"{window.kind}:{window.event or 'series'}"]
        sent = sum(1 for k in expect.delivered if k[:2] == (window.kind, window.event))
        assert row["sent"] == sent, row
        # Zacharias, registered for all dates, came after the deadlines of the
        # invitation and of the first reminder: those stay unsent, and say so.
        late = window.kind == "invitation" or window == next(windows_of("reminder"))
        assert (row["state"], row["outstanding"]) == (("closed", 1) if late else ("done", 0)), row
    invitation = by_mailing["invitation:series"]
    assert invitation["opted_out"] == len(OPTED_OUT)


@pytest.mark.slow
def test_waiting_followup_is_shown_and_sends_nothing(
    project: Path, smtp_server: SmtpServer
) -> None:
    env = smtp_env(smtp_server.port)
    result = invoke(["send-due", "--now", "2024-11-15T10:00"], env)
    assert result.exit_code == 0, result.output
    assert "0 sent" in result.stdout
    # The reminder of 13.11. was never sent in this replay and its window is closed now.
    assert smtp_server.received == []
    rows = {m["id"]: m for m in status_json(env, "--now", "2024-11-15T10:00")["mailings"]}
    assert rows["followup:verwaltung"]["state"] == "waiting-for-materials"
    assert rows["reminder:verwaltung"]["state"] == "closed"


@pytest.mark.slow
def test_send_due_as_a_real_process(project: Path, smtp_server: SmtpServer) -> None:
    env = smtp_env(smtp_server.port)
    first = run_process(["send-due", "--now", "2024-10-24T10:05"], env, project)
    assert first.returncode == 0, first.stderr
    assert "10 sent (+1 report to the organiser), 0 failed, 0 to retry later" in first.stdout, (
        first.stdout
    )
    assert f"smtp 127.0.0.1:{smtp_server.port}" in first.stdout
    got, summaries = split(mails(smtp_server.received))
    assert sorted(m.to for m in got) == sorted(
        a
        for a in Expectation(project / "config").registrations()
        if a not in {o.lower() for o in OPTED_OUT}
    )
    assert [s.to for s in summaries] == ["transferreihe@example.org"]
    assert "Versendet:            10" in summaries[0].body

    second = run_process(["send-due", "--now", "2024-10-24T10:05"], env, project)
    assert second.returncode == 0, second.stderr
    assert "0 sent" in second.stdout
    assert len(smtp_server.received) == 11

    status = run_process(["status", "--json", "--now", "2024-10-24T10:06"], env, project)
    assert status.returncode == 0, status.stderr
    rows = {m["id"]: m for m in json.loads(status.stdout)["mailings"]}
    assert rows["invitation:series"]["sent"] == 10
    assert rows["invitation:series"]["opted_out"] == 2
    assert rows["invitation:series"]["state"] == "done"
    assert rows["reminder:verwaltung"]["state"] == "scheduled"
