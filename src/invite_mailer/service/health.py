"""The daemon's heartbeat: a small JSON file that a health check reads.

``invite-mailer run`` writes the heartbeat after every wake-up (at least once a
minute); ``invite-mailer health`` (the container ``HEALTHCHECK``, a monitoring
probe) reads it and says whether the daemon is alive. A file rather than an
HTTP endpoint: it needs no open port, works the same under systemd and Docker,
and the check runs as a separate process that only needs read access to the
state folder. A daemon that stops cleanly writes a last beat with ``state:
stopped``, so the check fails at once instead of three minutes later.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
import tempfile
from collections.abc import Mapping
from datetime import datetime, timedelta
from pathlib import Path

HEARTBEAT_FILE = "heartbeat"
"""Suffix of the heartbeat file, written beside the state database."""

DEFAULT_MAX_AGE = timedelta(minutes=3)
MAX_BYTES = 64 * 1024
"""A heartbeat is a few hundred bytes; anything larger is not one."""

STOPPED = "stopped"
"""The ``state`` of the last beat of a daemon that exited cleanly."""
_RESERVED = frozenset({"time", "pid"})


def heartbeat_path(state_db: Path) -> Path:
    """Where the daemon working on *state_db* writes its heartbeat.

    Beside the database, named after it: ``state/invite-mailer.db`` beats in
    ``state/invite-mailer.heartbeat``. The state folder is the one place that
    is writable in every deployment, and two daemons with different ledgers in
    one folder do not share a heartbeat.
    """
    return state_db.with_name(f"{state_db.stem}.{HEARTBEAT_FILE}")


def write_heartbeat(path: Path, now: datetime, info: Mapping[str, object]) -> None:
    """Write ``{"time": ..., "pid": ..., **info}`` to *path* atomically.

    The file is written beside *path* and renamed over it, so a health check
    reading at the same moment sees the old beat or the new one, never half a
    file. Values in *info* that JSON does not know are written as ``str()``.
    """
    _require_aware(now)
    clash = _RESERVED & info.keys()
    if clash:
        raise ValueError(f"heartbeat info must not set {', '.join(sorted(clash))}")
    data = {"time": now.isoformat(), "pid": os.getpid(), **info}
    text = json.dumps(data, ensure_ascii=False, default=str) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def check_heartbeat(
    path: Path, now: datetime, max_age: timedelta = DEFAULT_MAX_AGE
) -> tuple[bool, str]:
    """Whether the heartbeat at *path* is younger than *max_age* at *now*.

    Returns ``(ok, message)``; the message says what an operator needs to know
    (no heartbeat yet, how long it has been silent, or when it last beat). The
    last beat of a daemon that stopped cleanly (``state: stopped``) is not ok,
    however young it is.
    """
    _require_aware(now)
    try:
        data = _read(path)
    except FileNotFoundError:
        return False, (
            f"no heartbeat at {path}: the daemon is not running, has not finished "
            "starting, or uses another state database"
        )
    except OSError as exc:
        return False, f"cannot read the heartbeat {path}: {exc.strerror or exc}"
    beat, pid, state = _parse(data)
    if beat is None:
        return False, (
            f"the heartbeat {path} is unreadable (expected JSON with an ISO 'time'); "
            "a running daemon rewrites it within a minute"
        )
    who = f"pid {pid}" if pid is not None else "unknown pid"
    if state == STOPPED:
        return False, (
            f"the daemon stopped at {beat.isoformat()} ({who}) and is not running; "
            "start it again (systemctl start invite-mailer / docker compose up -d)"
        )
    age = now - beat
    if age > max_age:
        return False, (
            f"stale since {beat.isoformat()}: no heartbeat for {_duration(age)} "
            f"(limit {_duration(max_age)}; {who}); the daemon is stopped or hung"
        )
    if -age > max_age:
        # A beat from the future: the clock was set back. Trusting it would
        # report a hung daemon as healthy until the clock catches up.
        return False, (
            f"the last heartbeat {beat.isoformat()} lies {_duration(-age)} in the future "
            f"({who}); was the system clock changed?"
        )
    return True, f"ok, last beat {beat.isoformat()} ({_duration(max(age, timedelta()))} ago, {who})"


def _read(path: Path) -> bytes:
    """At most :data:`MAX_BYTES` of *path*, which must be a regular file.

    Opened without blocking, so a FIFO put in its place cannot hang the check.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        return os.read(fd, MAX_BYTES + 1)
    finally:
        os.close(fd)


def _parse(raw: bytes) -> tuple[datetime | None, int | None, str | None]:
    if len(raw) > MAX_BYTES:
        return None, None, None
    try:
        data = json.loads(raw.decode("utf-8"))
    except ValueError:  # UnicodeDecodeError included: garbage, or a half-written file
        return None, None, None
    if not isinstance(data, dict) or not isinstance(data.get("time"), str):
        return None, None, None
    try:
        beat = datetime.fromisoformat(data["time"])
    except ValueError:
        return None, None, None
    if beat.tzinfo is None or beat.utcoffset() is None:
        return None, None, None
    pid = data.get("pid")
    state = data.get("state")
    return beat, pid if isinstance(pid, int) else None, state if isinstance(state, str) else None


def _duration(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 2 * 3600:
        return f"{seconds // 60} min"
    if seconds < 2 * 86400:
        return f"{seconds // 3600} h"
    return f"{seconds // 86400} days"


def _require_aware(now: datetime) -> None:
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must be timezone-aware")
