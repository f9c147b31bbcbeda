"""Delivery under hostile settings, relays, ledgers and signals.

Each test reproduces one way delivery went wrong: a password sent in clear
text, an IDN address refused, a foreign ledger taken for an empty one, a
setup error recorded as "uncertain", a rate limit forgotten on restart, a
header broken by a line break in a setting. Real SMTP servers on 127.0.0.1,
real files, real SQLite, real processes and signals.

The tests of what the ledger records run on both engines (``both_ledgers``);
those of the SQLite file itself (a full state disk, sqlite:/// URLs, foreign,
damaged and locked files) and of one process's rate limiter on its own clock
stay on SQLite.
"""

from __future__ import annotations

import asyncio
import contextlib
import email
import email.policy
import json
import logging
import os
import re
import shutil
import signal
import sqlite3
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from email.message import EmailMessage
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from aiosmtpd.smtp import AuthResult

from invite_mailer.delivery.dispatch import Dispatcher
from invite_mailer.delivery.ledger import Ledger
from invite_mailer.delivery.ratelimit import RateLimiter
from invite_mailer.delivery.transport import OutboxTransport, SmtpTransport, UncertainFailure
from invite_mailer.errors import PermanentFailure, SetupFailure, TemporaryFailure
from invite_mailer.inputs.config import load_config
from invite_mailer.inputs.settings import SmtpSettings
from invite_mailer.mail import mime
from invite_mailer.mail.mime import Wire
from support.cli import invoke, start_process, status_json, wait_for
from support.postgres import ledger_written, query
from support.project import clean_environ, ledger_of, series_due_now
from support.smtp import SmtpServer, smtp_env

NOW = "2024-10-24T10:05"
CONTACTS = 12  # in the shipped contacts.csv
BERLIN = ZoneInfo("Europe/Berlin")


def ledger_file(project: Path) -> Path:
    return project / "state" / "invite-mailer.db"


def states(project: Path) -> dict[str, str]:
    """Email → state of the invitation rows in the ledger."""
    rows = query(
        ledger_of(project), "SELECT email, state FROM deliveries WHERE kind = 'invitation'"
    )
    return dict(rows)


def outbox(project: Path) -> list[Path]:
    folder = project / "outbox"
    return sorted(folder.glob("*.eml")) if folder.is_dir() else []


class Logins:
    """An aiosmtpd authenticator that records every login and accepts one password."""

    def __init__(self, password: bytes = b"richtig") -> None:
        self.password = password
        self.seen: list[tuple[bytes, bytes]] = []

    def __call__(self, server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> Any:
        self.seen.append((data.login, data.password))
        # handled=False: aiosmtpd answers "535 5.7.8" itself.
        return AuthResult(success=data.password == self.password, handled=False)


def auth_server(factory: Any, logins: Logins, **kwargs: Any) -> SmtpServer:
    """A plain-text relay that offers AUTH without TLS (as a careless relay does)."""
    server: SmtpServer = factory(authenticator=logins, auth_require_tls=False, **kwargs)
    return server


def lines_with(output: str, needle: str) -> int:
    return sum(1 for line in output.splitlines() if needle in line)


# -- finding: the password over plain text ------------------------------------------


def test_validate_refuses_a_password_over_a_plaintext_connection(project: Path) -> None:
    env = {"INVITE_MAILER_SMTP__SECURITY": "none", "INVITE_MAILER_SMTP__USERNAME": "transfer"}
    result = invoke(["validate"], env)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert "config/settings.toml" in result.stderr
    assert "unencrypted" in result.stderr
    assert "allow_plaintext_auth" in result.stderr


@pytest.mark.slow
@pytest.mark.both_ledgers
def test_send_due_never_sends_the_password_in_clear_text(
    project: Path, smtp_server_factory: Any
) -> None:
    logins = Logins()
    server = auth_server(smtp_server_factory, logins)
    env = smtp_env(server.port, smtp__username="transfer", smtp__password="richtig")
    result = invoke(["send-due", "--now", NOW], env)
    assert result.exit_code == 1, result.output
    assert "unencrypted" in result.stderr
    assert logins.seen == [] and server.received == [] and server.connections == 0
    assert not ledger_written(ledger_of(project)) or states(project) == {}


@pytest.mark.slow
def test_plaintext_auth_only_when_explicitly_allowed(
    project: Path, smtp_server_factory: Any
) -> None:
    logins = Logins()
    server = auth_server(smtp_server_factory, logins)
    env = smtp_env(
        server.port,
        smtp__username="transfer",
        smtp__password="richtig",
        smtp__allow_plaintext_auth="true",
    )
    result = invoke(["send-due", "--now", NOW, "--json"], env)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["sent"] == CONTACTS
    assert logins.seen and all(seen == (b"transfer", b"richtig") for seen in logins.seen)


@pytest.mark.slow
@pytest.mark.both_ledgers
def test_starttls_stripped_by_the_relay_is_refused_before_any_login(
    project: Path, smtp_server_factory: Any
) -> None:
    # A relay (or a man in the middle) that does not announce STARTTLS.
    logins = Logins()
    server = auth_server(smtp_server_factory, logins)
    env = smtp_env(
        server.port, smtp__security="starttls", smtp__username="transfer", smtp__password="x"
    )
    result = invoke(["send-due", "--now", NOW], env)
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output
    assert lines_with(result.stderr, "does not offer STARTTLS") == 1, result.stderr
    assert logins.seen == [] and server.received == []
    assert set(states(project).values()) == {"pending"}
    assert status_json(env, "--now", NOW)["uncertain"] == []


# -- finding: setup failures are no "uncertain" mails ----------------------------------


@pytest.mark.slow
def test_validate_reports_a_missing_ca_file(project: Path) -> None:
    env = {"INVITE_MAILER_SMTP__CA_FILE": "/nonexistent/internal-ca.pem"}
    result = invoke(["validate"], env)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert "config/settings.toml" in result.stderr
    assert "smtp.ca_file" in result.stderr and "does not exist" in result.stderr
    assert "INVITE_MAILER_SMTP__CA_FILE" in result.stderr

    (project / "certs").mkdir()
    result = invoke(["validate"], {"INVITE_MAILER_SMTP__CA_FILE": "certs"})
    assert result.exit_code == 1 and "not a regular file" in result.stderr, result.output


def test_send_test_with_a_missing_ca_file_is_one_clear_message(project: Path) -> None:
    env = smtp_env(1, smtp__security="starttls", smtp__ca_file="missing-ca.pem")
    result = invoke(["send-test", "invitation", "--to", "test@example.org"], env)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and "FileNotFoundError" not in result.output
    assert "smtp.ca_file" in result.stderr


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl program")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2"]
        + ["-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"]
        + ["-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )
    return cert, key


@pytest.mark.slow
@pytest.mark.both_ledgers
def test_a_certificate_failure_stops_the_pass_once_and_leaves_every_mail_pending(
    project: Path,
    smtp_server_factory: Any,
    certificate: tuple[Path, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*certificate)
    server = smtp_server_factory(tls_context=context)
    # The test server logs each refused handshake with its own traceback.
    monkeypatch.setattr(logging.getLogger("mail.log"), "disabled", True)
    env = smtp_env(server.port, smtp__security="starttls")
    result = invoke(["send-due", "--now", NOW], env)
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output
    # One message for the pass, not one per mail, naming the likely cause.
    assert lines_with(result.stderr, "certificate verification failed") == 1, result.stderr
    assert "smtp.ca_file" in result.stderr
    assert server.received == []
    assert set(states(project).values()) == {"pending"}
    status = status_json(env, "--now", NOW)
    assert status["uncertain"] == []

    # With the CA file the same ledger goes out in full.
    fixed = smtp_env(server.port, smtp__security="starttls", smtp__ca_file=str(certificate[0]))
    again = invoke(["send-due", "--now", "2024-10-24T10:10", "--json"], fixed)
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["sent"] == CONTACTS


@pytest.mark.slow
@pytest.mark.both_ledgers
def test_a_rejected_password_says_authentication_failed(
    project: Path, smtp_server_factory: Any
) -> None:
    logins = Logins(password=b"richtig")
    server = auth_server(smtp_server_factory, logins)
    env = smtp_env(
        server.port,
        smtp__username="transfer",
        smtp__password="falsch",
        smtp__allow_plaintext_auth="true",
    )
    result = invoke(["send-due", "--now", NOW], env)
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output
    assert lines_with(result.stderr, "authentication failed (535") == 1, result.stderr
    assert "could not connect" not in result.stderr
    assert server.received == []
    assert set(states(project).values()) == {"pending"}
    assert status_json(env, "--now", NOW)["uncertain"] == []

    test = invoke(["send-test", "invitation", "--to", "test@example.org"], env)
    assert test.exit_code != 0 and "Traceback" not in test.output
    assert "authentication failed (535" in test.stderr


@pytest.mark.slow
@pytest.mark.both_ledgers
def test_an_outbox_that_is_a_file_stops_with_one_message(project: Path) -> None:
    (project / "outbox").write_text("not a folder\n", encoding="utf-8")
    result = invoke(["send-due", "--now", NOW], {})
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert lines_with(result.stderr, "cannot write to the outbox folder") == 1, result.stderr
    assert "transport.outbox_dir" in result.stderr
    assert not ledger_written(ledger_of(project)) or set(states(project).values()) <= {"pending"}


@pytest.mark.slow
@pytest.mark.both_ledgers
async def test_an_outbox_that_fails_mid_pass_gives_every_mail_back(project: Path) -> None:
    config = load_config(project / "config", None)
    folder = project / "outbox"
    async with Ledger.open(ledger_of(project)) as ledger:
        async with OutboxTransport(folder) as transport:
            # The folder goes away under the running pass (a disk unmounted,
            # a folder replaced by a file).
            folder.rmdir()
            folder.write_text("in the way\n", encoding="utf-8")
            now = datetime.fromisoformat(NOW).replace(tzinfo=BERLIN)
            with pytest.raises(SetupFailure, match="cannot write to the outbox folder"):
                await Dispatcher(config, ledger, transport).run_pass(now)
        rows = await ledger.deliveries(config.series.id)
    assert rows and {row.state.value for row in rows} == {"pending"}


@pytest.mark.slow
def test_a_full_disk_for_the_ledger_stops_the_pass_with_one_message(project: Path) -> None:
    # Every file this process writes may grow to 100 kB: the ledger fills up
    # during the pass (SQLite: "database or disk is full"), as on a full disk.
    # (Batched commits write fewer WAL frames than one commit per change: at
    # 150 kB, twelve mails no longer fill it.)
    first = invoke(["send-due", "--now", "2024-10-01T10:00"], {})  # creates the ledger
    assert first.exit_code == 0, first.output
    script = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))\n"
        "from invite_mailer.cli import main\n"
        "sys.argv = ['invite-mailer', 'send-due', '--now', sys.argv[1]]\n"
        "sys.exit(main())\n"
    )
    env = clean_environ()
    env.update(PYTHONUNBUFFERED="1", INVITE_MAILER_SMTP__MAX_CONNECTIONS="1")
    run = subprocess.run(
        [sys.executable, "-c", script, NOW],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode != 0, run.stdout + run.stderr
    assert "Traceback" not in run.stderr, run.stderr
    assert lines_with(run.stderr, "error:") == 1, run.stderr
    assert "state database" in run.stderr


@contextlib.contextmanager
def full_disk(folder: Path, size: str) -> Iterator[Path]:
    """*folder* as a tmpfs of *size*: writes in it end with "No space left on device"."""
    folder.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode:
        reason = f"cannot mount a small tmpfs here: {done.stderr.strip()}"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


@pytest.mark.slow
@pytest.mark.both_ledgers
def test_a_full_outbox_disk_stops_the_pass_with_exit_75(project: Path) -> None:
    # Room for a few mails, even when several are written at once, not for all.
    with full_disk(project / "outbox", "200k"):
        result = invoke(["send-due", "--now", NOW], {})
        written = len(outbox(project))
    assert result.exit_code == 75, result.output
    assert "Traceback" not in result.output
    assert lines_with(result.stderr, "cannot write to the outbox folder") == 1, result.stderr
    assert "No space left on device" in result.stderr
    assert 0 < written < CONTACTS
    rows = states(project)
    assert list(rows.values()).count("sent") == written
    assert set(rows.values()) <= {"sent", "pending"}


@pytest.mark.slow
def test_a_full_state_disk_stops_the_pass_with_exit_75(project: Path) -> None:
    with full_disk(project / "state", "20k"):
        result = invoke(["send-due", "--now", NOW], {})
    assert result.exit_code == 75, result.output
    assert "Traceback" not in result.output
    assert lines_with(result.stderr, "error:") == 1, result.stderr
    assert "cannot write the state database" in result.stderr
    assert "free disk space" in result.stderr


# -- finding: IDN addresses on a relay without SMTPUTF8 ----------------------------------


def idn_message(to: str) -> Wire:
    message = EmailMessage(policy=email.policy.SMTP)
    message["From"] = "transferreihe@example.org"
    message["To"] = "Bücherei <info@xn--bcher-kva.de>"
    message["Subject"] = "Einladung"
    message["Message-ID"] = f"<{abs(hash(to))}@example.org>"
    message.set_content("Guten Tag,\n")
    return mime.wire(message)


def plain_settings(server: SmtpServer) -> SmtpSettings:
    return SmtpSettings(host=server.host, port=server.port, security="none", timeout=5)


async def test_an_idn_domain_goes_out_in_ascii_form_without_smtputf8(
    smtp_server_factory: Any,
) -> None:
    smtp_server = smtp_server_factory(enable_SMTPUTF8=False)
    async with SmtpTransport(plain_settings(smtp_server)) as transport:
        await transport.send(
            idn_message("info@bücher.de"),
            sender="transferreihe@example.org",
            recipients=["info@bücher.de"],
        )
    (received,) = smtp_server.received
    assert received.rcpt_tos == ("info@xn--bcher-kva.de",)
    assert "SMTPUTF8" not in received.mail_options


@pytest.mark.parametrize("address", ["info@straße.de", "a@faß.de"])
async def test_the_envelope_names_the_domain_the_to_header_names(
    smtp_server_factory: Any, address: str
) -> None:
    # IDNA 2003 (Python's codec) turns "ß" into "ss": another domain, another owner.
    from invite_mailer.mail.mime import header_address

    smtp_server = smtp_server_factory(enable_SMTPUTF8=False)
    async with SmtpTransport(plain_settings(smtp_server)) as transport:
        await transport.send(
            idn_message(address), sender="transferreihe@example.org", recipients=[address]
        )
    (received,) = smtp_server.received
    assert received.rcpt_tos == (header_address(address),)
    assert "ss." not in received.rcpt_tos[0]


async def test_a_non_ascii_local_part_fails_only_that_recipient(
    smtp_server_factory: Any,
) -> None:
    smtp_server = smtp_server_factory(enable_SMTPUTF8=False)
    async with SmtpTransport(plain_settings(smtp_server)) as transport:
        with pytest.raises(PermanentFailure, match="does not support SMTPUTF8; this address"):
            await transport.send(
                idn_message("jürgen@example.org"),
                sender="transferreihe@example.org",
                recipients=["jürgen@example.org"],
            )
        # The connection and the pass go on.
        await transport.send(
            idn_message("info@example.org"),
            sender="transferreihe@example.org",
            recipients=["info@example.org"],
        )
    assert [r.rcpt_tos for r in smtp_server.received] == [("info@example.org",)]


async def test_a_relay_with_smtputf8_gets_the_address_as_written(
    smtp_server_factory: Any,
) -> None:
    server = smtp_server_factory(enable_SMTPUTF8=True)
    async with SmtpTransport(plain_settings(server)) as transport:
        await transport.send(
            idn_message("jürgen@bücher.de"),
            sender="transferreihe@example.org",
            recipients=["jürgen@bücher.de"],
        )
    (received,) = server.received
    assert received.rcpt_tos == ("jürgen@bücher.de",)
    assert "SMTPUTF8" in received.mail_options


# -- finding: CR/LF and other damage in [sender] settings --------------------------------


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("SENDER__UNSUBSCRIBE_URL", "https://example.org/abmelden\r\nBcc: victim@evil.example"),
        ("SENDER__ADDRESS", "Transferreihe <transferreihe@example.org>\nBcc: x@evil.example"),
        ("SENDER__REPLY_TO", "transferreihe@example.org\rBcc: x@evil.example"),
        ("SENDER__UNSUBSCRIBE_MAILTO", "abmeldung@example.org\x1b[2J"),
        ("SENDER__UNSUBSCRIBE_URL", "http://example.org/abmelden"),
        ("SENDER__UNSUBSCRIBE_URL", "https:///abmelden"),
        ("SENDER__UNSUBSCRIBE_URL", "https://exa mple.org/abmelden"),
        ("SENDER__REPLY_TO", "no address at all"),
    ],
)
def test_a_broken_sender_setting_is_a_settings_problem(
    project: Path, variable: str, value: str
) -> None:
    name = f"INVITE_MAILER_{variable}"
    result = invoke(["validate"], {name: value})
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and "ValueError" not in result.output
    key = variable.split("__")[1].lower()
    assert f"sender.{key}" in result.stderr, result.stderr
    assert "config/settings.toml" in result.stderr
    assert f"from the environment variable {name}" in result.stderr
    assert "hint:" in result.stderr


def test_a_line_break_written_into_settings_toml_is_reported_with_its_line(project: Path) -> None:
    path = project / "config" / "settings.toml"
    text = path.read_text(encoding="utf-8")
    text = text.replace(
        'reply_to = "transferreihe@example.org"',
        'reply_to = "transferreihe@example.org\\nBcc: victim@evil.example"',
    )
    path.write_text(text, encoding="utf-8")
    line = next(n for n, raw in enumerate(text.splitlines(), 1) if raw.startswith("reply_to"))
    result = invoke(["validate"], {})
    assert result.exit_code == 1, result.output
    assert f"config/settings.toml, line {line}: sender.reply_to" in result.stderr, result.stderr
    assert "line break" in result.stderr


def test_a_settings_file_nested_too_deeply_is_a_clear_error(project: Path) -> None:
    path = project / "config" / "settings.toml"
    path.write_text(
        path.read_text(encoding="utf-8") + "\n[x]\ny = " + "[" * 1000 + "]" * 1000 + "\n",
        encoding="utf-8",
    )
    result = invoke(["validate"], {})
    assert result.exit_code == 1, result.output
    assert "RecursionError" not in result.output and "this is a bug" not in result.output
    assert "config/settings.toml" in result.stderr and "nested too deeply" in result.stderr
    assert "hint:" in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("address", "A <a@example.org>, B <evil@evil.example>"),
        ("address", "evil@evil.example, Team <transferreihe@example.org>"),
        ("reply_to", "transferreihe@example.org, evil@evil.example"),
        ("reply_to", "transferreihe@example.org evil@evil.example"),
        ("unsubscribe_mailto", "abmeldung@example.org; evil@evil.example"),
        ("address", "Team <transferreihe@example.org> <evil@evil.example>"),
    ],
)
@pytest.mark.parametrize("where", ["file", "environment"])
def test_a_sender_setting_with_more_than_one_address_is_refused(
    project: Path, key: str, value: str, where: str
) -> None:
    path = project / "config" / "settings.toml"
    text = path.read_text(encoding="utf-8")
    env = {}
    if where == "file":
        text, count = re.subn(rf"(?m)^{key} = .*$", f"{key} = {json.dumps(value)}", text)
        assert count == 1
        path.write_text(text, encoding="utf-8")
    else:
        env = {f"INVITE_MAILER_SENDER__{key.upper()}": value}
    result = invoke(["validate"], env)
    assert result.exit_code == 1, result.output
    assert f"sender.{key}" in result.stderr and "one address only" in result.stderr, result.stderr
    assert "double quotes" in result.stderr and "config/settings.toml" in result.stderr
    if where == "file":
        line = next(n for n, raw in enumerate(text.splitlines(), 1) if raw.startswith(key))
        assert f"config/settings.toml, line {line}: sender.{key}" in result.stderr
    else:
        assert f"INVITE_MAILER_SENDER__{key.upper()}" in result.stderr
    sent = invoke(["send-due", "--now", NOW], env)
    assert sent.exit_code == 1 and outbox(project) == []


@pytest.mark.slow
def test_a_display_name_with_a_comma_in_double_quotes_is_one_address(project: Path) -> None:
    env = {"INVITE_MAILER_SENDER__ADDRESS": '"KomKomIn, Transferreihe" <transferreihe@example.org>'}
    result = invoke(["send-due", "--now", NOW], env)
    assert result.exit_code == 0, result.output
    mail = email.message_from_bytes(outbox(project)[0].read_bytes(), policy=email.policy.default)
    assert [a.addr_spec for a in mail["From"].addresses] == ["transferreihe@example.org"]
    assert mail["From"].addresses[0].display_name == "KomKomIn, Transferreihe"


@pytest.mark.slow
@pytest.mark.parametrize(
    "url",
    [
        "sqlite:///:memory:",
        "sqlite:///file:x.db?mode=memory&cache=shared",
        "sqlite:///file:state/invite-mailer.db",
        "sqlite:///state/invite-mailer.db?mode=ro",
        "sqlite:///",
    ],
)
def test_a_state_database_that_is_no_file_is_refused(project: Path, url: str) -> None:
    result = invoke(["validate"], {"INVITE_MAILER_STATE__URL": url})
    assert result.exit_code == 1, result.output
    assert "state.url" in result.stderr and "file path" in result.stderr, result.stderr
    assert "hint:" in result.stderr
    assert invoke(["send-due", "--now", NOW], {"INVITE_MAILER_STATE__URL": url}).exit_code == 1
    assert outbox(project) == []


# -- finding: a foreign or damaged ledger is never a fresh start -------------------------


def _foreign_sqlite(path: Path) -> None:
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE kontakte (email TEXT, name TEXT)")
        db.execute("INSERT INTO kontakte VALUES ('a@example.org', 'A')")
        db.execute("PRAGMA user_version = 2")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("kind", "expect"),
    [
        ("empty", "empty (0 bytes)"),
        ("random", "not an SQLite database"),
        ("foreign", "another program"),
    ],
)
def test_a_ledger_file_that_is_not_ours_is_never_a_fresh_start(
    project: Path, kind: str, expect: str
) -> None:
    path = ledger_file(project)
    path.parent.mkdir()
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "random":
        path.write_bytes(bytes(range(256)) * 64)
    else:
        _foreign_sqlite(path)
    before = path.read_bytes()

    result = invoke(["send-due", "--now", NOW], {})
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert str(Path("state") / "invite-mailer.db") in result.stderr, result.stderr
    assert expect in result.stderr, result.stderr
    assert "backup" in result.stderr
    assert outbox(project) == []
    assert path.read_bytes() == before  # not converted, not migrated
    status = invoke(["status"], {})
    assert status.exit_code == 1 and expect in status.stderr, status.output


@pytest.mark.slow
def test_a_damaged_ledger_gives_one_clear_message(project: Path) -> None:
    first = invoke(["send-due", "--now", NOW], {})
    assert first.exit_code == 0, first.output
    sent = outbox(project)
    path = ledger_file(project)
    with sqlite3.connect(path) as db:
        (root,) = db.execute(
            "SELECT rootpage FROM sqlite_master WHERE name = 'deliveries'"
        ).fetchone()
        (page_size,) = db.execute("PRAGMA page_size").fetchone()
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    with path.open("r+b") as file:  # a bad sector in the deliveries table
        file.seek((root - 1) * page_size)
        file.write(b"\xde\xad" * (page_size // 2))

    for command in (["status"], ["send-due", "--now", "2024-10-24T11:00"]):
        result = invoke(command, {})
        assert result.exit_code == 1, result.output
        assert "Traceback" not in result.output
        assert "damaged" in result.stderr and "malformed" in result.stderr, result.stderr
        assert "restore" in result.stderr
    assert outbox(project) == sent


@pytest.mark.slow
def test_a_ledger_locked_by_another_process_is_a_clear_error(project: Path) -> None:
    first = invoke(["send-due", "--now", "2024-10-01T10:00"], {})  # creates the ledger
    assert first.exit_code == 0, first.output
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sqlite3, sys\n"
            "db = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
            # Readers go on (WAL); the first write of send-due has to wait.
            "db.execute('BEGIN EXCLUSIVE')\n"
            "db.execute('CREATE TABLE held (x)')\n"
            "print('locked', flush=True)\n"
            "sys.stdin.read()\n",
            str(ledger_file(project)),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        # SQLite waits for the lock for ten seconds before it gives up.
        result = invoke(["send-due", "--now", NOW], {})
    finally:
        holder.communicate("", timeout=10)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert "locked by another process" in result.stderr, result.stderr
    assert "hint:" in result.stderr
    assert outbox(project) == []


# -- finding: the rate limit across restarts, and stopping while waiting for it ------------


async def test_the_rate_limit_counts_the_sends_of_an_earlier_process(tmp_path: Path) -> None:
    now = [1_700_000_000.0]

    async def sleep(seconds: float) -> None:
        now[0] += seconds

    def limiter() -> RateLimiter:
        # Monotonic and wall clock are the same virtual clock here.
        return RateLimiter(5, clock=lambda: now[0], sleep=sleep, wall_clock=lambda: now[0])

    starts: list[float] = []
    path = tmp_path / "ledger.db"
    async with Ledger.open(path) as ledger:
        first = limiter()
        await first.share(ledger)
        for _ in range(5):
            await first.acquire()
            starts.append(now[0])
        await first.flush()  # as the transport does before the ledger closes
    now[0] += 10  # the process ends; a new one starts ten seconds later
    async with Ledger.open(path) as ledger:
        second = limiter()
        await second.share(ledger)
        for _ in range(5):
            await second.acquire()
            starts.append(now[0])
    assert starts[:5] == [1_700_000_000.0] * 5
    # Not before the first process's sends have left the window.
    assert min(starts[5:]) >= 1_700_000_060.0
    assert max(sum(1 for t in starts if s <= t < s + 60) for s in starts) == 5


async def test_the_end_of_a_send_does_not_wait_for_the_journal() -> None:
    """Between the relay's answer and the ledger's "sent" nothing may wait: a
    cancellation there would make a delivered mail uncertain."""
    release = asyncio.Event()
    recorded: list[float] = []

    class SlowJournal:
        async def recent_sends(self, since: float) -> list[float]:
            return []

        async def record_send(self, at: float) -> None:
            await release.wait()
            recorded.append(at)

    limiter = RateLimiter(5, wall_clock=lambda: 1_700_000_000.0)
    await limiter.share(SlowJournal())
    async with asyncio.timeout(5):
        async with limiter.slot():
            pass  # the send; leaving the block must not wait for the journal
    assert recorded == []
    release.set()
    await limiter.flush()
    assert recorded == [1_700_000_000.0]


def add_contacts(project: Path, count: int) -> list[str]:
    path = project / "config" / "contacts.csv"
    new = [f"spaet{n}@example.org" for n in range(count)]
    with path.open("a", encoding="utf-8") as file:
        for address in new:
            file.write(f"{address};;;Kim;Spät{address[5]};Nachzügler GmbH;alle\n")
    return new


def rows_in(project: Path, state: str) -> set[str]:
    rows = query(ledger_of(project), "SELECT email FROM deliveries WHERE state = ?", (state,))
    return {row[0] for row in rows}


@pytest.mark.slow
@pytest.mark.both_ledgers
def test_a_new_process_waits_for_the_sends_of_the_last_minute_and_gives_back_on_stop(
    project: Path, smtp_server: SmtpServer
) -> None:
    series_due_now(project)
    env = smtp_env(smtp_server.port, smtp__rate_per_minute=CONTACTS + 1)
    first = invoke(["send-due"], env)  # the real clock: 12 invitations + 1 report
    assert first.exit_code == 0, first.output
    assert len(smtp_server.received) == CONTACTS + 1

    late = add_contacts(project, 3)
    second = start_process(["send-due"], env, project)
    try:
        # The limit of the minute is used up: the new process claims its mails
        # and waits for a slot instead of sending them now.
        wait_for(lambda: rows_in(project, "sending") == set(late), 30, "three claimed mails")
        assert len(smtp_server.received) == CONTACTS + 1
        stopped_at = time.monotonic()
        second.send_signal(signal.SIGINT)
        second.communicate(timeout=20)
        assert time.monotonic() - stopped_at < 10
    finally:
        if second.poll() is None:
            second.kill()
    assert len(smtp_server.received) == CONTACTS + 1
    assert rows_in(project, "sending") == set() and rows_in(project, "uncertain") == set()
    assert set(late) <= rows_in(project, "pending")


@pytest.mark.system
@pytest.mark.both_ledgers
def test_sigterm_while_waiting_for_the_rate_limit_releases_the_waiting_mails(
    project: Path, smtp_server: SmtpServer
) -> None:
    series_due_now(project)
    # Two a minute: two go out, the other connections wait for their slot.
    env = smtp_env(smtp_server.port, smtp__rate_per_minute=2, smtp__timeout=30)
    daemon = start_process(["run"], env, project)
    try:
        wait_for(lambda: len(smtp_server.received) == 2, 30, "the first two mails")
        wait_for(lambda: len(rows_in(project, "sending")) >= 2, 30, "mails waiting for a slot")
        stopped_at = time.monotonic()
        daemon.send_signal(signal.SIGTERM)
        _, stderr = daemon.communicate(timeout=60)
        took = time.monotonic() - stopped_at
    finally:
        if daemon.poll() is None:
            daemon.kill()
    assert daemon.returncode == 0, stderr
    assert took < 10, f"stopping took {took:.1f}s"
    assert "CancelledError" not in stderr and "Traceback" not in stderr, stderr
    assert len(smtp_server.received) == 2
    assert rows_in(project, "sending") == set() and rows_in(project, "uncertain") == set()
    assert len(rows_in(project, "sent")) == 2
    assert status_json(env)["uncertain"] == []


@pytest.mark.slow
@pytest.mark.both_ledgers
def test_sigterm_stops_send_due_and_gives_the_waiting_mails_back(
    project: Path, smtp_server: SmtpServer
) -> None:
    # The burst form under cron or systemd: SIGTERM must not leave claims behind.
    series_due_now(project)
    env = smtp_env(smtp_server.port, smtp__rate_per_minute=2, smtp__timeout=30)
    run = start_process(["send-due"], env, project)
    try:
        wait_for(lambda: len(smtp_server.received) == 2, 30, "the first two mails")
        wait_for(lambda: len(rows_in(project, "sending")) >= 2, 30, "mails waiting for a slot")
        stopped_at = time.monotonic()
        run.send_signal(signal.SIGTERM)
        _, stderr = run.communicate(timeout=60)
        took = time.monotonic() - stopped_at
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode != -signal.SIGTERM, "send-due died of SIGTERM instead of stopping"
    assert took < 10, f"stopping took {took:.1f}s"
    assert "Traceback" not in stderr and "CancelledError" not in stderr, stderr
    assert len(smtp_server.received) == 2
    assert rows_in(project, "sending") == set() and rows_in(project, "uncertain") == set()
    assert len(rows_in(project, "sent")) == 2


@pytest.mark.slow
@pytest.mark.both_ledgers
@pytest.mark.parametrize("as_json", [False, True])
def test_send_due_stopped_by_sigterm_says_so_and_exits_75(
    project: Path, smtp_server: SmtpServer, as_json: bool
) -> None:
    series_due_now(project)
    env = smtp_env(smtp_server.port, smtp__rate_per_minute=2, smtp__timeout=30)
    run = start_process(["send-due", *(["--json"] if as_json else [])], env, project)
    try:
        wait_for(lambda: len(smtp_server.received) == 2, 30, "the first two mails")
        wait_for(lambda: len(rows_in(project, "sending")) >= 2, 30, "mails waiting for a slot")
        run.send_signal(signal.SIGTERM)
        stdout, stderr = run.communicate(timeout=60)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 75, stdout + stderr
    assert "Traceback" not in stderr, stderr
    left = CONTACTS - 2
    assert len(rows_in(project, "sent")) == 2
    if as_json:
        data = json.loads(stdout)
        assert data["stopped_early"] == "SIGTERM" and data["given_back"] == left
    else:
        assert "2 sent" in stdout
        assert (
            f"stopped early (SIGTERM): {left} mails given back; they go out at the next run"
            in stderr
        ), stderr


# -- beyond the findings: what a hostile relay says ---------------------------------------


@pytest.mark.slow
@pytest.mark.both_ledgers
def test_a_hostile_relay_answer_is_stored_as_one_bounded_line_of_text(
    project: Path, smtp_server: SmtpServer
) -> None:
    answer = "550 5.1.1 \x1b[31m[/]\x1b]0;owned\x07[bold]" + "<b>x</b>" * 800
    smtp_server.behaviour.reject_recipients["alex.meyer@example.org"] = answer
    env = smtp_env(smtp_server.port)
    result = invoke(["send-due", "--now", NOW, "--json"], env)
    assert result.exit_code == 3, result.output
    (failure,) = json.loads(result.stdout)["failures"]
    stored = failure["answer"]
    assert stored.startswith("550 5.1.1 [/]") and len(stored) <= 500
    assert "\x1b" not in stored and "\x07" not in stored and "owned" not in stored
    (row,) = query(
        ledger_of(project),
        "SELECT last_response FROM deliveries WHERE email = 'alex.meyer@example.org'",
    )
    assert row[0] == stored
    status = invoke(["status", "--failed", "--json"], env)
    assert status.exit_code == 3 and stored in status.stdout.replace("\\u001b", "")


@pytest.mark.slow
async def test_a_relay_that_stalls_after_data_is_given_up_on_within_the_timeout(
    smtp_server: SmtpServer,
) -> None:
    smtp_server.behaviour.stall = 1
    smtp_server.behaviour.stall_seconds = 3600
    settings = SmtpSettings(
        host=smtp_server.host, port=smtp_server.port, security="none", timeout=1
    )
    started = time.monotonic()
    async with SmtpTransport(settings) as transport:
        with pytest.raises(UncertainFailure):
            await transport.send(
                idn_message("a@example.org"),
                sender="transferreihe@example.org",
                recipients=["a@example.org"],
            )
    assert time.monotonic() - started < 10


async def test_a_ca_file_removed_after_loading_stops_the_send_with_a_setup_error(
    smtp_server: SmtpServer, tmp_path: Path, certificate: tuple[Path, Path]
) -> None:
    ca_file = tmp_path / "ca.pem"
    shutil.copy(certificate[0], ca_file)
    settings = SmtpSettings(
        host=smtp_server.host, port=smtp_server.port, security="starttls", ca_file=ca_file
    )
    ca_file.unlink()  # e.g. a certificate rotation gone wrong while the daemon runs
    async with SmtpTransport(settings) as transport:
        with pytest.raises(SetupFailure, match="smtp.ca_file"):
            await transport.send(
                idn_message("a@example.org"),
                sender="transferreihe@example.org",
                recipients=["a@example.org"],
            )
    assert smtp_server.connections == 0


@pytest.mark.slow
@pytest.mark.both_ledgers
def test_a_relay_answering_in_binary_is_recorded_as_text(
    project: Path, smtp_server: SmtpServer
) -> None:
    address = "alex.meyer@example.org"
    smtp_server.behaviour.raw_reply_lines[address] = b"550-\xff\xfe\x00\x9b31m \xc3(binary"
    smtp_server.behaviour.reject_recipients[address] = "550 5.1.1 unknown user"
    env = smtp_env(smtp_server.port)
    result = invoke(["send-due", "--now", NOW, "--json"], env)
    assert result.exit_code == 3, result.output
    assert "Traceback" not in result.output
    data = json.loads(result.stdout)
    assert data["sent"] == CONTACTS - 1
    (failure,) = data["failures"]
    assert failure["answer"].startswith("550 ") and "unknown user" in failure["answer"]
    assert failure["answer"].isprintable()
    status = status_json(env, "--now", NOW)
    assert [d["email"] for d in status["failed"]] == [address]


@pytest.mark.slow
@pytest.mark.both_ledgers
def test_an_idn_contact_is_delivered_through_a_relay_without_smtputf8(
    project: Path, smtp_server_factory: Any
) -> None:
    server = smtp_server_factory(enable_SMTPUTF8=False)
    path = project / "config" / "contacts.csv"
    with path.open("a", encoding="utf-8") as file:
        file.write("info@bücher.de;;;Kim;Buch;Bücherei Beispielstadt;alle\n")
        file.write("jürgen@example.org;Herr;;Jürgen;Umlaut;Stadt Beispiel;alle\n")
    env = smtp_env(server.port)
    result = invoke(["send-due", "--now", NOW, "--json"], env)
    data = json.loads(result.stdout)
    # One recipient's address cannot go through this relay: that recipient fails,
    # every other mail goes out.
    assert result.exit_code == 3, result.output
    assert data["sent"] == CONTACTS + 1
    (failure,) = data["failures"]
    assert failure["email"] == "jürgen@example.org"
    assert (
        "does not support SMTPUTF8; this address has a non-ASCII local part" in (failure["answer"])
    )
    envelope = {to for received in server.received for to in received.rcpt_tos}
    assert "info@xn--bcher-kva.de" in envelope
    assert all(to.isascii() for to in envelope)


async def test_a_connection_lost_at_the_data_command_is_not_uncertain(
    smtp_server: SmtpServer,
) -> None:
    # Nothing of the message has left: a plain temporary failure, never "may have arrived".
    smtp_server.behaviour.drop_at_data_command = 1
    async with SmtpTransport(plain_settings(smtp_server)) as transport:
        with pytest.raises(TemporaryFailure) as caught:
            await transport.send(
                idn_message("a@example.org"),
                sender="transferreihe@example.org",
                recipients=["a@example.org"],
            )
    assert not isinstance(caught.value, UncertainFailure), caught.value
    assert smtp_server.received == []


async def test_a_relay_that_offers_auth_only_after_starttls(
    smtp_server_factory: Any, certificate: tuple[Path, Path]
) -> None:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*certificate)
    logins = Logins()
    # aiosmtpd's default: AUTH is announced only on an encrypted connection.
    server = smtp_server_factory(tls_context=context, authenticator=logins)
    common: dict[str, Any] = dict(
        host=server.host, port=server.port, timeout=5, username="transfer", password="richtig"
    )
    starttls = SmtpSettings(security="starttls", ca_file=certificate[0], **common)
    async with SmtpTransport(starttls) as transport:
        await transport.send(
            idn_message("a@example.org"),
            sender="transferreihe@example.org",
            recipients=["a@example.org"],
        )
    assert logins.seen == [(b"transfer", b"richtig")] and len(server.received) == 1

    # Told to skip TLS, the login cannot happen: one clear setup error naming the cause.
    plain = SmtpSettings(security="none", allow_plaintext_auth=True, **common)
    async with SmtpTransport(plain) as transport:
        with pytest.raises(SetupFailure, match="does not offer AUTH") as caught:
            await transport.send(
                idn_message("b@example.org"),
                sender="transferreihe@example.org",
                recipients=["b@example.org"],
            )
    assert "STARTTLS" in str(caught.value)
    assert len(logins.seen) == 1 and len(server.received) == 1
