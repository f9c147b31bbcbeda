"""Composition with the shipped config and templates: every kind, real MIME, real ICS."""

from __future__ import annotations

import html
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime
from email import message_from_bytes, policy
from email.message import EmailMessage
from email.utils import format_datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import icalendar
import pytest
from pydantic import SecretStr

from invite_mailer.core.tokens import make_token, verify_token
from invite_mailer.errors import ConfigError
from invite_mailer.inputs.config import load_config
from invite_mailer.inputs.contacts import Contact
from invite_mailer.inputs.series import Kind, Series, load_series
from invite_mailer.inputs.settings import Settings
from invite_mailer.inputs.settings_file import load_settings
from invite_mailer.mail.compose import Composer
from support.project import shipped_environment
from support.samples import FIRST_DATE, set_materials

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "config"
TEMPLATES = ROOT / "templates" / "email"
BERLIN = ZoneInfo("Europe/Berlin")

# When each kind would go out for the first date.
NOW = {
    Kind.INVITATION: datetime(2024, 10, 24, 10, 0, tzinfo=BERLIN),
    Kind.REMINDER: datetime(2024, 11, 13, 14, 0, tzinfo=BERLIN),
    Kind.FOLLOWUP: datetime(2024, 11, 15, 10, 0, tzinfo=BERLIN),
    Kind.UPDATE: datetime(2024, 11, 1, 9, 0, tzinfo=BERLIN),
    Kind.CANCELLATION: datetime(2024, 11, 1, 9, 0, tzinfo=BERLIN),
    Kind.CONFIRMATION: datetime(2024, 10, 28, 9, 30, tzinfo=BERLIN),
}
EVENT = {
    Kind.INVITATION: None,
    Kind.REMINDER: "verwaltung",
    Kind.FOLLOWUP: "verwaltung",
    Kind.UPDATE: "verwaltung",
    Kind.CANCELLATION: "verwaltung",
    Kind.CONFIRMATION: "verwaltung",
}

FRAU = Contact(
    email="jana.mueller@example.org",
    anrede="Frau",
    titel="Dr.",
    vorname="Jana",
    nachname="Müller",
    organisation="Stadt Musterhausen, Amt für Digitalisierung",
    registered_all=True,
)
HERR = Contact(
    email="thomas.schmidt@example.org",
    anrede="Herr",
    vorname="Thomas",
    nachname="Schmidt",
    organisation="Landkreis Beispielkreis",
    registrations=frozenset({"verwaltung", "allianzen"}),
)
NEUTRAL = Contact(
    email="alex.meyer@example.org",
    vorname="Alex",
    nachname="Meyer",
    organisation="Regionalverband Nordost",
    registrations=frozenset({"kreislaufwirtschaft"}),
)
NO_NAME = Contact(email="info@example.com", organisation="Projektbüro Kreislaufregion")

SALUTATIONS = {
    FRAU.email: "Sehr geehrte Frau Dr. Müller,",
    HERR.email: "Sehr geehrter Herr Schmidt,",
    NEUTRAL.email: "Guten Tag Alex Meyer,",
    NO_NAME.email: "Sehr geehrte Damen und Herren,",
}

TAG = re.compile(r"</?[a-zA-Z][a-zA-Z0-9]*(\s[^>]*)?/?>")


# --- fixtures and helpers -----------------------------------------------------------


@pytest.fixture(scope="module")
def settings() -> Iterator[Settings]:
    with shipped_environment():
        yield load_settings(CONFIG, env_file=None)


@pytest.fixture(scope="module")
def series() -> Series:
    return load_series(CONFIG)


@pytest.fixture(scope="module")
def composer(settings: Settings, series: Series) -> Composer:
    return Composer.load(settings, series, templates_dir=TEMPLATES, config_dir=CONFIG)


@pytest.fixture
def templates(tmp_path: Path) -> Path:
    """A copy of the shipped templates to break."""
    target = tmp_path / "templates"
    shutil.copytree(TEMPLATES, target)
    return target


@pytest.fixture
def material_config(tmp_path: Path) -> Path:
    """A copy of the shipped config whose first date has results: two links, one file."""
    config = tmp_path / "config"
    shutil.copytree(CONFIG, config)
    (config / "materials").mkdir()
    (config / "materials" / "protokoll.pdf").write_bytes(b"%PDF-1.4\n" + b"0" * 20_000)
    set_materials(
        config,
        FIRST_DATE,
        "      - title: Folien der Vorträge\n"
        "        url: https://example.org/transferreihe/verwaltung/folien.pdf\n"
        "        description: alle Präsentationen als PDF\n"
        "      - {title: Aufzeichnung, url: https://example.org/transferreihe/video}\n"
        "      - {title: Protokoll, file: materials/protokoll.pdf}\n",
    )
    return config


def with_sender(settings: Settings, **changes: str) -> Settings:
    return settings.model_copy(update={"sender": settings.sender.model_copy(update=changes)})


def with_secret(settings: Settings, secret: str) -> Settings:
    unsubscribe = settings.unsubscribe.model_copy(update={"secret": SecretStr(secret)})
    return settings.model_copy(update={"unsubscribe": unsubscribe})


def with_limit(settings: Settings, octets: int) -> Settings:
    limits = settings.limits.model_copy(update={"max_attachment_bytes": octets})
    return settings.model_copy(update={"limits": limits})


def compose(
    composer: Composer,
    series: Series,
    kind: Kind | str,
    contact: Contact,
    event_id: str | None = None,
    *,
    attended: bool | None = None,
    now: datetime | None = None,
) -> tuple[EmailMessage, bytes, EmailMessage]:
    """The message, its bytes, and the bytes parsed back as a receiver would."""
    event = series.event(event_id) if event_id else None
    when = now or NOW.get(kind, NOW[Kind.FOLLOWUP])
    msg = composer.compose(kind, contact, event=event, now=when, attended=attended)
    raw = msg.as_bytes()
    parsed = message_from_bytes(raw, policy=policy.default)
    assert isinstance(parsed, EmailMessage)
    return msg, raw, parsed


def body(parsed: EmailMessage, subtype: str) -> str:
    part = parsed.get_body(preferencelist=(subtype,))
    assert part is not None and part.get_content_type() == f"text/{subtype}"
    content = part.get_content()
    assert isinstance(content, str)
    return content.replace("\r\n", "\n")


def attachments(parsed: EmailMessage) -> list[tuple[str, str, bytes]]:
    found = []
    for part in parsed.iter_attachments():
        data = part.get_payload(decode=True)
        assert isinstance(data, bytes)
        found.append((part.get_filename() or "", part.get_content_type(), data))
    return found


def raw_headers(raw: bytes) -> list[bytes]:
    head = raw.split(b"\r\n\r\n", 1)[0]
    return re.split(rb"\r\n(?![ \t])", head)


# --- every kind for every kind of contact -----------------------------------------------


@pytest.mark.parametrize("kind", list(Kind))
@pytest.mark.parametrize("contact", [FRAU, HERR, NEUTRAL, NO_NAME], ids=lambda c: c.email)
def test_message_is_clean(composer: Composer, series: Series, kind: Kind, contact: Contact) -> None:
    msg, raw, parsed = compose(composer, series, kind, contact, EVENT[kind])

    for part in parsed.walk():
        assert not part.defects, (part.get_content_type(), part.defects)
    for line in raw.split(b"\r\n"):
        assert len(line) <= 998
    assert b"\n" not in raw.replace(b"\r\n", b""), "bare line feeds"

    salutation = SALUTATIONS[contact.email]
    text = body(parsed, "plain")
    page = body(parsed, "html")
    assert text.startswith(salutation + "\n\n")
    assert html.escape(salutation, quote=False) in page
    assert not TAG.search(text), TAG.search(text)
    assert "style=" in page and page.count("style=") > 20
    assert contact.email in text and contact.email in page

    assert parsed["To"].addresses[0].addr_spec == contact.email
    assert parsed["From"] == "KomKomIn Transferreihe <transferreihe@example.org>"
    assert parsed["Reply-To"] == "transferreihe@example.org"
    assert parsed["Message-ID"] == composer.message_id(
        kind, contact, series.event(EVENT[kind]) if EVENT[kind] else None
    )
    assert parsed["X-Invite-Mailer-Kind"] == kind.value
    assert parsed["List-Id"] == "Online-Transferreihe <transferreihe-2024.example.org>"
    assert "Auto-Submitted" not in parsed
    for part in (parsed.get_body(("plain",)), parsed.get_body(("html",))):
        assert part is not None
        assert part["Content-Transfer-Encoding"] == "quoted-printable"
        assert part.get_content_charset() == "utf-8"


def test_mime_structure(composer: Composer, series: Series) -> None:
    _, _, invitation = compose(composer, series, Kind.INVITATION, FRAU)
    assert invitation.get_content_type() == "multipart/mixed"
    first, *rest = invitation.iter_parts()
    assert first.get_content_type() == "multipart/alternative"
    assert [p.get_content_type() for p in first.iter_parts()] == ["text/plain", "text/html"]
    assert [p.get_content_type() for p in rest] == ["text/calendar"] * 4
    for part in rest:
        assert part.get_param("method") == "PUBLISH"
        assert part.get_content_disposition() == "attachment"

    # nothing to attach: just the alternative
    _, _, followup = compose(composer, series, Kind.FOLLOWUP, FRAU, "verwaltung")
    assert followup.get_content_type() == "multipart/alternative"
    assert attachments(followup) == []


def test_headers(composer: Composer, series: Series) -> None:
    _, raw, parsed = compose(composer, series, Kind.REMINDER, HERR, "verwaltung")
    assert parsed["Date"] == format_datetime(NOW[Kind.REMINDER])
    assert parsed["X-Invite-Mailer-Event"] == "verwaltung"
    assert parsed["Content-Language"] == "de"
    assert parsed["MIME-Version"] == "1.0"
    names = [line.split(b":", 1)[0].lower() for line in raw_headers(raw)]
    for name in (b"from", b"to", b"subject", b"date", b"message-id", b"list-unsubscribe"):
        assert names.count(name) == 1, name


def test_naive_now_is_series_time(composer: Composer, series: Series) -> None:
    naive = datetime(2024, 11, 13, 14, 0)
    msg = composer.compose(Kind.REMINDER, HERR, event=series.events[0], now=naive)
    assert msg["Date"] == "Wed, 13 Nov 2024 14:00:00 +0100"


# --- subjects and content -------------------------------------------------------------------


def test_invitation_subject_encoded(composer: Composer, series: Series) -> None:
    _, raw, parsed = compose(composer, series, Kind.INVITATION, FRAU)
    (subject,) = [h for h in raw_headers(raw) if h.startswith(b"Subject:")]
    assert b"=?utf-8?" in subject
    subject.decode("ascii")  # RFC 2047: plain ASCII on the wire
    # The kind and the first date lead; the series' title follows.
    assert parsed["Subject"] == "Einladung: vier Termine ab 14.11.2024 – Online-Transferreihe"


def test_umlauts_in_subject(settings: Settings, series: Series) -> None:
    renamed = series.model_copy(update={"title": "Transferreihe für Städte und Gemeinden"})
    composer = Composer.load(settings, renamed, templates_dir=TEMPLATES, config_dir=CONFIG)
    _, raw, parsed = compose(composer, renamed, Kind.INVITATION, FRAU)
    assert parsed["Subject"] == "Einladung ab 14.11.2024: Transferreihe für Städte und Gemeinden"
    assert "für Städte".encode() not in raw.split(b"\r\n\r\n", 1)[0]


def test_reminder_subject_and_content(composer: Composer, series: Series) -> None:
    _, _, parsed = compose(composer, series, Kind.REMINDER, HERR, "verwaltung")
    # The title is shortened to its part before the dash: the subject stays within 70.
    assert parsed["Subject"] == "Erinnerung: morgen, 14:00 Uhr – Verwaltung transformieren"
    text = body(parsed, "plain")
    assert "\nhttps://example.org/transferreihe/verwaltung\n" in text
    assert "Donnerstag, 14. November 2024, 14:00–16:00 Uhr" in text
    page = body(parsed, "html")
    assert 'href="https://example.org/transferreihe/verwaltung"' in page
    assert "Zur Online-Veranstaltung" in page


def test_reminder_on_the_day(composer: Composer, series: Series) -> None:
    now = datetime(2024, 11, 14, 8, 0, tzinfo=BERLIN)
    _, _, parsed = compose(composer, series, Kind.REMINDER, HERR, "verwaltung", now=now)
    assert parsed["Subject"].startswith("Erinnerung: heute, 14:00 Uhr")


def test_invitation_content(composer: Composer, series: Series) -> None:
    _, _, parsed = compose(composer, series, Kind.INVITATION, NO_NAME)
    text = body(parsed, "plain")
    page = body(parsed, "html")
    for event in series.events:
        assert event.title in text
        assert html.escape(event.title).replace(" –", "&nbsp;–") in page
    for expected in (
        "Donnerstag, 14. November 2024, 14:00–16:00 Uhr",
        "Donnerstag, 5. Dezember 2024, 14:00–16:00 Uhr",
        "Vertreterinnen und Vertreter",
        "Kalenderdatei (.ics)",
    ):
        assert expected in text
    assert "\nhttps://example.org/transferreihe/anmeldung\n" in text
    assert 'href="https://example.org/transferreihe/anmeldung"' in page
    assert "Impressum" in text and "Musterstraße 1, 10115 Berlin" in text
    assert "Musterstraße 1, 10115 Berlin" in page
    assert "angemeldet für" not in text  # not registered for anything


def test_invitation_mentions_registrations(composer: Composer, series: Series) -> None:
    _, _, parsed = compose(composer, series, Kind.INVITATION, HERR)
    text = body(parsed, "plain")
    assert "bereits angemeldet für:" in text
    assert "- Do., 14.11.2024: Verwaltung transformieren" in text
    assert "- Do., 28.11.2024: Allianzen bilden" in text
    assert "Kreislaufwirtschaft stärken" not in text.split("bereits angemeldet für:")[1]


def test_html_is_outlook_friendly(composer: Composer, series: Series) -> None:
    # HERR has dates left to register for, so his invitation has the button.
    _, _, parsed = compose(composer, series, Kind.INVITATION, HERR)
    page = body(parsed, "html")
    assert '<html lang="de"' in page
    assert '<meta charset="utf-8">' in page
    assert 'role="presentation"' in page
    assert 'width="600"' in page
    for banned in ("display: flex", "display:flex", "grid", "<img", "<link", "<script", "@import"):
        assert banned not in page
    # inlined: the inline-able rules left the <style> block, @media stayed
    assert "@media" in page
    assert ".event-cell {" not in page
    assert 'bgcolor="#1d4f7c"' in page  # button colour that Outlook shows


def test_plain_text_reads_well(composer: Composer, series: Series) -> None:
    for kind in Kind:
        _, _, parsed = compose(composer, series, kind, FRAU, EVENT[kind])
        text = body(parsed, "plain")
        assert "\n\n\n" not in text
        assert "&amp;" not in text and "&nbsp;" not in text
        assert "\n-- \n" in text  # signature separator
        for line in text.splitlines():
            assert line == line.rstrip() or line == "-- "
            assert len(line) <= 72 or line.startswith("http") or " " not in line.strip()


# --- calendar attachments ----------------------------------------------------------------


def check_ics(data: bytes, event_id: str, date: str) -> None:
    lines = data.decode().replace("\r\n ", "").split("\r\n")
    assert f"UID:transferreihe-2024-{event_id}@example.org" in lines
    assert f"DTSTART;TZID=Europe/Berlin:{date}T140000" in lines
    assert "METHOD:PUBLISH" in lines
    assert "BEGIN:VTIMEZONE" in lines
    assert any(line.startswith("ORGANIZER;CN=") for line in lines)
    cal = icalendar.Calendar.from_ical(data)
    assert len(cal.walk("VEVENT")) == 1
    assert len(cal.walk("VTIMEZONE")) == 1


def test_invitation_has_one_ics_per_date(composer: Composer, series: Series) -> None:
    _, _, parsed = compose(composer, series, Kind.INVITATION, FRAU)
    files = attachments(parsed)
    assert [name for name, _, _ in files] == [
        "transferreihe-2024-verwaltung.ics",
        "transferreihe-2024-kreislaufwirtschaft.ics",
        "transferreihe-2024-allianzen.ics",
        "transferreihe-2024-forschung.ics",
    ]
    dates = ["20241114", "20241121", "20241128", "20241205"]
    for (_, ctype, data), event, date in zip(files, series.events, dates, strict=True):
        assert ctype == "text/calendar"
        check_ics(data, event.id, date)


def test_reminder_has_its_ics(composer: Composer, series: Series) -> None:
    _, _, parsed = compose(composer, series, Kind.REMINDER, FRAU, "allianzen")
    ((name, ctype, data),) = attachments(parsed)
    assert name == "transferreihe-2024-allianzen.ics"
    check_ics(data, "allianzen", "20241128")


def test_ics_identical_for_every_recipient(composer: Composer, series: Series) -> None:
    first, _, one = compose(composer, series, Kind.INVITATION, FRAU)
    second, _, two = compose(composer, series, Kind.INVITATION, NO_NAME)
    assert attachments(one) == attachments(two)
    # ...but each message owns its parts: changing one leaves the other alone
    part = next(first.iter_attachments())
    part["X-Changed"] = "yes"
    assert all("X-Changed" not in p for p in second.iter_attachments())


# --- follow-up ------------------------------------------------------------------------------


def test_followup_wording_by_attendance(composer: Composer, series: Series) -> None:
    texts = {}
    for attended in (True, False, None):
        _, _, parsed = compose(
            composer, series, Kind.FOLLOWUP, FRAU, "verwaltung", attended=attended
        )
        texts[attended] = body(parsed, "plain")
        assert parsed["Subject"] == "Ergebnisse vom 14.11.2024: Verwaltung transformieren"
    assert "vielen Dank für Ihre Teilnahme" in texts[True]
    assert "leider konnten Sie" in texts[False]
    assert "vielen Dank für Ihr Interesse" in texts[None]
    assert "Teilnahme" not in texts[None].split("Mit freundlichen")[0]
    assert len(set(texts.values())) == 3


def test_followup_next_date(composer: Composer, series: Series) -> None:
    _, _, first = compose(composer, series, Kind.FOLLOWUP, HERR, "verwaltung")
    text = body(first, "plain")
    assert "Der nächste Termin" in text
    assert "Kreislaufwirtschaft stärken – Ressourcen schonen" in text
    assert "melden Sie sich bitte an" in text  # HERR is not registered for it

    _, _, registered = compose(composer, series, Kind.FOLLOWUP, FRAU, "verwaltung")
    assert "Sie sind für diesen Termin angemeldet" in body(registered, "plain")

    _, _, last = compose(composer, series, Kind.FOLLOWUP, FRAU, "forschung")
    text = body(last, "plain")
    assert "Der nächste Termin" not in text
    assert "abgeschlossen" in text


def test_followup_with_materials(settings: Settings, material_config: Path) -> None:
    series = load_series(material_config)
    composer = Composer.load(settings, series, templates_dir=TEMPLATES, config_dir=material_config)
    _, raw, parsed = compose(composer, series, Kind.FOLLOWUP, FRAU, "verwaltung", attended=True)
    for part in parsed.walk():
        assert not part.defects
    assert all(len(line) <= 998 for line in raw.split(b"\r\n"))
    ((name, ctype, data),) = attachments(parsed)
    assert name == "protokoll.pdf"
    assert ctype == "application/pdf"
    assert data == (material_config / "materials" / "protokoll.pdf").read_bytes()

    text = body(parsed, "plain")
    assert "\n  https://example.org/transferreihe/verwaltung/folien.pdf\n" in text
    assert "im Anhang: protokoll.pdf (20 KB)" in text
    page = body(parsed, "html")
    assert 'href="https://example.org/transferreihe/video"' in page
    assert "protokoll.pdf" in page

    for attended in (True, False, None):
        _, _, each = compose(composer, series, Kind.FOLLOWUP, FRAU, "verwaltung", attended=attended)
        assert "\n\nErgebnisse und Unterlagen\n=========================\n\n- " in body(
            each, "plain"
        )

    # the other dates have no materials, and reminders attach no material files
    _, _, reminder = compose(composer, series, Kind.REMINDER, FRAU, "verwaltung")
    assert [n for n, _, _ in attachments(reminder)] == ["transferreihe-2024-verwaltung.ics"]


def test_oversized_materials(settings: Settings, material_config: Path) -> None:
    series = load_series(material_config)
    with pytest.raises(ConfigError) as caught:
        Composer.load(
            with_limit(settings, 10_000),
            series,
            templates_dir=TEMPLATES,
            config_dir=material_config,
        )
    problem = caught.value.problems[0]
    assert problem.path == material_config / "series.yaml"
    assert "verwaltung" in problem.message
    assert "protokoll.pdf (20 KB)" in problem.message
    lines = problem.path.read_text(encoding="utf-8").splitlines()
    assert problem.line is not None and "materials/protokoll.pdf" in lines[problem.line - 1]
    assert problem.hint is not None and "url:" in problem.hint


def test_vanished_material_file(settings: Settings, material_config: Path) -> None:
    series = load_series(material_config)
    (material_config / "materials" / "protokoll.pdf").unlink()
    with pytest.raises(ConfigError, match="protokoll.pdf"):
        Composer.load(settings, series, templates_dir=TEMPLATES, config_dir=material_config)


# --- Message-ID ------------------------------------------------------------------------------


def test_message_id_is_stable(composer: Composer, series: Series) -> None:
    event = series.event("verwaltung")
    one = composer.compose(Kind.REMINDER, FRAU, event=event, now=NOW[Kind.REMINDER])
    two = composer.compose(Kind.REMINDER, FRAU, event=event, now=NOW[Kind.FOLLOWUP])
    assert one["Message-ID"] == two["Message-ID"]
    assert re.fullmatch(r"<[0-9a-f]{32}@example\.org>", one["Message-ID"])

    shouting = Contact(email="JANA.MUELLER@example.org")
    assert composer.message_id(Kind.REMINDER, shouting, event) == one["Message-ID"]
    others = {
        composer.message_id(Kind.REMINDER, FRAU, event),
        composer.message_id(Kind.FOLLOWUP, FRAU, event),
        composer.message_id(Kind.REMINDER, HERR, event),
        composer.message_id(Kind.REMINDER, FRAU, series.event("forschung")),
        composer.message_id(Kind.INVITATION, FRAU, None),
        composer.message_id(Kind.REMINDER, FRAU, event, version=1),
    }
    assert len(others) == 6


# --- unsubscribe -----------------------------------------------------------------------------


def test_list_unsubscribe_mailto_only(composer: Composer, series: Series) -> None:
    _, _, parsed = compose(composer, series, Kind.INVITATION, FRAU)
    assert parsed["List-Unsubscribe"] == (
        "<mailto:abmeldung@example.org?subject=Abmeldung%20transferreihe-2024>"
    )
    assert "List-Unsubscribe-Post" not in parsed
    assert 'href="mailto:abmeldung@example.org?subject=Abmeldung%20transferreihe-2024"' in body(
        parsed, "html"
    )
    assert "abmeldung@example.org" in body(parsed, "plain")


def test_no_https_link_without_secret(settings: Settings, series: Series) -> None:
    configured = with_sender(settings, unsubscribe_url="https://example.org/abmelden")
    composer = Composer.load(configured, series, templates_dir=TEMPLATES, config_dir=CONFIG)
    _, raw, parsed = compose(composer, series, Kind.INVITATION, FRAU)
    assert "https" not in parsed["List-Unsubscribe"]
    assert "List-Unsubscribe-Post" not in parsed
    assert b"example.org/abmelden" not in raw


def test_one_click_unsubscribe(settings: Settings, series: Series) -> None:
    configured = with_secret(
        with_sender(settings, unsubscribe_url="https://example.org/transferreihe/abmelden"),
        "s3cret",
    )
    composer = Composer.load(configured, series, templates_dir=TEMPLATES, config_dir=CONFIG)
    _, raw, parsed = compose(composer, series, Kind.REMINDER, FRAU, "verwaltung")

    (header,) = [h for h in raw_headers(raw) if h.startswith(b"List-Unsubscribe:")]
    assert b"=?" not in header  # URLs are never RFC 2047-encoded
    assert all(len(line) <= 998 for line in header.split(b"\r\n"))
    value = parsed["List-Unsubscribe"]
    mailto, link = re.findall(r"<([^<>]+)>", value)
    assert mailto == "mailto:abmeldung@example.org?subject=Abmeldung%20transferreihe-2024"
    assert link.startswith("https://example.org/transferreihe/abmelden/")
    token = link.rsplit("/", 1)[1]
    assert verify_token("s3cret", "transferreihe-2024", token) == FRAU.email
    assert parsed["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert f'href="{link}"' in body(parsed, "html")
    assert f"\n{link}\n" in body(parsed, "plain")


def test_unsubscribe_address_falls_back_to_reply_to(settings: Settings, series: Series) -> None:
    configured = with_sender(settings, unsubscribe_mailto="")
    composer = Composer.load(configured, series, templates_dir=TEMPLATES, config_dir=CONFIG)
    _, _, parsed = compose(composer, series, Kind.INVITATION, FRAU)
    assert parsed["List-Unsubscribe"].startswith("<mailto:transferreihe@example.org?")


def test_token_round_trip() -> None:
    token = make_token("secret", "transferreihe-2024", "Jana.Mueller@Example.org")
    assert verify_token("secret", "transferreihe-2024", token) == "jana.mueller@example.org"
    assert token == make_token("secret", "transferreihe-2024", "jana.mueller@example.org")
    assert re.fullmatch(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]{24}", token)


@pytest.mark.parametrize(
    "mangle",
    [
        lambda t: t[:-1],  # truncated MAC
        lambda t: t[:-1] + ("A" if t[-1] != "A" else "B"),  # altered MAC
        lambda t: t.split(".")[0],  # no MAC at all
        lambda t: (
            make_token("secret", "transferreihe-2024", "a@example.org").split(".")[0]
            + "."
            + t.split(".")[1]
        ),  # someone else's address with this MAC
        lambda t: "!" + t,  # not canonical base64
        lambda t: t + ".x",
        lambda t: "",
        lambda t: "....",
    ],
)
def test_forged_tokens(mangle: object) -> None:
    token = make_token("secret", "transferreihe-2024", "jana.mueller@example.org")
    assert callable(mangle)
    assert verify_token("secret", "transferreihe-2024", mangle(token)) is None


def test_token_is_bound_to_series_and_secret() -> None:
    token = make_token("secret", "transferreihe-2024", "jana.mueller@example.org")
    assert verify_token("secret", "transferreihe-2025", token) is None
    assert verify_token("other", "transferreihe-2024", token) is None
    assert verify_token("", "transferreihe-2024", token) is None
    with pytest.raises(ValueError):
        make_token("", "transferreihe-2024", "jana.mueller@example.org")


# --- hostile contact data ------------------------------------------------------------------


HOSTILE = [
    Contact(
        email="jana.mueller@example.org",
        anrede="Frau",
        titel="Dr.",
        vorname='Jana "JJ", die Zweite',
        nachname="Müller\r\nBcc: victim@example.net",
        organisation="<script>alert('x')</script> & Co.",
    ),
    Contact(
        email="jana.mueller@example.org",
        vorname="Jana,",
        nachname="<script>alert(1)</script>\nX-Evil: 1",
        organisation='"Stadt", <Amt>',
    ),
]


@pytest.mark.parametrize("contact", HOSTILE)
@pytest.mark.parametrize("kind", list(Kind))
def test_hostile_contact(composer: Composer, series: Series, contact: Contact, kind: Kind) -> None:
    _, raw, parsed = compose(composer, series, kind, contact, EVENT[kind])
    headers = raw_headers(raw)
    assert sum(h.startswith(b"To:") for h in headers) == 1
    assert not any(h.lower().startswith((b"bcc:", b"x-evil:")) for h in headers)
    assert "Bcc" not in parsed and "X-Evil" not in parsed
    (address,) = parsed["To"].addresses
    assert address.addr_spec == "jana.mueller@example.org"
    assert "Jana" in address.display_name

    page = body(parsed, "html")
    assert "<script" not in page
    assert "&lt;script&gt;" in page
    for part in parsed.walk():
        assert not part.defects


def test_invalid_recipient_address(composer: Composer, series: Series) -> None:
    broken = Contact(email="jana@example.org\r\nBcc: victim@example.net")
    with pytest.raises(ConfigError, match="invalid recipient address"):
        composer.compose(Kind.INVITATION, broken, event=None, now=NOW[Kind.INVITATION])


# --- long content ----------------------------------------------------------------------------


@pytest.mark.slow
def test_long_lines_stay_within_limits(settings: Settings, series: Series) -> None:
    event = series.events[0].model_copy(
        update={
            "title": "Umlaute äöü in einem sehr langen Titel " * 12,
            "description": "https://example.org/" + "x" * 3000,
        }
    )
    long = series.model_copy(update={"events": [event, *series.events[1:]]})
    composer = Composer.load(settings, long, templates_dir=TEMPLATES, config_dir=CONFIG)
    for kind in Kind:
        msg = composer.compose(
            kind, FRAU, event=None if kind is Kind.INVITATION else event, now=NOW[kind]
        )
        raw = msg.as_bytes()
        assert max(len(line) for line in raw.split(b"\r\n")) <= 998
        parsed = message_from_bytes(raw, policy=policy.default)
        for part in parsed.walk():
            assert not part.defects
        assert "äöü" in parsed["Subject"] or kind is Kind.INVITATION
        # Subjects shorten a long title to stay readable.
        assert len(parsed["Subject"]) <= 70, parsed["Subject"]


# --- templates: broken, missing, new -------------------------------------------------------


def insert_line(path: Path, number: int, line: str) -> None:
    """Put *line* so that it becomes line *number* (1-based) of the file."""
    lines = path.read_text(encoding="utf-8").split("\n")
    lines.insert(number - 1, line)
    path.write_text("\n".join(lines), encoding="utf-8")


def test_template_syntax_errors_are_collected(
    settings: Settings, series: Series, templates: Path
) -> None:
    insert_line(templates / "reminder.html.j2", 6, "{% endif %}")
    followup = templates / "followup.txt.j2"
    lines = followup.read_text(encoding="utf-8").split("\n")
    number = lines.index("{% if attended is true %}") + 1
    insert_line(followup, number, "{{ event.title }")
    with pytest.raises(ConfigError) as caught:
        Composer.load(settings, series, templates_dir=templates, config_dir=CONFIG)
    problems = {p.path.name if p.path else "": p for p in caught.value.problems}
    assert set(problems) == {"reminder.html.j2", "followup.txt.j2"}
    assert problems["reminder.html.j2"].line == 6
    assert "endif" in problems["reminder.html.j2"].message
    assert problems["followup.txt.j2"].line == number
    assert all(p.hint for p in problems.values())
    assert "reminder.html.j2, line 6" in str(caught.value)


def test_missing_template(settings: Settings, series: Series, templates: Path) -> None:
    (templates / "followup.txt.j2").unlink()
    with pytest.raises(ConfigError) as caught:
        Composer.load(settings, series, templates_dir=templates, config_dir=CONFIG)
    assert caught.value.path == templates / "followup.txt.j2"
    assert caught.value.hint is not None and "followup.txt.j2" in caught.value.hint


def test_missing_layout(settings: Settings, series: Series, templates: Path) -> None:
    path = templates / "invitation.html.j2"
    path.write_text(
        path.read_text(encoding="utf-8").replace("layout.html.j2", "layout2.html.j2"),
        encoding="utf-8",
    )
    with pytest.raises(ConfigError) as caught:
        Composer.load(settings, series, templates_dir=templates, config_dir=CONFIG)
    assert caught.value.path == path
    assert caught.value.line == 1
    assert "layout2.html.j2" in caught.value.problems[0].message


def test_missing_templates_folder(settings: Settings, series: Series, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        Composer.load(settings, series, templates_dir=tmp_path / "nope", config_dir=CONFIG)


def test_undefined_variable(settings: Settings, series: Series, templates: Path) -> None:
    insert_line(templates / "reminder.txt.j2", 3, "Fax: {{ contact.fax }}")
    composer = Composer.load(settings, series, templates_dir=templates, config_dir=CONFIG)
    with pytest.raises(ConfigError) as caught:
        composer.compose(Kind.REMINDER, FRAU, event=series.events[0], now=NOW[Kind.REMINDER])
    error = caught.value
    assert error.path == templates / "reminder.txt.j2"
    assert error.line == 3
    assert "fax" in str(error)
    assert error.hint is not None and "salutation" in error.hint
    # the other kinds are unaffected
    composer.compose(Kind.INVITATION, FRAU, event=None, now=NOW[Kind.INVITATION])


def test_undefined_variable_in_layout(settings: Settings, series: Series, templates: Path) -> None:
    path = templates / "layout.html.j2"
    lines = path.read_text(encoding="utf-8").split("\n")
    number = next(i for i, line in enumerate(lines, 1) if "<body>" in line) + 1
    insert_line(path, number, "<p>{{ sender_name }}</p>")
    composer = Composer.load(settings, series, templates_dir=templates, config_dir=CONFIG)
    with pytest.raises(ConfigError) as caught:
        composer.compose(Kind.INVITATION, FRAU, event=None, now=NOW[Kind.INVITATION])
    assert caught.value.path == path
    assert caught.value.line == number
    assert "sender_name" in str(caught.value)


def test_missing_extra_column(settings: Settings, series: Series, templates: Path) -> None:
    insert_line(templates / "invitation.txt.j2", 3, 'Funktion: {{ contact.extra["Funktion"] }}')
    composer = Composer.load(settings, series, templates_dir=templates, config_dir=CONFIG)
    with_column = Contact(email="a@example.org", extra={"Funktion": "Bürgermeisterin"})
    msg = composer.compose(Kind.INVITATION, with_column, event=None, now=NOW[Kind.INVITATION])
    assert "Funktion: Bürgermeisterin" in str(msg.get_body(("plain",)).get_content())  # type: ignore[union-attr]
    with pytest.raises(ConfigError) as caught:
        composer.compose(Kind.INVITATION, FRAU, event=None, now=NOW[Kind.INVITATION])
    assert caught.value.line == 3


def test_a_new_kind_needs_only_templates(
    settings: Settings, series: Series, templates: Path
) -> None:
    (templates / "announcement.subject.j2").write_text(
        "Änderung: {{ event.title }}\n", encoding="utf-8"
    )
    (templates / "announcement.txt.j2").write_text(
        '{% extends "layout.txt.j2" %}{% block content %}neu: {{ event.time_range }}'
        "{% endblock %}\n",
        encoding="utf-8",
    )
    (templates / "announcement.html.j2").write_text(
        '{% extends "layout.html.j2" %}{% block content %}<p>neu: {{ event.time_range }}</p>'
        "{% endblock %}\n",
        encoding="utf-8",
    )
    composer = Composer.load(settings, series, templates_dir=templates, config_dir=CONFIG)
    assert set(composer.kinds) == {
        "invitation",
        "reminder",
        "followup",
        "update",
        "cancellation",
        "confirmation",
        "announcement",
    }
    msg = composer.compose("announcement", FRAU, event=series.events[0], now=NOW[Kind.REMINDER])
    assert msg["Subject"] == "Änderung: Verwaltung transformieren – Effizienz steigern"
    assert msg["X-Invite-Mailer-Kind"] == "announcement"
    assert msg.get_content_type() == "multipart/alternative"

    (templates / "announcement.html.j2").unlink()
    with pytest.raises(ConfigError, match="announcement.html.j2"):
        Composer.load(settings, series, templates_dir=templates, config_dir=CONFIG)


def test_unknown_kind(composer: Composer) -> None:
    with pytest.raises(ValueError, match="no templates"):
        composer.compose("newsletter", FRAU, event=None, now=NOW[Kind.INVITATION])


def test_event_required_where_needed(composer: Composer, series: Series) -> None:
    with pytest.raises(ValueError, match="needs the event"):
        composer.compose(Kind.REMINDER, FRAU, event=None, now=NOW[Kind.REMINDER])
    with pytest.raises(ValueError, match="event=None"):
        composer.compose(Kind.INVITATION, FRAU, event=series.events[0], now=NOW[Kind.REMINDER])


def test_hidden_files_are_ignored(settings: Settings, series: Series, templates: Path) -> None:
    (templates / "._invitation.html.j2").write_bytes(b"\x00\x05\x16\x07\xff")
    (templates / ".reminder.txt.j2.swp").write_bytes(b"\xff")
    Composer.load(settings, series, templates_dir=templates, config_dir=CONFIG)


def test_not_utf8_template(settings: Settings, series: Series, templates: Path) -> None:
    (templates / "reminder.txt.j2").write_bytes("Grüße".encode("cp1252"))
    with pytest.raises(ConfigError, match="not UTF-8"):
        Composer.load(settings, series, templates_dir=templates, config_dir=CONFIG)


def test_the_composer_of_a_loaded_config_reads_no_file_again(
    material_config: Path, templates: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Templates and materials are read once, with the config: a composer built
    from it later renders the same mail with both folders gone."""
    for key in list(os.environ):
        if key.startswith("INVITE_MAILER_"):
            monkeypatch.delenv(key)
    config = load_config(material_config, templates, env_file=None)
    event = config.series.event("verwaltung")
    now = NOW[Kind.FOLLOWUP]
    before = Composer.from_config(config).compose(
        Kind.FOLLOWUP, FRAU, event=event, now=now, attended=True
    )
    shutil.rmtree(templates)
    shutil.rmtree(material_config / "materials")
    after = Composer.from_config(config).compose(
        Kind.FOLLOWUP, FRAU, event=event, now=now, attended=True
    )
    assert after.as_bytes() == before.as_bytes()
    assert [name for name, _, _ in attachments(after)] == ["protokoll.pdf"]


def test_a_config_with_other_settings_composes_with_them(material_config: Path) -> None:
    """Config is plain data: a copy with other settings gives a composer of those."""
    with pytest.MonkeyPatch.context() as mp:
        for key in list(os.environ):
            if key.startswith("INVITE_MAILER_"):
                mp.delenv(key)
        config = load_config(material_config, TEMPLATES, env_file=None)
    sender = config.settings.sender.model_copy(update={"address": "Anna <anna@example.net>"})
    changed = replace(config, settings=config.settings.model_copy(update={"sender": sender}))
    event = config.series.event("verwaltung")
    message = Composer.from_config(changed).compose(
        Kind.REMINDER, FRAU, event=event, now=NOW[Kind.REMINDER]
    )
    assert message["From"].addresses[0].addr_spec == "anna@example.net"
    assert message["Message-ID"].endswith("@example.net>")
