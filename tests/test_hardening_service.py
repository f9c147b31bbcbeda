"""The long-running service under hostile edits, faults and load.

The daemon runs as a real process (``python -m invite_mailer run``) on the
outbox transport, on the real clock; the series is written with its dates
around now, so what the daemon does is visible as ``.eml`` files in
``outbox/``. The unsubscribe endpoint is served over real sockets.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import httpx
import pytest

from deliverykit import (
    clean_environ,
    copy_project,
    free_port,
    start_process,
    wait_for,
    write_contacts,
)

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
    copy_project(tmp_path)
    monkeypatch.chdir(tmp_path)
    for name in os.environ.keys() - clean_environ().keys():
        monkeypatch.delenv(name)
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
