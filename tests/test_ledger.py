"""The delivery ledger on a real SQLite file."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from invite_mailer.delivery import ledger_file
from invite_mailer.delivery.ledger import (
    SCHEMA_VERSION,
    DeliveryKey,
    DeliveryState,
    Ledger,
    LedgerError,
    state_lock,
)
from invite_mailer.errors import InviteMailerError, LockedError
from support.postgres import query

BERLIN = ZoneInfo("Europe/Berlin")
NOW = datetime(2024, 10, 24, 10, 5, tzinfo=BERLIN)
SERIES = "transferreihe-2024"
SENT, FAILED, PENDING = DeliveryState.SENT, DeliveryState.FAILED, DeliveryState.PENDING
SENDING, UNCERTAIN = DeliveryState.SENDING, DeliveryState.UNCERTAIN


def key(email: str = "anna@example.org", kind: str = "invitation", event: str = "") -> DeliveryKey:
    return DeliveryKey(SERIES, kind, event, email)


def write_file(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "invite-mailer.db"


async def test_open_creates_a_wal_database_at_the_current_version(db_path: Path) -> None:
    async with Ledger.open(db_path):
        pass
    with sqlite3.connect(db_path) as raw:
        assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        tables = {row[0] for row in raw.execute("SELECT name FROM sqlite_master")}
    raw.close()
    assert {"deliveries", "optouts"} <= tables
    async with Ledger.open(db_path) as ledger:  # opening again migrates nothing
        assert await ledger.counts(SERIES) == {}


def test_key_compares_addresses_case_insensitively() -> None:
    assert key(" Anna@Example.ORG") == key("anna@example.org")


async def test_claim_then_sent(ledger_target: Path | str) -> None:
    async with Ledger.open(ledger_target) as ledger:
        assert await ledger.claim(key(), "<1@example.org>", NOW, version="v1")
        claimed = await ledger.get(key())
        assert claimed is not None
        assert (claimed.state, claimed.attempts, claimed.message_id) == (
            SENDING,
            1,
            "<1@example.org>",
        )
        assert claimed.first_attempt_at == claimed.last_attempt_at == NOW
        assert claimed.version == "v1"

        assert not await ledger.claim(key(), "<2@example.org>", NOW)  # already sending
        await ledger.mark_sent(key(), "250 2.0.0 Ok: queued as ABC", NOW + timedelta(seconds=1))
        assert not await ledger.claim(key(), "<3@example.org>", NOW)  # already sent

        sent = await ledger.get(key())
        assert sent is not None
        assert (sent.state, sent.attempts, sent.last_response) == (
            SENT,
            1,
            "250 2.0.0 Ok: queued as ABC",
        )
        assert sent.message_id == "<1@example.org>"
        assert sent.updated_at == NOW + timedelta(seconds=1)
        assert sent.updated_at is not None and sent.updated_at.tzinfo is not None


async def test_failed_is_final(ledger_target: Path | str) -> None:
    async with Ledger.open(ledger_target) as ledger:
        assert await ledger.claim(key(), "<1@x>", NOW)
        await ledger.mark_failed(key(), "550 5.1.1 User unknown", NOW)
        assert not await ledger.claim(key(), "<2@x>", NOW + timedelta(days=1))
        failed = await ledger.get(key())
        assert failed is not None and failed.state is FAILED
        assert failed.last_response == "550 5.1.1 User unknown"


async def test_retry_goes_back_to_pending_and_can_be_claimed_again(
    ledger_target: Path | str,
) -> None:
    later = NOW + timedelta(minutes=5)
    async with Ledger.open(ledger_target) as ledger:
        assert await ledger.claim(key(), "<1@x>", NOW)
        await ledger.mark_retry(key(), "451 4.3.0 try later", NOW, later)
        pending = await ledger.get(key())
        assert pending is not None
        assert (pending.state, pending.next_attempt_at) == (PENDING, later)

        assert await ledger.claim(key(), "<1@x>", later)
        again = await ledger.get(key())
        assert again is not None
        assert (again.state, again.attempts, again.next_attempt_at) == (SENDING, 2, None)
        assert again.first_attempt_at == NOW
        assert again.last_attempt_at == later


async def test_only_claimed_deliveries_can_be_marked(ledger_target: Path | str) -> None:
    async with Ledger.open(ledger_target) as ledger:
        with pytest.raises(LedgerError, match="no such delivery"):
            await ledger.mark_sent(key(), "250 ok", NOW)
        assert await ledger.claim(key(), "<1@x>", NOW)
        await ledger.mark_sent(key(), "250 ok", NOW)
        with pytest.raises(LedgerError, match="it is sent"):
            await ledger.mark_failed(key(), "550 no", NOW)


async def test_release_undoes_a_claim(ledger_target: Path | str) -> None:
    async with Ledger.open(ledger_target) as ledger:
        assert await ledger.claim(key(), "<1@x>", NOW)
        await ledger.release(key(), NOW)
        released = await ledger.get(key())
        assert released is not None and released.state is PENDING
        assert await ledger.claim(key(), "<1@x>", NOW)


async def test_uncertain_after_a_lost_answer(ledger_target: Path | str) -> None:
    async with Ledger.open(ledger_target) as ledger:
        assert await ledger.claim(key(), "<1@x>", NOW)
        await ledger.mark_uncertain(key(), "no answer after DATA", NOW, NOW + timedelta(hours=1))
        uncertain = await ledger.get(key())
        assert uncertain is not None and uncertain.state is UNCERTAIN
        assert uncertain.next_attempt_at == NOW + timedelta(hours=1)
        assert await ledger.claim(key(), uncertain.message_id, NOW + timedelta(hours=1))


async def test_recover_turns_sending_into_uncertain(ledger_target: Path | str) -> None:
    async with Ledger.open(ledger_target) as ledger:
        assert await ledger.claim(key("a@x.org"), "<a@x>", NOW)
        assert await ledger.claim(key("b@x.org"), "<b@x>", NOW)
        await ledger.mark_sent(key("b@x.org"), "250 ok", NOW)
        # ... and the process dies here.
    async with Ledger.open(ledger_target) as ledger:
        recovered = await ledger.recover(NOW + timedelta(minutes=1))
        assert [(d.email, d.state) for d in recovered] == [("a@x.org", UNCERTAIN)]
        assert await ledger.recover(NOW) == []
        states = (await ledger.view(SERIES)).states("invitation", "")
        assert dict(states) == {"a@x.org": UNCERTAIN, "b@x.org": SENT}
        # Uncertain mails are sent again; sent ones never.
        assert await ledger.claim(key("a@x.org"), "<a@x>", NOW + timedelta(minutes=2))
        assert not await ledger.claim(key("b@x.org"), "<b@x>", NOW + timedelta(minutes=2))
        again = await ledger.get(key("a@x.org"))
        assert again is not None and again.attempts == 2


@pytest.mark.slow
def test_a_claim_survives_sigkill(ledger_target: Path | str) -> None:
    script = textwrap.dedent(
        f"""
        import asyncio, os, signal
        from datetime import datetime, UTC
        from invite_mailer.delivery.ledger import DeliveryKey, Ledger

        async def main():
            async with Ledger.open({str(ledger_target)!r}) as ledger:
                now = datetime.now(UTC)
                await ledger.claim(DeliveryKey("s", "invitation", "", "a@x.org"), "<a@x>", now)
                await ledger.claim(DeliveryKey("s", "invitation", "", "b@x.org"), "<b@x>", now)
                await ledger.mark_sent(DeliveryKey("s", "invitation", "", "b@x.org"), "250", now)
                os.kill(os.getpid(), signal.SIGKILL)

        asyncio.run(main())
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=30)
    assert done.returncode == -signal.SIGKILL, done.stderr.decode()
    rows = query(ledger_target, "SELECT email, state FROM deliveries ORDER BY email")
    assert rows == [("a@x.org", "sending"), ("b@x.org", "sent")]


async def test_view_is_an_immutable_snapshot(ledger_target: Path | str) -> None:
    retry_at = NOW + timedelta(minutes=10)
    async with Ledger.open(ledger_target) as ledger:
        assert await ledger.claim(key("a@x.org"), "<a@x>", NOW)
        await ledger.mark_sent(key("a@x.org"), "250", NOW)
        assert await ledger.claim(key("b@x.org"), "<b@x>", NOW)
        await ledger.mark_retry(key("b@x.org"), "451", NOW, retry_at)
        assert await ledger.claim(key("a@x.org", "reminder", "verwaltung"), "<r@x>", NOW)
        assert await ledger.claim(DeliveryKey("other-series", "invitation", "", "z@x.org"), "", NOW)

        view = await ledger.view(SERIES)
        await ledger.mark_sent(key("a@x.org", "reminder", "verwaltung"), "250", NOW)

    invitation = view.states("invitation", "")
    assert dict(invitation) == {"a@x.org": SENT, "b@x.org": PENDING}
    assert dict(view.states("reminder", "verwaltung")) == {"a@x.org": SENDING}  # as it was
    assert dict(view.states("followup", "verwaltung")) == {}
    assert view.next_attempt("invitation", "", "B@X.org") == retry_at
    assert view.next_attempt("invitation", "", "a@x.org") is None
    with pytest.raises(TypeError):
        invitation["c@x.org"] = SENT  # type: ignore[index]


@pytest.mark.slow
async def test_view_of_100000_rows_is_quick(db_path: Path) -> None:
    async with Ledger.open(db_path):
        pass
    with sqlite3.connect(db_path) as raw:
        raw.executemany(
            "INSERT INTO deliveries (series, kind, event, email, state, updated_at) "
            "VALUES (?, ?, ?, ?, ?, '')",
            (
                (SERIES, "reminder", f"event-{n % 4}", f"person{n}@example.org", "sent")
                for n in range(100_000)
            ),
        )
    raw.close()
    async with Ledger.open(db_path) as ledger:
        started = time.perf_counter()
        view = await ledger.view(SERIES)
        took = time.perf_counter() - started
    assert len(view.states("reminder", "event-1")) == 25_000
    assert took < 2.0, f"view() took {took:.2f} s"


async def test_counts_and_deliveries(ledger_target: Path | str) -> None:
    async with Ledger.open(ledger_target) as ledger:
        for email in ("a@x.org", "b@x.org", "c@x.org"):
            assert await ledger.claim(key(email), f"<{email}>", NOW)
        await ledger.mark_sent(key("a@x.org"), "250", NOW)
        await ledger.mark_failed(key("b@x.org"), "550 unknown", NOW)
        assert await ledger.claim(key("a@x.org", "reminder", "verwaltung"), "<r>", NOW)

        assert await ledger.counts(SERIES) == {
            ("invitation", ""): Counter({SENT: 1, FAILED: 1, SENDING: 1}),
            ("reminder", "verwaltung"): Counter({SENDING: 1}),
        }
        failed = await ledger.deliveries(SERIES, states={FAILED})
        assert [(d.email, d.last_response) for d in failed] == [("b@x.org", "550 unknown")]
        invitation = await ledger.deliveries(SERIES, kind="invitation", event="")
        assert [d.email for d in invitation] == ["a@x.org", "b@x.org", "c@x.org"]
        assert len(await ledger.deliveries(SERIES)) == 4
        assert await ledger.deliveries(SERIES, states=()) == []
        assert await ledger.deliveries("no-such-series") == []


async def test_deliveries_tried_leaves_out_rows_never_attempted(db_path: Path) -> None:
    """status lists retries from SQL: pending rows with an attempt, not untouched ones."""
    async with Ledger.open(db_path) as ledger:
        assert await ledger.claim(key("a@x.org"), "<a>", NOW)
        await ledger.release(key("a@x.org"), NOW, NOW + timedelta(minutes=5))
    with sqlite3.connect(db_path) as db:
        db.execute(
            "INSERT INTO deliveries (series, kind, event, email, state, attempts, updated_at) "
            "VALUES (?, 'invitation', '', 'b@x.org', 'pending', 0, ?)",
            (SERIES, NOW.isoformat()),
        )
    db.close()
    async with Ledger.open(db_path) as ledger:
        pending = await ledger.deliveries(SERIES, states={PENDING})
        assert sorted(d.email for d in pending) == ["a@x.org", "b@x.org"]
        tried = await ledger.deliveries(SERIES, states={PENDING}, tried=True)
        assert [(d.email, d.attempts) for d in tried] == [("a@x.org", 1)]


async def test_naive_times_are_refused(ledger_target: Path | str) -> None:
    async with Ledger.open(ledger_target) as ledger:
        with pytest.raises(ValueError, match="aware"):
            await ledger.claim(key(), "<1@x>", datetime(2024, 10, 24, 10, 5))


async def test_optouts(ledger_target: Path | str) -> None:
    async with Ledger.open(ledger_target) as ledger:
        assert await ledger.optouts(SERIES) == frozenset()
        assert await ledger.add_optout(SERIES, "Anna@Example.org", source="one-click", now=NOW)
        assert not await ledger.add_optout(SERIES, "anna@example.org", source="mail", now=NOW)
        assert await ledger.add_optout(SERIES, "bob@example.org", source="optout.txt", now=NOW)
        assert await ledger.optouts(SERIES) == {"anna@example.org", "bob@example.org"}
        assert await ledger.optouts("other") == frozenset()
        assert await ledger.remove_optout(SERIES, "ANNA@example.org")
        assert not await ledger.remove_optout(SERIES, "anna@example.org")
        assert await ledger.optouts(SERIES) == {"bob@example.org"}


# -- schema versions -----------------------------------------------------------------


async def test_a_newer_database_is_refused(db_path: Path) -> None:
    async with Ledger.open(db_path):
        pass
    with sqlite3.connect(db_path) as raw:
        raw.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    raw.close()
    with pytest.raises(InviteMailerError, match="newer invite-mailer"):
        async with Ledger.open(db_path):
            pass


async def test_later_migrations_are_applied_in_order(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with Ledger.open(db_path) as ledger:
        assert await ledger.claim(key(), "<1@x>", NOW)
    migrations = (
        *ledger_file.MIGRATIONS,
        ("ALTER TABLE deliveries ADD COLUMN note TEXT NOT NULL DEFAULT ''",),
        ("CREATE INDEX deliveries_note ON deliveries (note)",),
    )
    monkeypatch.setattr(ledger_file, "MIGRATIONS", migrations)
    monkeypatch.setattr(ledger_file, "SCHEMA_VERSION", len(migrations))
    async with Ledger.open(db_path) as ledger:
        assert (await ledger.get(key())) is not None  # the data came along
    with sqlite3.connect(db_path) as raw:
        assert raw.execute("PRAGMA user_version").fetchone()[0] == len(migrations)
        assert raw.execute("SELECT note FROM deliveries").fetchall() == [("",)]
    raw.close()


async def test_a_broken_migration_changes_nothing(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    migrations = (
        *ledger_file.MIGRATIONS,
        ("CREATE TABLE extra (x)", "THIS IS NOT SQL"),
    )
    monkeypatch.setattr(ledger_file, "MIGRATIONS", migrations)
    monkeypatch.setattr(ledger_file, "SCHEMA_VERSION", len(migrations))
    with pytest.raises(LedgerError):
        async with Ledger.open(db_path):
            pass
    with sqlite3.connect(db_path) as raw:
        assert raw.execute("PRAGMA user_version").fetchone()[0] == 0
        assert raw.execute("SELECT name FROM sqlite_master").fetchall() == []
    raw.close()


async def test_a_file_that_is_no_database_is_refused(db_path: Path) -> None:
    write_file(db_path, "contacts;email\n" * 100)
    with pytest.raises(LedgerError, match="cannot use this file"):
        async with Ledger.open(db_path):
            pass


# -- the process lock (SQLite only: with PostgreSQL any number of processes send) -------


def test_lock_blocks_a_second_holder_in_this_process(db_path: Path) -> None:
    with state_lock(db_path):
        with pytest.raises(LockedError, match=r"another invite-mailer \(send-due or run\)") as e:
            with state_lock(db_path):
                pass
        assert f"process {os.getpid()}" in str(e.value)
    with state_lock(db_path):  # released on exit
        pass


@pytest.mark.slow
def test_lock_blocks_another_process(db_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import sys
        from invite_mailer.errors import LockedError
        from invite_mailer.delivery.ledger import state_lock
        try:
            with state_lock({str(db_path)!r}):
                sys.exit(0)
        except LockedError as exc:
            print(exc)
            sys.exit(3)
        """
    )
    with state_lock(db_path):
        held = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=30)
    assert held.returncode == 3
    assert b"another invite-mailer" in held.stdout
    free = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=30)
    assert free.returncode == 0, free.stderr.decode()


# -- throughput ---------------------------------------------------------------------------


@pytest.mark.slow
async def test_one_commit_per_state_change_is_fast_enough(tmp_path: Path) -> None:
    pairs = 2_000
    now = datetime(2024, 10, 24, 8, 0, tzinfo=UTC)
    async with Ledger.open(tmp_path / "ledger.db") as ledger:
        started = time.perf_counter()
        for n in range(pairs):
            mail = key(f"person{n}@example.org")
            assert await ledger.claim(mail, f"<{n}@x>", now)
            await ledger.mark_sent(mail, "250 2.0.0 Ok", now)
        took = time.perf_counter() - started
        assert (await ledger.counts(SERIES))[("invitation", "")][SENT] == pairs
    # 10,000 pairs must stay well under 10 s; this is a fifth of that.
    assert took < 2.0, f"{pairs} claim+mark_sent pairs took {took:.2f} s"


async def test_view_carries_attempts_of_deliveries_waiting_for_a_retry(tmp_path: Path) -> None:
    key = DeliveryKey("s", "invitation", "", "a@example.org")
    now = datetime(2024, 10, 24, 8, 0, tzinfo=UTC)
    async with Ledger.open(tmp_path / "l.db") as ledger:
        for attempt in range(3):
            assert await ledger.claim(key, "<m@example.org>", now)
            await ledger.mark_retry(key, "451 try later", now, now + timedelta(minutes=attempt + 1))
        view = await ledger.view("s")
    assert view.attempts("invitation", "", "A@example.org") == 3
    assert view.attempts("invitation", "", "b@example.org") == 0


@pytest.mark.slow
def test_a_first_open_killed_before_migrating_leaves_no_ledger_behind(tmp_path: Path) -> None:
    """SQLite creates the file when it connects; killed before the first
    migration, an empty file would be refused as "not ours" for ever."""
    path = tmp_path / "state" / "invite-mailer.db"
    script = textwrap.dedent(
        f"""
        import asyncio, os, signal
        from invite_mailer.delivery import ledger, ledger_file

        def die(db, path):
            os.kill(os.getpid(), signal.SIGKILL)  # as the OOM killer would

        ledger_file.migrate = die

        async def main():
            async with ledger.Ledger.open({str(path)!r}):
                pass

        asyncio.run(main())
        """
    )
    killed = subprocess.run([sys.executable, "-c", script], capture_output=True, check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not path.exists()

    async def reopen() -> int:
        async with Ledger.open(path) as ledger:
            return len(await ledger.deliveries(SERIES))

    assert asyncio.run(reopen()) == 0
