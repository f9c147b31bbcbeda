"""A date changes after mail went out: updates and cancellations.

Replays the shipped series on the outbox transport through the CLI, edits
series.yaml between runs as an organiser would, and reads what was written.
"""

from __future__ import annotations

import json
from collections import Counter
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path

import icalendar
import pytest

from support.cli import invoke

pytestmark = pytest.mark.both_ledgers

ROOT = Path(__file__).resolve().parent.parent
INVITED = 12  # contacts in the shipped config/contacts.csv
SERIES = "config/series.yaml"


@pytest.fixture
def project(project: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    # The organiser's summary mails would only add noise to the counts here.
    monkeypatch.setenv("INVITE_MAILER_NOTIFY__ORGANISER_SUMMARY", "false")
    return project


def run(*args: str) -> str:
    result = invoke(args)
    assert result.exit_code == 0, result.output
    return result.output


def edit(project: Path, old: str, new: str) -> None:
    path = project / SERIES
    text = path.read_text(encoding="utf-8")
    assert old in text, old
    path.write_text(text.replace(old, new, 1), encoding="utf-8")


class Outbox:
    """Reads the outbox; each call to :meth:`new` returns mails not seen before."""

    def __init__(self, project: Path) -> None:
        self.path = project / "outbox"
        self.seen: set[str] = set()

    def new(self) -> list[EmailMessage]:
        found = []
        for file in sorted(self.path.glob("*.eml")) if self.path.exists() else []:
            if file.name in self.seen:
                continue
            self.seen.add(file.name)
            message = message_from_bytes(file.read_bytes(), policy=policy.default)
            assert isinstance(message, EmailMessage)
            found.append(message)
        return found


def kinds(messages: list[EmailMessage]) -> Counter[str]:
    return Counter(str(m["X-Invite-Mailer-Kind"]) for m in messages)


def calendar(message: EmailMessage) -> icalendar.Calendar:
    parts = [p for p in message.iter_attachments() if p.get_content_type() == "text/calendar"]
    assert len(parts) == 1, [p.get_filename() for p in message.iter_attachments()]
    data = parts[0].get_payload(decode=True)
    assert isinstance(data, bytes)
    return icalendar.Calendar.from_ical(data)


def raw_calendar(message: EmailMessage) -> str:
    """The calendar file as sent, with folded lines joined."""
    (part,) = [p for p in message.iter_attachments() if p.get_content_type() == "text/calendar"]
    data = part.get_payload(decode=True)
    assert isinstance(data, bytes)
    return data.replace(b"\r\n ", b"").decode()


def vevent(cal: icalendar.Calendar) -> icalendar.Event:
    (event,) = cal.walk("VEVENT")
    return event


def text_of(message: EmailMessage) -> str:
    part = message.get_body(("plain",))
    assert part is not None
    return str(part.get_content())


MOVE_ALLIANZEN = (
    'date: 2024-11-28\n    start: "14:00"\n    end: "16:00"',
    'date: 2024-11-28\n    start: "15:00"\n    end: "17:00"',
)


def invitations_out(project: Path) -> Outbox:
    outbox = Outbox(project)
    run("send-due", "--now", "2024-10-24T10:05")
    assert kinds(outbox.new()) == {"invitation": INVITED}
    return outbox


@pytest.mark.slow
def test_moving_a_date_sends_one_update_per_invited_contact(project: Path) -> None:
    outbox = invitations_out(project)
    invitation_uid = None
    for message in Outbox(project).new():
        for part in message.iter_attachments():
            if part.get_filename() == "transferreihe-2024-allianzen.ics":
                data = part.get_payload(decode=True)
                assert isinstance(data, bytes)
                invitation_uid = str(vevent(icalendar.Calendar.from_ical(data))["UID"])
    assert invitation_uid is not None

    edit(project, *MOVE_ALLIANZEN)
    # Within the grace period (10 minutes) nothing goes out; plan shows the update.
    run("send-due", "--now", "2024-10-25T09:00")
    assert outbox.new() == []
    plan = json.loads(run("plan", "--now", "2024-10-25T09:01", "--json"))
    (update,) = [m for m in plan["mailings"] if m["kind"] == "update"]
    assert update["event"] == "allianzen"
    assert update["state"] == "scheduled"
    assert update["recipients"] == INVITED
    assert update["due"] == "2024-10-25T09:10:00+02:00"

    run("send-due", "--now", "2024-10-25T09:11")
    updates = outbox.new()
    assert kinds(updates) == {"update": INVITED}
    assert len({str(m["To"]) for m in updates}) == INVITED
    for message in updates:
        cal = calendar(message)
        assert str(cal["METHOD"]) == "REQUEST"
        item = vevent(cal)
        assert str(item["UID"]) == invitation_uid
        assert int(item["SEQUENCE"]) == 1
        assert item.decoded("DTSTART").isoformat() == "2024-11-28T15:00:00+01:00"
        assert "RSVP=FALSE" in raw_calendar(message)
        body = text_of(message)
        assert "bisher: Donnerstag, 28. November 2024, 14:00–16:00 Uhr" in body
        assert "neu:    Donnerstag, 28. November 2024, 15:00–17:00 Uhr" in body

    # Repeating sends nothing more.
    run("send-due", "--now", "2024-10-25T09:30")
    assert outbox.new() == []

    # A second change: SEQUENCE 2.
    edit(project, 'start: "15:00"\n    end: "17:00"', 'start: "16:00"\n    end: "18:00"')
    run("send-due", "--now", "2024-10-26T09:00")
    run("send-due", "--now", "2024-10-26T09:11")
    second = outbox.new()
    assert kinds(second) == {"update": INVITED}
    assert {int(vevent(calendar(m))["SEQUENCE"]) for m in second} == {2}

    # Reminders afterwards describe the current version, with the raised SEQUENCE.
    run("send-due", "--now", "2024-11-27T16:01")
    reminders = [m for m in outbox.new() if str(m["X-Invite-Mailer-Event"]) == "allianzen"]
    assert reminders and kinds(reminders) == {"reminder": len(reminders)}
    for message in reminders:
        item = vevent(calendar(message))
        assert item.decoded("DTSTART").isoformat() == "2024-11-28T16:00:00+01:00"
        assert int(item["SEQUENCE"]) == 2
        assert str(calendar(message)["METHOD"]) == "PUBLISH"
        assert "16:00–18:00 Uhr" in text_of(message)


@pytest.mark.slow
def test_cancelling_a_date_sends_cancellations_and_withdraws_its_reminder(project: Path) -> None:
    outbox = invitations_out(project)
    edit(
        project,
        "    join_url: https://example.org/transferreihe/allianzen\n",
        "    join_url: https://example.org/transferreihe/allianzen\n    cancelled: true\n"
        "    cancel_reason: Die Referentinnen sind kurzfristig verhindert.\n",
    )
    run("send-due", "--now", "2024-11-01T12:00")
    run("send-due", "--now", "2024-11-01T12:11")
    cancellations = outbox.new()
    assert kinds(cancellations) == {"cancellation": INVITED}
    for message in cancellations:
        cal = calendar(message)
        assert str(cal["METHOD"]) == "CANCEL"
        item = vevent(cal)
        assert str(item["STATUS"]) == "CANCELLED"
        assert int(item["SEQUENCE"]) == 1
        assert "kurzfristig verhindert" in text_of(message)
        assert "Abgesagt" in str(message["Subject"])

    plan = json.loads(run("plan", "--now", "2024-11-27T15:00", "--json"))
    states = {m["id"]: m["state"] for m in plan["mailings"]}
    assert states["reminder:allianzen"] == "withdrawn"
    assert states["followup:allianzen"] == "withdrawn"
    for moment in ("2024-11-27T14:01", "2024-11-27T15:00", "2024-11-29T10:01"):
        run("send-due", "--now", moment)
    assert not [m for m in outbox.new() if str(m["X-Invite-Mailer-Event"]) == "allianzen"]


@pytest.mark.slow
def test_editing_only_materials_or_description_sends_nothing(project: Path) -> None:
    outbox = invitations_out(project)
    edit(
        project,
        "    materials: []",
        '    materials: [{title: Folien, url: "https://example.org/f.pdf"}]',
    )
    edit(project, "Wie digitale Werkzeuge", "Welche digitalen Werkzeuge")
    run("send-due", "--now", "2024-10-25T09:00")
    run("send-due", "--now", "2024-10-26T09:00")
    assert outbox.new() == []
    plan = json.loads(run("plan", "--now", "2024-10-26T09:00", "--json"))
    assert not [m for m in plan["mailings"] if m["kind"] in ("update", "cancellation")]


@pytest.mark.slow
def test_a_typo_fixed_within_the_grace_period_sends_one_update(project: Path) -> None:
    outbox = invitations_out(project)
    edit(
        project,
        'title: "Allianzen bilden – Engagement fördern"',
        'title: "Allianzen bilden – Engagemnt fördern"',
    )
    run("send-due", "--now", "2024-10-25T09:00")
    edit(project, "Engagemnt", "Engagement stärken und")
    run("send-due", "--now", "2024-10-25T09:05")
    assert outbox.new() == []
    run("send-due", "--now", "2024-10-25T09:16")
    updates = outbox.new()
    assert kinds(updates) == {"update": INVITED}
    for message in updates:
        assert int(vevent(calendar(message))["SEQUENCE"]) == 1
        assert "Engagement stärken und fördern" in text_of(message)
        assert "Engagemnt" not in text_of(message)
    run("send-due", "--now", "2024-10-26T09:00")
    assert outbox.new() == []


@pytest.mark.slow
def test_a_change_reverted_within_the_grace_period_sends_nothing(project: Path) -> None:
    outbox = invitations_out(project)
    edit(project, *MOVE_ALLIANZEN)
    run("send-due", "--now", "2024-10-25T09:00")
    edit(project, MOVE_ALLIANZEN[1], MOVE_ALLIANZEN[0])
    run("send-due", "--now", "2024-10-25T09:05")
    run("send-due", "--now", "2024-10-25T10:00")
    assert outbox.new() == []


@pytest.mark.slow
def test_preview_update_shows_what_changed(project: Path) -> None:
    invitations_out(project)
    edit(project, *MOVE_ALLIANZEN)
    run("send-due", "--now", "2024-10-25T09:00")
    output = run(
        "preview",
        "update",
        "--event",
        "allianzen",
        "--contact",
        "jana.mueller@example.org",
        "--out",
        "preview",
        "--now",
        "2024-10-25T09:02",
    )
    eml = next(Path(line) for line in output.split() if line.endswith(".eml"))
    message = message_from_bytes(eml.read_bytes(), policy=policy.default)
    assert isinstance(message, EmailMessage)
    assert "bisher: Donnerstag, 28. November 2024, 14:00–16:00 Uhr" in text_of(message)
    assert int(vevent(calendar(message))["SEQUENCE"]) == 1


def inline_calendar(message: EmailMessage) -> tuple[str, icalendar.Calendar]:
    """The iTIP part inside multipart/alternative: its method parameter and content."""
    (alternative,) = [p for p in message.walk() if p.get_content_type() == "multipart/alternative"]
    parts = [p for p in alternative.iter_parts() if p.get_content_type() == "text/calendar"]
    assert len(parts) == 1, [p.get_content_type() for p in alternative.iter_parts()]
    assert parts[0].get_content_disposition() is None  # inline, not an attachment
    data = parts[0].get_payload(decode=True)
    assert isinstance(data, bytes)
    return str(parts[0].get_param("method")), icalendar.Calendar.from_ical(data)


@pytest.mark.slow
def test_with_links_updates_go_to_those_whose_mail_carried_the_date_inline_and_attached(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("INVITE_MAILER_SENDER__WEB_URL", "https://example.org/reihe")
    monkeypatch.setenv("INVITE_MAILER_UNSUBSCRIBE__SECRET", "links-secret-0123456789")
    edit(project, "privacy_url:", "registration:\n  mode: links\nprivacy_url:")
    outbox = invitations_out(project)
    run(
        "registrations",
        "add",
        "bjoern.oestreich@example.org",
        "--event",
        "allianzen",
        "--now",
        "2024-10-25T09:00",
    )
    run("send-due", "--now", "2024-10-25T09:01")
    [confirmation] = outbox.new()
    first = vevent(calendar(confirmation))

    edit(project, *MOVE_ALLIANZEN)
    run("send-due", "--now", "2024-11-01T09:00")
    run("send-due", "--now", "2024-11-01T09:11")
    updates = outbox.new()
    # The invitation carried allianzen's file only to those registered for it
    # (the contact list's), the confirmation to Björn: exactly they are told.
    registered = {
        "jana.mueller@example.org",
        "thomas.schmidt@example.org",
        "juergen.weiss@example.org",
        "oezlem.yilmaz@example.org",
        "klaus-dieter.fuchs@example.org",
        "bjoern.oestreich@example.org",
    }
    assert kinds(updates) == {"update": len(registered)}
    assert {m["To"].addresses[0].addr_spec for m in updates} == registered
    for message in updates:
        method, inline = inline_calendar(message)
        assert method == "REQUEST" and inline["METHOD"] == "REQUEST"
        entry = vevent(inline)
        assert entry["UID"] == first["UID"]
        assert int(entry["SEQUENCE"]) > int(first["SEQUENCE"])
        # The same file as the attachment.
        assert vevent(calendar(message))["UID"] == entry["UID"]
        assert int(vevent(calendar(message))["SEQUENCE"]) == int(entry["SEQUENCE"])

    # Cancelled: the same people, CANCEL inline and attached, SEQUENCE raised again.
    edit(project, "allianzen\n    title:", "allianzen\n    cancelled: true\n    title:")
    run("send-due", "--now", "2024-11-02T09:00")
    run("send-due", "--now", "2024-11-02T09:11")
    cancellations = outbox.new()
    assert kinds(cancellations) == {"cancellation": len(registered)}
    for message in cancellations:
        method, inline = inline_calendar(message)
        assert method == "CANCEL" and inline["METHOD"] == "CANCEL"
        assert int(vevent(inline)["SEQUENCE"]) > int(entry["SEQUENCE"])
