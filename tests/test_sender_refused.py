"""A relay that refuses our sender must not fail every recipient for good."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from invite_mailer.cli import cli
from support.project import copy_project
from support.smtp import SmtpServer, smtp_env


@pytest.mark.slow
def test_sender_refused_stops_the_pass_and_marks_nobody_failed(
    smtp_server: SmtpServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    copy_project(tmp_path)
    monkeypatch.chdir(tmp_path)
    env = smtp_env(smtp_server.port)
    smtp_server.behaviour.temp_fail = 1000
    smtp_server.behaviour.temp_fail_reply = (
        "553 5.7.1 <transferreihe@example.org>: Sender address rejected"
    )
    runner = CliRunner()

    result = runner.invoke(cli, ["send-due", "--now", "2024-10-24T10:05"], env=env)
    assert result.exit_code == 3, result.output
    assert "refuses the sender address" in result.output
    assert "553 5.7.1" in result.output
    assert smtp_server.received == []

    status = runner.invoke(cli, ["status", "--json", "--now", "2024-10-24T10:06"], env=env)
    data = json.loads(status.output)
    assert data["failed"] == []
    invitation = next(m for m in data["mailings"] if m["kind"] == "invitation")
    assert invitation["sent"] == 0 and invitation["outstanding"] == 12

    # The relay is fixed: the next run delivers everything.
    smtp_server.behaviour.temp_fail = 0
    result = runner.invoke(cli, ["send-due", "--now", "2024-10-24T10:07"], env=env)
    assert result.exit_code == 0, result.output
    invitations = [m for m in smtp_server.received if m.rcpt_tos != ("transferreihe@example.org",)]
    assert len(invitations) == 12
