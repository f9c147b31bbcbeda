"""Several nodes on one PostgreSQL ledger, as an operator runs them.

Real processes (``invite-mailer run`` and ``send-due``) on the real clock,
a real SMTP server on 127.0.0.1, the real PostgreSQL. The shipped series is
moved into the future with its invitation due an hour ago, to 2,000 contacts.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from support.cli import invoke, start_process, stop_processes, wait_for
from support.contacts import write_generated
from support.postgres import fresh_schema, query
from support.project import series_due_now
from support.smtp import SmtpServer, smtp_env

pytestmark = pytest.mark.system

CONTACTS = 2000
KILL_CONTACTS = 1000  # per kill round: ten of them
# Short leases: a killed node's claims come back within seconds, not minutes.
LEASE = {"state__lease_seconds": 10, "state__heartbeat_seconds": 2}


@pytest.fixture
def url() -> Iterator[str]:
    with fresh_schema() as found:
        yield found


def scale_project(project: Path, url: str, contacts: int = CONTACTS) -> None:
    """*contacts* generated contacts, the invitation due; the ledger's schema set up
    first, as an operator (or the compose profile's migrate service) does."""
    write_generated(project / "config" / "contacts.csv", contacts)
    series_due_now(project)
    done = invoke(["migrate"], {"INVITE_MAILER_STATE__URL": url})
    assert done.exit_code == 0, done.output


def invitations(server: SmtpServer) -> Counter[str]:
    """Recipient -> how many invitations arrived (the organiser's report left out)."""
    return Counter(
        rcpt for mail in list(server.received) for rcpt in mail.rcpt_tos if "@bench." in rcpt
    )


def all_sent(url: str, contacts: int = CONTACTS) -> bool:
    rows = query(
        url, "SELECT count(*) FROM deliveries WHERE kind = 'invitation' AND state = 'sent'"
    )
    return rows == [(contacts,)]


def cron(project: Path, env: dict[str, str], until: threading.Event) -> None:
    """``send-due`` again and again, as a cron job every few seconds would."""
    while not until.is_set():
        start_process(["send-due"], env, project).communicate(timeout=120)
        until.wait(0.5)


def test_two_daemons_and_a_cron_send_every_invitation_exactly_once(
    project: Path, smtp_server: SmtpServer, url: str
) -> None:
    scale_project(project, url)
    env = smtp_env(smtp_server.port, state__url=url, notify__organiser_summary="false", **LEASE)
    finished = threading.Event()
    loop = threading.Thread(target=cron, args=(project, env, finished))
    daemons = [start_process(["run"], env, project) for _ in range(2)]
    loop.start()
    try:
        wait_for(lambda: all_sent(url), 180, "every invitation", interval=0.5)
    finally:
        finished.set()
        loop.join(timeout=150)
        stop_processes(*daemons)
    received = invitations(smtp_server)
    assert len(received) == CONTACTS
    assert max(received.values()) == 1, received.most_common(3)
    holders = query(url, "SELECT claimed_by, count(*) FROM deliveries GROUP BY claimed_by")
    # The work was shared: more than one node sent invitations.
    assert len([h for h, n in holders if h]) >= 2, holders
    rows = query(url, "SELECT state, count(*) FROM deliveries GROUP BY state")
    assert dict(rows) == {"sent": CONTACTS}


@pytest.mark.parametrize("round_", range(10))
def test_a_daemon_killed_mid_pass_loses_nothing_and_duplicates_only_its_in_flight(
    project: Path, smtp_server: SmtpServer, url: str, round_: int
) -> None:
    scale_project(project, url, KILL_CONTACTS)
    env = smtp_env(smtp_server.port, state__url=url, notify__organiser_summary="false", **LEASE)
    victim, survivor = (start_process(["run"], env, project) for _ in range(2))
    try:
        kill_at = random.Random(round_).randint(100, KILL_CONTACTS - 300)
        wait_for(lambda: len(smtp_server.received) >= kill_at, 120, f"{kill_at} mails", 0.05)
        victim.kill()
        victim.communicate()
        started = time.monotonic()
        # Also the victim's in-flight mails: uncertain once their lease has run
        # out, and sent again (they may have arrived already).
        wait_for(lambda: all_sent(url, KILL_CONTACTS), 120, "the survivor's rest", interval=0.5)
        took = time.monotonic() - started
    finally:
        stop_processes(victim, survivor)
    received = invitations(smtp_server)
    twice = [rcpt for rcpt, n in received.items() if n > 1]
    # At most the victim's window of claimed mails (twice its 3 connections).
    assert len(received) == KILL_CONTACTS and max(received.values()) <= 2
    assert len(twice) <= 6, twice
    assert took < 60, f"the survivor needed {took:.0f} s"
    rows = dict(query(url, "SELECT state, count(*) FROM deliveries GROUP BY state"))
    assert rows == {"sent": KILL_CONTACTS}, rows


def test_a_rate_limit_holds_across_processes(
    project: Path, smtp_server: SmtpServer, url: str
) -> None:
    scale_project(project, url, contacts=40)
    env = smtp_env(
        smtp_server.port,
        state__url=url,
        smtp__rate_per_minute=5,
        notify__organiser_summary="false",
        **LEASE,
    )
    processes = [start_process(["run"], env, project) for _ in range(2)]
    processes.append(start_process(["send-due"], env, project))
    try:
        wait_for(lambda: len(smtp_server.received) >= 5, 60, "the first five mails", 0.2)
        # The relay's view for ten seconds more, all three waiting for places
        # that open only a minute after the first sends: no sixth mail may come.
        time.sleep(10)
    finally:
        stop_processes(*processes)
    assert len(invitations(smtp_server)) == 5
