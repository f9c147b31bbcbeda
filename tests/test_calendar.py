from __future__ import annotations

from datetime import UTC, datetime, timedelta
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path
from zoneinfo import ZoneInfo

import icalendar
import pytest

from invite_mailer.core.calendar import (
    CalendarFiles,
    build_event_calendar,
    event_uid,
    ics_filename,
    vtimezone,
)
from invite_mailer.inputs.series import Series, load_series
from support.cli import run
from support.project import use_project

CONFIG = Path(__file__).resolve().parents[1] / "config"
BERLIN = ZoneInfo("Europe/Berlin")
NOW = datetime(2024, 10, 24, 10, 0, tzinfo=BERLIN)


@pytest.fixture(scope="module")
def series() -> Series:
    return load_series(CONFIG)


def unfolded(data: bytes) -> list[str]:
    return data.decode("utf-8").replace("\r\n ", "").split("\r\n")


def test_event_calendar_content(series: Series) -> None:
    event = series.event("verwaltung")
    data = build_event_calendar(series, event, domain="example.org", now=NOW)
    lines = unfolded(data)

    assert data.startswith(b"BEGIN:VCALENDAR\r\n")
    assert data.endswith(b"END:VCALENDAR\r\n")
    assert "METHOD:PUBLISH" in lines
    assert any(line.startswith("PRODID:") for line in lines)
    assert "VERSION:2.0" in lines
    assert "UID:transferreihe-2024-verwaltung@example.org" in lines
    assert "SEQUENCE:0" in lines
    assert "DTSTAMP:20241024T080000Z" in lines
    assert "DTSTART;TZID=Europe/Berlin:20241114T140000" in lines
    assert "DTEND;TZID=Europe/Berlin:20241114T160000" in lines
    assert "LOCATION:Online" in lines
    assert "URL:https://example.org/transferreihe/verwaltung" in lines
    assert (
        'ORGANIZER;CN="KomKomIn – Wissenschaftliches Begleitvorhaben":'
        "mailto:transferreihe@example.org" in lines
    )
    assert "SUMMARY:Online-Transferreihe: Verwaltung transformieren – Effizienz steigern" in lines
    assert all(len(line.encode()) <= 75 for line in data.decode().split("\r\n"))

    cal = icalendar.Calendar.from_ical(data)
    (vevent,) = cal.walk("VEVENT")
    assert "https://example.org/transferreihe/verwaltung" in str(vevent["DESCRIPTION"])
    assert vevent.decoded("DTSTART") == datetime(2024, 11, 14, 14, tzinfo=BERLIN)
    assert vevent.decoded("DTEND") == datetime(2024, 11, 14, 16, tzinfo=BERLIN)
    (tz,) = cal.walk("VTIMEZONE")
    assert tz["TZID"] == "Europe/Berlin"
    # the timezone comes before the event that uses it
    assert cal.subcomponents[0].name == "VTIMEZONE"


def test_vtimezone_is_outlook_shaped(series: Series) -> None:
    data = build_event_calendar(series, series.events[0], domain="example.org", now=NOW)
    (tz,) = icalendar.Calendar.from_ical(data).walk("VTIMEZONE")
    kinds = sorted(c.name for c in tz.subcomponents)
    assert kinds == ["DAYLIGHT", "STANDARD"]
    rules = {c.name: c["RRULE"].to_ical().decode() for c in tz.subcomponents}
    assert set(rules["DAYLIGHT"].split(";")) == {"FREQ=YEARLY", "BYMONTH=3", "BYDAY=-1SU"}
    assert set(rules["STANDARD"].split(";")) == {"FREQ=YEARLY", "BYMONTH=10", "BYDAY=-1SU"}
    assert "RDATE" not in data.decode()


@pytest.mark.parametrize(
    "key",
    [
        "Europe/Berlin",
        "America/New_York",
        "Australia/Sydney",
        "Europe/Dublin",  # negative DST in tzdata
        "Australia/Lord_Howe",  # 30-minute shift
        "Asia/Tokyo",  # no DST
        "UTC",
        "Africa/Casablanca",  # irregular: falls back to icalendar's exact form
    ],
)
def test_vtimezone_matches_zoneinfo(key: str) -> None:
    zone = ZoneInfo(key)
    tz = vtimezone(key, 2024, 2024).to_tz()
    day = datetime(2023, 1, 1, 12)
    while day < datetime(2026, 1, 1):
        assert day.replace(tzinfo=tz).utcoffset() == day.replace(tzinfo=zone).utcoffset(), day
        day += timedelta(days=1)


def test_sequence_and_cache(series: Series) -> None:
    files = CalendarFiles(series, domain="example.org")
    event = series.events[1]
    first = files.get(event, now=NOW)
    # one file per minute: every recipient of a mailing gets the same bytes
    assert files.get(event, now=NOW + timedelta(seconds=59)) is first
    later = files.get(event, now=NOW + timedelta(hours=5))
    assert later != first
    assert "DTSTAMP:20241024T130000Z" in unfolded(later)
    assert files.filename(event) == "transferreihe-2024-kreislaufwirtschaft.ics"

    updated = files.get(event, now=NOW, sequence=2)
    assert updated is not first
    assert "SEQUENCE:2" in unfolded(updated)
    assert "UID:transferreihe-2024-kreislaufwirtschaft@example.org" in unfolded(updated)


def test_dtstamp_is_utc(series: Series) -> None:
    now = datetime(2024, 11, 13, 9, 30, tzinfo=UTC)
    data = build_event_calendar(series, series.events[0], domain="example.org", now=now)
    assert "DTSTAMP:20241113T093000Z" in unfolded(data)


def test_names(series: Series) -> None:
    event = series.event("forschung")
    assert ics_filename(series, event) == "transferreihe-2024-forschung.ics"
    assert event_uid(series, event, "example.org") == "transferreihe-2024-forschung@example.org"


def test_without_join_url(series: Series) -> None:
    event = series.events[0].model_copy(update={"join_url": None})
    data = build_event_calendar(series, event, domain="example.org", now=NOW)
    (vevent,) = icalendar.Calendar.from_ical(data).walk("VEVENT")
    assert "Zugangslink" in str(vevent["DESCRIPTION"])
    assert str(vevent["URL"]) == "https://example.org/transferreihe/anmeldung"


def test_without_the_join_link_the_file_does_not_carry_it(series: Series) -> None:
    event = series.event("verwaltung")
    assert event.join_url is not None
    files = CalendarFiles(series, domain="example.org")
    withheld = files.get(event, now=NOW, join_link=False)
    assert files.get(event, now=NOW) != withheld  # not the cached file with the link
    assert files.get(event, now=NOW, join_link=False) is withheld
    assert str(event.join_url).encode() not in withheld.replace(b"\r\n ", b"")
    (vevent,) = icalendar.Calendar.from_ical(withheld).walk("VEVENT")
    assert str(vevent["LOCATION"]) == "Online"
    assert str(vevent["URL"]) == "https://example.org/transferreihe/anmeldung"
    assert "Den Zugangslink erhalten Sie rechtzeitig vor dem Termin per E-Mail." in str(
        vevent["DESCRIPTION"]
    )


# --- the confirmation's calendar files follow mailings.confirmation.join_link --------------


def _confirmation_calendars(project: Path) -> tuple[str, list[icalendar.cal.Component]]:
    """The text and VEVENTs of the Anmeldebestätigung the outbox holds for Lena
    Hoffmann, after she registers for two dates (the invitation went out before)."""
    registered = "2024-10-28T09:00"
    for args in (
        ["send-due", "--now", "2024-10-24T10:05"],
        ["registrations", "add", "lena.hoffmann@example.com", "--event", "verwaltung"],
        ["registrations", "add", "lena.hoffmann@example.com", "--event", "allianzen"],
        ["send-due", "--now", "2024-10-28T09:05"],  # after the confirmation's quiet time
    ):
        moment = [] if "--now" in args else ["--now", registered]
        code, output = run([*args, *moment])
        assert code == 0, output
    found = []
    for path in (project / "outbox").glob("*.eml"):
        message = BytesParser(policy=policy.default).parsebytes(path.read_bytes())
        if str(message["Subject"]).startswith("Anmeldebestätigung"):
            assert isinstance(message, EmailMessage)
            found.append(message)
    (confirmation,) = found
    text = confirmation.get_body(("plain",))
    assert text is not None
    events = []
    for part in confirmation.iter_attachments():
        assert part.get_content_type() == "text/calendar"
        events.extend(icalendar.Calendar.from_ical(part.get_content()).walk("VEVENT"))
    assert len(events) == 2
    return text.get_content(), events


@pytest.mark.slow
def test_a_confirmation_without_the_join_link_has_none_in_its_calendar_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    project = use_project(tmp_path, monkeypatch)
    path = project / "config" / "series.yaml"
    text = path.read_text(encoding="utf-8")
    path.write_text(
        text.replace("mailings:\n", "mailings:\n  confirmation: {join_link: false}\n", 1),
        encoding="utf-8",
    )
    body, events = _confirmation_calendars(project)
    assert "https://example.org/transferreihe/" not in body
    for vevent in events:
        shown = vevent.to_ical().decode().replace("\r\n ", "")
        assert "https://example.org/transferreihe/verwaltung" not in shown
        assert "https://example.org/transferreihe/allianzen" not in shown
        assert str(vevent["LOCATION"]) == "Online"
        assert "Den Zugangslink erhalten Sie rechtzeitig vor dem Termin per E-Mail." in str(
            vevent["DESCRIPTION"]
        )


@pytest.mark.slow
def test_a_confirmation_with_the_join_link_has_it_in_its_calendar_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    project = use_project(tmp_path, monkeypatch)
    body, events = _confirmation_calendars(project)
    links = sorted(str(vevent["URL"]) for vevent in events)
    assert links == [
        "https://example.org/transferreihe/allianzen",
        "https://example.org/transferreihe/verwaltung",
    ]
    for vevent, link in zip(events, (str(e["URL"]) for e in events), strict=True):
        assert link in str(vevent["DESCRIPTION"])
        assert link in body
