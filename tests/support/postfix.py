"""A private Postfix instance on 127.0.0.1 for the system tests.

Its own config, queue and data directories in a temporary folder; it listens
on a free port, relays nothing and delivers what it accepts for its virtual
domains into Maildirs there (by default every recipient of example.org into
one). A test changes that with main.cf settings of its own, for example to
accept a recipient it does not know and bounce it, as a real relay does.

Needs Postfix and root (Postfix's master runs as root and drops privileges):
:func:`require_postfix` skips where either is missing, except under
``CI=true``, where that is a failure.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

__all__ = ["Postfix", "require_postfix", "running_postfix"]


def require_postfix() -> None:
    problem = ""
    missing = [p for p in ("postfix", "postconf") if shutil.which(p) is None]
    if missing:
        problem = f"needs {', '.join(missing)} (Debian: apt-get install postfix)"
    elif os.geteuid() != 0:
        problem = "needs root to run a private Postfix instance"
    if not problem:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"{problem}; with CI=true this test must run (.ci/run sets it up)")
    pytest.skip(problem)


@dataclass
class Postfix:
    base: Path
    port: int

    @property
    def config(self) -> Path:
        return self.base / "etc"

    @property
    def maildir(self) -> Path:
        """The Maildir every recipient goes to by default."""
        return self.mailbox("inbox")

    def mailbox(self, name: str) -> Path:
        """The Maildir *name*/ under the virtual mailbox base."""
        return self.base / "mail" / name

    def command(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["postfix", "-c", str(self.config), *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    def log(self, tail: int = 3000) -> str:
        path = self.base / "maillog"
        return path.read_text(errors="replace")[-tail:] if path.exists() else "(no log)"

    def deliveries_to(self, address: str) -> list[str]:
        """The log lines of every delivery attempt to *address*, whatever became of it."""
        pattern = re.compile(rf" to=<{re.escape(address)}>", re.I)
        return [line for line in self.log(tail=10**9).splitlines() if pattern.search(line)]

    def delivered(
        self, count: int, timeout: float = 20.0, *, mailbox: str = "inbox"
    ) -> list[bytes]:
        """Wait for *count* files in the Maildir *mailbox* and return their bytes."""
        folder = self.mailbox(mailbox) / "new"
        deadline = time.monotonic() + timeout
        while True:
            files = sorted(folder.glob("*")) if folder.exists() else []
            if len(files) >= count:
                return [path.read_bytes() for path in files]
            if time.monotonic() > deadline:
                pytest.fail(f"{len(files)} of {count} mails delivered in {timeout}s:\n{self.log()}")
            time.sleep(0.1)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _main_cf(base: Path, settings: Mapping[str, str]) -> str:
    defaults = {
        "compatibility_level": "3.6",
        "queue_directory": f"{base}/queue",
        "data_directory": f"{base}/data",
        "maillog_file": f"{base}/maillog",
        "maillog_file_prefixes": str(base),
        "myhostname": "mx.roundtrip.invalid",
        "mydomain": "roundtrip.invalid",
        "myorigin": "$myhostname",
        "inet_interfaces": "loopback-only",
        "inet_protocols": "ipv4",
        "mynetworks": "127.0.0.0/8",
        "mydestination": "",
        "alias_maps": "",
        "alias_database": "",
        "biff": "no",
        # Never relay anywhere: every address outside the virtual domains bounces at once.
        "relayhost": "",
        "default_transport": "error:this test instance delivers nothing outside",
        "relay_transport": "error:this test instance delivers nothing outside",
        "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
        # Leave headers as they arrive (no rewriting for remote clients).
        "local_header_rewrite_clients": "",
        # Every recipient of example.org into one Maildir (the trailing slash).
        "virtual_mailbox_domains": "example.org",
        "virtual_mailbox_base": f"{base}/mail",
        "virtual_mailbox_maps": "static:inbox/",
        "virtual_uid_maps": "static:65534",
        "virtual_gid_maps": "static:65534",
    }
    lines = [f"{name} = {value}" for name, value in {**defaults, **settings}.items()]
    return "\n".join(lines) + "\n"


@contextmanager
def running_postfix(
    settings: Mapping[str, str] | None = None, files: Mapping[str, str] | None = None
) -> Iterator[Postfix]:
    """A started instance; *settings* replace or add main.cf lines, *files* are
    written into its config folder (lookup tables: ``texthash:{config}/name``)."""
    require_postfix()
    # Not pytest's tmp_path: Postfix's users must be able to reach the folders.
    base = Path(tempfile.mkdtemp(prefix="invite-mailer-postfix-"))
    base.chmod(0o755)
    instance = Postfix(base, free_port())
    for name in ("etc", "queue", "data", "mail"):
        (base / name).mkdir()
    shutil.copy("/etc/postfix/master.cf", instance.config / "master.cf")
    for name, text in (files or {}).items():
        (instance.config / name).write_text(text, encoding="utf-8")
    main = _main_cf(
        base, {k: v.format(config=instance.config) for k, v in (settings or {}).items()}
    )
    (instance.config / "main.cf").write_text(main, encoding="utf-8")
    shutil.chown(base / "data", user="postfix")
    shutil.chown(base / "mail", user=65534, group=65534)
    service = f"127.0.0.1:{instance.port}"
    for args in (
        ["-M#", "smtp/inet"],
        ["-Me", f"{service}/inet={service} inet n - n - - smtpd"],
        ["-F", "*/*/chroot = n"],  # no chroot jail to populate
    ):
        subprocess.run(["postconf", "-c", str(instance.config), *args], check=True, timeout=30)
    started = instance.command("start")
    try:
        assert started.returncode == 0, f"{started.stdout}{started.stderr}\n{instance.log()}"
        _wait_listening(instance, service)
        yield instance
    finally:
        instance.command("stop")
        deadline = time.monotonic() + 20
        while instance.command("status").returncode == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        shutil.rmtree(base, ignore_errors=True)


def _wait_listening(instance: Postfix, service: str) -> None:
    deadline = time.monotonic() + 20
    while True:
        try:
            with socket.create_connection(("127.0.0.1", instance.port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                pytest.fail(f"Postfix did not listen on {service}:\n{instance.log()}")
            time.sleep(0.1)
