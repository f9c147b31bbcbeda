"""Registrations: signed links, the ledger's rows, the plan's confirmations, the CLI.

The end-to-end story (daemon, web app, SMTP server) is in
``test_registration_daemon.py``; here each part on its own, against a real
ledger file and through the command line as an organiser runs it.
"""

from __future__ import annotations

import csv
import email
import email.policy
import io
import json
import re
from datetime import datetime, timedelta
from email.message import EmailMessage
from pathlib import Path
from zoneinfo import ZoneInfo

import httpx
import openpyxl
import pytest

from invite_mailer.core.plan import MailingState, PlanInput, plan
from invite_mailer.core.registrations import Registration, with_registrations
from invite_mailer.core.tokens import (
    REGISTER,
    WITHDRAW,
    make_link_token,
    make_token,
    verify_link_token,
    verify_token,
)
from invite_mailer.delivery.ledger import Ledger
from invite_mailer.delivery.ledger_open import ledger_exists
from invite_mailer.inputs.config import load_config
from invite_mailer.inputs.series import Kind
from invite_mailer.mail.compose import Composer
from invite_mailer.service.server import start_server
from invite_mailer.service.web import create_app
from support.cli import invoke
from support.project import ledger_of

BERLIN = ZoneInfo("Europe/Berlin")
SERIES = "transferreihe-2024"
SECRET = "registration-secret-0123456789"
BJOERN = "bjoern.oestreich@example.org"  # registered for nothing in the shipped list
LENA = "lena.hoffmann@example.com"  # likewise
JANA = "jana.mueller@example.org"  # registered for every date ("alle")
INVITED = "2024-10-24T10:05"


# --- tokens ------------------------------------------------------------------------------


def test_a_link_token_is_bound_to_action_series_address_and_date() -> None:
    token = make_link_token(SECRET, REGISTER, SERIES, "Bjoern.Oestreich@Example.org", "allianzen")
    assert verify_link_token(SECRET, REGISTER, SERIES, token) == (BJOERN, "allianzen")
    assert verify_link_token(SECRET, WITHDRAW, SERIES, token) is None
    assert verify_link_token(SECRET, REGISTER, "other-series", token) is None
    assert verify_link_token("other-secret", REGISTER, SERIES, token) is None
    email_part, event_part, mac = token.split(".")
    other_date = make_link_token(SECRET, REGISTER, SERIES, BJOERN, "forschung").split(".")[1]
    assert verify_link_token(SECRET, REGISTER, SERIES, f"{email_part}.{other_date}.{mac}") is None
    for broken in (
        token[:-1],
        token + "A",
        token.replace(".", "", 1),
        f"{email_part}.{event_part}",
    ):
        assert verify_link_token(SECRET, REGISTER, SERIES, broken) is None
    # Unsubscribe tokens and link tokens never stand in for each other.
    assert verify_token(SECRET, SERIES, token) is None
    assert verify_link_token(SECRET, REGISTER, SERIES, make_token(SECRET, SERIES, BJOERN)) is None


# --- the ledger --------------------------------------------------------------------------


async def test_registering_is_idempotent_and_a_withdrawal_outweighs_the_contact_list(
    ledger_target: Path | str,
) -> None:
    now = datetime(2024, 10, 25, 9, 0, tzinfo=BERLIN)
    async with Ledger.open(ledger_target) as ledger:
        # The first reading of the contact list is the baseline: nothing to confirm.
        assert await ledger.observe_registrations(SERIES, {JANA: frozenset({"verwaltung"})}, now)
        assert await ledger.register(SERIES, "allianzen", BJOERN, source="link", now=now)
        assert not await ledger.register(SERIES, "allianzen", BJOERN, source="link", now=now)
        later = now + timedelta(hours=1)
        assert (
            await ledger.observe_registrations(
                SERIES, {JANA: frozenset({"verwaltung", "forschung"})}, later
            )
            == 1
        )
        assert await ledger.withdraw(SERIES, "verwaltung", JANA, by="link", now=later)
        assert not await ledger.withdraw(SERIES, "verwaltung", JANA, by="link", now=later)
        # Withdrawing what only the contact list knows writes a row that outweighs it.
        assert await ledger.withdraw(SERIES, "kreislaufwirtschaft", LENA, by="cli", now=later)
        rows = await ledger.registrations(SERIES)
    assert not rows[JANA]["verwaltung"].confirm and not rows[JANA]["verwaltung"].active
    assert rows[JANA]["forschung"].confirm and rows[JANA]["forschung"].registered_at == later
    assert rows[BJOERN]["allianzen"].source == "link" and rows[BJOERN]["allianzen"].active
    assert not rows[LENA]["kreislaufwirtschaft"].active


# --- the command line and the plan ---------------------------------------------------------


def sent_kinds(project: Path) -> list[tuple[str, str]]:
    """(kind, recipient) of every mail in the outbox but the organiser's reports."""
    found = []
    for path in sorted((project / "outbox").glob("*.eml")):
        message = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
        if message["X-Invite-Mailer-Kind"]:
            found.append(
                (str(message["X-Invite-Mailer-Kind"]), message["To"].addresses[0].addr_spec)
            )
    return found


def mails_of(project: Path, kind: str, to: str) -> list[EmailMessage]:
    found = []
    for path in sorted((project / "outbox").glob("*.eml")):
        message = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
        assert isinstance(message, EmailMessage)
        if message["X-Invite-Mailer-Kind"] == kind and message["To"].addresses[0].addr_spec == to:
            found.append(message)
    return found


def ok(*args: str) -> str:
    result = invoke(list(args))
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.slow
@pytest.mark.both_ledgers
def test_cli_registrations_are_confirmed_once_in_one_mail_after_the_quiet_period(
    project: Path,
) -> None:
    ok("send-due", "--now", INVITED)
    assert [k for k, _ in sent_kinds(project)].count("confirmation") == 0  # the baseline
    ok("registrations", "add", BJOERN, "--event", "verwaltung", "--now", "2024-10-25T09:00:00")
    ok("registrations", "add", BJOERN, "--event", "allianzen", "--now", "2024-10-25T09:00:20")
    # Within the quiet period nothing goes out; plan says when.
    ok("send-due", "--now", "2024-10-25T09:00:40")
    assert ("confirmation", BJOERN) not in sent_kinds(project)
    planned = json.loads(ok("plan", "--json", "--now", "2024-10-25T09:00:40"))
    [confirmation] = [m for m in planned["mailings"] if m["kind"] == "confirmation"]
    assert confirmation["event"] == "verwaltung" and confirmation["state"] == "scheduled"
    assert planned["registered"]["verwaltung"] == 6 and planned["registered"]["allianzen"] == 6

    ok("send-due", "--now", "2024-10-25T09:00:51")
    [mail] = mails_of(project, "confirmation", BJOERN)
    # Subjects lead with the kind and the date, and need no article for the title.
    assert mail["Subject"] == "Anmeldebestätigung: zwei Termine ab Do., 14.11.2024"
    attached = [p.get_filename() for p in mail.iter_attachments()]
    assert attached == [f"{SERIES}-verwaltung.ics", f"{SERIES}-allianzen.ics"]
    # Never twice: the next passes send no more confirmations.
    ok("send-due", "--now", "2024-10-25T10:00")
    ok("send-due", "--now", "2024-10-26T10:00")
    assert sent_kinds(project).count(("confirmation", BJOERN)) == 1

    # A withdrawal (CLI) outweighs the registration: no reminder for that date.
    ok("registrations", "remove", BJOERN, "--event", "allianzen", "--now", "2024-11-01T09:00")
    ok("send-due", "--now", "2024-11-13T14:05")
    ok("send-due", "--now", "2024-11-27T14:05")
    reminded = {str(m["X-Invite-Mailer-Event"]) for m in mails_of(project, "reminder", BJOERN)}
    assert reminded == {"verwaltung"}


@pytest.mark.slow
@pytest.mark.both_ledgers
def test_no_confirmation_after_the_date_began_or_to_an_opted_out_address(project: Path) -> None:
    ok("send-due", "--now", INVITED)
    ok("optout", "add", LENA)
    ok("registrations", "add", LENA, "--event", "allianzen", "--now", "2024-10-25T09:00")
    ok("registrations", "add", BJOERN, "--event", "verwaltung", "--now", "2024-11-14T13:59:50")
    ok("send-due", "--now", "2024-11-14T14:00:30")  # the date began before the quiet period ended
    kinds = sent_kinds(project)
    assert ("confirmation", LENA) not in kinds and ("confirmation", BJOERN) not in kinds


@pytest.mark.slow
@pytest.mark.both_ledgers
def test_registrations_list_exports_json_csv_and_xlsx(project: Path) -> None:
    ok("send-due", "--now", INVITED)
    ok("registrations", "add", BJOERN, "--event", "forschung", "--now", "2024-10-25T09:00")
    data = json.loads(ok("registrations", "list", "--json", "--event", "forschung"))
    rows = {row["email"]: row for row in data["registrations"]}
    assert rows[BJOERN]["source"] == "cli"
    assert rows[JANA]["source"] == "csv"
    assert {row["event"] for row in data["registrations"]} == {"forschung"}

    exported = list(csv.reader(io.StringIO(ok("registrations", "list", "--csv")), delimiter=";"))
    assert exported[0][:4] == ["email", "event", "date", "source"]
    assert [BJOERN, "forschung", "2024-12-05", "cli"] in [row[:4] for row in exported[1:]]
    assert len(exported) - 1 == sum(json.loads(ok("plan", "--json"))["registered"].values())

    ok("registrations", "list", "--xlsx", "anmeldungen.xlsx")
    sheet = openpyxl.load_workbook(project / "anmeldungen.xlsx").active
    assert sheet is not None
    values = [[cell.value for cell in row] for row in sheet.iter_rows()]
    assert values[0][:2] == ["email", "event"] and len(values) == len(exported)


def test_registration_mistakes_are_one_clear_error(project: Path) -> None:
    unknown = invoke(["registrations", "add", "nobody@example.org", "--event", "verwaltung"])
    assert unknown.exit_code == 1 and "no contact with the address" in unknown.output
    wrong = invoke(["registrations", "add", BJOERN, "--event", "no-such-date"])
    assert wrong.exit_code == 1 and "no event 'no-such-date'" in wrong.output
    both = invoke(["registrations", "list", "--json", "--csv"])
    assert both.exit_code == 2


def test_preview_of_a_confirmation(project: Path) -> None:
    output = ok("preview", "confirmation", "--event", "allianzen", "--contact", JANA)
    [eml] = [Path(line) for line in output.split() if line.endswith(".eml")]
    message = email.message_from_bytes((project / eml).read_bytes(), policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    assert str(message["Subject"]).startswith("Anmeldebestätigung: Do., 28.11.2024")
    assert [p.get_filename() for p in message.iter_attachments()] == [f"{SERIES}-allianzen.ics"]


def test_links_mode_needs_the_web_address_and_the_secret(project: Path) -> None:
    series = project / "config" / "series.yaml"
    series.write_text(
        series.read_text(encoding="utf-8").replace(
            "privacy_url:", "registration:\n  mode: links\nprivacy_url:"
        ),
        encoding="utf-8",
    )
    result = invoke(["validate"])
    assert result.exit_code == 1
    assert "web_url is not set" in result.output and "secret" in result.output


def test_a_contact_registered_for_every_date_is_not_asked_to_register(project: Path) -> None:
    ok("send-due", "--now", INVITED)
    [jana] = mails_of(project, "invitation", JANA)
    [thomas] = mails_of(project, "invitation", "thomas.schmidt@example.org")
    for message, asked in ((jana, False), (thomas, True)):
        for kind in ("plain", "html"):
            part = message.get_body((kind,))
            assert part is not None
            body = part.get_content()
            assert ("Jetzt anmelden" in body or "Zur Anmeldung" in body) is asked, kind
            assert ("zusätzlich anmelden" in body) is asked, kind
    html = jana.get_body(("html",))
    assert html is not None
    assert len(re.findall(r"<li[ >]", html.get_content())) == 4  # the dates, as a list


# --- the web pages -----------------------------------------------------------------------


@pytest.mark.both_ledgers
async def test_the_withdrawal_link_asks_on_get_and_withdraws_on_post(project: Path) -> None:
    ledger_path = ledger_of(project)
    config = load_config(project / "config")
    now = datetime(2024, 11, 1, 9, 0, tzinfo=BERLIN)
    app = create_app(SERIES, SECRET, ledger_path, series=lambda: config.series, clock=lambda: now)
    server = await start_server(app, "127.0.0.1", 0)
    token = make_link_token(SECRET, WITHDRAW, SERIES, JANA, "allianzen")
    try:
        async with httpx.AsyncClient(timeout=10) as client:
            url = f"{server.url}/absage/{token}"
            page = await client.get(url)
            assert page.status_code == 200 and "Allianzen bilden" in page.text
            assert not ledger_exists(ledger_path) or not await _rows(ledger_path)
            done = await client.post(url, data={"bestaetigt": "ja"})
            assert done.status_code == 200 and "abgesagt" in done.text
            # The registration page for a date that has begun registers nobody.
            late = make_link_token(SECRET, REGISTER, SERIES, BJOERN, "verwaltung")
            app_late = create_app(
                SERIES,
                SECRET,
                ledger_path,
                series=lambda: config.series,
                clock=lambda: datetime(2024, 11, 14, 14, 30, tzinfo=BERLIN),
            )
            late_server = await start_server(app_late, "127.0.0.1", 0)
            try:
                closed = await client.post(f"{late_server.url}/anmeldung/{late}")
                assert closed.status_code == 200 and "nicht mehr möglich" in closed.text
            finally:
                await late_server.stop()
    finally:
        await server.stop()
    rows = await _rows(ledger_path)
    assert list(rows) == [JANA] and not rows[JANA]["allianzen"].active
    merged = with_registrations(config, rows)
    contact = merged.contacts.by_key(JANA)
    assert contact is not None
    assert not contact.is_registered("allianzen") and contact.is_registered("forschung")
    mailings = plan(PlanInput.of(merged), _EmptyView(rows), now)
    [reminder] = [m for m in mailings if m.id == "reminder:allianzen"]
    assert JANA not in reminder.audience and reminder.state is MailingState.SCHEDULED


async def _rows(path: Path | str) -> dict[str, dict[str, Registration]]:
    async with Ledger.open(path) as ledger:
        return await ledger.registrations(SERIES)


class _EmptyView:
    """A ledger view with registrations only."""

    def __init__(self, rows: dict[str, dict[str, Registration]]) -> None:
        self.rows = rows

    def states(self, kind: str, event: str) -> dict[str, str]:
        return {}

    def seen(self, event: str) -> dict[str, str]:
        return {}

    def date(self, event: str) -> None:
        return None

    def registrations_of(self, email: str) -> dict[str, Registration]:
        return self.rows.get(email, {})

    def confirmed(self, email: str) -> frozenset[str]:
        return frozenset()


def test_the_cancellation_speaks_to_each_recipient(project: Path) -> None:
    config = load_config(project / "config")
    composer = Composer.from_config(config)
    event = config.series.event("allianzen")
    now = datetime(2024, 11, 1, 9, 0, tzinfo=BERLIN)
    texts = {}
    for address in (JANA, BJOERN):
        contact = config.contacts.by_key(address)
        assert contact is not None
        message = composer.compose(
            Kind.CANCELLATION, contact, event=event, now=now, sequences={event.id: 1}
        )
        part = message.get_body(("plain",))
        assert part is not None
        texts[address] = " ".join(str(part.get_content()).split())
    assert "Eine Erinnerung zu diesem Termin erhalten Sie nicht mehr." in texts[JANA]
    assert "Erinnerung" not in texts[BJOERN]  # never registered: no reminder to stop
    sentence = (
        "Der nächste Termin der Reihe, „Kommunen und Forschung – Mehrwerte nutzen“, findet wie "
        "geplant am Donnerstag, 5. Dezember 2024, von 14:00 bis 16:00 Uhr statt."
    )
    assert sentence + " Dafür sind Sie angemeldet." in texts[JANA]
    assert sentence in texts[BJOERN] and "Dafür sind Sie angemeldet" not in texts[BJOERN]


def test_the_contact_list_decides_its_own_rows_links_and_withdrawals_decide_theirs(
    project: Path,
) -> None:
    config = load_config(project / "config")
    at = datetime(2024, 10, 25, 9, 0, tzinfo=BERLIN)
    rows = {
        # The list registered Thomas for verwaltung and allianzen (shipped contacts.csv).
        "thomas.schmidt@example.org": {
            "verwaltung": Registration("verwaltung", "thomas.schmidt@example.org", "csv", at),
            "forschung": Registration("forschung", "thomas.schmidt@example.org", "csv", at),
            "allianzen": Registration(
                "allianzen", "thomas.schmidt@example.org", "csv", at, withdrawn_at=at
            ),
        },
        BJOERN: {"forschung": Registration("forschung", BJOERN, "link", at)},
    }
    merged = with_registrations(config, rows)
    thomas = merged.contacts.by_key("thomas.schmidt@example.org")
    bjoern = merged.contacts.by_key(BJOERN)
    assert thomas is not None and bjoern is not None
    # forschung: a CSV row the list no longer has; allianzen: withdrawn by link.
    assert thomas.registrations == frozenset({"verwaltung"})
    assert bjoern.registrations == frozenset({"forschung"})
    # Contacts without rows are the very same objects.
    assert merged.contacts.by_key(JANA) is config.contacts.by_key(JANA)


@pytest.mark.both_ledgers
def test_the_organisers_summary_counts_registrations_per_date(project: Path) -> None:
    ok("registrations", "add", BJOERN, "--event", "forschung", "--now", "2024-10-24T09:00")
    ok("send-due", "--now", INVITED)
    reports = []
    for path in sorted((project / "outbox").glob("summary.*.eml")):
        message = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
        assert isinstance(message, EmailMessage)
        part = message.get_body(("plain",))
        assert part is not None
        reports.append(str(part.get_content()))
    [report] = reports
    assert "Anmeldungen (Stand jetzt):" in report
    # The shipped list registers five for forschung; Björn by the CLI makes six.
    assert "05.12.2024 Kommunen und Forschung – Mehrwerte nutzen: 6" in report
    assert "14.11.2024 Verwaltung transformieren – Effizienz steigern: 5" in report


def test_the_join_link_can_wait_for_the_reminder(project: Path) -> None:
    series = project / "config" / "series.yaml"
    series.write_text(
        series.read_text(encoding="utf-8").replace(
            "  updates:    {grace: 10 minutes}",
            "  updates:    {grace: 10 minutes}\n  confirmation: {join_link: false}",
        ),
        encoding="utf-8",
    )
    output = ok("preview", "confirmation", "--event", "allianzen", "--contact", JANA)
    [eml] = [Path(line) for line in output.split() if line.endswith(".eml")]
    message = email.message_from_bytes((project / eml).read_bytes(), policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    for kind in ("plain", "html"):
        part = message.get_body((kind,))
        assert part is not None
        body = part.get_content()
        assert "https://example.org/transferreihe/allianzen" not in body, kind
        assert "Den Zugangslink senden wir Ihnen mit der Erinnerung vor dem Termin." in body


@pytest.mark.slow
def test_validate_warns_when_nothing_here_answers_the_links(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    series = project / "config" / "series.yaml"
    series.write_text(
        series.read_text(encoding="utf-8").replace(
            "privacy_url:", "registration:\n  mode: links\nprivacy_url:"
        ),
        encoding="utf-8",
    )
    monkeypatch.setenv("INVITE_MAILER_SENDER__WEB_URL", "https://example.org/reihe")
    monkeypatch.setenv("INVITE_MAILER_UNSUBSCRIBE__SECRET", SECRET)
    warned = invoke(["validate"])
    assert warned.exit_code == 0, warned.output
    assert "does not answer the registration links" in warned.output
    monkeypatch.setenv("INVITE_MAILER_UNSUBSCRIBE__SERVE", "true")
    quiet = invoke(["validate"])
    assert quiet.exit_code == 0 and "registration links" not in quiet.output


@pytest.mark.both_ledgers
async def test_an_opted_out_address_registering_is_told_that_no_mail_follows(
    project: Path,
) -> None:
    ledger_path = ledger_of(project)
    config = load_config(project / "config")
    now = datetime(2024, 11, 1, 9, 0, tzinfo=BERLIN)
    async with Ledger.open(ledger_path) as ledger:
        await ledger.add_optout(SERIES, LENA, source="cli", now=now)
    app = create_app(SERIES, SECRET, ledger_path, series=lambda: config.series, clock=lambda: now)
    server = await start_server(app, "127.0.0.1", 0)
    try:
        async with httpx.AsyncClient(timeout=10) as client:
            token = make_link_token(SECRET, REGISTER, SERIES, LENA, "forschung")
            page = await client.post(f"{server.url}/anmeldung/{token}")
            assert page.status_code == 200
            assert "abgemeldet" in page.text and "in den nächsten Minuten" not in page.text
            token = make_link_token(SECRET, REGISTER, SERIES, BJOERN, "forschung")
            page = await client.post(f"{server.url}/anmeldung/{token}")
            assert "in den nächsten Minuten" in page.text
    finally:
        await server.stop()
    rows = await _rows(ledger_path)
    assert rows[LENA]["forschung"].source == "link" and rows[BJOERN]["forschung"].active


@pytest.mark.both_ledgers
def test_a_link_registration_of_an_address_taken_off_the_list_is_still_listed(
    project: Path,
) -> None:
    ok("registrations", "add", BJOERN, "--event", "allianzen", "--now", "2024-10-25T09:00")
    contacts = project / "config" / "contacts.csv"
    text = contacts.read_text(encoding="utf-8")
    contacts.write_text(
        "\n".join(line for line in text.splitlines() if not line.startswith(BJOERN)) + "\n",
        encoding="utf-8",
    )
    data = json.loads(ok("registrations", "list", "--json", "--event", "allianzen"))
    [row] = [r for r in data["registrations"] if r["email"] == BJOERN]
    assert row["source"] == "cli" and row["organisation"] == "(nicht mehr in der Kontaktliste)"
