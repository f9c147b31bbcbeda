"""The organiser's summary after a mailing: what the relay's quota means for the
mailings still to send, and the series' bounces, in German.

Run as a user runs it: ``send-due --now`` against a real SMTP server on
127.0.0.1 (with quotas) or into the outbox, bounces imported with
``bounces import``. The day between two runs passes by moving the ledger's
record of the sends a day back, which is what the quota counts.
"""

from __future__ import annotations

from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path

import pytest

from invite_mailer.mail.summary import BounceNotes, SuppressedAddress, bounce_lines
from support.bounces import bounce_of, sent_invitations
from support.cli import invoke
from support.contacts import write_generated
from support.postgres import move_sends_back
from support.project import ledger_of
from support.smtp import SmtpServer, smtp_env

pytestmark = pytest.mark.both_ledgers

INVITATION = "2024-10-24T10:05"
REMINDER = "2024-11-13T14:05"  # the reminders for 14.11.2024 are open
ORGANISER = "transferreihe@example.org"


def text_of(data: bytes) -> str:
    message = message_from_bytes(data, policy=policy.default)
    assert isinstance(message, EmailMessage)
    part = message.get_body(("plain",))
    assert part is not None
    return str(part.get_content()).replace("\r\n", "\n")


def received_reports(server: SmtpServer) -> list[str]:
    return [text_of(r.data) for r in server.received if r.rcpt_tos == (ORGANISER,)]


def outbox_reports(project: Path) -> dict[str, str]:
    """Subject -> text of every summary in the outbox."""
    reports = {}
    for path in (project / "outbox").glob("*.eml"):
        message = message_from_bytes(path.read_bytes(), policy=policy.default)
        if str(message["Subject"]).startswith("Versandbericht"):
            reports[str(message["Subject"])] = text_of(path.read_bytes())
    return reports


def a_day_later(project: Path) -> None:
    """Move the ledger's record of every send a day and a minute back."""
    move_sends_back(ledger_of(project), 86460)


def register_more_for_kreislaufwirtschaft(project: Path) -> None:
    """Eight registered for 21.11. instead of six: more than the day's quota below."""
    path = project / "config" / "contacts.csv"
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines):
        if line.startswith(("lena.hoffmann@", "bjoern.oestreich@")):
            assert line.endswith(";")
            lines[number] = line + "kreislaufwirtschaft"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def reminder_report(project: Path, server: SmtpServer, **quota: int) -> str:
    """The invitation with room to spare, then the reminders for 14.11. under *quota*:
    the summary of those reminders."""
    register_more_for_kreislaufwirtschaft(project)
    roomy = smtp_env(server.port, smtp__rate_per_day=20)
    assert invoke(["send-due", "--now", INVITATION], roomy).exit_code == 0
    (invitation,) = received_reports(server)
    # Nothing of the series is held back by 20 a day: no word about it.
    assert "Ihr Mailserver nimmt höchstens" not in invitation
    assert "ACHTUNG" not in invitation
    a_day_later(project)
    before = len(server.received)
    result = invoke(["send-due", "--now", REMINDER], smtp_env(server.port, **quota))
    assert result.exit_code == 0, result.output
    assert len(server.received) - before == 6  # five reminders and their summary
    report = received_reports(server)[-1]
    assert "„Erinnerung“ für „Verwaltung transformieren – Effizienz steigern (14.11.2024)“" in (
        report
    )
    return report


def test_the_summary_warns_when_a_window_closes_before_the_quota_reaches_everyone(
    project: Path, smtp_server: SmtpServer
) -> None:
    report = reminder_report(project, smtp_server, smtp__rate_per_day=6)
    assert "Ihr Mailserver nimmt höchstens 6 E-Mails pro Tag an." in report
    name = "„Erinnerung“ für „Kreislaufwirtschaft stärken – Ressourcen schonen (21.11.2024)“"
    warning = report[report.index(f"ACHTUNG – {name}:") :]
    # Due at 14:00 the day before, open until the start: six a day reach six of eight.
    assert "Das Versandfenster schließt am Donnerstag, 21.11.2024, um 14:00 Uhr." in warning
    assert "Bis dahin lässt das Kontingent nur 6 der 8 noch offenen E-Mails zu:" in warning
    assert "2 Personen werden diese E-Mail nicht erhalten." in warning
    assert "Erhöhen Sie das Kontingent in settings.toml (smtp.rate_per_day)," in warning
    assert "oder lassen Sie den Versand früher" in warning
    # The reminders for the other dates reach everyone: not named.
    assert report.count("ACHTUNG") == 1


def test_the_summary_tells_when_the_quota_lets_a_mailing_finish(
    project: Path, smtp_server: SmtpServer
) -> None:
    report = reminder_report(project, smtp_server, smtp__rate_per_hour=6)
    assert "Ihr Mailserver nimmt höchstens 6 E-Mails pro Stunde an." in report
    name = "„Erinnerung“ für „Kreislaufwirtschaft stärken – Ressourcen schonen (21.11.2024)“"
    part = report[report.index(f"{name}:") :]
    # Six at 14:00, the other two when the hour has passed: in time.
    assert part.startswith(
        f"{name}:\n"
        "  Die letzte der 8 noch offenen E-Mails geht voraussichtlich am\n"
        "  Mittwoch, 20.11.2024, um 15:00 Uhr hinaus.\n"
    )
    assert "ACHTUNG" not in report


def test_without_a_quota_the_summary_says_nothing_of_one(project: Path) -> None:
    sent_invitations(project)
    (report,) = outbox_reports(project).values()
    assert "Kontingent" not in report and "höchstens" not in report
    assert "unzustellbar" not in report  # nor of bounces while there are none


@pytest.mark.slow
def test_the_summary_counts_the_bounces_and_names_the_suppressed(project: Path) -> None:
    sent = sent_invitations(project)
    jana = "jana.mueller@example.org"
    report = project / "jana.eml"
    report.write_bytes(bounce_of("postfix-unknown-user.eml", jana, jana, sent[jana]))
    soft = project / "soft.eml"
    thomas = "thomas.schmidt@example.org"
    soft.write_bytes(bounce_of("gmail-over-quota.eml", thomas, thomas, sent[thomas]))
    result = invoke(["bounces", "import", str(report), str(soft)])
    assert result.exit_code == 0, result.output
    # Thomas opts out himself: opted out, yet suppressed by no bounce.
    assert invoke(["optout", "add", thomas]).exit_code == 0
    assert invoke(["send-due", "--now", REMINDER]).exit_code == 0
    reports = outbox_reports(project)
    text = next(t for s, t in reports.items() if s.startswith("Versandbericht: Erinnerung"))
    assert "  Versendet:            3" in text  # five registered, two opted out
    assert "  Abgemeldet (gesperrt): 2" in text
    assert (
        "Unzustellbare E-Mails und Beschwerden der Reihe (bisher):\n"
        "  Dauerhaft unzustellbar:     1\n"
        "  Vorübergehend unzustellbar: 1\n"
        "  Als Spam gemeldet:          0\n"
    ) in text
    listed = text[text.index("Gesperrt (erhalten keine E-Mails dieser Reihe mehr):") :]
    lines = listed.splitlines()
    assert lines[1] == f"  {jana} – dauerhaft unzustellbar (5.1.1)"
    # The server's words, cut short at a word.
    assert lines[2].startswith(f"    smtp; 550 5.1.1 <{jana}>: Recipient address rejected: User")
    assert lines[2].endswith(" virtual…") and len(lines[2]) <= 4 + 100
    assert thomas not in listed  # his own opt-out; one soft bounce suppresses nobody
    assert "und" not in lines[3]
    assert "invite-mailer bounces list" in listed


@pytest.mark.slow
def test_the_list_of_suppressed_addresses_is_bounded(project: Path) -> None:
    write_generated(project / "config" / "contacts.csv", 30)
    sent = sent_invitations(project)
    addresses = sorted(sent)[:23]
    paths = []
    for number, address in enumerate(addresses):
        path = project / f"bounce-{number}.eml"
        path.write_bytes(bounce_of("postfix-unknown-user.eml", address, address, sent[address]))
        paths.append(str(path))
    result = invoke(["bounces", "import", *paths])
    assert result.exit_code == 0, result.output
    assert "23 address(es) newly suppressed" in result.output
    assert invoke(["send-due", "--now", REMINDER]).exit_code == 0
    reminders = [t for s, t in outbox_reports(project).items() if "Erinnerung" in s]
    assert reminders
    text = reminders[0]
    assert "  Dauerhaft unzustellbar:     23\n" in text
    listed = text[text.index("Gesperrt") : text.index("Die vollständige Liste")]
    assert listed.count("dauerhaft unzustellbar (5.1.1)") == 20
    assert "  … und 3 weitere\n" in listed


def test_the_words_of_a_bounce_stay_one_line_each() -> None:
    """A report's address and diagnostic come from outside: no line breaks or
    control characters get from them into the summary's text."""
    hostile = SuppressedAddress(
        "jana.mueller@example.org\r\nBcc: alle@example.com",
        "hard",
        "5.1.1\n",
        "550 nein\r\n\r\nSubject: neu\x00\x1b[2J <b>fett</b>",
    )
    lines = bounce_lines(BounceNotes(1, 0, 0, 1, [hostile]))
    assert not any(set(line) & {"\r", "\n", "\x00", "\x1b"} for line in lines)
    assert "  jana.mueller@example.org Bcc: alle@example.com – dauerhaft unzustellbar (5.1.1)" in (
        lines
    )
    assert "    550 nein Subject: neu[2J <b>fett</b>" in lines  # plain text: nothing to escape
