"""Shared pieces of the benchmarks: a generated workspace, smtp-sink, measurements.

Nothing here is imported by invite-mailer itself. Every benchmark builds a
throw-away workspace (the shipped series and templates, generated contacts,
a ledger of its own) under a temporary folder, so a run never touches
``config/`` or ``state/`` of the checkout.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

# The tests' support package (project copy, clean environment, generated
# contacts, the test SMTP server) is shared with the benchmarks rather than
# copied: ``import common`` first, then ``from support... import ...``.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from support.contacts import write_generated
from support.project import CONFIG, ROOT, TEMPLATES, clean_environ

DOCS = ROOT / "docs"
RESULTS = ROOT / "bench" / "results"
SMTP_SINK = "/usr/sbin/smtp-sink"
SMTP_SOURCE = "/usr/sbin/smtp-source"
LOOPBACK = "127.0.0.1"

# The moment the shipped invitation mailing is open (due 2024-10-24 10:00).
INVITATION_NOW = "2024-10-24T10:05"


@dataclass(frozen=True)
class Workspace:
    """A config folder, templates and state of their own."""

    root: Path
    config: Path
    templates: Path
    state: Path
    contacts: int
    # INVITE_MAILER_* variables every command of this workspace runs with.
    overrides: tuple[tuple[str, str], ...] = ()

    def env(self, **smtp: object) -> dict[str, str]:
        """The environment that points invite-mailer at this workspace's relay."""
        # The benchmarks must not pick up a developer's .env or shell settings.
        env = clean_environ()
        env.update(self.overrides)
        for key, value in smtp.items():
            env[f"INVITE_MAILER_SMTP__{key.upper()}"] = str(value)
        return env

    def invoke(self, *args: str) -> list[str]:
        """The exact ``invite-mailer`` command line for this workspace."""
        exe = Path(sys.executable).with_name("invite-mailer")
        command, *rest = args
        return [
            str(exe),
            command,
            "--config",
            str(self.config),
            "--templates",
            str(self.templates),
            *rest,
        ]


def make_workspace(
    root: Path,
    contacts: int,
    *,
    port: int = 2525,
    connections: int = 1,
    transport: str = "smtp",
    seed: int = 1,
) -> Workspace:
    """A workspace with the shipped series and templates and *contacts* generated contacts.

    Its settings are the benchmarks' own (plain SMTP to *port*, *connections*
    in parallel, no organiser summary), for measurements that must count
    exactly the mails of one mailing; :func:`make_default_workspace` keeps the
    shipped settings instead.
    """
    workspace = _populate(root, contacts, seed)
    (workspace.config / "settings.toml").write_text(
        f"""\
[transport]
kind = "{transport}"
outbox_dir = "{workspace.root / "outbox"}"

[smtp]
host = "{LOOPBACK}"
port = {port}
security = "none"
timeout = 30
max_connections = {connections}
rate_per_minute = 0

[sender]
address = "KomKomIn Transferreihe <transferreihe@example.org>"
reply_to = "transferreihe@example.org"
unsubscribe_mailto = "abmeldung@example.org"

[state]
url = "sqlite:///{workspace.state / "invite-mailer.db"}"

[notify]
organiser_summary = false
""",
        encoding="utf-8",
    )
    return workspace


def make_default_workspace(root: Path, contacts: int, *, port: int, seed: int = 1) -> Workspace:
    """A workspace with the shipped ``settings.toml`` unchanged: every default as shipped.

    Only what a user would set to reach a local relay is overridden, through
    the environment as the README shows (``INVITE_MAILER_TRANSPORT__KIND=smtp``,
    host, port, no TLS on 127.0.0.1). Connections, compose workers and the
    organiser's summary stay at their defaults. Relative paths of the shipped
    settings (outbox, state) resolve against the workspace, the working
    directory of every command.
    """
    workspace = _populate(root, contacts, seed)
    shutil.copy(CONFIG / "settings.toml", workspace.config / "settings.toml")
    overrides = {
        "INVITE_MAILER_TRANSPORT__KIND": "smtp",
        "INVITE_MAILER_SMTP__HOST": LOOPBACK,
        "INVITE_MAILER_SMTP__PORT": str(port),
        "INVITE_MAILER_SMTP__SECURITY": "none",
    }
    return dataclasses.replace(workspace, overrides=tuple(overrides.items()))


def shipped_setting(section: str, key: str) -> object:
    """A value of the shipped ``config/settings.toml``, to describe a default run."""
    with (CONFIG / "settings.toml").open("rb") as file:
        value: object = tomllib.load(file)[section][key]
    return value


def _populate(root: Path, contacts: int, seed: int) -> Workspace:
    """The shipped series and templates, *contacts* generated contacts, no settings yet."""
    root.mkdir(parents=True, exist_ok=True)
    config = root / "config"
    templates = root / "templates"
    state = root / "state"
    if config.exists():
        shutil.rmtree(config)
    config.mkdir()
    shutil.copy(CONFIG / "series.yaml", config / "series.yaml")
    if not templates.exists():
        shutil.copytree(TEMPLATES / "email", templates)
    write_generated(config / "contacts.csv", contacts, seed=seed)
    return Workspace(root, config, templates, state, contacts)


def reset_state(workspace: Workspace) -> None:
    """Forget every delivery, so the next send-due sends the whole mailing again."""
    if workspace.state.exists():
        shutil.rmtree(workspace.state)
    outbox = workspace.root / "outbox"
    if outbox.exists():
        shutil.rmtree(outbox)


def wait_for_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((LOOPBACK, port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def require(*programs: str) -> None:
    missing = [p for p in programs if not Path(p).exists() and shutil.which(p) is None]
    if missing:
        sys.exit(
            f"missing: {', '.join(missing)}; install Postfix's tools with "
            "'apt-get install postfix' (Debian/Ubuntu)"
        )


@dataclass(frozen=True)
class Sink:
    """A running ``smtp-sink`` and the count of messages it has received."""

    process: subprocess.Popen[bytes]
    counters: int  # the file descriptor of its ``-c`` output

    def received(self) -> int:
        """Messages received so far (each counted at its final ``.``), over all sessions."""
        size = os.fstat(self.counters).st_size
        tail = os.pread(self.counters, 512, max(0, size - 512)).decode("ascii", "replace")
        # smtp-sink rewrites one status line, "sess=S quit=Q mesg=M", ending each with \r.
        records = tail.split("\r")[:-1]
        for record in reversed(records):
            match = re.search(r"\bmesg=(\d+)$", record)
            if match:
                return int(match.group(1))
        return 0


@contextlib.contextmanager
def smtp_sink(port: int, *, backlog: int = 256) -> Iterator[Sink]:
    """Postfix's ``smtp-sink`` on 127.0.0.1:*port*: accepts and discards every message.

    ``-u nobody`` because smtp-sink refuses to keep root privileges; ``-R`` is
    not used, so no message is written to disk. ``-c`` makes it report its
    counters on stdout (an anonymous temporary file), so a benchmark can check
    that every contender delivered what it claims.
    """
    require(SMTP_SINK)
    args = [SMTP_SINK, "-c"]
    if os.geteuid() == 0:
        args += ["-u", "nobody"]
    args += [f"{LOOPBACK}:{port}", str(backlog)]
    with tempfile.TemporaryFile() as counters:
        process = subprocess.Popen(args, stdout=counters, stderr=subprocess.PIPE)
        try:
            wait_for_port(port)
            yield Sink(process, counters.fileno())
        finally:
            process.terminate()
            process.wait(timeout=10)


def send_due_claim(contacts: int) -> Callable[[str], int]:
    """Reads send-due's ``--json`` report: how many messages the relay must have received.

    Every one of *contacts* invitations, plus the organiser's summaries; a
    pass that sent fewer, or failed any, stops the benchmark.
    """

    def claim(stdout: str) -> int:
        report = json.loads(stdout)
        if report["sent"] != contacts or report["failed"]:
            raise SystemExit(f"send-due sent {report['sent']} of {contacts}: {stdout[-2000:]}")
        return int(report["sent"]) + int(report.get("reports_sent", 0))

    return claim


def public_command(script: str, argv: list[str]) -> str:
    """The command line for the results, a baseline executable's path replaced by a placeholder.

    Results are committed; the path of another build on this machine means
    nothing elsewhere.
    """
    shown, hide = [script], False
    for arg in argv:
        if hide:
            shown.append("<baseline>/bin/invite-mailer")
        elif arg.startswith("--baseline="):
            shown.append("--baseline=<baseline>/bin/invite-mailer")
        else:
            shown.append(arg)
        hide = arg == "--baseline"
    return " ".join(shown)


def version_of(executable: Path) -> str:
    """What an invite-mailer executable says with ``--version``."""
    return subprocess.run(
        [str(executable), "--version"], capture_output=True, text=True, check=False
    ).stdout.strip()


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def machine() -> dict[str, str]:
    """Where the figures come from: CPU model and count, memory, OS, Python."""
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    memory = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                memory = f"{int(line.split()[1]) // 1024} MiB"
                break
    postfix = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        postfix = subprocess.run(
            ["postconf", "-d", "-h", "mail_version"], capture_output=True, text=True, check=False
        ).stdout.strip()
    commit = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        git = ["git", "-C", str(ROOT)]
        commit = subprocess.run(
            [*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip()
        # Changed code (not the results and plots the benchmarks write themselves).
        changed = subprocess.run(
            [*git, "status", "--porcelain", "--", "src", "templates", "pyproject.toml", "bench"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.splitlines()
        paths = [line[3:] for line in changed if "bench/results/" not in line]
        if commit and paths:
            commit += f" with uncommitted changes to {', '.join(paths)}"
    return {
        "commit": commit,
        "cpu": model,
        "cores": str(os.cpu_count()),
        "memory": memory,
        "os": platform.platform(),
        "python": platform.python_version(),
        "postfix": postfix,
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def save(name: str, data: dict[str, object]) -> Path:
    """Write a benchmark's figures to ``bench/results/<name>.json``."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path
