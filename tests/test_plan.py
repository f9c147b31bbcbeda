"""The pure planner: a table of moments, rules and expected outcomes."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from invite_mailer.core.plan import EmptyLedger, MailingState, PlanInput, plan
from invite_mailer.inputs.contacts import Contact
from invite_mailer.inputs.series import Kind, Series, load_series, parse_series
from invite_mailer.inputs.yamlfile import parse_yaml

BERLIN = ZoneInfo("Europe/Berlin")
CONFIG = Path(__file__).resolve().parent.parent / "config"


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=BERLIN)


@pytest.fixture(scope="module")
def series() -> Series:
    return load_series(CONFIG)


def contact(email: str, *events: str, all_: bool = False) -> Contact:
    return Contact(email=email, registrations=frozenset(events), registered_all=all_)


CONTACTS = (
    contact("a@example.org", all_=True),
    contact("b@example.org", "verwaltung", "allianzen"),
    contact("c@example.org", "kreislaufwirtschaft"),
    contact("d@example.org"),
)


class Ledger:
    def __init__(self, states: Mapping[tuple[str, str], Mapping[str, str]]) -> None:
        self._states = states

    def states(self, kind: str, event: str) -> Mapping[str, str]:
        return self._states.get((kind, event), {})

    def seen(self, event: str) -> Mapping[str, str]:
        return {}

    def date(self, event: str) -> None:
        return None

    def registrations_of(self, email: str) -> Mapping[str, object]:
        return {}

    def confirmed(self, email: str) -> frozenset[str]:
        return frozenset()


def by_id(mailings: list, mailing_id: str):  # type: ignore[no-untyped-def]
    return next(m for m in mailings if m.id == mailing_id)


def test_shipped_series_has_nine_mailings_with_reminders_the_day_before(series: Series) -> None:
    mailings = plan(PlanInput(series, CONTACTS), EmptyLedger(), at("2024-11-01T09:00"))
    assert len(mailings) == 9
    reminders = [m for m in mailings if m.kind is Kind.REMINDER]
    assert [m.due.isoformat() for m in reminders] == [
        "2024-11-13T14:00:00+01:00",
        "2024-11-20T14:00:00+01:00",
        "2024-11-27T14:00:00+01:00",
        "2024-12-04T14:00:00+01:00",
    ]
    assert [m.deadline.isoformat() for m in reminders] == [
        "2024-11-14T14:00:00+01:00",
        "2024-11-21T14:00:00+01:00",
        "2024-11-28T14:00:00+01:00",
        "2024-12-05T14:00:00+01:00",
    ]
    invitation = by_id(mailings, "invitation:series")
    assert invitation.due.isoformat() == "2024-10-24T10:00:00+02:00"  # still summer time
    assert invitation.deadline == at("2024-11-14T14:00")
    followup = by_id(mailings, "followup:verwaltung")
    assert followup.due == at("2024-11-15T10:00")
    assert followup.deadline == at("2024-11-29T10:00")


@pytest.mark.parametrize(
    ("now", "mailing_id", "state", "audience"),
    [
        ("2024-10-24T09:59", "invitation:series", MailingState.SCHEDULED, 4),
        ("2024-10-24T10:00", "invitation:series", MailingState.OPEN, 4),
        ("2024-11-14T13:59", "invitation:series", MailingState.OPEN, 4),
        ("2024-11-14T14:00", "invitation:series", MailingState.CLOSED, 4),
        ("2024-11-13T13:59", "reminder:verwaltung", MailingState.SCHEDULED, 2),
        ("2024-11-13T14:00", "reminder:verwaltung", MailingState.OPEN, 2),
        ("2024-11-14T14:00", "reminder:verwaltung", MailingState.CLOSED, 2),
        ("2024-11-20T15:00", "reminder:kreislaufwirtschaft", MailingState.OPEN, 2),
        ("2024-12-04T14:00", "reminder:forschung", MailingState.OPEN, 1),
        # No materials listed in the shipped series: follow-ups hold.
        ("2024-11-15T10:00", "followup:verwaltung", MailingState.WAITING, 2),
        ("2024-11-29T10:00", "followup:verwaltung", MailingState.CLOSED, 2),
    ],
)
def test_states_over_time(
    series: Series, now: str, mailing_id: str, state: MailingState, audience: int
) -> None:
    mailing = by_id(plan(PlanInput(series, CONTACTS), EmptyLedger(), at(now)), mailing_id)
    assert mailing.state is state
    assert len(mailing.audience) == audience


def test_sent_and_failed_are_settled_uncertain_is_outstanding(series: Series) -> None:
    ledger = Ledger(
        {
            ("invitation", ""): {
                "a@example.org": "sent",
                "b@example.org": "failed",
                "c@example.org": "uncertain",
                "d@example.org": "pending",
            }
        }
    )
    mailing = by_id(
        plan(PlanInput(series, CONTACTS), ledger, at("2024-10-25T10:00")), "invitation:series"
    )
    assert (mailing.sent, mailing.failed, mailing.uncertain) == (1, 1, 1)
    assert mailing.outstanding == ("c@example.org", "d@example.org")
    assert mailing.sendable


def test_everyone_settled_is_done_and_late_contact_reopens(series: Series) -> None:
    ledger = Ledger({("invitation", ""): {c.key: "sent" for c in CONTACTS}})
    now = at("2024-10-30T12:00")
    mailing = by_id(plan(PlanInput(series, CONTACTS), ledger, now), "invitation:series")
    assert mailing.state is MailingState.DONE
    late = (*CONTACTS, contact("late@example.org", "forschung"))
    mailing = by_id(plan(PlanInput(series, late), ledger, now), "invitation:series")
    assert mailing.state is MailingState.OPEN
    assert mailing.outstanding == ("late@example.org",)


def test_late_registration_gets_reminder_while_window_open(series: Series) -> None:
    ledger = Ledger({("reminder", "forschung"): {"a@example.org": "sent"}})
    late = (*CONTACTS, contact("new@example.org", "forschung"))
    mailing = by_id(
        plan(PlanInput(series, late), ledger, at("2024-12-05T13:00")), "reminder:forschung"
    )
    assert mailing.outstanding == ("new@example.org",)
    after = by_id(
        plan(PlanInput(series, late), ledger, at("2024-12-05T14:00")), "reminder:forschung"
    )
    assert after.state is MailingState.CLOSED and not after.sendable


def test_optouts_are_never_in_the_audience(series: Series) -> None:
    data = PlanInput(series, CONTACTS, optouts=frozenset({"a@example.org"}))
    mailing = by_id(plan(data, EmptyLedger(), at("2024-10-24T10:00")), "invitation:series")
    assert "a@example.org" not in mailing.audience
    assert mailing.opted_out == 1


def test_attendance_adds_unregistered_attendees_to_followup(series: Series) -> None:
    data = PlanInput(series, CONTACTS, attendance={"verwaltung": frozenset({"d@example.org"})})
    mailing = by_id(plan(data, EmptyLedger(), at("2024-11-01T00:00")), "followup:verwaltung")
    assert set(mailing.audience) == {"a@example.org", "b@example.org", "d@example.org"}


def test_plan_requires_aware_now(series: Series) -> None:
    with pytest.raises(ValueError, match="aware"):
        plan(PlanInput(series, CONTACTS), EmptyLedger(), datetime(2024, 11, 1))


def _series(yaml_text: str) -> Series:
    return parse_series(parse_yaml(yaml_text), Path("series.yaml"), CONFIG)


BASE = """
id: dst
title: DST
organiser: {{name: Org, email: org@example.org}}
timezone: Europe/Berlin
events:
  - {{id: e1, title: One, date: "{date}", start: "{start}", end: "{end}"}}
  - {{id: e2, title: Two, date: "2024-12-01", start: "10:00", end: "11:00"}}
mailings:
  invitation: {{send_at: "{send_at}"}}
  reminder: {{before: {before}}}
  followup: {{after: 1 day, at: "10:00"}}
"""


@pytest.mark.parametrize(
    ("date", "start", "before", "send_at", "expect_id", "expect"),
    [
        # Reminder one calendar day before, across the spring change: still 14:00 local.
        (
            "2024-04-01",
            "14:00",
            "1 day",
            "2024-03-01 10:00",
            "reminder:e1",
            "2024-03-31T14:00:00+02:00",
        ),
        # Across the autumn change.
        (
            "2024-10-28",
            "14:00",
            "1 day",
            "2024-10-01 10:00",
            "reminder:e1",
            "2024-10-27T14:00:00+01:00",
        ),
        # Hours are elapsed time: 24 hours before 14:00 on 2024-03-31 is 13:00 local the day before.
        (
            "2024-03-31",
            "14:00",
            "24 hours",
            "2024-03-01 10:00",
            "reminder:e1",
            "2024-03-30T13:00:00+01:00",
        ),
        # A non-existent local time (02:30 on 2024-03-31) moves forward, never earlier.
        (
            "2024-04-02",
            "14:00",
            "1 day",
            "2024-03-31 02:30",
            "invitation:series",
            "2024-03-31T03:30:00+02:00",
        ),
        # An ambiguous local time (02:30 on 2024-10-27) takes its first occurrence.
        (
            "2024-11-02",
            "14:00",
            "1 day",
            "2024-10-27 02:30",
            "invitation:series",
            "2024-10-27T02:30:00+02:00",
        ),
    ],
)
def test_daylight_saving(
    date: str, start: str, before: str, send_at: str, expect_id: str, expect: str
) -> None:
    series = _series(
        BASE.format(date=date, start=start, end="16:00", before=before, send_at=send_at)
    )
    mailing = by_id(
        plan(PlanInput(series, CONTACTS), EmptyLedger(), at("2024-01-01T00:00")), expect_id
    )
    assert mailing.due.isoformat() == expect


def test_followup_with_materials_is_open() -> None:
    text = BASE.format(
        date="2024-11-14", start="14:00", end="16:00", before="1 day", send_at="2024-10-01 10:00"
    )
    text = text.replace(
        'end: "16:00"}',
        'end: "16:00", materials: [{title: Folien, url: "https://example.org/f.pdf"}]}',
    )
    series = _series(text)
    data = PlanInput(series, (contact("x@example.org", "e1"),))
    mailing = by_id(plan(data, EmptyLedger(), at("2024-11-15T10:00")), "followup:e1")
    assert mailing.state is MailingState.OPEN
    assert mailing.outstanding == ("x@example.org",)


def test_cancelled_date_withdraws_reminder_and_followup() -> None:
    text = BASE.format(
        date="2024-11-14", start="14:00", end="16:00", before="1 day", send_at="2024-10-01 10:00"
    )
    text = text.replace('end: "16:00"}', 'end: "16:00", cancelled: true}')
    mailings = plan(PlanInput(_series(text), CONTACTS), EmptyLedger(), at("2024-11-13T15:00"))
    assert by_id(mailings, "reminder:e1").state is MailingState.WITHDRAWN
    assert by_id(mailings, "followup:e1").state is MailingState.WITHDRAWN
    assert not by_id(mailings, "reminder:e1").outstanding
