"""A real Dovecot IMAP server on 127.0.0.1 for the bounce mailbox tests.

Debian's ``dovecot-imapd``, started with a configuration of its own in a
temporary folder: plain IMAP on a free port, one user from a passwd file,
mail in a Maildir there. Dovecot drops privileges to its own users, so it
needs root; where it or root is missing the tests skip, except under
``CI=true`` (``.ci/run`` installs it), where that is a failure.
"""

from __future__ import annotations

import imaplib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

DOVECOT = "/usr/sbin/dovecot"
USER, PASSWORD = "bounces@example.org", "geheim-für-tests"


def require_dovecot() -> None:
    problem = None
    if not Path(DOVECOT).exists():
        problem = "needs Dovecot (Debian: apt-get install dovecot-imapd)"
    elif os.geteuid() != 0:
        problem = "needs root to start Dovecot (it drops privileges to its own users)"
    if problem is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"{problem}; with CI=true this test must run (.ci/run installs it)")
    pytest.skip(problem)


@dataclass(frozen=True)
class Dovecot:
    port: int
    root: Path

    def client(self) -> imaplib.IMAP4:
        client = imaplib.IMAP4("127.0.0.1", self.port, timeout=10)
        secret = f"\0{USER}\0{PASSWORD}".encode()
        client.authenticate("PLAIN", lambda _challenge: secret)
        return client

    def append(self, folder: str, data: bytes) -> None:
        client = self.client()
        try:
            client.create(f'"{folder}"')
            status, answer = client.append(f'"{folder}"', None, None, data)
            assert status == "OK", answer
        finally:
            client.logout()

    def folder(self, folder: str) -> list[tuple[bytes, bytes]]:
        """(flags, message) of every message in *folder*."""
        client = self.client()
        try:
            status, _ = client.select(f'"{folder}"', readonly=True)
            if status != "OK":
                return []
            _, found = client.uid("SEARCH", "ALL")
            messages = []
            for uid in (found[0] or b"").split():
                _, parts = client.uid("FETCH", uid, "(FLAGS BODY.PEEK[])")
                head, data = next(p for p in parts if isinstance(p, tuple))
                messages.append((head, data))
            return messages
        finally:
            client.logout()

    def settings_env(self, **extra: str) -> dict[str, str]:
        env = {
            "INVITE_MAILER_IMAP__HOST": "127.0.0.1",
            "INVITE_MAILER_IMAP__PORT": str(self.port),
            "INVITE_MAILER_IMAP__SECURITY": "none",
            "INVITE_MAILER_IMAP__USERNAME": USER,
            "INVITE_MAILER_IMAP__PASSWORD": PASSWORD,
        }
        env.update({f"INVITE_MAILER_IMAP__{k.upper()}": v for k, v in extra.items()})
        return env


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextmanager
def running_dovecot() -> Iterator[Dovecot]:
    require_dovecot()
    # Not under pytest's tmp_path: Dovecot's users must be able to walk into it.
    root = Path(tempfile.mkdtemp(prefix="dovecot-", dir="/tmp"))
    root.chmod(0o755)
    port = _free_port()
    for sub in ("run", "state", "mail", "home"):
        (root / sub).mkdir()
    (root / "users").write_text(f"{USER}:{{PLAIN}}{PASSWORD}\n", encoding="utf-8")
    (root / "dovecot.conf").write_text(
        f"""\
protocols = imap
listen = 127.0.0.1
base_dir = {root}/run
state_dir = {root}/state
log_path = {root}/dovecot.log
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
mail_location = maildir:{root}/mail/%u
first_valid_uid = 1
default_internal_user = dovecot
default_login_user = dovenull
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {root}/users
}}
userdb {{
  driver = static
  args = uid=dovecot gid=dovecot home={root}/home/%u
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
""",
        encoding="utf-8",
    )
    shutil.chown(root / "mail", "dovecot", "dovecot")
    shutil.chown(root / "home", "dovecot", "dovecot")
    config = str(root / "dovecot.conf")
    subprocess.run([DOVECOT, "-c", config], check=True, timeout=30)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    log = (root / "dovecot.log").read_text(errors="replace")
                    raise RuntimeError(f"Dovecot did not start:\n{log}") from None
                time.sleep(0.05)
        yield Dovecot(port, root)
    finally:
        subprocess.run([DOVECOT, "-c", config, "stop"], check=False, timeout=30)
        shutil.rmtree(root, ignore_errors=True)
