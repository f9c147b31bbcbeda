"""The long-running service under hostile edits, faults and load.

The daemon runs as a real process (``python -m invite_mailer run``) on the
outbox transport, on the real clock; the series is written with its dates
around now, so what the daemon does is visible as ``.eml`` files in
``outbox/``. The unsubscribe endpoint is served over real sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import httpx
import pytest

from invite_mailer.core.tokens import make_token
from invite_mailer.delivery.ledger import Ledger, state_lock
from invite_mailer.inputs.addresses import load_address_list
from invite_mailer.inputs.config import load_config
from invite_mailer.logs import RepeatFilter
from invite_mailer.service.daemon import (
    EXIT_INVALID_CONFIG,
    EXIT_SOFTWARE,
    EXIT_TEMPFAIL,
    run_daemon,
)
from invite_mailer.service.server import RunningServer, start_server
from invite_mailer.service.web import create_app
from support.cli import invoke, start_process, wait_for
from support.contacts import write_contacts
from support.project import clean_environ, use_project
from support.smtp import SmtpServer, free_port, smtp_env

BERLIN = ZoneInfo("Europe/Berlin")
CONTACTS = ("anna.alt@example.org", "bernd.berg@example.org", "clara.chen@example.org")

SERIES = """\
id: service-probe
title: Probereihe
organiser:
  name: "KomKomIn – Wissenschaftliches Begleitvorhaben"
  email: transferreihe@example.org
timezone: Europe/Berlin
registration_url: https://example.org/probe/anmeldung
imprint: |
  KomKomIn – Wissenschaftliches Begleitvorhaben
  Musterstraße 1, 10115 Berlin
events:
  - id: bald
    title: "Bald – Erfahrungen teilen"
    date: {soon}
    start: "14:00"
    end: "16:00"
    join_url: https://example.org/probe/bald
    materials: []
mailings:
  invitation: {{send_at: "{send_at}", until: "{until}", audience: all}}
  reminder:   {{before: 1 day, audience: registered}}
  followup:   {{after: 1 hour, at: null, audience: registered, wait_for_materials: 14 days}}
"""


def series_text(invitation_at: datetime) -> str:
    soon = datetime.now(BERLIN).date() + timedelta(days=3)
    fmt = "%Y-%m-%d %H:%M:%S"
    return SERIES.format(
        soon=soon,
        send_at=invitation_at.astimezone(BERLIN).strftime(fmt),
        until=(invitation_at + timedelta(hours=1)).astimezone(BERLIN).strftime(fmt),
    )


@pytest.fixture
def service(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project whose invitation is due tomorrow (nothing goes out yet)."""
    use_project(tmp_path, monkeypatch)
    write_contacts(
        tmp_path / "config" / "contacts.csv",
        ((address, "", address.split(".")[0].title(), "Probe", "alle") for address in CONTACTS),
    )
    (tmp_path / "config" / "series.yaml").write_text(
        series_text(datetime.now(BERLIN) + timedelta(days=1)), encoding="utf-8"
    )
    return tmp_path


class Daemon:
    """``invite-mailer [OPTIONS] run`` as a child process, with its log in a file."""

    def __init__(
        self,
        project: Path,
        *options: str,
        env: dict[str, str] | None = None,
        preexec: object = None,
    ) -> None:
        self.project = project
        self.log = project / f"daemon-{time.monotonic_ns()}.log"
        if preexec is None:
            self.process = start_process([*options, "run"], env or {}, project, stderr=self.log)
        else:
            full = clean_environ()
            full.update(env or {})
            with self.log.open("w", encoding="utf-8") as err:
                self.process = subprocess.Popen(
                    [sys.executable, "-m", "invite_mailer", *options, "run"],
                    cwd=project,
                    env=full,
                    stdout=subprocess.DEVNULL,
                    stderr=err,
                    preexec_fn=preexec,  # type: ignore[arg-type]
                )

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def wait_for_log(self, needle: str, timeout: float = 10, after: int = 0) -> int:
        """Wait until *needle* is logged after offset *after*; return where it ends."""
        found: list[int] = []

        def logged() -> bool:
            position = self.output().find(needle, after)
            if position >= 0:
                found.append(position + len(needle))
                return True
            if self.process.poll() is not None:
                raise AssertionError(f"daemon exited ({self.process.returncode}):\n{self.output()}")
            return False

        wait_for(logged, timeout, f"{needle!r} in the daemon's log")
        return found[0]

    def edit_until_logged(self, path: Path, text: str, needle: str, *, after: int) -> int:
        """Write *path* until the daemon logs *needle* (the first write may beat the watch)."""
        for _ in range(5):
            path.write_text(text, encoding="utf-8")
            try:
                return self.wait_for_log(needle, timeout=3, after=after)
            except AssertionError:
                if self.process.poll() is not None:
                    raise
        raise AssertionError(f"the daemon never logged {needle!r}:\n{self.output()[after:]}")

    def stop(self, timeout: float = 15) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    yield started
    for daemon in started:
        daemon.kill()


def start(daemons: list[Daemon], project: Path, *options: str, **kwargs: object) -> Daemon:
    daemon = Daemon(project, *options, **kwargs)  # type: ignore[arg-type]
    daemons.append(daemon)
    return daemon


def invitations(project: Path) -> list[Path]:
    return sorted((project / "outbox").glob("*.eml")) if (project / "outbox").exists() else []


# --- the file watcher survives every broken edit ------------------------------------------


def _block_scalar_title(text: str) -> str:
    return text.replace("title: Probereihe\n", "title: |\n  Probe-\n  reihe\n", 1)


def _far_future_date(text: str) -> str:
    return re.sub(r"date: \d{4}-\d{2}-\d{2}", "date: 9999-12-31", text, count=1)


@pytest.mark.system
def test_the_watcher_survives_edits_that_are_not_config_errors(
    service: Path, daemons: list[Daemon]
) -> None:
    """A two-line title, a date at the calendar's end: rejected; the next good edit works."""
    series = service / "config" / "series.yaml"
    good = series.read_text(encoding="utf-8")
    daemon = start(daemons, service)
    offset = daemon.wait_for_log("scheduled")
    for broken in (_far_future_date(good), _block_scalar_title(good)):
        offset = daemon.edit_until_logged(
            series, broken, "the last good config keeps running", after=offset
        )
    rejections = daemon.output()
    assert "Traceback" not in rejections, rejections
    assert rejections.count("rejected") >= 2, rejections
    assert invitations(service) == []

    # A good edit after the broken ones: the invitation is moved to a minute
    # ago, so it goes out at once, as a late edit by an organiser would.
    now = datetime.now(BERLIN)
    daemon.edit_until_logged(
        series, series_text(now - timedelta(minutes=1)), "config reloaded", after=offset
    )
    wait_for(lambda: len(invitations(service)) >= len(CONTACTS), 15, "the invitations")
    assert daemon.stop() == 0, daemon.output()
    log = daemon.output()
    assert "Traceback" not in log, log
    assert "daemon stopped" in log


@pytest.mark.system
def test_the_watcher_survives_running_out_of_descriptors(
    service: Path, daemons: list[Daemon]
) -> None:
    """No descriptor left (EMFILE): the watcher or the reload fails, and recovers."""
    series = service / "config" / "series.yaml"
    daemon = start(daemons, service)
    offset = daemon.wait_for_log("scheduled")
    pid = daemon.process.pid
    _, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)

    def starve() -> None:
        # No descriptor below the limit is free: every open() in the daemon
        # fails. Again before each edit: a descriptor the daemon held for a
        # moment when the list was read and has closed since leaves a gap.
        used = {int(fd) for fd in os.listdir(f"/proc/{pid}/fd")}
        lowest_free = min(set(range(len(used) + 1)) - used)
        soft, _ = resource.prlimit(pid, resource.RLIMIT_NOFILE)
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (min(soft, lowest_free), hard))

    starve()
    try:
        edited = series.read_text(encoding="utf-8") + "# edited\n"
        failures = re.compile(r"the file watcher failed|the last good config keeps running")
        for _ in range(10):
            starve()
            series.write_text(edited, encoding="utf-8")
            time.sleep(1)
            found = failures.search(daemon.output(), offset)
            if found:
                break
        assert found, daemon.output()[offset:]
        offset = found.end()
    finally:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (hard, hard))
    if "watcher failed" in found[0]:
        # It starts again by itself and catches up with what it missed.
        offset = daemon.wait_for_log("config reloaded (file watcher restarted)", 30, after=offset)
    now = datetime.now(BERLIN)
    daemon.edit_until_logged(
        series, series_text(now - timedelta(minutes=1)), "config reloaded", after=offset
    )
    wait_for(lambda: len(invitations(service)) >= len(CONTACTS), 15, "the invitations")
    assert daemon.stop() == 0, daemon.output()
    assert "Traceback" not in daemon.output(), daemon.output()


@pytest.mark.system
def test_a_replaced_config_folder_is_watched_again(service: Path, daemons: list[Daemon]) -> None:
    """The watched folder deleted and created anew: the watcher restarts and sees edits."""
    config = service / "config"
    good = (config / "series.yaml").read_text(encoding="utf-8")
    daemon = start(daemons, service)
    offset = daemon.wait_for_log("scheduled")
    spare = service / "config.new"
    shutil.copytree(config, spare)
    time.sleep(0.5)  # the watch is set up while the daemon starts
    shutil.rmtree(config)
    # Watching a folder that is gone fails: the watcher must try again.
    offset = daemon.wait_for_log("watching again", after=offset)
    offset = daemon.wait_for_log("the file watcher failed", timeout=15, after=offset)
    spare.rename(config)
    offset = daemon.wait_for_log("config reloaded (file watcher restarted)", 30, after=offset)
    now = datetime.now(BERLIN)
    daemon.edit_until_logged(
        config / "series.yaml",
        good.replace(
            re.search(r'send_at: "[^"]+"', good)[0],  # type: ignore[index]
            f'send_at: "{(now - timedelta(minutes=1)).strftime("%Y-%m-%d %H:%M:%S")}"',
        ),
        "config reloaded (changed: series.yaml)",
        after=offset,
    )
    wait_for(lambda: len(invitations(service)) >= len(CONTACTS), 15, "the invitations")
    assert daemon.stop() == 0, daemon.output()
    assert "Traceback" not in daemon.output()


@pytest.mark.system
@pytest.mark.parametrize(
    "temporary",
    [
        ".series.yaml.swp",
        "series.yaml~",
        "4913",
        ".#series.yaml",
        "#series.yaml#",
        "~$contacts.xlsx",
    ],
)
def test_editor_temp_files_neither_reload_nor_appear_in_the_log(
    service: Path, daemons: list[Daemon], temporary: str
) -> None:
    config = service / "config"
    daemon = start(daemons, service)
    offset = daemon.wait_for_log("scheduled")
    time.sleep(0.5)
    (config / temporary).write_text("x", encoding="utf-8")
    series = config / "series.yaml"
    text = series.read_text(encoding="utf-8") + "# edited\n"
    end = daemon.edit_until_logged(series, text, "config reloaded", after=offset)
    output = daemon.output()
    line = output[output.rindex("\n", 0, end) + 1 : output.index("\n", end)]
    assert line.endswith("config reloaded (changed: series.yaml)"), line
    assert temporary not in daemon.output()
    assert daemon.stop() == 0


# --- config is parsed off the event loop ---------------------------------------------------

SECRET = "test-secret-0123456789"


def endpoint_env(port: int) -> dict[str, str]:
    return {
        "INVITE_MAILER_UNSUBSCRIBE__SERVE": "true",
        "INVITE_MAILER_UNSUBSCRIBE__SECRET": SECRET,
        "INVITE_MAILER_UNSUBSCRIBE__BIND_PORT": str(port),
    }


def get(url: str, timeout: float = 5) -> httpx.Response:
    return httpx.get(url, timeout=timeout)


def wait_for_endpoint(daemon: Daemon, base: str) -> None:
    def answers() -> bool:
        if daemon.process.poll() is not None:
            raise AssertionError(daemon.output())
        try:
            return get(f"{base}/healthz", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    wait_for(answers, 15, "the endpoint to answer")


@pytest.mark.system
def test_a_slow_reload_does_not_stall_the_endpoint(service: Path, daemons: list[Daemon]) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    daemon = start(daemons, service, env=endpoint_env(port))
    offset = daemon.wait_for_log("scheduled")
    wait_for_endpoint(daemon, base)
    # 40,000 contacts take a couple of seconds to read and check.
    many = service / "contacts.csv.new"
    write_contacts(
        many, ((f"person{n:06d}@example.org", "Frau", "Vorname", f"N{n}", "") for n in range(40000))
    )
    written = time.monotonic()
    many.rename(service / "config" / "contacts.csv")
    slowest = 0.0
    while daemon.output().find("config reloaded", offset) < 0:
        assert time.monotonic() - written < 60, daemon.output()[offset:]
        asked = time.monotonic()
        assert get(f"{base}/healthz").status_code == 200
        slowest = max(slowest, time.monotonic() - asked)
        time.sleep(0.05)
    took = time.monotonic() - written
    assert took > 1.0, f"the reload took only {took:.2f} s: nothing was measured"
    assert slowest < 0.5, (
        f"the endpoint took {slowest:.2f} s to answer during a {took:.1f} s reload"
    )
    assert daemon.stop() == 0, daemon.output()


# --- the endpoint under load ---------------------------------------------------------------

FEW_DESCRIPTORS = 256


def _few_descriptors() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (FEW_DESCRIPTORS, FEW_DESCRIPTORS))


def open_idle_connections(port: int, count: int) -> list[socket.socket]:
    """*count* clients that connect and send nothing (those refused are skipped)."""
    held = []
    for _ in range(count):
        sock = socket.socket()
        sock.settimeout(2)
        try:
            sock.connect(("127.0.0.1", port))
        except OSError:
            sock.close()
            continue
        held.append(sock)
    return held


@pytest.mark.system
@pytest.mark.slow
def test_idle_connections_cannot_take_the_endpoint_down(
    service: Path, daemons: list[Daemon]
) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    daemon = start(daemons, service, env=endpoint_env(port), preexec=_few_descriptors)
    offset = daemon.wait_for_log("scheduled")
    wait_for_endpoint(daemon, base)
    before = daemon.log.stat().st_size
    held = open_idle_connections(port, FEW_DESCRIPTORS + 150)
    try:
        # More idle clients than the daemon has descriptors: the ones over the
        # limit are closed, the others time out, and a fresh request is answered.
        deadline = time.monotonic() + 30
        while True:
            try:
                if get(f"{base}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, daemon.output()[-3000:]
            time.sleep(0.2)
        token_page = get(f"{base}/{'x' * 40}.{'y' * 24}")
        assert token_page.status_code == 400
        # Those still held were closed by the daemon: reading gives EOF (or a reset).
        closed = 0
        for sock in held:
            try:
                closed += sock.recv(1) == b""
            except TimeoutError:  # still open
                pass
            except OSError:  # reset
                closed += 1
        assert closed == len(held)
    finally:
        for sock in held:
            sock.close()
    grown = daemon.log.stat().st_size - before
    assert grown < 20_000, daemon.output()[before : before + 3000]
    assert "Too many open files" not in daemon.output()
    # The file watcher is alive: an edit is still picked up.
    series = service / "config" / "series.yaml"
    daemon.edit_until_logged(
        series, series.read_text(encoding="utf-8") + "# edited\n", "config reloaded", after=offset
    )
    assert daemon.stop() == 0, daemon.output()


# --- the endpoint against hostile clients (in this process, over real sockets) -------------

SERIES_ID = "transferreihe-2024"
JANA = "jana.mueller@example.org"
ONE_CLICK = b"List-Unsubscribe=One-Click"


@dataclass
class Served:
    server: RunningServer
    ledger_path: Path
    optout_file: Path

    async def optouts(self) -> set[str]:
        if not self.ledger_path.exists():
            return set()
        async with Ledger.open(self.ledger_path) as ledger:
            return set(await ledger.optouts(SERIES_ID))

    async def raw(self, data: bytes, *, read_for: float = 3.0) -> bytes:
        """Send *data* on a fresh connection; everything the server answers until it closes."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.server.port)
        try:
            writer.write(data)
            await writer.drain()
            answer = b""
            with contextlib.suppress(TimeoutError, ConnectionError):
                async with asyncio.timeout(read_for):
                    while chunk := await reader.read(65536):
                        answer += chunk
            return answer
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    ledger_path = tmp_path / "state" / "invite-mailer.db"
    optout_file = tmp_path / "optout.txt"
    app = create_app(
        SERIES_ID,
        SECRET,
        ledger_path,
        optout_file=optout_file,
        series_title="Online-Transferreihe",
        contact_address="abmeldung@example.org",
    )
    server = await start_server(app, "127.0.0.1", 0, max_connections=8, request_seconds=1.0)
    try:
        yield Served(server, ledger_path, optout_file)
    finally:
        await server.stop()


async def closed_within(served: Served, send: list[bytes], pause: float, limit: float) -> float:
    """Connect, send *send* piece by piece with *pause* between; seconds until the server closed."""
    reader, writer = await asyncio.open_connection("127.0.0.1", served.server.port)
    started = time.monotonic()
    try:
        async with asyncio.timeout(limit):
            for piece in send:
                writer.write(piece)
                with contextlib.suppress(ConnectionError):
                    await writer.drain()
                if reader.at_eof():
                    break
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(pause):
                        await reader.read(65536)
                if reader.at_eof():
                    break
            while await reader.read(65536):
                pass
    except ConnectionError:
        pass
    finally:
        writer.close()
    return time.monotonic() - started


SLOW_CLIENTS = {
    "silent": [b""],
    "slowloris": [
        bytes([c]) for c in b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Padding: aaaaaaaaaaaaaaa"
    ],
    "slow-body": [
        b"POST /abc HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n",
        *([b"x"] * 50),
    ],
}


@pytest.mark.slow
@pytest.mark.parametrize("client", list(SLOW_CLIENTS))
async def test_slow_clients_are_cut_off(served: Served, client: str) -> None:
    took = await closed_within(served, SLOW_CLIENTS[client], pause=0.2, limit=8)
    assert took < 3, f"{client}: the server kept the connection for {took:.1f} s"


@pytest.mark.slow
async def test_keep_alive_requests_still_work(served: Served) -> None:
    async with httpx.AsyncClient(base_url=served.server.url) as client:
        for _ in range(3):
            assert (await client.get("/healthz")).status_code == 200
            await asyncio.sleep(0.6)  # twice that is more than request_seconds


async def test_connections_over_the_limit_are_closed_at_once(served: Served) -> None:
    held = [await asyncio.open_connection("127.0.0.1", served.server.port) for _ in range(8)]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", served.server.port)
        started = time.monotonic()
        with contextlib.suppress(ConnectionError):
            assert await asyncio.wait_for(reader.read(100), 5) == b""
        assert time.monotonic() - started < 0.9
        writer.close()
    finally:
        for _, idle in held:
            idle.close()
    async with httpx.AsyncClient(base_url=served.server.url) as client:
        assert (await client.get("/healthz")).status_code == 200


def one_click_request(token: str) -> bytes:
    return (
        f"POST /{token} HTTP/1.1\r\nHost: x\r\n"
        "Content-Type: application/x-www-form-urlencoded\r\n"
        f"Content-Length: {len(ONE_CLICK)}\r\n\r\n"
    ).encode() + ONE_CLICK


@pytest.mark.parametrize("framing", ["cl-and-te", "te-and-cl", "two-lengths"])
async def test_smuggled_requests_are_refused(served: Served, framing: str) -> None:
    """What a proxy that reads the other length header would pass on as one request."""
    smuggled = one_click_request(make_token(SECRET, SERIES_ID, JANA))
    if framing == "two-lengths":
        head = f"Content-Length: 0\r\nContent-Length: {len(smuggled)}\r\n"
        body = b""
    else:
        lengths = [f"Content-Length: {5 + len(smuggled)}\r\n", "Transfer-Encoding: chunked\r\n"]
        head = "".join(lengths if framing == "cl-and-te" else lengths[::-1])
        body = b"0\r\n\r\n"
    request = f"POST /healthz HTTP/1.1\r\nHost: x\r\n{head}\r\n".encode() + body + smuggled
    answer = await served.raw(request)
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
    assert answer.count(b"HTTP/1.1 ") == 1, answer
    assert await served.optouts() == set()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("target", "status"),
    [
        (b"/" + b"A" * 5000, b"414"),
        (b"/" + b"A" * 600 + b"." + b"B" * 24, b"400"),
        (b"/healthz?" + b"t=1&" * 1000, b"414"),
        (b"/%ff%fe.%c3%28", b"400"),
        (b"/\xff\xfe.abc", b"400"),
        (b"/%00." + b"A" * 24, b"400"),
    ],
    ids=["huge-token", "long-token", "huge-query", "bad-utf8-escaped", "bad-utf8-raw", "nul"],
)
async def test_odd_targets_are_refused_cleanly(
    served: Served, target: bytes, status: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    for method in (b"GET", b"POST"):
        request = method + b" " + target + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 26\r\n\r\n"
        answer = await served.raw(request + ONE_CLICK)
        assert answer.startswith(b"HTTP/1.1 " + status), answer[:300]
    assert await served.optouts() == set()
    assert "Traceback" not in caplog.text
    async with httpx.AsyncClient(base_url=served.server.url) as client:
        assert (await client.get("/healthz")).status_code == 200


async def test_huge_headers_are_refused(served: Served) -> None:
    token = make_token(SECRET, SERIES_ID, JANA)
    request = one_click_request(token).replace(
        b"Host: x\r\n", b"Host: x\r\nX-Big: " + b"a" * 20000 + b"\r\n"
    )
    answer = await served.raw(request)
    assert answer.startswith((b"HTTP/1.1 431", b"HTTP/1.1 400")), answer[:200]
    assert await served.optouts() == set()


async def test_head_options_and_other_methods(served: Served) -> None:
    token = make_token(SECRET, SERIES_ID, JANA)
    async with httpx.AsyncClient(base_url=served.server.url) as client:
        head = await client.head(f"/{token}")
        assert head.status_code == 200 and head.content == b""
        assert (await client.head("/healthz")).status_code == 200
        for method in ("OPTIONS", "TRACE", "PUT", "DELETE", "PATCH"):
            response = await client.request(method, f"/{token}")
            assert response.status_code == 405, method
            assert "POST" in response.headers["allow"]
        assert (await client.post("/healthz")).status_code == 405
    assert await served.optouts() == set()


@pytest.mark.parametrize("sent", [b"Lis", b""])
async def test_a_client_that_disconnects_during_the_body_is_no_error(
    served: Served, caplog: pytest.LogCaptureFixture, sent: bytes
) -> None:
    caplog.set_level(logging.DEBUG)
    token = make_token(SECRET, SERIES_ID, JANA)
    head = (
        f"POST /{token} HTTP/1.1\r\nHost: x\r\n"
        "Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 100\r\n\r\n"
    ).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", served.server.port)
    writer.write(head + sent)
    await writer.drain()
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()
    # Stopping waits for every running request: the one left without its body too.
    await served.server.stop()
    loud = [
        f"{r.name} {r.levelname} {r.getMessage()} {r.exc_text or ''}"
        for r in caplog.records
        if r.levelno > logging.DEBUG and r.name.startswith(("invite_mailer", "uvicorn", "asyncio"))
    ]
    assert loud == []
    assert await served.optouts() == set()


async def test_nothing_about_an_address_leaks_from_a_forged_token(
    served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    genuine = make_token(SECRET, SERIES_ID, JANA)
    email_part = genuine.split(".")[0]
    forged = email_part + "." + "A" * 24
    async with httpx.AsyncClient(base_url=served.server.url) as client:
        for method in ("GET", "POST"):
            response = await client.request(method, f"/{forged}", content=ONE_CLICK)
            assert response.status_code == 400
            assert "mueller" not in response.text and email_part not in response.text
    # What the service logs (the test's own HTTP client logs its URLs).
    ours = "\n".join(
        f"{r.getMessage()} {r.exc_text or ''}"
        for r in caplog.records
        if r.name.startswith(("invite_mailer", "uvicorn", "asyncio"))
    )
    assert "rejected an invalid token" in ours
    assert "mueller" not in ours and email_part not in ours
    assert await served.optouts() == set()


@pytest.mark.slow
async def test_optout_list_is_read_once_per_change(served: Served) -> None:
    listed = [f"person{n:05d}@example.org" for n in range(20000)]
    served.optout_file.write_text("\n".join(listed) + "\n", encoding="utf-8")
    started = time.monotonic()
    load_address_list(served.optout_file)
    parse = time.monotonic() - started
    token = make_token(SECRET, SERIES_ID, listed[-1])
    async with httpx.AsyncClient(base_url=served.server.url, timeout=30) as client:
        assert "bereits abgemeldet" in (await client.get(f"/{token}")).text
        started = time.monotonic()
        for _ in range(4):
            assert "bereits abgemeldet" in (await client.get(f"/{token}")).text
        pages = time.monotonic() - started
        assert pages < parse, f"4 pages took {pages:.2f} s, one parse of the list {parse:.2f} s"

        # An edit is seen by the next page: appended, and the file replaced.
        other = make_token(SECRET, SERIES_ID, JANA)
        assert "bereits abgemeldet" not in (await client.get(f"/{other}")).text
        with served.optout_file.open("a", encoding="utf-8") as file:
            file.write(JANA + "\n")
        assert "bereits abgemeldet" in (await client.get(f"/{other}")).text
        replacement = served.optout_file.with_name("optout.new")
        replacement.write_text(JANA + "\n", encoding="utf-8")
        replacement.replace(served.optout_file)
        assert "bereits abgemeldet" not in (await client.get(f"/{token}")).text
        served.optout_file.unlink()
        assert "bereits abgemeldet" not in (await client.get(f"/{other}")).text


@pytest.mark.slow
async def test_a_broken_optout_list_is_not_parsed_again_for_every_page(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    from invite_mailer.service import web

    reads: list[Path] = []

    def counted(path: Path) -> frozenset[str]:
        reads.append(path)
        return load_address_list(path)

    monkeypatch.setattr(web, "load_address_list", counted)
    lines = [f"person{n:05d}@example.org" for n in range(20000)] + ["kein gültiger eintrag"]
    served.optout_file.write_text("\n".join(lines) + "\n", encoding="utf-8")
    token = make_token(SECRET, SERIES_ID, JANA)
    async with httpx.AsyncClient(base_url=served.server.url, timeout=30) as client:
        for _ in range(5):
            page = await client.get(f"/{token}")
            assert page.status_code == 200 and "bereits abgemeldet" not in page.text
        assert len(reads) == 1
        served.optout_file.write_text(JANA + "\n", encoding="utf-8")  # mended
        assert "bereits abgemeldet" in (await client.get(f"/{token}")).text
    assert len(reads) == 2


# --- logs: every line JSON, floods bounded ------------------------------------------------


def json_lines(text: str) -> list[dict[str, object]]:
    records = []
    for line in text.splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            raise AssertionError(f"not a JSON line: {line!r}\nin:\n{text}") from None
    return records


@pytest.mark.system
def test_json_log_format_holds_for_library_records_and_rejected_reloads(
    service: Path, daemons: list[Daemon]
) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    daemon = start(daemons, service, "--log-format", "json", env=endpoint_env(port))
    offset = daemon.wait_for_log("scheduled")
    wait_for_endpoint(daemon, base)
    # uvicorn logs a bad request itself, through its own logger.
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        sock.recv(1000)
    series = service / "config" / "series.yaml"
    good = series.read_text(encoding="utf-8")
    offset = daemon.edit_until_logged(
        series, good.replace("id: bald", "id: [bald"), "rejected", after=offset
    )
    daemon.edit_until_logged(series, _far_future_date(good), "rejected", after=offset)
    assert daemon.stop() == 0
    records = json_lines(daemon.output())
    loggers = {record["logger"] for record in records}
    assert "uvicorn.error" in loggers, loggers
    rejected = [r for r in records if "rejected" in str(r["message"])]
    assert len(rejected) >= 2
    assert "series.yaml" in str(rejected[0]["message"])


def run_python(
    project: Path, code: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    full = clean_environ()
    full.update(env or {})
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=project,
        env=full,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_uncaught_errors_and_python_warnings_are_json_records(tmp_path: Path) -> None:
    result = run_python(
        tmp_path,
        "import warnings\n"
        "from invite_mailer.logs import setup_logging\n"
        "setup_logging('json')\n"
        "warnings.warn('something is deprecated', DeprecationWarning, stacklevel=1)\n"
        "raise RuntimeError('boom')\n",
    )
    assert result.returncode == 1
    records = json_lines(result.stderr)
    assert [r["logger"] for r in records] == ["py.warnings", "invite_mailer"]
    assert "something is deprecated" in str(records[0]["message"])
    assert records[1]["level"] == "critical"
    assert "RuntimeError: boom" in str(records[1]["exception"])


def test_a_flood_of_one_message_is_logged_once_per_interval_with_a_count() -> None:
    clock = [0.0]
    repeat = RepeatFilter(interval=60, clock=lambda: clock[0])
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(repeat)
    logger = logging.getLogger("test.flood")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        for _ in range(10_000):
            logger.error("socket.accept() out of system resource")
            clock[0] += 0.001
        logger.error("another problem")  # a different message is never hidden
        clock[0] = 61
        logger.error("socket.accept() out of system resource")
    finally:
        logger.removeHandler(handler)
    assert stream.getvalue().splitlines() == [
        "socket.accept() out of system resource",
        "another problem",
        "socket.accept() out of system resource (repeated 9999 more time(s) in 60 s)",
    ]


def test_answers_to_edits_and_routine_records_are_never_held_back() -> None:
    repeat = RepeatFilter(exempt=("invite_mailer.service.daemon",))

    def passes(name: str, level: int) -> bool:
        return repeat.filter(logging.makeLogRecord({"name": name, "levelno": level, "msg": "x"}))

    assert all(passes("invite_mailer.service.daemon", logging.ERROR) for _ in range(3))
    assert all(passes("invite_mailer.service.web", logging.INFO) for _ in range(3))
    assert passes("invite_mailer.service.web", logging.WARNING)
    assert not passes("invite_mailer.service.web", logging.WARNING)


# --- start-up, exit codes and health ------------------------------------------------------

# The command line exactly as the systemd unit runs it.
START = (
    "from invite_mailer.cli import main; raise SystemExit(main(['--log-format', 'json', 'run']))"
)


@pytest.mark.slow
@pytest.mark.parametrize(
    "breakage",
    [lambda text: text.replace("id: bald", "id: [bald"), _far_future_date],
    ids=["yaml-error", "date-overflow"],
)
def test_an_invalid_config_at_start_exits_1_and_says_a_restart_will_not_help(
    service: Path, breakage: object
) -> None:
    series = service / "config" / "series.yaml"
    series.write_text(breakage(series.read_text(encoding="utf-8")), encoding="utf-8")  # type: ignore[operator]
    result = run_python(service, START)
    assert result.returncode == 1, result.stderr
    records = json_lines(result.stderr)
    assert any(
        "not restarting: fix the config and start again" in str(r["message"]) for r in records
    )
    assert "Traceback" not in result.stderr
    assert not (service / "outbox").exists()


@pytest.mark.slow
async def test_other_failures_at_start_exit_with_a_status_that_is_restarted(
    service: Path,
) -> None:
    """The state database locked by another process: worth another try, so not exit 1."""
    config = load_config(service / "config")
    with state_lock(config.settings.state.path):
        code = await run_daemon(config, config_dir=service / "config", templates_dir=None)
    assert code == EXIT_TEMPFAIL != EXIT_INVALID_CONFIG


@pytest.mark.system
def test_a_pass_stopped_for_a_known_reason_is_one_line_not_a_traceback(
    service: Path, daemons: list[Daemon], smtp_server: SmtpServer
) -> None:
    # The relay offers no STARTTLS although the settings require it: every pass
    # stops before a mail leaves, and says why in one line.
    (service / "config" / "series.yaml").write_text(
        series_text(datetime.now(BERLIN) - timedelta(minutes=1)), encoding="utf-8"
    )
    env = smtp_env(smtp_server.port, smtp__security="starttls")
    daemon = start(daemons, service, env=env)
    daemon.wait_for_log("delivery pass stopped:", timeout=30)
    assert daemon.stop() == 0
    output = daemon.output()
    assert "STARTTLS" in output
    assert "Traceback" not in output, output
    assert smtp_server.received == []


@pytest.mark.system
def test_a_daemon_that_stopped_is_not_healthy(service: Path, daemons: list[Daemon]) -> None:
    daemon = start(daemons, service)
    daemon.wait_for_log("scheduled")
    assert invoke(["health"], {}).exit_code == 0
    assert daemon.stop() == 0
    result = invoke(["health"], {})
    assert result.exit_code == 1, result.output
    assert "stopped" in result.output


@pytest.mark.parametrize(
    "content",
    [
        b"\xff\xfe\x00{",
        b'{"time": "2024-11-14T14:00:00+01:00", "pid": 1, "state": "runn\xe4ng"}',
        b"\x00" * 100_000,
    ],
    ids=["utf16-garbage", "latin1", "huge"],
)
def test_a_garbled_heartbeat_is_reported_clearly(service: Path, content: bytes) -> None:
    path = service / "state" / "invite-mailer.heartbeat"
    path.parent.mkdir()
    path.write_bytes(content)
    result = invoke(["health"], {})
    assert result.exit_code == 1
    assert "unreadable" in result.output, result.output


def test_a_fifo_as_heartbeat_does_not_hang_health(service: Path) -> None:
    path = service / "state" / "invite-mailer.heartbeat"
    path.parent.mkdir()
    os.mkfifo(path)
    started = time.monotonic()
    result = invoke(["health"], {})
    assert time.monotonic() - started < 5
    assert result.exit_code == 1
    assert "not a regular file" in result.output


def test_the_unit_does_not_restart_an_invalid_config_but_everything_else() -> None:
    unit = (Path(__file__).resolve().parent.parent / "deploy" / "invite-mailer.service").read_text(
        encoding="utf-8"
    )
    keys = dict(
        line.split("=", 1) for line in unit.splitlines() if "=" in line and not line.startswith("#")
    )
    assert keys["Restart"] == "on-failure"
    prevented = {int(code) for code in keys["RestartPreventExitStatus"].split()}
    assert prevented == {EXIT_INVALID_CONFIG}
    assert not prevented & {EXIT_TEMPFAIL, EXIT_SOFTWARE}
