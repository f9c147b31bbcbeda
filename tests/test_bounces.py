"""Bounces and complaints: reading the reports, recording them, suppressing addresses.

The reports in ``tests/data/bounces`` follow the documented formats of
Postfix (RFC 3464 with its X-Postfix fields), Microsoft 365 / Exchange
Online, Gmail, Exim's plain text (X-Failed-Recipients) and an ARF feedback
report (RFC 5965), plus a delay warning and an out-of-office reply that must
not count. The end-to-end tests send the shipped invitation as a user would
(``send-due`` on the outbox), turn those reports into bounces of the mails
that went out, and import them with the command line from a Maildir, an mbox
file and single files.
"""

from __future__ import annotations

import json
import mailbox
import re
from email import message_from_bytes, policy
from pathlib import Path

import pytest

from invite_mailer.delivery.bounces import BounceKind, clean, read_report
from support.bounces import DATA, bounce_of, sent_invitations
from support.cli import invoke
from support.smtp import SmtpServer, smtp_env

pytestmark = pytest.mark.both_ledgers

REMINDER = "2024-11-13T14:05"  # the reminders for 14.11.2024 are open


@pytest.mark.parametrize(
    ("name", "email", "kind", "status", "said", "original"),
    [
        (
            "postfix-unknown-user.eml",
            "alt.adresse@example.com",
            BounceKind.HARD,
            "5.1.1",
            "User unknown in virtual mailbox table",
            "<invitation.3f2a9c@example.org>",
        ),
        (
            "exchange-online-not-found.eml",
            "ehemalig@stadt.example.com",
            BounceKind.HARD,
            "5.1.10",
            "RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup",
            "<invitation.77aa01@example.org>",
        ),
        (
            "gmail-no-such-user.eml",
            "gibtsnicht@gmail.example",
            BounceKind.HARD,
            "5.1.1",
            "The email account that you tried to reach does not exist.",
            "<invitation.55bb02@example.org>",
        ),
        (
            "gmail-over-quota.eml",
            "voll@gmail.example",
            BounceKind.SOFT,
            "5.2.2",
            "inbox is out of storage space",
            "<reminder.verwaltung.99cc03@example.org>",
        ),
        (
            "exim-plain-text.eml",
            "weg@kommune.example",
            BounceKind.HARD,
            "5.1.1",
            "Recipient address rejected: User unknown",
            None,
        ),
        (
            "complaint-arf.eml",
            "beschwerde@mail.example.net",
            BounceKind.COMPLAINT,
            "",
            "feedback report: abuse",
            "<invitation.88dd05@example.org>",
        ),
    ],
)
def test_reports_name_the_recipient_the_kind_and_the_servers_words(
    name: str, email: str, kind: BounceKind, status: str, said: str, original: str | None
) -> None:
    report = read_report((DATA / name).read_bytes())
    assert [(b.email, b.kind, b.status) for b in report.bounces] == [(email, kind, status)]
    assert said in report.bounces[0].diagnostic
    assert report.message_id == original


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("postfix-delayed.eml", "delay warning"),
        ("out-of-office.eml", "no bounce or complaint"),
    ],
)
def test_warnings_and_replies_are_no_bounces(name: str, why: str) -> None:
    report = read_report((DATA / name).read_bytes())
    assert report.bounces == ()
    assert why in report.ignored


def test_report_text_becomes_one_printable_line() -> None:
    hostile = "550 5.1.1 [bold]x[/bold]\r\nBcc: victim@example.org\x1b[31m" + "y" * 500
    line = clean(hostile)
    assert "\n" not in line and "\r" not in line and "\x1b" not in line
    assert len(line) == 300 and line.endswith("…")
    data = (DATA / "postfix-unknown-user.eml").read_bytes()
    data = data.replace(
        b"Recipient address\n    rejected", b"Recipient\x07 \x1b[2Jaddress\n rejected"
    )
    (bounce,) = read_report(data).bounces
    assert "\x07" not in bounce.diagnostic and "\x1b" not in bounce.diagnostic


# --- end to end ----------------------------------------------------------------------


def maildir_with(path: Path, messages: list[bytes]) -> mailbox.Maildir:
    box = mailbox.Maildir(path, create=True)
    for data in messages:
        box.add(mailbox.MaildirMessage(data))
    return box


def json_of(*args: str) -> dict[str, object]:
    result = invoke([*args, "--json"])
    assert result.exit_code == 0, result.output
    data: dict[str, object] = json.loads(result.stdout)
    return data


def test_a_hard_bounce_stops_all_further_mail_to_the_address(project: Path) -> None:
    sent = sent_invitations(project)
    jana = "jana.mueller@example.org"  # registered for every date
    box = maildir_with(
        project / "Maildir",
        [
            bounce_of("postfix-unknown-user.eml", jana, jana, sent[jana]),
            (DATA / "out-of-office.eml").read_bytes(),
            (DATA / "postfix-delayed.eml").read_bytes(),
        ],
    )
    result = invoke(["bounces", "import", "Maildir"])
    assert result.exit_code == 0, result.output
    assert f"{jana}: hard bounce 5.1.1, suppressed" in result.output
    assert result.output.count("ignored") == 2
    assert "3 message(s) read; 1 address(es) newly suppressed" in result.output
    # Never lost: every message is still there, read and flagged as seen.
    assert len(box) == 3 and not list((project / "Maildir" / "new").iterdir())
    assert all("S" in box.get_message(key).get_flags() for key in box.keys())

    listed = json_of("bounces", "list")["bounces"]
    assert isinstance(listed, list) and len(listed) == 1
    assert listed[0]["email"] == jana and listed[0]["kind"] == "hard"
    assert "User unknown" in listed[0]["diagnostic"]
    assert listed[0]["message_id"] == sent[jana]
    assert json_of("status")["bounces"] == listed
    optouts = json_of("optout", "list")["optouts"]
    assert {"email": jana, "source": "bounce 5.1.1"}.items() <= optouts[0].items()  # type: ignore[index]

    # The reminder the next day goes to everyone registered but her.
    before = set((project / "outbox").glob("*.eml"))
    result = invoke(["send-due", "--now", REMINDER])
    assert result.exit_code == 0, result.output
    reminded = {
        message_from_bytes(p.read_bytes(), policy=policy.default)["To"].addresses[0].addr_spec
        for p in set((project / "outbox").glob("*.eml")) - before
    }
    assert reminded and jana not in {r.lower() for r in reminded}

    # Importing the same Maildir again records nothing twice.
    again = invoke(["bounces", "import", "Maildir"])
    assert "(already recorded)" in again.output
    assert "0 address(es) newly suppressed" in again.output
    assert len(json_of("bounces", "list")["bounces"]) == 1  # type: ignore[arg-type]


def test_soft_bounces_count_up_to_the_limit_and_complaints_opt_out(project: Path) -> None:
    with (project / "config" / "settings.toml").open("a", encoding="utf-8") as file:
        file.write("\n[bounces]\nsoft_limit = 2\n")
    sent = sent_invitations(project)
    thomas, alex = "thomas.schmidt@example.org", "alex.meyer@example.org"
    full = bounce_of("gmail-over-quota.eml", thomas, thomas, sent.get(thomas, ""))
    first = project / "soft-1.eml"
    first.write_bytes(full)
    result = invoke(["bounces", "import", str(first)])
    assert f"{thomas}: soft bounce 5.2.2, 1 soft so far" in result.output
    second = project / "soft-2.eml"
    second.write_bytes(full.replace(b"Date: Thu, 13 Nov", b"Date: Fri, 14 Nov"))
    result = invoke(["bounces", "import", str(second)])
    assert f"{thomas}: soft bounce 5.2.2, suppressed" in result.output

    mbox = mailbox.mbox(project / "complaints.mbox")
    mbox.add(bounce_of("complaint-arf.eml", alex, alex, sent[alex]))
    mbox.close()
    result = invoke(["bounces", "import", "complaints.mbox"])
    assert f"{alex}: complaint, suppressed" in result.output
    sources = {e["email"]: e["source"] for e in json_of("optout", "list")["optouts"]}  # type: ignore[union-attr]
    assert sources[thomas] == "2 soft bounces"
    assert sources[alex] == "complaint (spam report)"


def test_bounces_are_attributed_through_the_message_id_or_ignored(project: Path) -> None:
    sent = sent_invitations(project)
    jana = "jana.mueller@example.org"
    forwarded = project / "forwarded.eml"
    # Her mail was forwarded; the address behind it bounced.
    forwarded.write_bytes(
        bounce_of("exchange-online-not-found.eml", "weiter@example.net", jana, sent[jana])
    )
    stranger = project / "stranger.eml"
    stranger.write_bytes((DATA / "exim-plain-text.eml").read_bytes())
    result = invoke(["bounces", "import", str(forwarded), str(stranger)])
    assert result.exit_code == 0, result.output
    assert f"{jana}: hard bounce 5.1.10, suppressed" in result.output
    assert "ignored, not a recipient of this series: weg@kommune.example" in result.output
    (recorded,) = json_of("bounces", "list")["bounces"]  # type: ignore[misc]
    assert recorded["email"] == jana


def test_a_folder_that_is_not_a_maildir_is_a_clear_error(project: Path) -> None:
    (project / "reports").mkdir()
    result = invoke(["bounces", "import", "reports"])
    assert result.exit_code == 1
    assert "not a Maildir" in result.output


# --- per-recipient return paths (VERP) ----------------------------------------------

SECRET = "a-long-random-secret-for-the-tests-only"


def test_every_mail_has_its_own_return_path_and_its_bounce_names_the_recipient(
    project: Path, smtp_server: SmtpServer
) -> None:
    env = smtp_env(
        smtp_server.port,
        bounces__return_path="bounces+{token}@example.org",
        unsubscribe__secret=SECRET,
        notify__organiser_summary="false",
    )
    assert invoke(["send-due", "--now", "2024-10-24T10:05"], env).exit_code == 0
    senders = {r.rcpt_tos[0].lower(): r.mail_from for r in smtp_server.received}
    assert len(senders) == 12 and len(set(senders.values())) == 12
    assert all(re.fullmatch(r"bounces\+[a-z2-7]{16}@example\.org", s) for s in senders.values())
    # The headers are the sender's: the return path lives in the envelope only.
    assert all(
        b"From: KomKomIn Transferreihe <transferreihe@example.org>" in r.data
        for r in smtp_server.received
    )
    assert not any(b"bounces+" in r.data for r in smtp_server.received)

    # An Exim bounce about a forwarding address and without the original's
    # Message-ID: only the address it came back to tells whose mail it was.
    jana = "jana.mueller@example.org"
    data = (DATA / "exim-plain-text.eml").read_bytes()
    data = data.replace(b"To: transferreihe@example.org", f"To: {senders[jana]}".encode(), 1)
    report = project / "exim.eml"
    report.write_bytes(data)
    result = invoke(["bounces", "import", str(report)], env)
    assert result.exit_code == 0, result.output
    assert f"{jana}: hard bounce 5.1.1, suppressed" in result.output
    # A token that is no recipient's is no one's.
    forged = data.replace(senders[jana].encode(), b"bounces+aaaaaaaaaaaaaaaa@example.org")
    report.write_bytes(forged)
    assert (
        "not a recipient of this series" in invoke(["bounces", "import", str(report)], env).output
    )


@pytest.mark.parametrize(
    ("value", "said"),
    [
        ("bounces@example.org", "with {token} once before the @"),
        ("bounces+{token}{token}@example.org", "with {token} once before the @"),
        ("b@{token}.example.org", "with {token} once before the @"),
        ("bounces+{token}@", "with {token} once before the @"),
    ],
)
def test_a_return_path_without_its_token_is_a_clear_error(
    project: Path, value: str, said: str
) -> None:
    result = invoke(["validate"], {"INVITE_MAILER_BOUNCES__RETURN_PATH": value})
    assert result.exit_code == 1, result.output
    assert said in result.output
