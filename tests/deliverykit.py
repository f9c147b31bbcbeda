"""Helpers for the end-to-end delivery tests: a project copy, the CLI, what arrived.

The tests drive invite-mailer the way an operator does (a copied ``config/``
and ``templates/``, environment overrides, the command line) against the
in-process SMTP server of :mod:`smtpserver`, and judge what the server received.
"""

from __future__ import annotations

import email
import email.parser
import email.policy
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from click.testing import CliRunner, Result

from invite_mailer.cli import cli
from smtpserver import Received, SmtpServer

ROOT = Path(__file__).resolve().parent.parent
ORGANISER = "transferreihe@example.org"


def copy_project(target: Path) -> Path:
    """The shipped ``config/`` and ``templates/`` under *target*."""
    shutil.copytree(ROOT / "config", target / "config")
    shutil.copytree(ROOT / "templates", target / "templates")
    return target


def smtp_env(port: int, **overrides: object) -> dict[str, str]:
    """Environment that points the shipped settings at a plain SMTP server on 127.0.0.1.

    *overrides* are ``section__key=value`` pairs, e.g. ``smtp__timeout=1``.
    """
    env = {
        "INVITE_MAILER_TRANSPORT__KIND": "smtp",
        "INVITE_MAILER_SMTP__HOST": "127.0.0.1",
        "INVITE_MAILER_SMTP__PORT": str(port),
        "INVITE_MAILER_SMTP__SECURITY": "none",
        "INVITE_MAILER_SMTP__TIMEOUT": "5",
        "INVITE_MAILER_LIMITS__RETRY_INITIAL_SECONDS": "0.05",
        "INVITE_MAILER_LIMITS__RETRY_MAX_SECONDS": "0.4",
        "INVITE_MAILER_LIMITS__RETRY_IN_PASS_SECONDS": "15",
    }
    for key, value in overrides.items():
        env[f"INVITE_MAILER_{key.upper()}"] = str(value)
    return env


def clean_environ() -> dict[str, str]:
    """This process's environment without any INVITE_MAILER_ setting."""
    return {k: v for k, v in os.environ.items() if not k.startswith("INVITE_MAILER_")}


def invoke(args: list[str], env: Mapping[str, str]) -> Result:
    """``invite-mailer ARGS`` in this process, as the CLI runner sees it."""
    return CliRunner().invoke(cli, args, env=dict(env), catch_exceptions=False)


def subprocess_env(env: Mapping[str, str]) -> dict[str, str]:
    full = clean_environ()
    full.update(env)
    full["PYTHONUNBUFFERED"] = "1"
    full["COLUMNS"] = "200"
    return full


def run_process(
    args: list[str], env: Mapping[str, str], cwd: Path, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """``python -m invite_mailer ARGS`` as a real child process."""
    return subprocess.run(
        [sys.executable, "-m", "invite_mailer", *args],
        cwd=cwd,
        env=subprocess_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def start_process(
    args: list[str], env: Mapping[str, str], cwd: Path, *, stderr: Path | None = None
) -> subprocess.Popen[str]:
    """``python -m invite_mailer ARGS`` started in the background."""
    err: Any = subprocess.PIPE if stderr is None else stderr.open("w", encoding="utf-8")
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "invite_mailer", *args],
            cwd=cwd,
            env=subprocess_env(env),
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
    finally:
        if stderr is not None:
            err.close()


def status_json(env: Mapping[str, str], *extra: str) -> dict[str, Any]:
    result = invoke(["status", "--json", *extra], env)
    assert result.exit_code in (0, 3), result.output
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def wait_for(
    condition: Callable[[], object], timeout: float, what: str, interval: float = 0.02
) -> None:
    """Poll *condition* until it is true; fail with *what* after *timeout* seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def free_port() -> int:
    """A port on 127.0.0.1 where nothing listens (right now)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def server_on(port: int) -> SmtpServer:
    """A started test server on a given port (the relay coming back where it was)."""
    server = SmtpServer()
    # The fixture binds port 0; the relay comes back at its old address instead.
    server._controller.port = port
    server.start()
    return server


@dataclass(frozen=True)
class Mail:
    """One message as the server received it, reduced to what the tests judge."""

    kind: str  # invitation, reminder, followup, or "summary" for the organiser's report
    event: str  # '' for the invitation
    to: str  # the envelope recipient, lower case
    subject: str
    message_id: str
    data: bytes = field(repr=False)

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.kind, self.event, self.to)

    @property
    def body(self) -> str:
        """The plain-text part, decoded."""
        message = email.message_from_bytes(self.data, policy=email.policy.default)
        text = message.get_body(("plain",))  # type: ignore[attr-defined]
        return "" if text is None else str(text.get_content())


_HEADERS = email.parser.BytesHeaderParser(policy=email.policy.default)
SUMMARY_LABELS = {"Einladung": "invitation", "Erinnerung": "reminder", "Nachbereitung": "followup"}


def parse(received: Received, event_dates: Mapping[str, str] | None = None) -> Mail:
    """Turn one received message into a :class:`Mail`.

    The organiser's summary carries no invite-mailer headers; its subject names
    the kind and, for a date, ``(DD.MM.YYYY)``, which *event_dates* (event id
    → ``DD.MM.YYYY``) maps back to the event.
    """
    assert len(received.rcpt_tos) == 1, received.rcpt_tos
    # Headers only: the tests read thousands of messages.
    message = _HEADERS.parsebytes(received.data)
    subject = str(message["Subject"])
    kind = str(message.get("X-Invite-Mailer-Kind", ""))
    event = str(message.get("X-Invite-Mailer-Event", ""))
    if not kind:
        assert subject.startswith("Versandbericht: "), subject
        label = subject.removeprefix("Versandbericht: ").split(" ", 1)[0]
        kind = "summary:" + SUMMARY_LABELS[label]
        for event_id, day in (event_dates or {}).items():
            if f"({day})" in subject:
                event = event_id
    return Mail(
        kind=kind,
        event=event,
        to=received.rcpt_tos[0].lower(),
        subject=subject,
        message_id=str(message["Message-ID"]),
        data=received.data,
    )


def mails(received: Iterable[Received], event_dates: Mapping[str, str] | None = None) -> list[Mail]:
    return [parse(r, event_dates) for r in received]


def split(all_mails: Iterable[Mail]) -> tuple[list[Mail], list[Mail]]:
    """(mails to contacts, summaries to the organiser)."""
    to_contacts, summaries = [], []
    for mail in all_mails:
        (summaries if mail.kind.startswith("summary:") else to_contacts).append(mail)
    return to_contacts, summaries


def duplicates(keys: Iterable[Any]) -> dict[Any, int]:
    return {key: n for key, n in Counter(keys).items() if n > 1}


def keep_only_first_event(config: Path) -> None:
    """Cut the copied series down to its first date: fewer calendar files, cheaper mails."""
    path = config / "series.yaml"
    text = path.read_text(encoding="utf-8")
    first = text.index("  - id: ")
    second = text.index("  - id: ", first + 1)
    path.write_text(text[:second] + text[text.index("mailings:") :], encoding="utf-8")


def write_contacts(path: Path, rows: Iterable[tuple[str, str, str, str, str]]) -> None:
    """A contacts.csv: (email, anrede, vorname, nachname, anmeldungen) per row."""
    lines = ["email;anrede;titel;vorname;nachname;organisation;anmeldungen"]
    for address, anrede, first, last, registrations in rows:
        lines.append(f"{address};{anrede};;{first};{last};Testorganisation;{registrations}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
