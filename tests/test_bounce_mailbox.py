"""The bounce mailbox over IMAP, against a real Dovecot on 127.0.0.1.

The shipped invitation goes out (``send-due`` on the outbox); bounces of it in
the documented Postfix, Exchange Online and Gmail formats, and an
out-of-office reply, are put into the mailbox with IMAP APPEND; then
``invite-mailer bounces fetch`` reads them as the daemon's poll does.

And a report no one wrote by hand: the daemon sends through a private
Postfix (:mod:`support.postfix`) that accepts a recipient it has no mailbox
for, fails to deliver it and sends its own delivery status notification to
the mail's VERP return path; that report goes into the mailbox as it came.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from datetime import datetime
from email import message_from_bytes, policy
from pathlib import Path

import pytest

from invite_mailer.delivery.ledger import Ledger
from invite_mailer.delivery.transport import make_transport
from invite_mailer.inputs.config import load_config
from invite_mailer.service.daemon import BOUNCES_JOB
from support.bounces import DATA, bounce_of, sent_invitations
from support.cli import invoke
from support.daemon import make_daemon, serving
from support.dovecot import Dovecot, running_dovecot
from support.mails import mails
from support.postfix import Postfix, running_postfix
from support.postgres import query
from support.project import ledger_of
from support.smtp import SmtpServer, smtp_env

pytestmark = pytest.mark.system

JANA, THOMAS, ALEX = (
    "jana.mueller@example.org",
    "thomas.schmidt@example.org",
    "alex.meyer@example.org",
)


@pytest.fixture
def dovecot() -> Iterator[Dovecot]:
    with running_dovecot() as server:
        yield server


def fill(dovecot: Dovecot, sent: dict[str, str]) -> None:
    dovecot.append("INBOX", bounce_of("postfix-unknown-user.eml", JANA, JANA, sent[JANA]))
    dovecot.append("INBOX", bounce_of("gmail-over-quota.eml", THOMAS, THOMAS, sent[THOMAS]))
    dovecot.append(
        "INBOX", bounce_of("exchange-online-not-found.eml", "alt@example.net", ALEX, sent[ALEX])
    )
    dovecot.append("INBOX", (DATA / "out-of-office.eml").read_bytes())


def fetch(env: dict[str, str]) -> dict[str, object]:
    result = invoke(["bounces", "fetch", "--json"], env)
    assert result.exit_code == 0, result.output
    data: dict[str, object] = json.loads(result.stdout)
    return data


@pytest.mark.both_ledgers
def test_fetch_records_the_bounces_and_flags_them_as_seen(project: Path, dovecot: Dovecot) -> None:
    sent = sent_invitations(project)
    fill(dovecot, sent)
    env = dovecot.settings_env()
    first = fetch(env)
    assert first["read"] == 4
    assert first["suppressed"] == sorted([JANA, ALEX])
    recorded = {r["email"]: r for r in first["recorded"]}  # type: ignore[union-attr]
    assert recorded[THOMAS]["kind"] == "soft" and recorded[THOMAS]["soft_count"] == 1
    assert recorded[ALEX]["reported_as"] == "alt@example.net"  # forwarded; by Message-ID
    # Nothing lost: all four are still in the inbox, now seen.
    inbox = dovecot.folder("INBOX")
    assert len(inbox) == 4 and all(b"\\Seen" in flags for flags, _ in inbox)
    assert fetch(env)["read"] == 0  # seen ones are not read again

    listed = json.loads(invoke(["bounces", "list", "--json"], env).stdout)["bounces"]
    assert {b["email"]: b["kind"] for b in listed} == {JANA: "hard", THOMAS: "soft", ALEX: "hard"}
    assert "User unknown" in next(b for b in listed if b["email"] == JANA)["diagnostic"]

    # The reminders the next day skip the bounced addresses.
    before = set((project / "outbox").glob("*.eml"))
    assert invoke(["send-due", "--now", "2024-11-13T14:05"], env).exit_code == 0
    reminded = {
        message_from_bytes(p.read_bytes(), policy=policy.default)["To"].addresses[0].addr_spec
        for p in set((project / "outbox").glob("*.eml")) - before
    }
    assert reminded and JANA not in reminded and THOMAS in reminded


@pytest.mark.both_ledgers
def test_fetch_moves_what_it_read_to_the_processed_folder(project: Path, dovecot: Dovecot) -> None:
    sent = sent_invitations(project)
    fill(dovecot, sent)
    env = dovecot.settings_env(processed_folder="Verarbeitet")
    assert fetch(env)["read"] == 4
    assert dovecot.folder("INBOX") == []
    moved = dovecot.folder("Verarbeitet")
    assert len(moved) == 4
    assert any(b"User unknown in virtual mailbox" in data for _, data in moved)


def test_a_wrong_password_is_one_clear_error(project: Path, dovecot: Dovecot) -> None:
    env = dovecot.settings_env(password="falsch")
    result = invoke(["bounces", "fetch"], env)
    assert result.exit_code == 1, result.output
    assert "cannot read the bounce mailbox bounces@example.org@127.0.0.1" in result.output
    assert "INVITE_MAILER_IMAP__PASSWORD" in result.output


def test_fetch_without_a_mailbox_says_how_to_set_one_up(project: Path) -> None:
    result = invoke(["bounces", "fetch"])
    assert result.exit_code == 1
    assert "imap.host is empty" in result.output


@pytest.mark.both_ledgers
async def test_the_daemon_polls_the_mailbox_and_stops_mailing_the_bounced(
    project: Path, dovecot: Dovecot, smtp_server: SmtpServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The daemon as ``invite-mailer run`` sets it up, on a clock of its own."""
    for name, value in {**dovecot.settings_env(), **smtp_env(smtp_server.port)}.items():
        monkeypatch.setenv(name, value)
    config = load_config(project / "config")
    invitation = datetime(2024, 10, 24, 10, 5, tzinfo=config.series.zone)
    moment = [invitation]
    async with (
        Ledger.open(ledger_of(project)) as ledger,
        make_transport(config.settings) as transport,
    ):
        daemon = make_daemon(config, ledger, transport, project, lambda: moment[0])
        async with serving(daemon):
            jobs = {job.id: job for job in daemon.scheduler.get_jobs()}
            assert BOUNCES_JOB in jobs  # every imap.poll_seconds
            sent = {m.to: m for m in mails(smtp_server.received) if m.kind == "invitation"}
            assert JANA in sent
            dovecot.append(
                "INBOX", bounce_of("postfix-unknown-user.eml", JANA, JANA, sent[JANA].message_id)
            )
            await daemon.poll_bounces()  # the job's own call
            moment[0] = datetime(2024, 11, 13, 14, 5, tzinfo=config.series.zone)
            before = len(smtp_server.received)
            await daemon.run_pass()
    reminded = {m.to for m in mails(smtp_server.received[before:]) if m.kind == "reminder"}
    assert reminded and JANA not in reminded
    assert all(b"\\Seen" in flags for flags, _ in dovecot.folder("INBOX"))


# --- a bounce that a real Postfix generates ------------------------------------------

SECRET = "a-long-random-secret-for-the-tests-only"
REMINDER = datetime(2024, 11, 13, 14, 5)  # the reminders for 14.11.2024 (Thomas is registered)


def relay_that_knows_everyone_but(project: Path, unknown: str) -> dict[str, str]:
    """A lookup table of the relay's mailboxes: every contact and the organiser but
    *unknown* into ``inbox/``, the return path's mailbox into ``bounces/``."""
    config = load_config(project / "config")
    known = {c.email.lower() for c in config.contacts.contacts} - {unknown}
    known.add(str(config.series.organiser.email).lower())
    lines = [f"{address} inbox/" for address in sorted(known)]
    # With recipient_delimiter = +, bounces+TOKEN@example.org is bounces@example.org's.
    return {"mailboxes": "\n".join([*lines, "bounces@example.org bounces/"]) + "\n"}


def kinds_in(messages: list[bytes]) -> list[tuple[str, str]]:
    """(kind, recipient) of the mails in a Maildir of the relay."""
    found = []
    for data in messages:
        message = message_from_bytes(data, policy=policy.default)
        found.append((str(message["X-Invite-Mailer-Kind"] or "summary"), message["Delivered-To"]))
    return found


async def invitation_then_reminder(
    project: Path, postfix: Postfix, dovecot: Dovecot
) -> tuple[bytes, list[bytes]]:
    """The daemon, as ``invite-mailer run`` sets it up, on a clock of its own: the
    invitation through the relay, its bounce polled from the mailbox, then the
    reminders. Returns the relay's report and what the relay delivered."""
    config = load_config(project / "config")
    moment = [datetime(2024, 10, 24, 10, 5, tzinfo=config.series.zone)]
    async with (
        Ledger.open(ledger_of(project)) as ledger,
        make_transport(config.settings) as transport,
    ):
        daemon = make_daemon(config, ledger, transport, project, lambda: moment[0])
        async with serving(daemon):
            # Eleven invitations and the summary arrive; Thomas's comes back.
            await asyncio.to_thread(postfix.delivered, 12)
            (dsn,) = await asyncio.to_thread(postfix.delivered, 1, mailbox="bounces")
            dovecot.append("INBOX", dsn)  # exactly as the relay wrote it
            await daemon.poll_bounces()  # the job's own call
            moment[0] = REMINDER.replace(tzinfo=config.series.zone)
            await daemon.run_pass()
    # Four reminders to the others registered and their summary: 17 in all.
    return dsn, await asyncio.to_thread(postfix.delivered, 17)


@pytest.mark.both_ledgers
def test_a_dsn_from_a_real_postfix_stops_the_mail_to_an_unknown_recipient(
    project: Path, dovecot: Dovecot, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The relay takes the invitation for an address it has no mailbox for, then
    sends its own delivery status notification to the VERP return path; that
    very report, in the bounce mailbox, is what the daemon's poll reads."""
    settings = {
        "virtual_mailbox_domains": "example.org, example.com",
        "virtual_mailbox_maps": "texthash:{config}/mailboxes",
        # Accept at RCPT time, fail at delivery: the relay must write the report.
        "smtpd_reject_unlisted_recipient": "no",
        "recipient_delimiter": "+",
    }
    with running_postfix(settings, relay_that_knows_everyone_but(project, THOMAS)) as postfix:
        env = {
            **dovecot.settings_env(),
            **smtp_env(
                postfix.port,
                bounces__return_path="bounces+{token}@example.org",
                unsubscribe__secret=SECRET,
            ),
        }
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        dsn, delivered = asyncio.run(invitation_then_reminder(project, postfix, dovecot))
        attempts = postfix.deliveries_to(THOMAS)
    report = message_from_bytes(dsn, policy=policy.default)
    assert report.get_content_type() == "multipart/report", dsn[:2000]
    assert report.get_param("report-type") == "delivery-status"
    assert str(report["To"]).startswith("bounces+")  # the VERP return path of the mail
    reminded = {to for kind, to in kinds_in(delivered) if kind == "reminder"}
    assert len(reminded) == 4 and THOMAS not in reminded
    # One mail to Thomas, the invitation, and the relay bounced it.
    rows = query(ledger_of(project), "SELECT kind FROM deliveries WHERE email = ?", (THOMAS,))
    kinds = [row[0] for row in rows]
    assert kinds == ["invitation"]
    assert len(attempts) == 1 and "status=bounced" in attempts[0], attempts
    assert all(b"\\Seen" in flags for flags, _ in dovecot.folder("INBOX"))

    result = invoke(["bounces", "list", "--json"], env)
    assert result.exit_code == 0, result.output
    (bounce,) = json.loads(result.stdout)["bounces"]
    assert bounce["email"] == THOMAS and bounce["kind"] == "hard"
    assert bounce["status"] == "5.1.1"
    # Postfix's own words, from its report's Diagnostic-Code.
    assert bounce["diagnostic"] == f'X-Postfix; unknown user: "{THOMAS}"', bounce
