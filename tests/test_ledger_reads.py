"""A pass reads the ledger's view of the series once: its plan and the organiser's
summary come from that one snapshot and the pass's own counts."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from invite_mailer.delivery.dispatch import Dispatcher
from invite_mailer.delivery.ledger import DeliveryKey, DeliveryState, Ledger, LedgerView
from invite_mailer.delivery.transport import OutboxTransport
from invite_mailer.inputs.config import load_config
from support.postgres import query
from support.project import ledger_of

BERLIN = ZoneInfo("Europe/Berlin")
NOW = datetime(2024, 10, 24, 10, 5, tzinfo=BERLIN)
ORGANISER = "transferreihe@example.org"

pytestmark = pytest.mark.both_ledgers


class CountingLedger(Ledger):
    """The real ledger, counting how often the whole view is read."""

    views = 0

    async def view(self, series: str) -> LedgerView:
        type(self).views += 1
        return await super().view(series)


def reports(project: Path) -> list[str]:
    texts = [p.read_text(encoding="utf-8") for p in (project / "outbox").glob("*.eml")]
    return [text for text in texts if "Versandbericht" in text]


async def test_a_pass_and_its_summary_read_the_view_once(project: Path) -> None:
    config = load_config(project / "config", None)
    CountingLedger.views = 0
    async with (
        CountingLedger.open(ledger_of(project)) as ledger,
        OutboxTransport(project / "outbox") as transport,
    ):
        result = await Dispatcher(config, ledger, transport).run_pass(NOW)
        assert result.mailings["invitation:series"].counts["sent"] == 12
        assert result.reports_sent == 1
        assert CountingLedger.views == 1
        key = DeliveryKey(config.series.id, "summary", "invitation:series", ORGANISER)
        summary = await ledger.get(key)
        assert summary is not None and summary.state is DeliveryState.SENT

        # Nothing left to do, and the summary went out: none again, one more read.
        again = await Dispatcher(config, ledger, transport).run_pass(NOW + timedelta(minutes=5))
        assert again.reports_sent == 0
        assert CountingLedger.views == 2
    (report,) = reports(project)
    assert "Versendet:            12" in report


async def test_a_summary_that_failed_for_a_moment_goes_out_after_its_backoff(
    project: Path,
) -> None:
    config = load_config(project / "config", None)
    async with (
        Ledger.open(ledger_of(project)) as ledger,
        OutboxTransport(project / "outbox") as transport,
    ):
        assert (await Dispatcher(config, ledger, transport).run_pass(NOW)).reports_sent == 1
        # What a 451 to the summary leaves: pending, to be retried in 5 minutes.
        retry_at = (NOW + timedelta(minutes=5)).astimezone(UTC).isoformat()
        query(
            ledger_of(project),
            "UPDATE deliveries SET state = 'pending', next_attempt_at = ? WHERE kind = 'summary'",
            (retry_at,),
        )
        early = await Dispatcher(config, ledger, transport).run_pass(NOW + timedelta(minutes=1))
        assert early.reports_sent == 0  # still backing off
        due = await Dispatcher(config, ledger, transport).run_pass(NOW + timedelta(minutes=6))
        assert due.reports_sent == 1
        row = await ledger.get(
            DeliveryKey(config.series.id, "summary", "invitation:series", ORGANISER)
        )
        assert row is not None and row.state is DeliveryState.SENT and row.attempts == 2
