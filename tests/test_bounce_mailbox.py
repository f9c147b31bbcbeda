"""The bounce mailbox over IMAP, against a real Dovecot on 127.0.0.1.

The shipped invitation goes out (``send-due`` on the outbox); bounces of it in
the documented Postfix, Exchange Online and Gmail formats, and an
out-of-office reply, are put into the mailbox with IMAP APPEND; then
``invite-mailer bounces fetch`` reads them as the daemon's poll does.
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
from invite_mailer.service.daemon import BOUNCES_JOB, Daemon
from support.bounces import DATA, bounce_of, sent_invitations
from support.cli import invoke
from support.dovecot import Dovecot, running_dovecot
from support.mails import mails
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
        Ledger.open(project / "state" / "invite-mailer.db") as ledger,
        make_transport(config.settings) as transport,
    ):
        daemon = Daemon(
            config,
            ledger,
            transport,
            config_dir=project / "config",
            templates_dir=None,
            clock=lambda: moment[0],
            sweep_seconds=3600,
        )
        task = asyncio.create_task(daemon.serve())
        try:
            async with asyncio.timeout(60):
                await daemon.caught_up.wait()
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
        finally:
            daemon.request_stop()
            async with asyncio.timeout(30):
                await task
    reminded = {m.to for m in mails(smtp_server.received[before:]) if m.kind == "reminder"}
    assert reminded and JANA not in reminded
    assert all(b"\\Seen" in flags for flags, _ in dovecot.folder("INBOX"))
