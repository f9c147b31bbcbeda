"""``send-due`` against a relay that misbehaves: every mail arrives once, or is reported.

The shipped config (12 contacts, all invited) is replayed at the invitation
moment against the in-process SMTP server, which is told per test to answer
4xx or 5xx, stall, drop the line or not to listen at all.
"""

from __future__ import annotations

import email
import email.policy
import json
import time
from pathlib import Path
from typing import Any

import pytest

from invite_mailer.delivery.transport import outbox_name
from invite_mailer.mail import mime
from support.cli import invoke, run_process, status_json
from support.mails import ORGANISER, duplicates, mails, split
from support.postgres import query
from support.project import ledger_of
from support.smtp import SmtpServer, free_port, server_on, smtp_env

pytestmark = pytest.mark.both_ledgers

NOW = "2024-10-24T10:05"
EVERYONE = {
    "jana.mueller@example.org",
    "thomas.schmidt@example.org",
    "alex.meyer@example.org",
    "sabine.gross@example.org",
    "juergen.weiss@example.org",
    "oezlem.yilmaz@example.org",
    "bjoern.oestreich@example.org",
    "kim.schaefer@example.org",
    "maria.koenig@example.org",
    "klaus-dieter.fuchs@example.org",
    "info@example.com",
    "lena.hoffmann@example.com",
}


def send_due(env: dict[str, str], now: str = NOW) -> tuple[int, dict[str, Any], str]:
    result = invoke(["send-due", "--now", now, "--json"], env)
    return result.exit_code, json.loads(result.stdout), result.stderr


def recipients(server: SmtpServer) -> list[str]:
    to_contacts, _ = split(mails(server.received))
    return [m.to for m in to_contacts]


def summaries(server: SmtpServer) -> list[str]:
    return [m.to for m in split(mails(server.received))[1]]


def ledger_states(project: Path) -> dict[str, str]:
    rows = query(
        ledger_of(project), "SELECT email, state FROM deliveries WHERE kind = 'invitation'"
    )
    return dict(rows)


@pytest.mark.slow
@pytest.mark.parametrize(
    "reply",
    [
        "421 4.7.0 mx.test.invalid Service not available, closing channel",
        "451 4.3.0 Try again later",
    ],
    ids=["421", "451"],
)
def test_temporary_refusals_are_retried_within_the_pass(
    project: Path, smtp_server: SmtpServer, reply: str
) -> None:
    smtp_server.behaviour.temp_fail = 6
    smtp_server.behaviour.temp_fail_reply = reply
    code, data, _ = send_due(smtp_env(smtp_server.port))
    assert code == 0
    assert (data["sent"], data["failed"], data["retry_later"]) == (12, 0, 0), data
    got = recipients(smtp_server)
    assert sorted(got) == sorted(EVERYONE) and not duplicates(got)
    assert summaries(smtp_server) == [ORGANISER]
    assert smtp_server.behaviour.temp_fail == 0  # every refusal was used up
    assert set(ledger_states(project).values()) == {"sent"}


@pytest.mark.slow
def test_a_refused_recipient_is_failed_with_the_servers_answer(
    project: Path, smtp_server: SmtpServer
) -> None:
    answer = "550 5.1.1 <alex.meyer@example.org>: Recipient address rejected: User unknown"
    smtp_server.behaviour.reject_recipients["alex.meyer@example.org"] = answer
    env = smtp_env(smtp_server.port)
    result = invoke(["send-due", "--now", NOW], env)
    assert result.exit_code == 3, result.output
    assert "11 sent (+1 report to the organiser), 1 failed, 0 to retry later" in result.stdout
    assert "alex.meyer@example.org" in result.stderr and "User unknown" in result.stderr
    assert sorted(recipients(smtp_server)) == sorted(EVERYONE - {"alex.meyer@example.org"})
    # The mailing is complete (one failure is an outcome): the organiser is told.
    (report,) = split(mails(smtp_server.received))[1]
    assert "Fehlgeschlagen:       1" in report.body

    failed = invoke(["status", "--failed"], env)
    assert failed.exit_code == 3
    assert "alex.meyer@example.org" in failed.stdout and "550 5.1.1" in failed.stdout
    data = status_json(env, "--failed")
    assert [(d["email"], d["answer"]) for d in data["failed"]] == [
        ("alex.meyer@example.org", answer)
    ]

    # Permanent means permanent: the next run neither retries it nor fails again.
    del smtp_server.behaviour.reject_recipients["alex.meyer@example.org"]
    code, data, _ = send_due(env, "2024-10-25T10:00")
    assert code == 0 and data["sent"] == 0
    assert len(smtp_server.received) == 12


@pytest.mark.slow
def test_a_message_refused_at_data_is_failed(project: Path, smtp_server: SmtpServer) -> None:
    smtp_server.behaviour.data_fail = 1
    smtp_server.behaviour.data_reply = "554 5.7.1 Message rejected as spam"
    env = smtp_env(smtp_server.port)
    code, data, _ = send_due(env)
    assert code == 3
    assert (data["sent"], data["failed"]) == (11, 1), data
    (failure,) = data["failures"]
    assert failure["answer"] == "554 5.7.1 Message rejected as spam"
    got = recipients(smtp_server)
    assert not duplicates(got)
    assert set(got) == EVERYONE - {failure["email"]}
    assert ledger_states(project)[failure["email"]] == "failed"


@pytest.mark.slow
@pytest.mark.parametrize("stall_at", ["MAIL", "DATA"])
def test_a_stall_past_the_timeout_is_retried(
    project: Path, smtp_server: SmtpServer, stall_at: str
) -> None:
    smtp_server.behaviour.stall_at = stall_at
    smtp_server.behaviour.stall = 1
    smtp_server.behaviour.stall_seconds = 3
    env = smtp_env(smtp_server.port, smtp__timeout=1)
    started = time.monotonic()
    code, data, stderr = send_due(env)
    assert code == 0
    assert (data["sent"], data["failed"], data["retry_later"]) == (12, 0, 0), data
    assert time.monotonic() - started < 6
    got = recipients(smtp_server)
    assert set(got) == EVERYONE
    # After the data went out a timeout leaves it open whether the relay took
    # the mail; only that one may arrive twice.
    assert len(duplicates(got)) <= (1 if stall_at == "DATA" else 0)
    assert "temporary failure" in stderr


@pytest.mark.slow
def test_a_connection_dropped_after_data_is_retried(project: Path, smtp_server: SmtpServer) -> None:
    smtp_server.behaviour.drop_after_data = 1
    code, data, stderr = send_due(smtp_env(smtp_server.port))
    assert code == 0
    assert (data["sent"], data["failed"], data["retry_later"]) == (12, 0, 0), data
    got = recipients(smtp_server)
    assert set(got) == EVERYONE
    assert sum(n - 1 for n in duplicates(got).values()) <= 1
    assert "may have been delivered" in stderr


@pytest.mark.slow
def test_a_relay_that_is_down_leaves_everything_for_the_next_run(project: Path) -> None:
    port = free_port()
    env = smtp_env(port, limits__retry_in_pass_seconds=0.5)
    result = invoke(["send-due", "--now", NOW], env)
    assert result.exit_code == 0, result.output
    assert "0 sent, 0 failed, 12 to retry later" in result.stdout, result.stdout
    assert "could not connect" in result.stderr

    states = ledger_states(project)
    assert set(states) == EVERYONE and set(states.values()) == {"pending"}
    status = status_json(env, "--now", NOW)
    assert {d["email"] for d in status["retrying"]} == EVERYONE
    assert all("could not connect" in d["answer"] for d in status["retrying"])
    invitation = next(m for m in status["mailings"] if m["id"] == "invitation:series")
    assert (invitation["sent"], invitation["outstanding"]) == (0, 12)

    # Run again at once (cron every minute, say): they are still backing off.
    again = invoke(["send-due", "--now", NOW], env)
    assert again.exit_code == 0, again.output
    assert "0 sent, 0 failed, 12 to retry later" in again.stdout, again.stdout
    assert "could not connect" not in again.stderr

    server = server_on(port)
    try:
        code, data, _ = send_due(env, "2024-10-24T10:20")
        assert code == 0
        assert (data["sent"], data["failed"], data["retry_later"]) == (12, 0, 0), data
        got = recipients(server)
        assert sorted(got) == sorted(EVERYONE)
        assert summaries(server) == [ORGANISER]
    finally:
        server.stop()
    assert set(ledger_states(project).values()) == {"sent"}


@pytest.mark.slow
def test_an_unexpected_transport_error_neither_hangs_the_pass_nor_loses_the_mail(
    project: Path,
) -> None:
    # The shipped outbox transport; where one mail's file should go, a folder
    # is in the way (as a full or broken disk would fail a write).
    code = invoke(
        ["preview", "invitation", "--contact", "alex.meyer@example.org", "--out", "preview"], {}
    ).exit_code
    assert code == 0
    (eml,) = (project / "preview").glob("*.eml")
    message = email.message_from_bytes(eml.read_bytes(), policy=email.policy.default)
    blocker = project / "outbox" / f"{outbox_name(mime.wire(message))}.eml"
    blocker.mkdir(parents=True)

    first = run_process(["send-due", "--now", NOW, "--json"], {}, project, timeout=30)
    assert first.returncode == 0, first.stderr
    data = json.loads(first.stdout)
    assert (data["sent"], data["failed"], data["retry_later"]) == (11, 0, 1), data
    assert "IsADirectoryError" in first.stderr
    status = status_json({}, "--now", NOW)
    # The write failed before the mail left: it is retried, never uncertain.
    assert status["uncertain"] == []
    assert [d["email"] for d in status["retrying"]] == ["alex.meyer@example.org"]
    assert "IsADirectoryError" in status["retrying"][0]["answer"]

    blocker.rmdir()
    second = run_process(["send-due", "--now", "2024-10-24T10:10", "--json"], {}, project)
    assert second.returncode == 0, second.stderr
    assert json.loads(second.stdout)["sent"] == 1
    assert blocker.is_file()
    assert status_json({}, "--now", NOW)["uncertain"] == []


@pytest.mark.slow
def test_a_summary_refused_for_a_moment_is_sent_by_a_later_run(
    project: Path, smtp_server: SmtpServer
) -> None:
    smtp_server.behaviour.reject_recipients[ORGANISER] = "452 4.2.2 Mailbox full, try later"
    env = smtp_env(smtp_server.port)
    code, data, _ = send_due(env)
    assert code == 0 and data["sent"] == 12
    assert summaries(smtp_server) == []

    del smtp_server.behaviour.reject_recipients[ORGANISER]
    code, data, _ = send_due(env, "2024-10-24T10:30")
    assert code == 0 and data["sent"] == 0
    assert summaries(smtp_server) == [ORGANISER]
    code, data, _ = send_due(env, "2024-10-24T11:00")
    assert summaries(smtp_server) == [ORGANISER]
    assert sorted(recipients(smtp_server)) == sorted(EVERYONE)
