"""The organiser's summary after a pass: once per mailing, when it has gone out to everyone.

Decided from the plan the pass started from and what the pass did, so that
nothing of the ledger is read again but the few summary rows. What a summary
adds about the series (the quota's forecast for the mailings still to send,
the bounces so far) is read once per pass, and only when a summary goes out:
the sends of the last day and a few counted rows, never the whole ledger.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

from invite_mailer.core.plan import Mailing
from invite_mailer.delivery.bounces import BounceKind
from invite_mailer.delivery.ledger import DeliveryKey, DeliveryState, Ledger
from invite_mailer.delivery.quota_forecast import finishes_now, quotas_of
from invite_mailer.delivery.results import Outcome, PassResult
from invite_mailer.delivery.transport import Transport
from invite_mailer.errors import PermanentFailure, TemporaryFailure
from invite_mailer.inputs.config import Config
from invite_mailer.inputs.series import Kind
from invite_mailer.mail import mime
from invite_mailer.mail.summary import (
    SUPPRESSED_SHOWN,
    BounceNotes,
    QuotaOutlook,
    SuppressedAddress,
    compose_summary,
)

__all__ = ["SUMMARY_KIND", "after_pass", "send_summaries"]

SUMMARY_KIND = "summary"


async def send_summaries(
    config: Config,
    ledger: Ledger,
    transport: Transport,
    result: PassResult,
    mailings: list[Mailing],
    now: datetime,
) -> None:
    """Tell the organiser about each mailing of *mailings* that is complete now.

    *mailings* is the plan the pass started from, *result* what it did.
    """
    if not config.settings.notify.organiser_summary:
        return
    organiser = str(config.series.organiser.email).lower()
    notes = _SeriesNotes(config, ledger, mailings, result, now)
    for mailing in mailings:
        if mailing.kind is Kind.CONFIRMATION:
            continue  # a few mails at a time, all the series long: not worth a report each
        done = after_pass(mailing, result)
        if done is None and ledger.shared:
            done = await _settled_with_others(ledger, config.series.id, mailing, result)
        if done is None:
            continue
        after, touched = done
        key = DeliveryKey(config.series.id, SUMMARY_KIND, mailing.id, organiser)
        if touched or await _still_due(ledger, key, after, now):
            await _send(config, ledger, transport, key, after, result, now, notes)


def after_pass(mailing: Mailing, result: PassResult) -> tuple[Mailing, bool] | None:
    """*mailing* of the pass's plan with the pass's outcomes added, and whether
    the pass sent any of it; None while someone is still outstanding.

    Every mail of the pass counts once, at its last attempt: when the sent
    and failed ones account for everyone outstanding at the start, nobody is
    left. (One who opted out during the pass still counts as outstanding
    here; the next pass's plan no longer lists them and sends the summary.)
    """
    counts = result.mailings.get(mailing.id)
    sent = failed = 0
    if counts is not None:
        sent, failed = counts.counts[Outcome.SENT], counts.counts[Outcome.FAILED]
    if len(mailing.outstanding) > sent + failed:
        return None
    after = replace(
        mailing, outstanding=(), sent=mailing.sent + sent, failed=mailing.failed + failed
    )
    if not (after.sent or after.failed):
        return None
    return after, bool(sent or failed)


async def _settled_with_others(
    ledger: Ledger, series: str, mailing: Mailing, result: PassResult
) -> tuple[Mailing, bool] | None:
    """On a shared ledger: *mailing* complete now that the other nodes' part is in.

    Nodes that share a mailing each send part of it, so no single pass
    accounts for everyone. The one that finishes last finds every recipient
    settled in the ledger and reports it (the summary's claim keeps it to
    one). Asked only of a pass that sent some of the mailing.
    """
    counts = result.mailings.get(mailing.id)
    if counts is None or not (counts.counts[Outcome.SENT] or counts.counts[Outcome.FAILED]):
        return None
    settled = {
        row.email: row.state
        for row in await ledger.deliveries(
            series,
            kind=mailing.ledger_kind,
            event=mailing.event,
            states=(DeliveryState.SENT, DeliveryState.FAILED),
        )
    }
    if any(key not in settled for key in mailing.outstanding):
        return None
    sent = sum(settled[key] is DeliveryState.SENT for key in mailing.outstanding)
    failed = len(mailing.outstanding) - sent
    after = replace(
        mailing, outstanding=(), sent=mailing.sent + sent, failed=mailing.failed + failed
    )
    return after, True


async def _still_due(ledger: Ledger, key: DeliveryKey, mailing: Mailing, now: datetime) -> bool:
    """For a mailing completed earlier: while its window is open, a summary
    that failed for a moment, or whose pass was stopped before telling
    anyone, is due again (one indexed lookup of its row)."""
    if now >= mailing.deadline:
        return False
    row = await ledger.get(key)
    if row is None:
        return True
    retry_at = row.next_attempt_at
    return row.state in (DeliveryState.PENDING, DeliveryState.UNCERTAIN) and (
        retry_at is None or retry_at <= now
    )


async def _send(
    config: Config,
    ledger: Ledger,
    transport: Transport,
    key: DeliveryKey,
    mailing: Mailing,
    result: PassResult,
    now: datetime,
    notes: _SeriesNotes,
) -> None:
    outlook, bounces = await notes.read()
    message = compose_summary(config, mailing, now=now, outlook=outlook, bounces=bounces)
    if not await ledger.claim(key, str(message["Message-ID"]), now):
        return
    sender = config.settings.sender.from_address.addr_spec
    organiser = str(config.series.organiser.email)
    try:
        answer = await transport.send(mime.wire(message), sender=sender, recipients=[organiser])
    except PermanentFailure as exc:
        await ledger.mark_failed(key, exc.response, now)
    except (TemporaryFailure, OSError) as exc:
        response = exc.response if isinstance(exc, TemporaryFailure) else str(exc)
        await ledger.mark_retry(key, response, now, now + timedelta(minutes=5))
    else:
        await ledger.mark_sent(key, answer, now)
        result.reports_sent += 1


@dataclass
class _SeriesNotes:
    """What every summary of one pass tells about the series, read on first use."""

    config: Config
    ledger: Ledger
    mailings: list[Mailing]
    result: PassResult
    now: datetime
    _read: tuple[QuotaOutlook | None, BounceNotes] | None = field(default=None, init=False)

    async def read(self) -> tuple[QuotaOutlook | None, BounceNotes]:
        if self._read is None:
            self._read = (await self._outlook(), await self._bounces())
        return self._read

    async def _outlook(self) -> QuotaOutlook | None:
        quotas = quotas_of(self.config)
        if not quotas:
            return None
        # The plan of the pass, less what the pass sent: who is left is all
        # the forecast needs (how many), not who.
        left = [_rest(m, self.result) for m in self.mailings]
        finishes = await finishes_now(self.config, self.ledger, left, self.now)
        return QuotaOutlook(quotas, [(m, finishes[m.id]) for m in left if m.id in finishes])

    async def _bounces(self) -> BounceNotes:
        overview = await self.ledger.bounce_overview(self.config.series.id, SUPPRESSED_SHOWN)
        return BounceNotes(
            hard=overview.counts[BounceKind.HARD],
            soft=overview.counts[BounceKind.SOFT],
            complaints=overview.counts[BounceKind.COMPLAINT],
            suppressed=overview.suppressed,
            first=[
                SuppressedAddress(r.email, str(r.kind), r.status, r.diagnostic)
                for r in overview.first
            ],
        )


def _rest(mailing: Mailing, result: PassResult) -> Mailing:
    counts = result.mailings.get(mailing.id)
    if counts is None:
        return mailing
    done = counts.counts[Outcome.SENT] + counts.counts[Outcome.FAILED]
    return replace(mailing, outstanding=mailing.outstanding[done:])
