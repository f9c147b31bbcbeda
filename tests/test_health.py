"""The heartbeat file: written atomically by the daemon, judged by ``health``.

Once, not on both ledgers: these tests write and judge the file itself, which
lies beside ``state.path`` whatever the engine; no ledger is opened here.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from invite_mailer.service.health import (
    DEFAULT_MAX_AGE,
    check_heartbeat,
    heartbeat_path,
    write_heartbeat,
)

BERLIN = ZoneInfo("Europe/Berlin")
NOW = datetime(2024, 11, 14, 14, 0, tzinfo=BERLIN)


def test_heartbeat_lives_beside_the_state_database() -> None:
    assert heartbeat_path(Path("state/invite-mailer.db")) == Path("state/invite-mailer.heartbeat")
    assert heartbeat_path(Path("/var/lib/invite-mailer/invite-mailer.db")) == Path(
        "/var/lib/invite-mailer/invite-mailer.heartbeat"
    )
    assert heartbeat_path(Path("/srv/ledger")) == Path("/srv/ledger.heartbeat")


def test_write_records_time_pid_and_info(tmp_path: Path) -> None:
    path = heartbeat_path(tmp_path / "state" / "invite-mailer.db")
    write_heartbeat(path, NOW, {"state": "running", "series": "transferreihe-2024", "jobs": 9})
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data == {
        "time": "2024-11-14T14:00:00+01:00",
        "pid": os.getpid(),
        "state": "running",
        "series": "transferreihe-2024",
        "jobs": 9,
    }


def test_write_replaces_the_old_beat_and_leaves_no_temporary_files(tmp_path: Path) -> None:
    path = tmp_path / "invite-mailer.heartbeat"
    write_heartbeat(path, NOW, {})
    write_heartbeat(path, NOW + timedelta(minutes=1), {"next": NOW + timedelta(hours=1)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["invite-mailer.heartbeat"]
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["time"] == "2024-11-14T14:01:00+01:00"
    assert data["next"] == "2024-11-14 15:00:00+01:00"  # non-JSON values as str()


def test_failed_write_keeps_the_previous_beat(tmp_path: Path) -> None:
    path = tmp_path / "invite-mailer.heartbeat"
    write_heartbeat(path, NOW, {})
    before = path.read_text(encoding="utf-8")

    class Unprintable:
        def __str__(self) -> str:
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        write_heartbeat(path, NOW + timedelta(minutes=1), {"bad": Unprintable()})
    assert path.read_text(encoding="utf-8") == before
    assert [p.name for p in tmp_path.iterdir()] == ["invite-mailer.heartbeat"]


def test_failed_rename_removes_the_temporary_file(tmp_path: Path) -> None:
    path = tmp_path / "invite-mailer.heartbeat"
    (path / "in-the-way").mkdir(parents=True)  # a non-empty directory cannot be replaced
    with pytest.raises(OSError):
        write_heartbeat(path, NOW, {})
    assert [p.name for p in tmp_path.iterdir()] == ["invite-mailer.heartbeat"]


@pytest.mark.parametrize("key", ["time", "pid"])
def test_info_cannot_override_time_or_pid(tmp_path: Path, key: str) -> None:
    with pytest.raises(ValueError, match=key):
        write_heartbeat(tmp_path / "hb", NOW, {key: "x"})


def test_naive_times_are_refused(tmp_path: Path) -> None:
    naive = NOW.replace(tzinfo=None)
    with pytest.raises(ValueError, match="timezone-aware"):
        write_heartbeat(tmp_path / "hb", naive, {})
    with pytest.raises(ValueError, match="timezone-aware"):
        check_heartbeat(tmp_path / "hb", naive)


def test_missing_heartbeat_is_unhealthy(tmp_path: Path) -> None:
    ok, message = check_heartbeat(tmp_path / "invite-mailer.heartbeat", NOW)
    assert not ok
    assert message.startswith("no heartbeat at ")
    assert "not running" in message


@pytest.mark.parametrize(
    ("age", "ok", "start"),
    [
        (timedelta(0), True, "ok, last beat 2024-11-14T14:00:00+01:00 (0 s ago, pid "),
        (timedelta(seconds=59), True, "ok, last beat 2024-11-14T14:00:00+01:00 (59 s ago, pid "),
        (DEFAULT_MAX_AGE, True, "ok, last beat"),
        (
            DEFAULT_MAX_AGE + timedelta(seconds=1),
            False,
            "stale since 2024-11-14T14:00:00+01:00: no heartbeat for 3 min (limit 3 min; pid ",
        ),
        (timedelta(hours=5), False, "stale since 2024-11-14T14:00:00+01:00: no heartbeat for 5 h"),
        (
            timedelta(days=3),
            False,
            "stale since 2024-11-14T14:00:00+01:00: no heartbeat for 3 days",
        ),
    ],
)
def test_heartbeat_age_decides(tmp_path: Path, age: timedelta, ok: bool, start: str) -> None:
    path = tmp_path / "invite-mailer.heartbeat"
    write_heartbeat(path, NOW, {"state": "running"})
    result, message = check_heartbeat(path, NOW + age)
    assert result is ok
    assert message.startswith(start), message


def test_max_age_is_configurable(tmp_path: Path) -> None:
    path = tmp_path / "invite-mailer.heartbeat"
    write_heartbeat(path, NOW, {})
    assert check_heartbeat(path, NOW + timedelta(minutes=2), timedelta(minutes=1))[0] is False
    assert check_heartbeat(path, NOW + timedelta(minutes=2), timedelta(minutes=5))[0] is True


def test_times_in_other_zones_compare_as_instants(tmp_path: Path) -> None:
    path = tmp_path / "invite-mailer.heartbeat"
    write_heartbeat(path, NOW, {})
    ok, message = check_heartbeat(path, datetime(2024, 11, 14, 13, 0, 30, tzinfo=UTC))
    assert ok, message
    assert "(30 s ago" in message


def test_small_clock_skew_is_tolerated_but_a_beat_far_in_the_future_is_not(
    tmp_path: Path,
) -> None:
    path = tmp_path / "invite-mailer.heartbeat"
    write_heartbeat(path, NOW, {})
    ok, message = check_heartbeat(path, NOW - timedelta(seconds=5))
    assert ok
    assert "(0 s ago" in message
    ok, message = check_heartbeat(path, NOW - timedelta(hours=1))
    assert not ok
    assert "in the future" in message


@pytest.mark.parametrize(
    "content",
    [
        "",
        "{half",
        "[]",
        '{"pid": 1}',
        '{"time": 12}',
        '{"time": "yesterday"}',
        '{"time": "2024-11-14T14:00:00"}',  # naive: cannot be compared safely
    ],
)
def test_unreadable_heartbeat_is_unhealthy(tmp_path: Path, content: str) -> None:
    path = tmp_path / "invite-mailer.heartbeat"
    path.write_text(content, encoding="utf-8")
    ok, message = check_heartbeat(path, NOW)
    assert not ok
    assert "unreadable" in message


def test_heartbeat_without_pid_still_counts(tmp_path: Path) -> None:
    path = tmp_path / "invite-mailer.heartbeat"
    path.write_text('{"time": "2024-11-14T14:00:00+01:00"}', encoding="utf-8")
    ok, message = check_heartbeat(path, NOW + timedelta(seconds=10))
    assert ok
    assert message.endswith("(10 s ago, unknown pid)")


def test_a_directory_in_the_way_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "invite-mailer.heartbeat"
    path.mkdir()
    ok, message = check_heartbeat(path, NOW)
    assert not ok
    assert message.startswith("cannot read the heartbeat")
