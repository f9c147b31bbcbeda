"""Shared pieces of the benchmarks: a generated workspace, smtp-sink, measurements.

Nothing here is imported by invite-mailer itself. Every benchmark builds a
throw-away workspace (the shipped series and templates, generated contacts,
a ledger of its own) under a temporary folder, so a run never touches
``config/`` or ``state/`` of the checkout.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
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

    def env(self, **smtp: object) -> dict[str, str]:
        """The environment that points invite-mailer at this workspace's relay."""
        # The benchmarks must not pick up a developer's .env or shell settings.
        env = clean_environ()
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
    """A workspace with the shipped series and templates and *contacts* generated contacts."""
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
    (config / "settings.toml").write_text(
        f"""\
[transport]
kind = "{transport}"
outbox_dir = "{root / "outbox"}"

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
url = "sqlite:///{state / "invite-mailer.db"}"

[notify]
organiser_summary = false
""",
        encoding="utf-8",
    )
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


@contextlib.contextmanager
def smtp_sink(port: int, *, backlog: int = 256) -> Iterator[subprocess.Popen[bytes]]:
    """Postfix's ``smtp-sink`` on 127.0.0.1:*port*: accepts and discards every message.

    ``-u nobody`` because smtp-sink refuses to keep root privileges; ``-R`` is
    not used, so nothing is written to disk.
    """
    require(SMTP_SINK)
    args = [SMTP_SINK]
    if os.geteuid() == 0:
        args += ["-u", "nobody"]
    args += [f"{LOOPBACK}:{port}", str(backlog)]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for_port(port)
        yield process
    finally:
        process.terminate()
        process.wait(timeout=10)


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
        if commit and any("bench/results/" not in line for line in changed):
            commit += " with uncommitted changes"
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
