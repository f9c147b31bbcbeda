"""The command line under hostile data and faults: one clear message, never a traceback.

Every test drives ``invite-mailer`` as a user runs it (the CLI runner on
:data:`invite_mailer.cli.cli`, or a child process) in a copy of the shipped
project.
"""

from __future__ import annotations

import contextlib
import email
import email.policy
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import Result

from invite_mailer.cli import cli
from support.cli import invoke as invoke_cli
from support.cli import subprocess_env
from support.project import copy_project
from support.smtp import SmtpServer, smtp_env

ROOT = Path(__file__).resolve().parent.parent
JANA = "jana.mueller@example.org"
HOSTILE_NAMES = ("Jana [/]", "Jana [bold]fett[/bold]", "Jana [link=https://evil.example]x[/link]")


def invoke(*args: str, env: dict[str, str] | None = None) -> Result:
    return invoke_cli(args, env)


def no_traceback(result: Result) -> None:
    assert "Traceback" not in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text(encoding="utf-8")
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1), encoding="utf-8")


def append_contact(project: Path, row: str) -> None:
    with (project / "config" / "contacts.csv").open("a", encoding="utf-8") as file:
        file.write(row + "\n")


# --- data is never markup ----------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_markup_in_a_duplicated_contact_name_is_printed_as_it_is(project: Path, name: str) -> None:
    append_contact(project, f"{JANA};Frau;Dr.;{name};Müller;Stadt Musterhausen;alle")
    for command in (["validate"], ["plan", "--now", "2024-10-01T10:00"]):
        result = invoke(*command)
        no_traceback(result)
        assert result.exit_code == 0, result.output
        assert "warning:" in result.stderr
        assert name in result.stderr  # literally: no tag swallowed, no link made


@pytest.mark.slow
def test_markup_in_the_series_title_is_printed_as_it_is(project: Path) -> None:
    title = "Reihe [/] [bold]X[/bold]"
    edit(project / "config" / "series.yaml", "title: Online-Transferreihe", f'title: "{title}"')
    result = invoke("plan", "--now", "2024-10-01T10:00")
    no_traceback(result)
    assert result.exit_code == 0, result.output
    assert title in result.stdout
    result = invoke("status", "--now", "2024-10-01T10:00")
    assert result.exit_code == 0, result.output
    assert title in result.stdout


@pytest.mark.slow
def test_markup_in_a_relay_answer_reaches_send_due_and_status_as_text(
    project: Path, smtp_server: SmtpServer
) -> None:
    answer = "550 5.1.1 [/] no [bold]such[/bold] user"
    smtp_server.behaviour.reject_recipients[JANA] = answer
    env = smtp_env(smtp_server.port)
    result = invoke("send-due", "--now", "2024-10-24T10:05", env=env)
    no_traceback(result)
    assert result.exit_code == 3, result.output
    assert len(smtp_server.received) > 0  # the others went out
    assert "[/] no [bold]such[/bold] user" in result.stderr
    assert "[red]" not in result.output

    for args in (["status", "--failed"], ["status"]):
        result = invoke(*args, "--now", "2024-10-24T11:00", env=env)
        no_traceback(result)
        assert result.exit_code == 3, result.output
        assert JANA in result.stdout
        assert "[/] no [bold]such[/bold] user" in result.stdout


@pytest.mark.slow
def test_a_relay_that_drops_after_data_is_not_called_a_crash(
    project: Path, smtp_server: SmtpServer
) -> None:
    smtp_server.behaviour.drop_after_data = 1
    env = smtp_env(smtp_server.port, limits__retry_in_pass_seconds=0)
    result = invoke("send-due", "--now", "2024-10-24T10:05", env=env)
    no_traceback(result)
    assert result.exit_code == 0, result.output
    status = invoke("status", "--now", "2024-10-24T11:00", env=env)
    no_traceback(status)
    assert "Uncertain" in status.stdout, status.stdout
    assert "crash" not in status.output
    assert "the relay's answer never arrived" in status.stdout
    again = invoke("send-due", "--now", "2024-10-24T11:00", env=env)
    assert again.exit_code == 0 and "crash" not in again.output


@pytest.mark.slow
def test_markup_in_the_relay_refusing_the_sender_is_printed_as_text(
    project: Path, smtp_server: SmtpServer
) -> None:
    smtp_server.behaviour.temp_fail = 1000
    smtp_server.behaviour.temp_fail_reply = "553 5.7.1 [/] sender not [bold]owned[/bold]"
    result = invoke("send-due", "--now", "2024-10-24T10:05", env=smtp_env(smtp_server.port))
    no_traceback(result)
    assert result.exit_code == 3, result.output
    assert "[/] sender not [bold]owned[/bold]" in result.stderr
    # The hint names the settings section; rich used to swallow "[sender]" as a tag.
    assert "check [sender] address in settings.toml" in result.stderr
    assert smtp_server.received == []


def test_markup_in_an_optout_source_is_listed_as_text(project: Path) -> None:
    source = "[/] Anruf [bold]vom[/bold] [link=https://evil.example]12.11.[/link]"
    result = invoke("optout", "add", JANA, "--source", source)
    assert result.exit_code == 0, result.output
    result = invoke("optout", "list")
    no_traceback(result)
    assert result.exit_code == 0, result.output
    assert source in result.stdout


def test_markup_in_an_address_argument_is_echoed_as_text(project: Path) -> None:
    result = invoke("optout", "remove", "[bold]x@example.org")
    no_traceback(result)
    assert "[bold]x@example.org" in result.output


# --- send-test -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "to",
    [
        "a@b.c\r\nBcc: victim@evil.example",
        "a@example.org\nBcc: victim@evil.example",
        "a@example.org, victim@evil.example",
        "Name <a@example.org>",
        "not an address",
        "",
    ],
)
def test_send_test_refuses_a_bad_address_before_sending(
    project: Path, smtp_server: SmtpServer, to: str
) -> None:
    result = invoke("send-test", "invitation", "--to", to, env=smtp_env(smtp_server.port))
    no_traceback(result)
    assert result.exit_code == 2, result.output
    assert "--to" in result.output
    assert smtp_server.received == []


@pytest.mark.slow
def test_send_test_gets_its_own_message_id(project: Path, smtp_server: SmtpServer) -> None:
    env = smtp_env(smtp_server.port)
    result = invoke("send-test", "invitation", "--to", "tester@example.net", env=env)
    assert result.exit_code == 0, result.output
    result = invoke("send-test", "invitation", "--to", "tester@example.net", env=env)
    assert result.exit_code == 0, result.output
    tests = [
        email.message_from_bytes(r.data, policy=email.policy.SMTP) for r in smtp_server.received
    ]
    assert len(tests) == 2
    assert tests[0]["To"] == "tester@example.net"
    assert tests[0]["Subject"].startswith("[Test] ")
    smtp_server.reset()

    result = invoke("send-due", "--now", "2024-10-24T10:05", env=env)
    assert result.exit_code == 0, result.output
    real = {
        str(m["To"]): m
        for m in (
            email.message_from_bytes(r.data, policy=email.policy.SMTP) for r in smtp_server.received
        )
    }
    rendered_as = tests[0]["X-Invite-Mailer-Test-For"]
    assert rendered_as in real
    ids = {str(m["Message-ID"]) for m in real.values()}
    assert str(tests[0]["Message-ID"]) not in ids
    # Two test sends are two different mails, not one the recipient's client folds together.
    assert tests[0]["Message-ID"] != tests[1]["Message-ID"]
    assert re.fullmatch(r"<[^<>@\s]+@[^<>@\s]+>", str(tests[0]["Message-ID"]))
    # The MIME boundaries come from the Message-ID: nothing of the real mail's is reused.
    assert tests[0].get_boundary() != real[rendered_as].get_boundary()


# --- warnings that save organisers ---------------------------------------------------------


def new_series(project: Path) -> None:
    edit(project / "config" / "series.yaml", "id: transferreihe-2024", "id: fachtag-2025")


@pytest.mark.slow
def test_a_new_series_with_the_example_sender_is_warned_about(project: Path) -> None:
    new_series(project)
    result = invoke("validate")
    no_traceback(result)
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    text = "\n".join(warnings)
    assert "sender.address (transferreihe@example.org)" in text
    assert "sender.reply_to (transferreihe@example.org)" in text
    assert "sender.unsubscribe_mailto (abmeldung@example.org)" in text
    assert "config/settings.toml: " in text
    assert "'fachtag-2025'" in text
    assert "hint: write your own addresses into [sender]" in result.stderr
    lines = (project / "config" / "series.yaml").read_text(encoding="utf-8").splitlines()
    line = lines.index("  email: transferreihe@example.org") + 1
    assert f"config/series.yaml, line {line}: organiser.email is still the example address" in text


@pytest.mark.slow
def test_the_example_sender_is_also_caught_when_settings_lack_a_sender(project: Path) -> None:
    new_series(project)
    settings = project / "config" / "settings.toml"
    text = settings.read_text(encoding="utf-8")
    text = re.sub(r"\[sender\].*?(?=\n\[)", "", text, flags=re.S)
    assert "[sender]" not in text
    settings.write_text(text, encoding="utf-8")
    result = invoke("validate")
    assert result.exit_code == 0, result.output
    assert "transferreihe@example.org" in result.stderr


@pytest.mark.slow
def test_own_sender_addresses_give_no_warning(project: Path) -> None:
    new_series(project)
    settings = project / "config" / "settings.toml"
    text = settings.read_text(encoding="utf-8")
    text = text.replace("transferreihe@example.org", "fachtag@institut.example")
    text = text.replace("abmeldung@example.org", "abmelden@institut.example")
    settings.write_text(text, encoding="utf-8")
    result = invoke("validate")
    assert result.exit_code == 0, result.output
    assert "sender." not in result.stderr
    assert "organiser.email is still the example address" in result.stderr

    edit(
        project / "config" / "series.yaml",
        "  email: transferreihe@example.org",
        "  email: fachtag@institut.example",
    )
    result = invoke("validate")
    assert result.exit_code == 0, result.output
    assert "warning:" not in result.output


@pytest.mark.slow
def test_the_shipped_series_keeps_its_example_sender_without_a_warning(project: Path) -> None:
    result = invoke("validate")
    assert result.exit_code == 0, result.output
    assert "warning:" not in result.output


def test_the_example_addresses_are_those_of_the_shipped_settings() -> None:
    from invite_mailer.cli import advisories as app

    text = (ROOT / "config" / "settings.toml").read_text(encoding="utf-8")
    shipped = set(re.findall(r"[\w.+-]+@[\w.-]+", text))
    assert shipped == set(app.EXAMPLE_SENDER_ADDRESSES)
    series = (ROOT / "config" / "series.yaml").read_text(encoding="utf-8")
    assert f"\nid: {app.SHIPPED_SERIES_ID}\n" in series


@pytest.mark.slow
def test_an_invitation_after_the_first_date_is_warned_about(project: Path) -> None:
    edit(
        project / "config" / "series.yaml",
        'send_at: "2024-10-24 10:00"',
        'send_at: "2024-11-20 10:00"',
    )
    expected = (
        "the invitation can never go out: send_at 2024-11-20 10:00 is after the first date "
        "starts 2024-11-14 14:00"
    )
    result = invoke("validate")
    no_traceback(result)
    assert result.exit_code == 0, result.output
    assert expected in result.stderr
    line = next(
        n
        for n, text in enumerate(
            (project / "config" / "series.yaml").read_text(encoding="utf-8").splitlines(), 1
        )
        if "2024-11-20 10:00" in text
    )
    assert f"series.yaml, line {line}" in result.stderr

    result = invoke("rehearse", "--out", str(project / "probe"))
    no_traceback(result)
    assert result.exit_code == 0, result.output
    assert expected in result.stderr
    result = invoke("rehearse", "--json", "--out", str(project / "probe"))
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert any(expected in w for w in data["warnings"])


@pytest.mark.slow
def test_a_reminder_with_no_window_is_warned_about(project: Path) -> None:
    edit(project / "config" / "series.yaml", "before: 1 day", "before: 0 days")
    result = invoke("validate")
    assert result.exit_code == 0, result.output
    assert "the reminder for verwaltung can never go out" in result.stderr
    assert result.stderr.count("can never go out") == 4  # one per date


@pytest.mark.slow
def test_a_followup_with_no_window_is_warned_about(project: Path) -> None:
    edit(
        project / "config" / "series.yaml",
        "wait_for_materials: 14 days",
        "wait_for_materials: 0 days",
    )
    result = invoke("validate")
    assert result.exit_code == 0, result.output
    assert (
        "the follow-up for verwaltung can never go out: it is due 2024-11-15 10:00 and its "
        "window closes 2024-11-15 10:00"
    ) in result.stderr
    assert result.stderr.count("can never go out") == 4


@pytest.mark.slow
def test_the_shipped_series_has_no_mailing_warning(project: Path) -> None:
    result = invoke("rehearse", "--out", str(project / "probe"))
    assert result.exit_code == 0, result.output
    assert "warning:" not in result.output


# --- output folders ------------------------------------------------------------------------


@contextlib.contextmanager
def project_for_others(mode: int) -> Iterator[Path]:
    """A copy of the project that other users may read, every entry set to *mode*."""
    base = Path(tempfile.mkdtemp())
    project = copy_project(base / "project")
    base.chmod(0o755)
    for path in [project, *project.rglob("*")]:
        path.chmod(mode | 0o111 if path.is_dir() else mode)
    try:
        yield project
    finally:
        for path in [project, *project.rglob("*")]:
            path.chmod(0o755)
        shutil.rmtree(base)


@pytest.fixture
def read_only_project() -> Iterator[Path]:
    """A project folder its user can read but not write (as after a read-only deploy)."""
    with project_for_others(0o444) as project:
        yield project


def run_unprivileged(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """``invite-mailer ARGS`` as a child process of a user that file modes bind.

    root ignores them, so as root the child runs in a user namespace of its own
    (util-linux unshare): still the files' owner, but without the capability
    that lets root override their modes.
    """
    command = [sys.executable, "-m", "invite_mailer", *args]
    if os.geteuid() == 0:
        unshare = shutil.which("unshare")
        probe = [unshare or "unshare", "--user", "true"]
        if unshare is None or subprocess.run(probe, capture_output=True, check=False).returncode:
            reason = "running as root without unshare --user to drop the override"
            if os.environ.get("CI") == "true":
                pytest.fail(reason)
            pytest.skip(reason)
        command = [unshare, "--user", *command]
    return subprocess.run(
        command,
        cwd=cwd,
        env=subprocess_env({}),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.slow
@pytest.mark.parametrize(("command", "folder"), [("preview", "preview"), ("rehearse", "rehearsal")])
def test_preview_and_rehearse_in_a_read_only_folder_say_what_to_do(
    read_only_project: Path, command: str, folder: str
) -> None:
    args = [command, "invitation"] if command == "preview" else [command]
    done = run_unprivileged(args, read_only_project)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert f"cannot write {folder}: permission denied" in done.stderr
    assert "pass --out DIR" in done.stderr
    assert not (read_only_project / folder).exists()


@pytest.mark.slow
def test_send_due_in_a_read_only_folder_says_what_to_do(read_only_project: Path) -> None:
    done = run_unprivileged(["send-due", "--now", "2024-10-24T10:05"], read_only_project)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert "- state: cannot write the state folder: permission denied" in done.stderr
    assert "hint: run where the state folder may be written" in done.stderr
    assert not (read_only_project / "outbox").exists()


STATE_COMMANDS = [["status"], ["optout", "list"], ["optout", "add", "x@example.org"]]


@contextlib.contextmanager
def project_with_ledger() -> Iterator[Path]:
    """A project whose ledger exists (one pass was sent), readable by others."""
    with project_for_others(0o644) as project:
        first = subprocess.run(
            [sys.executable, "-m", "invite_mailer", "send-due", "--now", "2024-10-24T10:05"],
            cwd=project,
            env=subprocess_env({}),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert first.returncode == 0, first.stderr
        yield project


def assert_says_the_state_folder_is_not_writable(done: subprocess.CompletedProcess[str]) -> None:
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert "cannot use this file" not in done.stderr, done.stderr
    assert "state/invite-mailer.db" in done.stderr
    assert re.search(r"state folder state is (read-only|not writable)", done.stderr), done.stderr
    assert "hint: " in done.stderr and "[state] url" in done.stderr


@pytest.mark.slow
@pytest.mark.parametrize("args", STATE_COMMANDS, ids=" ".join)
def test_a_state_folder_without_write_permission_is_named_as_such(args: list[str]) -> None:
    with project_with_ledger() as project:
        state = project / "state"
        for path in state.iterdir():
            path.chmod(0o444)
        state.chmod(0o555)
        done = run_unprivileged(args, project)
        assert_says_the_state_folder_is_not_writable(done)
        assert "permission denied" in done.stderr


@contextlib.contextmanager
def mounted_read_only(folder: Path) -> Iterator[None]:
    """*folder* as a read-only bind mount of itself: even root cannot write it."""
    commands = [
        ["mount", "--bind", str(folder), str(folder)],
        ["mount", "-o", "remount,bind,ro", str(folder)],
    ]
    mounted = False
    try:
        for command in commands:
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode:
                reason = f"cannot mount here: {done.stderr.strip()}"
                if os.environ.get("CI") == "true":
                    pytest.fail(reason)
                pytest.skip(reason)
            mounted = True
        yield
    finally:
        if mounted:
            subprocess.run(["umount", str(folder)], check=False)


@pytest.mark.slow
@pytest.mark.parametrize("args", STATE_COMMANDS, ids=" ".join)
def test_a_state_folder_on_a_read_only_mount_is_named_as_such(args: list[str]) -> None:
    with project_with_ledger() as project, mounted_read_only(project / "state"):
        done = subprocess.run(
            [sys.executable, "-m", "invite_mailer", *args],
            cwd=project,
            env=subprocess_env({}),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert_says_the_state_folder_is_not_writable(done)
        assert "read-only" in done.stderr


@pytest.mark.slow
def test_an_unreadable_config_file_is_one_message_not_a_traceback() -> None:
    with project_for_others(0o666) as project:
        (project / "config" / "series.yaml").chmod(0)
        done = run_unprivileged(["plan"], project)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert "series.yaml" in done.stderr
    assert "permission denied" in done.stderr.lower()
    assert done.stderr.count("error:") == 1


@pytest.mark.slow
def test_an_unreadable_template_is_named_with_the_reason() -> None:
    with project_for_others(0o666) as project:
        (project / "templates" / "email" / "invitation.html.j2").chmod(0)
        done = run_unprivileged(["validate"], project)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert "invitation.html.j2: the file cannot be read: permission denied" in done.stderr


def test_preview_into_a_file_path_is_a_clear_error(project: Path) -> None:
    (project / "taken").write_text("x", encoding="utf-8")
    result = invoke("preview", "invitation", "--out", "taken/sub")
    no_traceback(result)
    assert result.exit_code == 1, result.output
    assert "cannot write taken" in result.stderr


@pytest.mark.parametrize("event", ["../../x", "/etc/passwd", "..", "verwaltung/../../x"])
def test_preview_event_is_an_id_never_a_path(project: Path, event: str) -> None:
    result = invoke("preview", "reminder", "--event", event, "--out", "preview")
    no_traceback(result)
    assert result.exit_code == 1, result.output
    assert "--event" in result.stderr
    outside = [p for p in project.rglob("*") if p.suffix in (".eml", ".html")]
    assert outside == []
    assert not Path("/x.eml").exists()


@pytest.mark.slow
def test_preview_file_names_from_contact_data_stay_in_the_folder(project: Path) -> None:
    # As long as an address may be (254 characters): too long for a file name.
    address = f"{'a' * 64}@{'b' * 63}.{'c' * 63}.{'d' * 58}.de"
    assert len(address) == 254
    append_contact(project, f"{address};;;Lang;Name;Org;alle")
    result = invoke("preview", "invitation", "--contact", address, "--out", "preview")
    no_traceback(result)
    assert result.exit_code == 0, result.output
    written = [Path(line) for line in result.stdout.splitlines()]
    assert written
    for path in written:
        assert path.resolve().parent == (project / "preview").resolve()
        assert len(path.name.encode()) <= 255
        assert path.exists()


# --- errors as one message -----------------------------------------------------------------


@pytest.mark.slow
def test_a_zero_byte_ledger_is_one_clear_message(project: Path) -> None:
    (project / "state").mkdir()
    ledger = project / "state" / "invite-mailer.db"
    ledger.write_bytes(b"")
    for args in (["send-due", "--now", "2024-10-24T10:05"], ["status"], ["plan"]):
        result = invoke(*args)
        no_traceback(result)
        assert result.exit_code == 1, (args, result.output)
        assert "invite-mailer.db" in result.stderr
        assert result.stderr.count("error:") == 1
    assert not (project / "outbox").exists() or not any((project / "outbox").iterdir())
    assert ledger.read_bytes() == b""


@pytest.mark.slow
def test_an_unexpected_error_is_one_line_and_a_bug_report_request(project: Path) -> None:
    # A bug, simulated in a real child process by a core function that raises
    # something no command expects: the user sees one line, not a traceback.
    script = (
        "import sys\n"
        "from invite_mailer import cli\n"
        "from invite_mailer.cli import commands\n"
        "def broken(*args, **kwargs):\n"
        "    raise RuntimeError('boom [/] inside')\n"
        "commands.validate = broken\n"
        "sys.exit(cli.main(sys.argv[1:]))\n"
    )
    for verbose in (False, True):
        args = [sys.executable, "-c", script, *(["--verbose"] if verbose else []), "validate"]
        done = subprocess.run(args, cwd=project, capture_output=True, text=True, check=False)
        assert done.returncode == 70, done.stderr
        assert "RuntimeError: boom [/] inside" in done.stderr
        assert "this is a bug; please report it" in done.stderr
        assert ("Traceback" in done.stderr) is verbose, done.stderr


# --- --now -----------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "now",
    [
        "9999-12-31T23:59",
        "0001-01-01T00:00",
        "garbage",
        "2024-13-01T00:00",
        "9999-12-31T23:59+00:00",
        "0001-01-01T00:00:00-12:00",
        "",
    ],
)
@pytest.mark.parametrize("command", ["plan", "status", "send-due", "preview"])
def test_now_out_of_range_or_garbage_is_a_usage_error(
    project: Path, now: str, command: str
) -> None:
    args = [command, "--now", now]
    if command == "preview":
        args[1:1] = ["invitation"]
    result = invoke(*args)
    no_traceback(result)
    assert result.exit_code == 2, result.output
    assert "--now" in result.stderr
    assert not (project / "outbox").exists()


def test_every_command_turns_errors_into_messages() -> None:
    import click

    def commands(group: click.Group) -> Iterator[click.Command]:
        for command in group.commands.values():
            if isinstance(command, click.Group):
                yield from commands(command)
            else:
                yield command

    from invite_mailer.cli import handle_errors

    wrapper = handle_errors(lambda: None).__code__
    names = [c.name for c in commands(cli)]
    assert {"validate", "send-due", "rehearse", "list"} <= set(names)
    unwrapped = [
        c.name
        for c in commands(cli)
        if c.callback is None or getattr(c.callback, "__code__", None) is not wrapper
    ]
    assert unwrapped == []


def json_lines(stderr: str) -> list[dict[str, object]]:
    records = []
    for line in stderr.splitlines():
        record = json.loads(line)  # every line, or this fails
        assert isinstance(record, dict)
        records.append(record)
    return records


@pytest.mark.slow
def test_json_logs_carry_the_commands_warnings_and_errors(project: Path) -> None:
    append_contact(project, f"{JANA};Frau;Dr.;Jana [/];Müller;Stadt Musterhausen;alle")
    args = [sys.executable, "-m", "invite_mailer", "--log-format", "json", "validate"]
    env = subprocess_env({})
    done = subprocess.run(args, cwd=project, env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    (warning,) = [r for r in json_lines(done.stderr) if r["level"] == "warning"]
    assert "Jana [/]" in str(warning["message"])

    edit(project / "config" / "series.yaml", 'end: "16:00"', 'end: "13:00"')
    done = subprocess.run(args, cwd=project, env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 1, done.stderr
    records = json_lines(done.stderr)
    errors = [r for r in records if r["level"] == "error"]
    assert len(errors) == 1
    assert "1 problem found; nothing was sent." in str(errors[0]["message"])
    assert "end 13:00 is not after start 14:00" in str(errors[0]["message"])


@pytest.mark.slow
def test_json_logs_carry_a_bug_report_with_its_traceback(project: Path) -> None:
    script = (
        "import sys\n"
        "from invite_mailer import cli\n"
        "from invite_mailer.cli import commands\n"
        "def broken(*args, **kwargs):\n"
        "    raise RuntimeError('boom')\n"
        "commands.validate = broken\n"
        "sys.exit(cli.main(sys.argv[1:]))\n"
    )
    args = [sys.executable, "-c", script, "--log-format", "json", "--verbose", "validate"]
    done = subprocess.run(args, cwd=project, capture_output=True, text=True, check=False)
    assert done.returncode == 70, done.stderr
    (record,) = [r for r in json_lines(done.stderr) if r["level"] == "critical"]
    assert "RuntimeError: boom" in str(record["message"])
    assert "this is a bug; please report it" in str(record["message"])
    assert "Traceback" in str(record["exception"])


@pytest.mark.slow
def test_rehearse_never_writes_through_a_link_in_its_folder(project: Path) -> None:
    result = invoke("rehearse", "--out", "probe")
    assert result.exit_code == 0, result.output
    elsewhere = project / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("x", encoding="utf-8")
    shutil.rmtree(project / "probe" / "mails")
    (project / "probe" / "mails").symlink_to(elsewhere, target_is_directory=True)
    (project / "probe" / "index.html").unlink()
    (project / "probe" / "index.html").symlink_to(elsewhere / "keep.txt")

    result = invoke("rehearse", "--out", "probe")
    no_traceback(result)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in elsewhere.iterdir()) == ["keep.txt"]
    assert (elsewhere / "keep.txt").read_text(encoding="utf-8") == "x"
    mails = project / "probe" / "mails"
    assert not mails.is_symlink() and any(mails.glob("*.eml"))


@pytest.mark.slow
def test_preview_never_writes_through_a_link_in_its_folder(project: Path) -> None:
    target = project / "precious.txt"
    target.write_text("keep", encoding="utf-8")
    (project / "preview").mkdir()
    for suffix in (".eml", ".html"):
        (project / "preview" / f"invitation-{JANA}{suffix}").symlink_to(target)
    result = invoke("preview", "invitation", "--contact", JANA)
    no_traceback(result)
    assert result.exit_code == 0, result.output
    assert target.read_text(encoding="utf-8") == "keep"
    eml = project / "preview" / f"invitation-{JANA}.eml"
    assert not eml.is_symlink() and eml.read_bytes().startswith(b"From: ")


@pytest.mark.slow
def test_terminal_control_characters_in_data_are_shown_not_obeyed(
    project: Path, smtp_server: SmtpServer
) -> None:
    smtp_server.behaviour.reject_recipients[JANA] = "550 5.1.1 \x1b[2J\x1b[31mgone\u202e"
    env = smtp_env(smtp_server.port)
    result = invoke("send-due", "--now", "2024-10-24T10:05", env=env)
    assert result.exit_code == 3, result.output
    for text in (result.stderr, invoke("status", "--failed", env=env).stdout):
        assert "\x1b" not in text and "\u202e" not in text
        assert "gone" in text

    result = invoke("optout", "add", JANA, "--source", "\x1b]0;pwned\x07Mail")
    assert result.exit_code == 0, result.output
    result = invoke("optout", "list")
    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.stdout and "\x07" not in result.stdout
    assert "\\x1b]0;pwned\\x07Mail" in result.stdout

    result = invoke("optout", "remove", "\x1b[2Jx@example.org")
    no_traceback(result)
    assert "\x1b" not in result.output and "\\x1b[2jx@example.org" in result.output


@pytest.mark.slow
def test_send_test_to_an_international_domain_writes_it_as_ascii(
    project: Path, smtp_server: SmtpServer
) -> None:
    result = invoke(
        "send-test", "invitation", "--to", "info@bücher.de", env=smtp_env(smtp_server.port)
    )
    assert result.exit_code == 0, result.output
    (received,) = smtp_server.received
    headers = received.data.split(b"\r\n\r\n", 1)[0]
    assert headers.isascii()
    message = email.message_from_bytes(received.data, policy=email.policy.SMTP)
    assert message["To"] == "info@xn--bcher-kva.de"
