"""The nodes that share one ledger (PostgreSQL) and their heartbeats.

Every process that sends (a daemon, a ``send-due`` run) is a node. It beats
every ``state.heartbeat_seconds``: its row in ``nodes`` gets the time, and
the mails it holds in ``sending`` get their lease renewed to
``state.lease_seconds`` from then. A node that stops beating (killed, its
host gone, cut off from the database) loses its claims when their leases
run out: another node's next pass makes them ``uncertain`` and sends them
again, which is why only the mails a node had in flight can arrive twice.

Times here are wall-clock Unix seconds: liveness is about real time on real
hosts, never about the series' schedule (``--now`` replays leave it alone).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass

from invite_mailer.delivery.database import Database, transaction
from invite_mailer.delivery.ledger_sql import Holder
from invite_mailer.delivery.ledger_thread import LedgerThread
from invite_mailer.delivery.records import DeliveryState
from invite_mailer.delivery.send_slots import SendSlots
from invite_mailer.errors import LedgerError

__all__ = ["NodeIdentity", "NodeMembership", "NodeRow", "beat", "beating", "node_rows", "stop"]

log = logging.getLogger("invite_mailer.delivery.ledger")

# Beats this many heartbeats late count as a dead node (in status and health).
DEAD_AFTER_BEATS = 3


@dataclass(frozen=True, slots=True)
class NodeIdentity:
    """One process working on the ledger: ``host:pid`` plus a random tag (pids recur)."""

    id: str
    host: str
    pid: int
    role: str  # "daemon" or "send-due"

    @classmethod
    def here(cls, role: str) -> NodeIdentity:
        host = socket.gethostname()
        pid = os.getpid()
        return cls(f"{host}:{pid}:{secrets.token_hex(3)}", host, pid, role)


@dataclass(frozen=True, slots=True)
class NodeRow:
    """A node as the ledger knows it."""

    id: str
    host: str
    pid: int
    role: str
    started_at: float
    beat_at: float
    stopped_at: float | None
    holding: int  # mails it has claimed and not finished

    def alive(self, now: float, heartbeat_seconds: float) -> bool:
        if self.stopped_at is not None:
            return False
        return now - self.beat_at <= DEAD_AFTER_BEATS * heartbeat_seconds


def beat(db: Database, node: NodeIdentity, now: float, lease_until: float) -> int:
    """Record that *node* is alive at *now* and renew its leases; how many it holds."""
    with transaction(db):
        db.execute(
            "INSERT INTO nodes (id, host, pid, role, started_at, beat_at) "
            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET beat_at = excluded.beat_at",
            (node.id, node.host, node.pid, node.role, now, now),
        )
        # Nodes gone for a day are forgotten (status lists the recent ones).
        db.execute("DELETE FROM nodes WHERE beat_at < ?", (now - 86400.0,))
        held = db.execute(
            "UPDATE deliveries SET lease_until = ? WHERE claimed_by = ? AND state = ?",
            (lease_until, node.id, DeliveryState.SENDING.value),
        ).rowcount
    return held


def stop(db: Database, node: NodeIdentity, now: float) -> None:
    """*node* has ended cleanly (what it held is recorded or given back)."""
    db.execute("UPDATE nodes SET stopped_at = ?, beat_at = ? WHERE id = ?", (now, now, node.id))


def node_rows(db: Database, since: float) -> list[NodeRow]:
    """The nodes that beat at or after *since*, with what each holds, oldest first."""
    rows = db.execute(
        "SELECT n.id, n.host, n.pid, n.role, n.started_at, n.beat_at, n.stopped_at, "
        "(SELECT count(*) FROM deliveries d WHERE d.claimed_by = n.id AND d.state = ?) "
        "FROM nodes n WHERE n.beat_at >= ? ORDER BY n.started_at, n.id",
        (DeliveryState.SENDING.value, since),
    ).fetchall()
    return [
        NodeRow(
            str(r[0]),
            str(r[1]),
            int(r[2]),
            str(r[3]),
            float(r[4]),
            float(r[5]),
            None if r[6] is None else float(r[6]),
            int(r[7]),
        )
        for r in rows
    ]


@contextlib.asynccontextmanager
async def beating(
    beat_once: Callable[[], Awaitable[int]],
    stopped: Callable[[], Awaitable[None]],
    interval: float,
) -> AsyncIterator[None]:
    """Beat now and every *interval* seconds while the block runs; say so when it ends."""
    await beat_once()

    async def every() -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await beat_once()
            except LedgerError as exc:
                # The next beat may get through; a lease lasts several beats.
                log.warning("heartbeat: %s", exc)

    task = asyncio.get_running_loop().create_task(every())
    try:
        yield
    finally:
        task.cancel()
        await asyncio.wait([task])
        with contextlib.suppress(LedgerError):
            await stopped()


class NodeMembership:
    """What a :class:`~invite_mailer.delivery.ledger.Ledger` does as one node among
    several on a shared (PostgreSQL) ledger: beat, keep its leases, share quotas."""

    _thread: LedgerThread
    _clock: Callable[[], float]
    _heartbeat_seconds: float
    _renewed_at: float
    where: str
    shared: bool
    node: NodeIdentity | None
    lease_seconds: float

    def _beating(self, interval: float) -> AbstractAsyncContextManager[None]:
        if not (self.shared and self.node is not None):
            return contextlib.nullcontext()
        node = self.node

        async def stopped() -> None:
            now = self._clock()
            await self._thread.call(lambda db: stop(db, node, now))

        return beating(self.beat, stopped, interval)

    async def beat(self) -> int:
        """Record this node as alive and renew its leases; how many mails it holds."""
        node = self.node
        if node is None:
            return 0
        now = self._clock()
        lease_until = now + self.lease_seconds
        held = await self._thread.call(lambda db: beat(db, node, now, lease_until))
        self._renewed_at = now
        return held

    def check_lease(self) -> None:
        """Raise LedgerError when this node's leases may have run out (no heartbeat got
        through for nearly a lease): another node may be sending its mails by now.

        Asked just before a mail goes to the relay. A node that was frozen (a
        paused VM, SIGSTOP) or cut off from the database thus stops instead of
        sending what another node has taken over.
        """
        if self.node is None or not self.shared:
            return
        silent = self._clock() - self._renewed_at
        if silent > self.lease_seconds - 2 * self._heartbeat_seconds:
            raise LedgerError(
                f"{self.where}: no heartbeat reached the ledger for {silent:.0f} s; "
                "this node's claims may have passed to another node, so it sends nothing",
                hint="check the connection to PostgreSQL; the node goes on when a beat "
                "gets through",
                temporary=True,
            )

    async def nodes(self, *, within: float = 86400.0) -> list[NodeRow]:
        """The nodes that beat in the last *within* seconds, with what each holds."""
        since = self._clock() - within
        return await self._thread.call(lambda db: node_rows(db, since))

    def send_slots(self) -> SendSlots | None:
        """With several nodes: the shared places in the relay's quota windows."""
        if not self.shared:
            return None
        node = self.node.id if self.node is not None else ""
        return SendSlots(self._thread, node, self._clock, self.lease_seconds)

    def _holder(self) -> Holder:
        if self.node is None:
            return Holder()
        return Holder(self.node.id, self._clock() + self.lease_seconds)

    async def next_lease_end(self) -> float | None:
        """When the first claim another node holds runs out (Unix seconds), if any."""
        mine = self.node.id if self.node is not None else ""
        return await self._thread.call(lambda db: _next_lease_end(db, mine))


def _next_lease_end(db: Database, mine: str) -> float | None:
    row = db.execute(
        "SELECT min(lease_until) FROM deliveries WHERE state = ? AND claimed_by != ?",
        (DeliveryState.SENDING.value, mine),
    ).fetchone()
    return None if row is None or row[0] is None else float(row[0])
