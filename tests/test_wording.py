"""German that fits any series, and subjects that lead with what matters.

The shipped series ("die Online-Transferreihe", ``title_genus: f``) and a copy
titled "Klimadialog Kommunen": masculine (``title_genus: m``) and without
``title_genus`` (mails then say "Reihe „…“"). Every kind, both follow-up
wordings, both kinds of update, for a person and for an organisation.
"""

from __future__ import annotations

import re
from datetime import datetime
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from html import unescape
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from invite_mailer.inputs.config import Config
from invite_mailer.inputs.series import Kind
from invite_mailer.mail.compose import Composer
from support.cli import run
from support.project import copy_project
from support.samples import load_sample_config, sample_mails, sample_project, second_series

BERLIN = ZoneInfo("Europe/Berlin")
TEMPLATES = Path(__file__).resolve().parent.parent / "templates" / "email"

# An article or contraction that does not go with a masculine title.
WRONG_FOR_MASCULINE = re.compile(
    r"\b(zur|die|der|von der|Die|Der)\s+Klimadialog\b|\bKlimadialog Kommunen\s+steht\b"
)


def _texts(message: EmailMessage) -> tuple[str, str]:
    """The plain-text part and the HTML part as text (tags removed, entities decoded)."""
    text = message.get_body(("plain",))
    html = message.get_body(("html",))
    assert text is not None and html is not None
    visible = re.sub(
        r"<!--.*?-->|<style\b.*?</style>|<title>.*?</title>", "", html.get_content(), flags=re.S
    )
    shown = unescape(re.sub(r"<[^>]+>", " ", visible)).replace("\xa0", " ")
    return text.get_content(), " ".join(shown.split())


def _config(tmp: Path, genus: str | None, *, klimadialog: bool = True) -> Config:
    config_dir = sample_project(tmp)
    if klimadialog:
        second_series(config_dir, genus=genus)
    return load_sample_config(config_dir)


def _every_mail(config: Config) -> list[tuple[str, EmailMessage]]:
    office = config.contacts.by_key("info@example.com")
    assert office is not None
    composer = Composer.from_config(config)
    return [
        (f"{sample.name}/{contact.email}", sample.message)
        for contact in (config.contacts.contacts[0], office)
        for sample in sample_mails(config, contact, composer=composer)
    ]


@pytest.fixture(scope="module")
def masculine(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[str, EmailMessage]]:
    return _every_mail(_config(tmp_path_factory.mktemp("m"), "m"))


@pytest.fixture(scope="module")
def no_genus(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[str, EmailMessage]]:
    return _every_mail(_config(tmp_path_factory.mktemp("none"), None))


def test_a_masculine_title_gets_masculine_articles(
    masculine: list[tuple[str, EmailMessage]],
) -> None:
    assert len(masculine) == 20
    for name, message in masculine:
        text, html = _texts(message)
        for shown in (text, html, str(message["Subject"])):
            wrong = WRONG_FOR_MASCULINE.findall(shown)
            assert wrong == [], (name, wrong)
        assert "Klimadialog Kommunen" in text, name
        assert "Online-Transferreihe" not in text + html, name
    invitation = dict(masculine)["invitation/jana.mueller@example.org"]
    text, html = _texts(invitation)
    assert "wir laden Sie herzlich zum Klimadialog Kommunen" in text
    assert "Einladung zum Klimadialog Kommunen" in html
    assert "keine weiteren E-Mails zum Klimadialog Kommunen erhalten" in text
    assert "weil Ihre Adresse für den Klimadialog Kommunen in unserem Einladungsverteiler" in html
    reminder_text, _ = _texts(dict(masculine)["reminder/jana.mueller@example.org"])
    assert "findet der Termin aus dem Klimadialog Kommunen statt" in reminder_text


def test_without_a_genus_the_title_is_named_as_a_series(
    no_genus: list[tuple[str, EmailMessage]],
) -> None:
    for name, message in no_genus:
        text, html = _texts(message)
        for shown in (text, html):
            assert WRONG_FOR_MASCULINE.findall(shown) == [], name
            # Every mention with an article goes through "Reihe „…“".
            assert not re.search(r"\b(zur|zum|der|dem|den|die)\s+Klimadialog", shown), name
    text, html = _texts(dict(no_genus)["invitation/jana.mueller@example.org"])
    assert "wir laden Sie herzlich zur Reihe „Klimadialog Kommunen“" in text
    assert "Einladung zur Reihe „Klimadialog Kommunen“" in html


def test_the_shipped_series_keeps_its_feminine_article(tmp_path: Path) -> None:
    mails = dict(_every_mail(_config(tmp_path, None, klimadialog=False)))
    text, html = _texts(mails["invitation/jana.mueller@example.org"])
    assert "wir laden Sie herzlich zur Online-Transferreihe" in text
    assert "Einladung zur Online-Transferreihe" in html
    followup, _ = _texts(mails["followup-links/jana.mueller@example.org"])
    assert "Reihe „" not in text + html + followup


def test_no_mail_promises_one_click_where_it_takes_two() -> None:
    # The link in the footer opens a page that asks to confirm: two clicks.
    # (The one-click unsubscribe is the mail program's, from List-Unsubscribe.)
    for path in TEMPLATES.glob("*.j2"):
        assert "einem Klick" not in path.read_text(encoding="utf-8"), path.name


# --- organisations and titles ------------------------------------------------------------


def test_an_organisation_without_a_name_is_addressed_well(
    masculine: list[tuple[str, EmailMessage]],
) -> None:
    for name, message in masculine:
        if not name.endswith("/info@example.com"):
            continue
        raw = message.as_bytes(policy=policy.SMTP)
        parsed = BytesParser(policy=policy.default).parsebytes(raw)
        (address,) = parsed["To"].addresses
        assert (address.display_name, address.addr_spec) == (
            "Projektbüro Kreislaufregion",
            "info@example.com",
        ), name
        text, _ = _texts(message)
        assert text.startswith("Sehr geehrte Damen und Herren,\n"), name


def test_a_double_title_names_the_highest_in_the_salutation(tmp_path: Path) -> None:
    config = _config(tmp_path, "m")
    gross = config.contacts.by_key("sabine.gross@example.org")
    assert gross is not None and gross.titel == "Prof. Dr."
    (invitation,) = [s for s in sample_mails(config, gross) if s.name == "invitation"]
    text, _ = _texts(invitation.message)
    assert text.startswith("Sehr geehrte Frau Prof. Groß,\n")
    # The address keeps the whole title.
    assert invitation.message["To"].addresses[0].display_name == "Prof. Dr. Sabine Groß"


# --- subjects ----------------------------------------------------------------------------

SUBJECT_LIMIT = 70


def test_subjects_lead_with_the_kind_and_the_date(tmp_path: Path) -> None:
    config = _config(tmp_path, None, klimadialog=False)
    composer = Composer.from_config(config)
    contact = config.contacts.contacts[0]
    subjects: dict[str, str] = {}
    for event in config.series.events:
        day = event.starts_at
        moments = {
            Kind.REMINDER: day.replace(day=day.day - 1, hour=14),
            Kind.FOLLOWUP: day.replace(day=day.day + 1, hour=10),
            Kind.CANCELLATION: datetime(2024, 11, 1, 9, tzinfo=BERLIN),
        }
        for kind, now in moments.items():
            message = composer.compose(kind, contact, event=event, now=now, sequences={event.id: 1})
            subjects[f"{kind}/{event.id}"] = str(message["Subject"])
        fingerprint = event.fingerprint()
        previous = {
            "time": {
                **fingerprint,
                "start": day.replace(hour=10).isoformat(),
                "end": day.replace(hour=12).isoformat(),
            },
            "date": {
                **fingerprint,
                "start": day.replace(day=day.day - 1).isoformat(),
                "end": event.ends_at.replace(day=day.day - 1).isoformat(),
            },
            "title": {**fingerprint, "title": "Ein anderes Thema"},
            "link": {**fingerprint, "join_url": "https://example.org/alt"},
            "all": {
                "start": "2024-10-01T10:00:00+02:00",
                "end": "2024-10-01T11:00:00+02:00",
                "title": "x",
                "join_url": "",
            },
        }
        for what, before in previous.items():
            message = composer.compose(
                Kind.UPDATE,
                contact,
                event=event,
                now=datetime(2024, 11, 1, 9, tzinfo=BERLIN),
                sequences={event.id: 1},
                previous=before,
            )
            subjects[f"update-{what}/{event.id}"] = str(message["Subject"])
    invitation = composer.compose(
        Kind.INVITATION, contact, event=None, now=datetime(2024, 10, 24, 10, tzinfo=BERLIN)
    )
    subjects["invitation"] = str(invitation["Subject"])

    too_long = {k: v for k, v in subjects.items() if len(v) > SUBJECT_LIMIT}
    assert too_long == {}
    assert subjects["invitation"] == "Einladung: vier Termine ab 14.11.2024 – Online-Transferreihe"
    assert subjects["reminder/verwaltung"] == (
        "Erinnerung: morgen, 14:00 Uhr – Verwaltung transformieren"
    )
    assert subjects["followup/allianzen"] == (
        "Ergebnisse vom 28.11.2024: Allianzen bilden – Engagement fördern"
    )
    assert subjects["cancellation/forschung"] == (
        "Abgesagt: 05.12.2024 – Kommunen und Forschung – Mehrwerte nutzen"
    )
    # An update says first what changed, then the new date and time.
    assert subjects["update-time/verwaltung"] == (
        "Neue Uhrzeit: 14.11.2024, 14:00–16:00 Uhr – Verwaltung transformieren"
    )
    assert subjects["update-date/allianzen"].startswith("Neues Datum: 28.11.2024, 14:00–16:00 Uhr")
    assert subjects["update-title/allianzen"].startswith("Neues Thema: 28.11.2024")
    assert subjects["update-link/verwaltung"] == (
        "Neuer Zugangslink: 14.11.2024 – Verwaltung transformieren"
    )
    assert subjects["update-all/allianzen"].startswith("Geänderter Termin: 28.11.2024")


# --- title_genus in series.yaml ------------------------------------------------------------


def test_a_wrong_title_genus_is_one_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    copy_project(tmp_path)
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "config" / "series.yaml"
    text = path.read_text(encoding="utf-8")
    assert "title_genus: f\n" in text
    path.write_text(text.replace("title_genus: f\n", "title_genus: maskulin\n"), encoding="utf-8")
    line = next(
        number
        for number, content in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if content.startswith("title_genus:")
    )
    code, output = run(["validate"])
    assert code == 1, output
    assert f"series.yaml, line {line}: 'title_genus'" in output
    assert "'f', 'm', 'n' or 'pl'" in output
    assert "m (der Klimadialog Kommunen)" in output
    assert "nothing was sent" in output


# --- the footer says why, for the dates the mail is about -----------------------------------

# The sentence that says why the recipient gets the mail (both parts, spaces folded).
WHY = re.compile(r"Sie erhalten diese E-Mail, (weil [^.]*)\.")


def _why(message: EmailMessage) -> tuple[str, str]:
    text, html = _texts(message)
    found = [WHY.search(" ".join(part.split())) for part in (text, html)]
    assert found[0] is not None and found[1] is not None
    return found[0].group(1), found[1].group(1)


def _calendar_files(message: EmailMessage) -> int:
    return sum(
        1 for part in message.iter_attachments() if part.get_content_type() == "text/calendar"
    )


@pytest.fixture(scope="module")
def shipped(tmp_path_factory: pytest.TempPathFactory) -> Config:
    return _config(tmp_path_factory.mktemp("shipped"), None, klimadialog=False)


def test_a_confirmation_of_several_dates_speaks_of_these_dates(shipped: Config) -> None:
    for email in ("jana.mueller@example.org", "info@example.com"):
        contact = shipped.contacts.by_key(email)
        assert contact is not None
        mails = {s.name: s.message for s in sample_mails(shipped, contact)}
        several, one = mails["confirmation-several"], mails["confirmation"]
        assert _calendar_files(several) == 3 and _calendar_files(one) == 1
        assert _why(several) == ("weil Sie sich für diese Termine angemeldet haben",) * 2
        text, html = _texts(several)
        for shown in (text, html):
            assert "für diesen Termin" not in shown, email
            assert "Im Anhang finden Sie für jeden dieser Termine eine Kalenderdatei" in " ".join(
                shown.split()
            )
        assert _why(one) == ("weil Sie sich für diesen Termin angemeldet haben",) * 2


LIST = "weil Ihre Adresse für die Online-Transferreihe in unserem Einladungsverteiler steht"
INVITED = datetime(2024, 10, 24, 10, tzinfo=BERLIN)
# Registered for all four dates, for two, for one, for none.
REGISTRANTS = (
    "jana.mueller@example.org",
    "thomas.schmidt@example.org",
    "maria.koenig@example.org",
    "lena.hoffmann@example.com",
)


def _invitation_why(config: Config, email: str) -> tuple[str, str]:
    contact = config.contacts.by_key(email)
    assert contact is not None
    invitation = Composer.from_config(config).compose(
        Kind.INVITATION, contact, event=None, now=INVITED
    )
    assert _calendar_files(invitation) == 4
    return _why(invitation)


@pytest.mark.parametrize("email", REGISTRANTS)
def test_an_invitation_to_the_whole_list_says_the_address_is_on_it(
    shipped: Config, email: str
) -> None:
    # audience: all. Those registered for some dates get it as everyone else does.
    assert _invitation_why(shipped, email) == (LIST, LIST)


@pytest.fixture(scope="module")
def for_registered(tmp_path_factory: pytest.TempPathFactory) -> Config:
    config_dir = sample_project(tmp_path_factory.mktemp("registered"))
    series = config_dir / "series.yaml"
    text = series.read_text(encoding="utf-8")
    assert text.count("audience: all}") == 1
    series.write_text(text.replace("audience: all}", "audience: registered}"), encoding="utf-8")
    return load_sample_config(config_dir)


@pytest.mark.parametrize(
    ("email", "why"),
    list(
        zip(
            REGISTRANTS,
            [
                "weil Sie sich für die Online-Transferreihe angemeldet haben",
                "weil Sie sich für Termine aus der Online-Transferreihe angemeldet haben",
                "weil Sie sich für einen Termin aus der Online-Transferreihe angemeldet haben",
                LIST,
            ],
            strict=True,
        )
    ),
)
def test_an_invitation_to_the_registered_names_what_the_recipient_registered_for(
    for_registered: Config, email: str, why: str
) -> None:
    assert _invitation_why(for_registered, email) == (why, why)


@pytest.mark.parametrize("kind", [Kind.UPDATE, Kind.CANCELLATION])
def test_a_mail_about_a_date_says_registered_only_to_those_registered_for_it(
    shipped: Config, kind: Kind
) -> None:
    verwaltung = next(e for e in shipped.series.events if e.id == "verwaltung")
    composer = Composer.from_config(shipped)
    seen = {}
    for contact in shipped.contacts.contacts:
        message = composer.compose(
            kind, contact, event=verwaltung, now=INVITED, previous=verwaltung.fingerprint()
        )
        seen[contact.email] = _why(message)
        expected = (
            "weil Sie sich für diesen Termin angemeldet haben"
            if contact.is_registered("verwaltung")
            else LIST
        )
        assert seen[contact.email] == (expected, expected), contact.email
    assert {why for why, _ in seen.values()} == {
        LIST,
        "weil Sie sich für diesen Termin angemeldet haben",
    }


def test_no_mail_with_several_calendar_files_speaks_of_this_one_date(shipped: Config) -> None:
    checked = 0
    composer = Composer.from_config(shipped)
    for contact in shipped.contacts.contacts:
        for sample in sample_mails(shipped, contact, composer=composer):
            if _calendar_files(sample.message) < 2:
                continue
            checked += 1
            for shown in _texts(sample.message):
                assert "diesen Termin" not in shown, (sample.name, contact.email)
    assert checked == 2 * len(shipped.contacts.contacts)  # the invitation, a confirmation


def test_the_cancellation_keeps_its_paragraphs_apart(shipped: Config) -> None:
    registered = shipped.contacts.by_key("jana.mueller@example.org")
    assert registered is not None
    kreislauf = next(e for e in shipped.series.events if e.id == "kreislaufwirtschaft")
    last = shipped.series.events[-1]
    for event in (kreislauf, last):  # with and without a next date
        message = Composer.from_config(shipped).compose(
            Kind.CANCELLATION, registered, event=event, now=INVITED
        )
        text, _ = _texts(message)
        body = text.split("\n-- \n")[0]
        paragraphs = [" ".join(p.split()) for p in body.split("\n\n")]
        assert "Wir bitten um Ihr Verständnis." in paragraphs, paragraphs
        calendar = next(p for p in paragraphs if p.startswith("Im Anhang"))
        assert calendar.endswith("Eine Erinnerung zu diesem Termin erhalten Sie nicht mehr.")
        following = [p for p in paragraphs if p.startswith("Der nächste Termin der Reihe")]
        assert len(following) == (event is kreislauf), paragraphs
