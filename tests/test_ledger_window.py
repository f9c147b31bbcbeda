"""Batched ledger writes: claims committed before a mail leaves, outcomes in batches,
never more mails in flight than the window holds. On a real SQLite file, read back
through a second connection as another process would."""

from __future__ import annotations

import asyncio
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from invite_mailer.delivery.ledger import Claim, DeliveryKey, DeliveryState, Finish, Ledger
from invite_mailer.delivery.window import LedgerWindow, default_size
from invite_mailer.errors import LedgerError
from support.postgres import query

SERIES = "transferreihe-2024"
NOW = datetime(2024, 10, 24, 8, 5, tzinfo=UTC)
SENT = DeliveryState.SENT


def key(n: int) -> DeliveryKey:
    return DeliveryKey(SERIES, "invitation", "", f"person{n:04d}@example.org")


def claim(n: int, *, unless_opted_out: bool = True) -> Claim:
    return Claim(key(n), f"<{n}@example.org>", NOW, unless_opted_out=unless_opted_out)


def states_on_disk(path: Path | str) -> dict[str, str]:
    """What another process sees: only committed rows."""
    return dict(query(path, "SELECT email, state FROM deliveries"))


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "ledger.db"


async def test_a_claim_is_committed_before_it_returns(ledger_target: Path | str) -> None:
    async with Ledger.open(ledger_target) as ledger, LedgerWindow(ledger, 4) as window:
        assert await window.claim(claim(1))
        assert states_on_disk(ledger_target) == {"person0001@example.org": "sending"}
        assert window.holds(key(1)) and window.in_flight == 1
        window.finish(Finish(key(1), SENT, "250 ok", NOW))
        assert not window.holds(key(1))
    # Leaving the window commits the queued outcome.
    assert states_on_disk(ledger_target) == {"person0001@example.org": "sent"}


async def test_senders_wait_while_the_window_is_full(ledger_target: Path | str) -> None:
    size, senders, mails_each = 3, 8, 25
    peak = 0

    async with Ledger.open(ledger_target) as ledger, LedgerWindow(ledger, size) as window:

        async def sender(first: int) -> None:
            nonlocal peak
            for n in range(first, first + mails_each):
                assert await window.claim(claim(n))
                # What a crash now would leave in doubt: every claim on disk
                # without its outcome.
                on_disk = states_on_disk(ledger_target)
                peak = max(peak, sum(1 for s in on_disk.values() if s == "sending"))
                await asyncio.sleep(0)  # the relay's answer
                window.finish(Finish(key(n), SENT, "250 ok", NOW))

        await asyncio.gather(*(sender(i * mails_each) for i in range(senders)))
        assert window.peak == size  # the window was used, and never overran
    assert 1 <= peak <= size
    final = states_on_disk(ledger_target)
    assert len(final) == senders * mails_each and set(final.values()) == {"sent"}
    # Claims and outcomes shared commits: far fewer batches than writes.
    assert window.batches < senders * mails_each


async def test_outcomes_and_claims_of_many_senders_share_commits(db_path: Path) -> None:
    async with Ledger.open(db_path) as ledger, LedgerWindow(ledger, 64) as window:
        granted = await asyncio.gather(*(window.claim(claim(n)) for n in range(50)))
        assert all(granted)
        assert window.batches <= 2  # the first claim may go alone
        for n in range(50):
            window.finish(Finish(key(n), SENT, "250 ok", NOW))
        await window.flush()
        assert window.batches <= 3
        assert window.in_flight == 0
    assert set(states_on_disk(db_path).values()) == {"sent"}


async def test_an_opted_out_address_is_not_claimed_and_holds_no_place(
    ledger_target: Path | str,
) -> None:
    async with Ledger.open(ledger_target) as ledger:
        await ledger.add_optout(SERIES, key(1).email, source="one-click", now=NOW)
        async with LedgerWindow(ledger, 1) as window:
            assert not await window.claim(claim(1))
            assert window.in_flight == 0 and not window.holds(key(1))
            assert await window.claim(claim(2))  # the one place is free
            # Without the check (the organiser's own mails), the claim holds.
            window.finish(Finish(key(2), SENT, "250 ok", NOW))
            assert await window.claim(claim(1, unless_opted_out=False))
            window.finish(Finish(key(1), SENT, "250 ok", NOW))
    assert states_on_disk(ledger_target) == {key(1).email: "sent", key(2).email: "sent"}


async def test_a_delivery_sent_or_in_flight_is_not_claimed_twice(ledger_target: Path | str) -> None:
    async with Ledger.open(ledger_target) as ledger, LedgerWindow(ledger, 4) as window:
        first, second = await asyncio.gather(window.claim(claim(1)), window.claim(claim(1)))
        assert sorted([first, second]) == [False, True]
        assert window.in_flight == 1
        window.finish(Finish(key(1), SENT, "250 ok", NOW))
        assert not await window.claim(claim(1))


async def test_a_retry_and_its_next_claim_in_one_batch_keep_their_order(
    ledger_target: Path | str,
) -> None:
    later = NOW + timedelta(seconds=30)
    async with Ledger.open(ledger_target) as ledger, LedgerWindow(ledger, 4) as window:
        assert await window.claim(claim(1))
        window.finish(Finish(key(1), DeliveryState.PENDING, "451 try later", NOW, later))
        # Queued behind the outcome: the claim sees the row pending again.
        assert await window.claim(Claim(key(1), "<1@example.org>", later))
        window.finish(Finish(key(1), SENT, "250 ok", later))
        row = await ledger.get(key(1))
    assert row is not None and row.attempts == 2


async def test_an_outcome_for_a_mail_not_claimed_here_is_refused(ledger_target: Path | str) -> None:
    async with Ledger.open(ledger_target) as ledger, LedgerWindow(ledger, 4) as window:
        with pytest.raises(LedgerError, match="not claimed"):
            window.finish(Finish(key(1), SENT, "250 ok", NOW))
        with pytest.raises(ValueError, match="aware"):
            await window.claim(Claim(key(2), "<2@x>", datetime(2024, 10, 24, 10, 5)))
        assert window.in_flight == 0


async def test_a_failed_batch_writes_nothing_and_stops_further_claims(db_path: Path) -> None:
    async with Ledger.open(db_path) as ledger:
        window = LedgerWindow(ledger, 4)
        assert await window.claim(claim(1))
        window.finish(Finish(key(1), SENT, "250 ok", NOW))
        # Another writer takes the database away meanwhile (a read-only mount would do).
        ledger_db = sqlite3.connect(db_path)
        ledger_db.execute("DROP TABLE deliveries")
        ledger_db.close()
        with pytest.raises(LedgerError):
            await window.claim(claim(2))
        with pytest.raises(LedgerError):
            await window.claim(claim(3))
        with pytest.raises(LedgerError):
            await window.aclose()


def test_the_default_window_is_twice_the_connections() -> None:
    assert default_size(4) == 8
    assert default_size(1) == 2
    assert default_size(0) == 2
    with pytest.raises(ValueError, match="at least one"):
        LedgerWindow(None, 0)  # type: ignore[arg-type]


async def test_a_window_smaller_than_the_senders_still_lets_every_mail_through(
    ledger_target: Path | str,
) -> None:
    async with Ledger.open(ledger_target) as ledger, LedgerWindow(ledger, 1) as window:

        async def sender(first: int) -> None:
            for n in range(first, first + 10):
                assert await window.claim(claim(n))
                assert window.in_flight == 1
                await asyncio.sleep(0)
                window.finish(Finish(key(n), SENT, "250 ok", NOW))

        await asyncio.wait_for(asyncio.gather(*(sender(i * 10) for i in range(4))), timeout=30)
        assert window.peak == 1
    assert len(states_on_disk(ledger_target)) == 40


class BrokenLedger(Ledger):
    """The real ledger whose batch write has a bug."""

    async def apply(self, finishes: object, claims: object) -> list[bool]:  # type: ignore[override]
        raise RuntimeError("a bug")


async def test_a_bug_in_a_batch_stops_the_claims_instead_of_hanging_them(
    ledger_target: Path | str,
) -> None:
    async with BrokenLedger.open(ledger_target) as ledger:
        window = LedgerWindow(ledger, 4)
        with pytest.raises(LedgerError, match="a bug"):
            await asyncio.wait_for(window.claim(claim(1)), timeout=10)
        assert window.in_flight == 0
        with pytest.raises(LedgerError):
            await window.claim(claim(2))
        await window.aclose()  # nothing queued: nothing to try again
    assert states_on_disk(ledger_target) == {}
