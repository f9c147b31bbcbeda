"""``send-due --json`` tells mails a full quota held back from mails that will not go.

A relay's hour or day quota stops a pass cleanly; what it held back goes out
when the quota reopens. The report calls those mails ``deferred`` (in total
and per mailing), never ``skipped``. The day passes by moving the ledger's
record of the sends back a day, which is what the quota counts.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from support.cli import invoke
from support.smtp import SmtpServer, smtp_env

pytestmark = pytest.mark.slow  # whole send-due passes against a real SMTP server


def send_due(env: dict[str, str], now: str) -> dict[str, object]:
    result = invoke(["send-due", "--now", now, "--json"], env)
    assert result.exit_code == 0, result.output
    data: dict[str, object] = json.loads(result.stdout)
    return data


def a_day_later(project: Path) -> None:
    with sqlite3.connect(project / "state" / "invite-mailer.db") as db:
        db.execute("UPDATE sends SET at = at - 86460")
    db.close()


def test_mails_held_back_by_a_day_quota_are_deferred_not_skipped(
    project: Path, smtp_server: SmtpServer
) -> None:
    env = smtp_env(smtp_server.port, smtp__rate_per_day=5, notify__organiser_summary="false")
    seen = []
    for now in ("2024-10-24T10:05", "2024-10-24T10:06"):  # the second at once: nothing goes
        data = send_due(env, now)
        seen.append((data["sent"], data["deferred"], data["mailings"]))
    assert seen == [
        (5, 7, {"invitation:series": {"sent": 5, "deferred": 7}}),
        (0, 7, {"invitation:series": {"deferred": 7}}),
    ]
    a_day_later(project)
    data = send_due(env, "2024-10-25T10:05")
    assert (data["sent"], data["deferred"]) == (5, 2), data
    a_day_later(project)
    data = send_due(env, "2024-10-26T10:05")
    assert (data["sent"], data["deferred"], data["quota_reached"]) == (2, 0, None), data
    assert data["mailings"] == {"invitation:series": {"sent": 2}}
    assert len(smtp_server.received) == 12


def test_the_line_says_how_many_wait_for_the_quota(project: Path, smtp_server: SmtpServer) -> None:
    env = smtp_env(smtp_server.port, smtp__rate_per_day=5, notify__organiser_summary="false")
    result = invoke(["send-due", "--now", "2024-10-24T10:05"], env)
    assert result.exit_code == 0, result.output
    assert "5 sent, 0 failed, 0 to retry later, 7 deferred" in result.stdout
    assert "smtp.rate_per_day = 5 reached: the 7 deferred wait until" in result.stdout


def test_without_a_quota_nothing_is_deferred(project: Path, smtp_server: SmtpServer) -> None:
    env = smtp_env(smtp_server.port, notify__organiser_summary="false")
    data = send_due(env, "2024-10-24T10:05")
    assert (data["sent"], data["deferred"], data["quota_reached"]) == (12, 0, None), data
    assert data["mailings"] == {"invitation:series": {"sent": 12}}


def test_a_temporary_failure_waiting_for_its_retry_stays_a_retry_at_the_quota(
    project: Path, smtp_server: SmtpServer
) -> None:
    # Ten places a day, twelve contacts. Jana's 451 takes a place; while her
    # retry waits (a few seconds), nine others fill the day and two are held
    # back. She failed for a moment and is retried later: not held back untried.
    jana = "jana.mueller@example.org"  # the first contact: her 451 comes first
    smtp_server.behaviour.reject_recipients[jana] = "451 4.3.0 Try again later"
    env = smtp_env(
        smtp_server.port,
        smtp__rate_per_day=10,
        limits__retry_initial_seconds=6,
        limits__retry_max_seconds=6,
        notify__organiser_summary="false",
    )
    data = send_due(env, "2024-10-24T10:05")
    assert (data["sent"], data["failed"], data["retry_later"], data["deferred"]) == (9, 0, 1, 2)
    assert data["mailings"] == {"invitation:series": {"sent": 9, "retry": 1, "deferred": 2}}
