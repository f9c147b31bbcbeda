"""The ledger in PostgreSQL: schema, claims between nodes, leases, heartbeats, moving.

Against the real server (see support.postgres), each test in its own schema.
The ledger tests in test_ledger.py and test_ledger_window.py run on both
engines; these are what only a shared ledger has.
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest

from invite_mailer.delivery.ledger import SCHEMA_VERSION, DeliveryKey, Ledger, NodeIdentity
from invite_mailer.delivery.ledger_sql import Claim, Finish
from invite_mailer.delivery.ratelimit import Quotas
from invite_mailer.delivery.records import DeliveryState
from invite_mailer.delivery.window import LedgerWindow
from invite_mailer.errors import LedgerError, QuotaReached
from support.cli import invoke
from support.postgres import fresh_schema, query

NOW = datetime(2024, 10, 24, 8, 0, tzinfo=UTC)
SERIES = "s"


def key(n: int) -> DeliveryKey:
    return DeliveryKey(SERIES, "invitation", "", f"person{n}@example.org")


@pytest.fixture
def url() -> object:
    with fresh_schema() as found:
        yield found


class Clock:
    """Wall-clock seconds for leases and heartbeats, moved by the test."""

    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def node(name: str) -> NodeIdentity:
    return NodeIdentity(f"{name}:1:aa", name, 1, "daemon")


# --- the schema ------------------------------------------------------------------------


async def test_a_new_database_gets_the_schema_and_its_version(url: str) -> None:
    async with Ledger.open(url) as ledger:
        assert await ledger.counts(SERIES) == {}
    assert query(url, "SELECT version FROM invite_mailer_schema") == [(SCHEMA_VERSION,)]


async def test_an_older_schema_is_refused_until_migrate_runs(url: str, project: Path) -> None:
    async with Ledger.open(url):
        pass
    query(url, "UPDATE invite_mailer_schema SET version = ?", (SCHEMA_VERSION - 1,))
    query(url, "ALTER TABLE deliveries DROP COLUMN lease_until")
    query(url, "ALTER TABLE deliveries DROP COLUMN claimed_by")
    query(url, "DROP TABLE nodes")
    query(url, "DROP TABLE send_slots")
    with pytest.raises(LedgerError, match="invite-mailer migrate"):
        async with Ledger.open(url):
            pass
    env = {"INVITE_MAILER_STATE__URL": url}
    done = invoke(["migrate", "--json"], env)
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout)["from"] == SCHEMA_VERSION - 1
    async with Ledger.open(url) as ledger:
        assert await ledger.claim(key(1), "<1@x>", NOW)


async def test_a_newer_schema_is_refused(url: str) -> None:
    async with Ledger.open(url):
        pass
    query(url, "UPDATE invite_mailer_schema SET version = ?", (SCHEMA_VERSION + 1,))
    with pytest.raises(LedgerError, match="newer invite-mailer"):
        async with Ledger.open(url):
            pass


async def test_tables_of_another_program_are_refused(url: str) -> None:
    query(url, "CREATE TABLE deliveries (id INTEGER)")
    with pytest.raises(LedgerError, match="not written by invite-mailer"):
        async with Ledger.open(url):
            pass


def test_a_password_in_the_url_is_refused(project: Path) -> None:
    env = {"INVITE_MAILER_STATE__URL": "postgresql://mailer:geheim@127.0.0.1/test"}
    result = invoke(["validate"], env)
    assert result.exit_code == 1
    assert "must not contain a password" in result.output and "PGPASSWORD" in result.output
    assert "geheim" not in result.output


async def test_an_unreachable_server_is_a_temporary_ledger_error() -> None:
    with pytest.raises(LedgerError) as caught:
        async with Ledger.open("postgresql://postgres@127.0.0.1:9/test", lock_wait=2):
            pass
    assert caught.value.temporary and "cannot reach the state database" in str(caught.value)


# --- claims between nodes --------------------------------------------------------------


async def test_of_two_nodes_claiming_the_same_mails_at_once_each_mail_goes_to_one(
    url: str,
) -> None:
    mails = 400
    async with (
        Ledger.open(url, node=node("a")) as a,
        Ledger.open(url, node=node("b")) as b,
        LedgerWindow(a, 16) as window_a,
        LedgerWindow(b, 16) as window_b,
    ):

        async def claim_all(window: LedgerWindow, order: range) -> set[int]:
            won = set()
            for n in order:
                if await window.claim(Claim(key(n), f"<{n}@x>", NOW)):
                    won.add(n)
                    window.finish(Finish(key(n), DeliveryState.SENT, "250 ok", NOW))
            return won

        # Opposite orders: every row is fought over, and the batches lock in key order.
        got_a, got_b = await asyncio.gather(
            claim_all(window_a, range(mails)), claim_all(window_b, range(mails - 1, -1, -1))
        )
    assert got_a.isdisjoint(got_b) and got_a | got_b == set(range(mails))
    holders = dict(query(url, "SELECT claimed_by, count(*) FROM deliveries GROUP BY claimed_by"))
    assert query(url, "SELECT DISTINCT state, attempts FROM deliveries") == [("sent", 1)]
    assert holders == {"a:1:aa": len(got_a), "b:1:aa": len(got_b)}


async def test_a_dead_nodes_claims_come_back_only_when_their_lease_has_run_out(
    url: str,
) -> None:
    clock = Clock()
    async with Ledger.open(url, node=node("a"), lease_seconds=120, clock=clock) as a:
        assert await a.claim(key(1), "<1@x>", NOW)
    # Node a is gone (its process killed: no outcome was recorded).
    async with Ledger.open(url, node=node("b"), lease_seconds=120, clock=clock) as b:
        clock.now += 119
        assert await b.recover(NOW) == []
        assert not await b.claim(key(1), "<1@x>", NOW)
        clock.now += 2
        (taken,) = await b.recover(NOW)
        assert taken.email == key(1).email and taken.state == "uncertain"
        assert await b.claim(key(1), "<1@x>", NOW)


async def test_a_heartbeat_keeps_the_claims_of_a_live_node(url: str) -> None:
    clock = Clock()
    async with (
        Ledger.open(url, node=node("a"), lease_seconds=120, clock=clock) as a,
        Ledger.open(url, node=node("b"), lease_seconds=120, clock=clock) as b,
    ):
        assert await a.claim(key(1), "<1@x>", NOW)
        for _ in range(5):  # ten minutes of beats, each within the lease
            clock.now += 110
            assert await a.beat() == 1
            assert await b.recover(NOW) == []
        rows = {row.id: row for row in await b.nodes()}
        assert rows["a:1:aa"].holding == 1 and rows["b:1:aa"].holding == 0
        assert rows["a:1:aa"].alive(clock.now, 10)
        await a.mark_sent(key(1), "250 ok", NOW)
        assert {row.id: row.holding for row in await b.nodes()}["a:1:aa"] == 0


async def test_a_node_that_ends_is_marked_stopped(url: str) -> None:
    clock = Clock()
    async with Ledger.open(url, node=node("a"), clock=clock):
        pass
    async with Ledger.open(url, clock=clock) as reader:
        (row,) = await reader.nodes()
    assert row.id == "a:1:aa" and row.stopped_at is not None
    assert not row.alive(clock.now, 10)


async def test_two_nodes_that_see_an_edit_record_one_grace_period(url: str) -> None:
    dates = {"verwaltung": ("v2", {"start": "2024-11-14T15:00"})}
    day = timedelta(days=1)
    async with Ledger.open(url) as a, Ledger.open(url) as b:
        await asyncio.gather(
            a.observe_dates(SERIES, dates, NOW), b.observe_dates(SERIES, dates, NOW + day)
        )
        first = (await a.view(SERIES)).date("verwaltung")
        assert first is not None and first.current == "v2"
        assert first.observed_since in (NOW, NOW + day)
        # Seen again by both, later: the grace period does not start again.
        await asyncio.gather(
            a.observe_dates(SERIES, dates, NOW + 2 * day),
            b.observe_dates(SERIES, dates, NOW + 3 * day),
        )
        again = (await b.view(SERIES)).date("verwaltung")
    assert again is not None and again.observed_since == first.observed_since
    assert query(url, "SELECT count(*) FROM date_versions") == [(1,)]


# --- moving an SQLite ledger -------------------------------------------------------------


@pytest.mark.slow
def test_an_sqlite_ledger_moves_to_postgres_with_every_row(project: Path, url: str) -> None:
    sent = invoke(["send-due", "--now", "2024-10-24T10:05"], {})
    assert sent.exit_code == 0, sent.output
    invoke(["optout", "add", "anna.schmidt@example.org"], {})
    sqlite_url = "sqlite:///state/invite-mailer.db"
    before = invoke(["status", "--now", "2024-10-24T10:06", "--json"], {})
    moved = invoke(["migrate", "--from", sqlite_url, "--to", url, "--json"], {})
    assert moved.exit_code == 0, moved.output
    rows = json.loads(moved.stdout)["rows"]
    assert rows["deliveries"] == 13 and rows["optouts"] >= 1  # 12 invitations + the report
    after = invoke(
        ["status", "--now", "2024-10-24T10:06", "--json"], {"INVITE_MAILER_STATE__URL": url}
    )
    assert after.exit_code == 0, after.output
    assert json.loads(after.stdout)["mailings"] == json.loads(before.stdout)["mailings"]
    # Nothing goes out twice from the new ledger, and a new row gets a fresh id.
    again = invoke(
        ["send-due", "--now", "2024-10-24T10:07", "--json"], {"INVITE_MAILER_STATE__URL": url}
    )
    assert again.exit_code == 0 and json.loads(again.stdout)["sent"] == 0, again.output
    # A second move into the same ledger is refused and changes nothing.
    twice = invoke(["migrate", "--from", sqlite_url, "--to", url], {})
    assert twice.exit_code == 1 and "already holds a ledger" in twice.output
    assert query(url, "SELECT count(*) FROM deliveries") == [(13,)]


def test_moving_needs_an_sqlite_source_and_a_postgres_target(project: Path, url: str) -> None:
    result = invoke(["migrate", "--from", url, "--to", "sqlite:///state/x.db"], {})
    assert result.exit_code == 1 and "--from names an SQLite ledger" in result.output
    missing = invoke(["migrate", "--from", "sqlite:///state/none.db", "--to", url], {})
    assert missing.exit_code == 1 and "no SQLite ledger there" in missing.output
    query_url = invoke(["migrate", "--from", "sqlite:///state/a.db?x=1", "--to", url], {})
    assert query_url.exit_code == 1 and "must be a file path" in query_url.output
    assert "pydantic" not in query_url.output
    (project / "state").mkdir(exist_ok=True)
    (project / "state" / "notes.db").write_text("not a database", encoding="utf-8")
    foreign = invoke(["migrate", "--from", "sqlite:///state/notes.db", "--to", url], {})
    assert foreign.exit_code == 1 and "is not an SQLite database" in foreign.output


def test_the_test_server_is_real() -> None:
    with fresh_schema() as found, psycopg.connect(found) as db:
        assert db.execute("SELECT current_schema()").fetchone()[0].startswith("t_")


@pytest.mark.slow
def test_status_and_health_list_the_nodes_and_what_they_hold(project: Path, url: str) -> None:
    env = {"INVITE_MAILER_STATE__URL": url}
    assert invoke(["send-due", "--now", "2024-10-24T10:05"], env).exit_code == 0
    status = invoke(["status", "--now", "2024-10-24T10:06", "--json"], env)
    (node,) = json.loads(status.stdout)["nodes"]
    assert node["role"] == "send-due" and node["holding"] == 0
    assert node["stopped"] is not None and not node["alive"]
    table = invoke(["status", "--now", "2024-10-24T10:06"], env)
    assert "Nodes on this ledger" in table.output and "send-due" in table.output
    health = invoke(["health"], env)
    assert health.exit_code == 1  # no daemon runs on this host
    assert f"node {node['id']} (send-due): stopped" in health.output


async def test_a_node_whose_heartbeats_do_not_get_through_sends_nothing(url: str) -> None:
    clock = Clock()
    async with Ledger.open(
        url, node=node("a"), lease_seconds=120, heartbeat_seconds=10, clock=clock
    ) as a:
        a.check_lease()
        clock.now += 99  # nine beats lost: still a beat short of the margin
        a.check_lease()
        clock.now += 2
        with pytest.raises(LedgerError, match="no heartbeat reached the ledger") as caught:
            a.check_lease()
        assert caught.value.temporary
        await a.beat()  # a beat gets through again
        a.check_lease()


async def test_quotas_hold_across_nodes_sharing_one_ledger(url: str) -> None:
    clock = Clock()

    async def virtual_sleep(seconds: float) -> None:
        clock.now += seconds
        await asyncio.sleep(0)

    starts: list[float] = []
    async with (
        Ledger.open(url, node=node("a"), clock=clock) as a,
        Ledger.open(url, node=node("b"), clock=clock) as b,
    ):
        nodes = [Quotas(5, 0, 12, sleep=virtual_sleep, wall_clock=clock) for _ in range(2)]
        await nodes[0].share(a)
        await nodes[1].share(b)

        async def sender(quotas: Quotas) -> None:
            for _ in range(4):
                try:
                    async with quotas.slot():
                        starts.append(clock.now)
                except QuotaReached:
                    return

        await asyncio.gather(*(sender(q) for q in nodes for _ in range(3)))
        for quotas in nodes:
            await quotas.flush()
    starts.sort()
    # Together at most 5 in any minute, and the day's 12 in all; then the day is full.
    assert len(starts) == 12
    assert max(sum(1 for t in starts if s <= t < s + 60) for s in starts) == 5
