"""SMTP with and without PIPELINING against Postfix's ``smtp-sink``.

smtp-sink announces PIPELINING unless told ``-p``; ``-f``/``-r`` (refuse a
command hard or soft) imply ``-p``; ``-q`` hangs up on a command without
answering it and ``-Q`` answers 421 first, both with PIPELINING on. ``-d``
dumps each transaction to a file (LF line ends, dots unstuffed), so the
bytes that arrived can be compared with the ones sent.

Skipped where smtp-sink is missing, except under ``CI=true``, where that is
a failure.
"""

from __future__ import annotations

import asyncio
import email.policy
import os
import shutil
import socket
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path

import aiosmtplib
import pytest

from invite_mailer.delivery.transport import SmtpTransport, UncertainFailure
from invite_mailer.errors import PermanentFailure, SenderRefused, TemporaryFailure
from invite_mailer.inputs.settings import SmtpSettings
from invite_mailer.mail.mime import Wire, crlf_checked

pytestmark = pytest.mark.system

SENDER = "transferreihe@example.org"
RECIPIENTS = ["anna.mueller@example.org", "bernd.schmidt@example.org"]


def smtp_sink() -> str:
    program = shutil.which("smtp-sink") or shutil.which("smtp-sink", path="/usr/sbin:/usr/bin")
    if program is not None:
        return program
    problem = "needs Postfix's smtp-sink (Debian: apt-get install postfix)"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{problem}; with CI=true this test must run")
    pytest.skip(problem)


class Sink:
    """smtp-sink on 127.0.0.1 and a free port, dumping every transaction into a folder."""

    def __init__(self, *options: str) -> None:
        self.options = options
        # smtp-sink drops root privileges to nobody, who must be able to write here.
        self.folder = Path(tempfile.mkdtemp(prefix="smtp-sink-"))
        self.folder.chmod(stat.S_IRWXU | stat.S_IRWXG | stat.S_IRWXO)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        args = [smtp_sink(), "-d", f"{self.folder}/%H%M%S.", *self.options]
        if os.geteuid() == 0:
            args += ["-u", "nobody"]
        args += [f"127.0.0.1:{self.port}", "64"]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(500):  # up to 5 s for the port to open
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            if self.process.poll() is not None:
                raise RuntimeError(f"smtp-sink ended with {self.process.returncode}: {args}")
            subprocess.run(["sleep", "0.01"], check=True)
        raise RuntimeError("smtp-sink did not open its port")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
        shutil.rmtree(self.folder, ignore_errors=True)

    def settings(self) -> SmtpSettings:
        return SmtpSettings(
            host="127.0.0.1", port=self.port, security="none", timeout=3, local_hostname="c.test"
        )

    async def dumps(self, count: int) -> list[bytes]:
        """The *count* transactions smtp-sink dumped, each as its file's bytes."""
        for _ in range(500):  # smtp-sink may finish a file just after its answer
            files = sorted(self.folder.iterdir())
            if len(files) >= count and all(f.read_bytes().endswith(b"\n\n") for f in files):
                return [f.read_bytes() for f in files]
            await asyncio.sleep(0.01)
        return [f.read_bytes() for f in sorted(self.folder.iterdir())]


@pytest.fixture
def sink_factory() -> Iterator[type[Sink]]:
    sinks: list[Sink] = []

    class Started(Sink):
        def __init__(self, *options: str) -> None:
            super().__init__(*options)
            sinks.append(self)
            self.start()

    try:
        yield Started
    finally:
        for sink in sinks:
            sink.stop()


def wire(number: int) -> Wire:
    msg = EmailMessage()
    msg["From"] = f"KomKomIn Transferreihe <{SENDER}>"
    msg["To"] = "Dr. Anna Müller <anna.mueller@example.org>"
    msg["Subject"] = f"Einladung Nr. {number}: Kreislaufwirtschaft stärken"
    msg["Message-ID"] = f"<{number}.sink@example.org>"
    msg.set_content(".Punkt am Anfang\n" + "Grüße aus Göttingen.\n" * 300 + "..\n.\n")
    msg.add_attachment(bytes(range(256)) * 60, maintype="application", subtype="pdf")
    msg.set_boundary(f"grenze-{number}")
    return Wire(msg["Message-ID"], crlf_checked(msg.as_bytes(policy=email.policy.SMTP)))


def body_of(dump: bytes) -> bytes:
    """The message in an smtp-sink dump: after its three-line Received header."""
    head, _, rest = dump.partition(b"\nReceived: ")
    rest = rest.split(b"\n", 3)[3]
    assert rest.endswith(b"\n\n")
    return rest[:-1]


async def advertises_pipelining(sink: Sink) -> bool:
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=sink.port, timeout=3)
    await client.connect()
    try:
        return client.supports_extension("pipelining")
    finally:
        await client.quit()


@pytest.mark.parametrize("options", [(), ("-p",)], ids=["pipelining", "lock-step"])
async def test_the_bytes_arrive(sink_factory: type[Sink], options: tuple[str, ...]) -> None:
    sink = sink_factory(*options)
    assert await advertises_pipelining(sink) is (options == ())
    wires = [wire(n) for n in range(3)]
    async with SmtpTransport(sink.settings()) as transport:
        for item in wires:
            answer = await transport.send(item, sender=SENDER, recipients=RECIPIENTS)
            assert answer.startswith("250 ")
        assert transport.connections_opened == 1
    dumps = await sink.dumps(len(wires))
    assert len(dumps) == len(wires)
    expected = {item.data.replace(b"\r\n", b"\n") for item in wires}
    assert {body_of(dump) for dump in dumps} == expected
    for dump in dumps:
        assert b"X-Rcpt-Args: <anna.mueller@example.org>\nX-Rcpt-Args: <bernd" in dump
        assert f"X-Mail-Args: <{SENDER}> BODY=8BITMIME\n".encode() in dump  # no SIZE offered


@pytest.mark.parametrize(
    ("options", "failure", "code"),
    [
        (("-f", "MAIL"), SenderRefused, 500),
        (("-r", "MAIL"), TemporaryFailure, 450),
        (("-f", "RCPT"), PermanentFailure, 500),
        (("-r", "RCPT"), TemporaryFailure, 450),
        (("-f", "DATA"), PermanentFailure, 500),
        (("-r", "."), TemporaryFailure, 450),
        (("-Q", "MAIL"), TemporaryFailure, 421),
        (("-Q", "RCPT"), TemporaryFailure, 421),
    ],
    ids=lambda value: " ".join(value) if isinstance(value, tuple) else None,
)
async def test_refusals(
    sink_factory: type[Sink], options: tuple[str, ...], failure: type[Exception], code: int
) -> None:
    sink = sink_factory(*options)
    async with SmtpTransport(sink.settings()) as transport:
        with pytest.raises(failure) as caught:
            await transport.send(wire(1), sender=SENDER, recipients=RECIPIENTS)
    assert getattr(caught.value, "code", None) == code
    assert not isinstance(caught.value, UncertainFailure)
    if failure is not SenderRefused:
        assert not isinstance(caught.value, SenderRefused)


@pytest.mark.parametrize("command", ["MAIL", "RCPT", "DATA"])
async def test_a_hang_up_mid_pipeline_is_temporary(sink_factory: type[Sink], command: str) -> None:
    sink = sink_factory("-q", command)
    assert await advertises_pipelining(sink)
    async with SmtpTransport(sink.settings()) as transport:
        with pytest.raises(TemporaryFailure) as caught:
            await transport.send(wire(1), sender=SENDER, recipients=RECIPIENTS)
    assert not isinstance(caught.value, UncertainFailure)
    assert command in str(caught.value)


async def test_a_hang_up_after_the_data_is_uncertain(sink_factory: type[Sink]) -> None:
    sink = sink_factory("-q", ".")
    async with SmtpTransport(sink.settings()) as transport:
        with pytest.raises(UncertainFailure):
            await transport.send(wire(1), sender=SENDER, recipients=RECIPIENTS)
