"""``invite-mailer health``: is this host's daemon alive, and (PostgreSQL) the other nodes."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from pathlib import Path

from invite_mailer.delivery.ledger import Ledger, NodeRow
from invite_mailer.errors import LedgerError
from invite_mailer.inputs.settings_file import load_settings
from invite_mailer.service.health import check_heartbeat, heartbeat_path

__all__ = ["health", "node_line"]


def health(config_dir: Path, now: datetime) -> tuple[bool, str]:
    """Whether the daemon's heartbeat is fresh at *now*, and what to say about it.

    Only the settings are read: a broken series.yaml must not make a daemon
    that keeps running its last good config look dead.
    """
    settings = load_settings(config_dir)
    ok, message = check_heartbeat(heartbeat_path(settings.state.path), now)
    if not settings.state.is_postgresql:
        return ok, message
    # The heartbeat file is this host's daemon; the ledger tells about all of them.
    try:
        rows = asyncio.run(_nodes(settings.state.target))
    except LedgerError as exc:
        return False, f"{message}; but the ledger cannot be read: {exc}"
    lines = [node_line(row, time.time(), settings.state.heartbeat_seconds) for row in rows]
    return ok, "\n".join([message, *lines])


async def _nodes(target: Path | str) -> list[NodeRow]:
    async with Ledger.open(target, lock_wait=5.0) as ledger:
        return await ledger.nodes(within=3600.0)


def node_line(row: NodeRow, now: float, heartbeat_seconds: float) -> str:
    """One node for an operator: who, alive or not, since when, what it holds."""
    alive = (
        "alive" if row.alive(now, heartbeat_seconds) else "stopped" if row.stopped_at else "dead"
    )
    started = datetime.fromtimestamp(row.started_at, UTC).isoformat(timespec="seconds")
    return (
        f"node {row.id} ({row.role}): {alive}, last beat {now - row.beat_at:.0f} s ago, "
        f"started {started}, holds {row.holding} mail(s)"
    )
