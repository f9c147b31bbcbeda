"""A round trip through a real Postfix: what arrives is what was sent.

A private Postfix instance (its own config, queue and data directories in a
temporary folder) listens on 127.0.0.1 and a free port and delivers every
recipient of example.org into one local Maildir; it relays nothing. Every
kind of mail goes through invite-mailer's SMTP transport, and the delivered
file must end with exactly the bytes that were sent (Postfix only puts its
own trace headers in front: Return-Path, X-Original-To, Delivered-To,
Received), so bodies, attachments and headers arrive intact, umlauts too.

Needs Postfix and root (Postfix's master runs as root and drops privileges):
skipped where either is missing, except under ``CI=true``, where that is a
failure.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path

import pytest

from invite_mailer.delivery.transport import SmtpTransport
from invite_mailer.inputs.settings import SmtpSettings
from invite_mailer.mail import mime
from support.samples import Sample, load_sample_config, sample_mails, sample_project

pytestmark = pytest.mark.system

SENDER = "transferreihe@example.org"
TRACE_HEADERS = {"return-path", "x-original-to", "delivered-to", "received"}


def require() -> None:
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
        return self.base / "mail" / "inbox"

    def command(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["postfix", "-c", str(self.config), *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    def log(self) -> str:
        path = self.base / "maillog"
        return path.read_text(errors="replace")[-3000:] if path.exists() else "(no log)"

    def delivered(self, count: int, timeout: float = 20.0) -> list[bytes]:
        """Wait for *count* files in the Maildir and return their bytes."""
        deadline = time.monotonic() + timeout
        while True:
            files = sorted((self.maildir / "new").glob("*")) if self.maildir.exists() else []
            if len(files) >= count:
                return [path.read_bytes() for path in files]
            if time.monotonic() > deadline:
                pytest.fail(f"{len(files)} of {count} mails delivered in {timeout}s:\n{self.log()}")
            time.sleep(0.1)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def postfix() -> Iterator[Postfix]:
    require()
    # Not pytest's tmp_path: Postfix's users must be able to reach the folders.
    base = Path(tempfile.mkdtemp(prefix="invite-mailer-postfix-"))
    base.chmod(0o755)
    instance = Postfix(base, free_port())
    for name in ("etc", "queue", "data", "mail"):
        (base / name).mkdir()
    shutil.copy("/etc/postfix/master.cf", instance.config / "master.cf")
    (instance.config / "main.cf").write_text(
        f"""\
compatibility_level = 3.6
queue_directory = {base}/queue
data_directory = {base}/data
maillog_file = {base}/maillog
maillog_file_prefixes = {base}
myhostname = mx.roundtrip.invalid
mydomain = roundtrip.invalid
myorigin = $myhostname
inet_interfaces = loopback-only
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
mydestination =
alias_maps =
alias_database =
biff = no
# Never relay anywhere: every address outside example.org bounces at once.
relayhost =
default_transport = error:this test instance delivers nothing outside
relay_transport = error:this test instance delivers nothing outside
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
# Leave headers as they arrive (no rewriting for remote clients).
local_header_rewrite_clients =
# Every recipient of example.org into one Maildir (the trailing slash).
virtual_mailbox_domains = example.org
virtual_mailbox_base = {base}/mail
virtual_mailbox_maps = static:inbox/
virtual_uid_maps = static:65534
virtual_gid_maps = static:65534
""",
        encoding="utf-8",
    )
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
        deadline = time.monotonic() + 20
        while True:
            try:
                with socket.create_connection(("127.0.0.1", instance.port), timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"Postfix did not listen on {service}:\n{instance.log()}")
                time.sleep(0.1)
        yield instance
    finally:
        instance.command("stop")
        deadline = time.monotonic() + 20
        while instance.command("status").returncode == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory) -> list[Sample]:
    config = load_sample_config(sample_project(tmp_path_factory.mktemp("roundtrip")))
    contact = config.contacts.contacts[0]  # Frau Dr. Jana Müller
    return sample_mails(config, contact)


def dotted() -> EmailMessage:
    """A plain mail whose lines start with dots: SMTP must stuff and unstuff them."""
    message = EmailMessage(policy=policy.SMTP)
    message["From"] = SENDER
    message["To"] = "punkte@example.org"
    message["Subject"] = "Punkte am Zeilenanfang"
    message["Message-ID"] = "<dots.roundtrip@example.org>"
    message.set_content(
        ".\n..\n.eine Zeile mit Punkt\nnormal\n. \n...", cte="7bit", charset="us-ascii"
    )
    return message


def split_headers(data: bytes) -> tuple[list[bytes], bytes]:
    head, _, body = data.partition(b"\n\n")
    return re.split(rb"\n(?![ \t])", head), body


def test_every_kind_arrives_unchanged(postfix: Postfix, samples: list[Sample]) -> None:
    sent = {str(s.message["Message-ID"]): s.message for s in samples}
    probe = dotted()
    sent[str(probe["Message-ID"])] = probe

    async def send_all() -> None:
        settings = SmtpSettings(host="127.0.0.1", port=postfix.port, security="none")
        async with SmtpTransport(settings) as transport:
            for message in sent.values():
                recipient = message["To"].addresses[0].addr_spec
                answer = await transport.send(
                    mime.wire(message), sender=SENDER, recipients=[recipient]
                )
                assert answer.startswith("250"), answer

    asyncio.run(asyncio.wait_for(send_all(), timeout=30))
    arrived = postfix.delivered(len(sent))
    by_id = {}
    for data in arrived:
        found = re.search(rb"^Message-ID: (<[^>]+>)$", data, re.M | re.I)
        assert found, data[:500]
        by_id[found.group(1).decode()] = data
    assert set(by_id) == set(sent)

    for message_id, message in sent.items():
        original = message.as_bytes(policy=policy.SMTP)
        # Maildir files have LF line ends; everything else must be identical.
        expected = original.replace(b"\r\n", b"\n")
        data = by_id[message_id]
        assert data.endswith(expected), f"{message_id} changed on the way"
        added, _ = split_headers(data[: len(data) - len(expected)] + b"\n")
        names = {line.split(b":", 1)[0].decode().lower() for line in added if line}
        assert names <= TRACE_HEADERS, names

        delivered = message_from_bytes(data, policy=policy.default)
        assert isinstance(delivered, EmailMessage)
        assert str(delivered["Subject"]) == str(message["Subject"])
        assert str(delivered["To"]) == str(message["To"])
        assert not any(part.defects for part in delivered.walk())
        for kind in ("plain", "html"):
            part = message.get_body((kind,))
            if part is not None:
                got = delivered.get_body((kind,))
                assert got is not None and got.get_content() == part.get_content()
        assert [
            (p.get_filename(), p.get_payload(decode=True)) for p in delivered.iter_attachments()
        ] == [(p.get_filename(), p.get_payload(decode=True)) for p in message.iter_attachments()]

    # Umlauts survive in the subject, the name and both bodies.
    invitation = message_from_bytes(
        by_id[str(samples[0].message["Message-ID"])], policy=policy.default
    )
    assert isinstance(invitation, EmailMessage)
    assert "–" in str(invitation["Subject"])
    assert invitation["To"].addresses[0].display_name == "Dr. Jana Müller"
    text = invitation.get_body(("plain",))
    assert text is not None and "Sehr geehrte Frau Dr. Müller," in text.get_content()
    page = invitation.get_body(("html",))
    assert page is not None and "Städte" in page.get_content()
