"""What ``send-due`` prints about its pass: one line, or the ``--json`` report.

A mail of the pass goes one of these ways: ``sent``, ``failed`` (for good),
``retry`` (a temporary failure, retried later in its window), ``deferred``
(a full relay quota held it back; it goes out when the quota reopens) or
``skipped`` (not to be sent by this pass: its window closed meanwhile, an
opt-out or another process came first).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from invite_mailer.cli.commands import SendDueResult
from invite_mailer.cli.output import local
from invite_mailer.delivery.dispatch import Outcome
from invite_mailer.delivery.results import MailingResult, PassResult
from invite_mailer.inputs.series import Series

__all__ = ["deferred", "send_due_json", "send_due_line"]


def deferred(result: PassResult) -> dict[str, int]:
    """Per mailing, its due mails that a full quota held back for when it reopens.

    The pass stops taking mail at the quota: the mails it had in hand come
    back deferred, the rest were never tried. Both wait for the quota.
    """
    if result.quota is None:
        return {}
    held = {mid: _held(r) for mid, r in result.mailings.items()}
    return {mid: count for mid, count in held.items() if count}


def _held(mailing: MailingResult) -> int:
    untried = len(mailing.mailing.outstanding) - sum(mailing.counts.values())
    return mailing.counts[Outcome.DEFERRED] + max(0, untried)


def _counts(mailing: MailingResult, held: int) -> dict[str, int]:
    counts = {str(k): v for k, v in mailing.counts.items()}
    if held:
        counts[str(Outcome.DEFERRED)] = held
    return counts


def send_due_json(outcome: SendDueResult, now: datetime) -> dict[str, Any]:
    result = outcome.result
    held = deferred(result)
    return {
        "now": now.isoformat(),
        "destination": outcome.destination,
        "sent": result.total(Outcome.SENT),
        "failed": result.total(Outcome.FAILED),
        "retry_later": result.total(Outcome.RETRY),
        "deferred": sum(held.values()),
        "reports_sent": result.reports_sent,
        "uncertain_recovered": len(outcome.recovered),
        "sender_refused": result.sender_refused,
        "stopped_early": outcome.stopped_by,
        "given_back": outcome.given_back if outcome.stopped_by else 0,
        "quota_reached": None
        if result.quota is None
        else {
            "setting": result.quota.setting,
            "limit": result.quota.limit,
            "reopens_at": datetime.fromtimestamp(result.quota.reopens_at, UTC).isoformat(),
        },
        "mailings": {mid: _counts(r, held.get(mid, 0)) for mid, r in result.mailings.items()},
        "failures": [{"mailing": m, "email": e, "answer": a} for m, e, a in result.failures],
    }


def send_due_line(outcome: SendDueResult, now: datetime, series: Series) -> str:
    """``3 sent (+1 report to the organiser), 0 failed, 0 to retry later → outbox ...``."""
    result = outcome.result
    sent, failed = result.total(Outcome.SENT), result.total(Outcome.FAILED)
    retry = result.total(Outcome.RETRY)
    reports = (
        f" (+{result.reports_sent} report{'s' if result.reports_sent != 1 else ''} "
        "to the organiser)"
        if result.reports_sent
        else ""
    )
    held = sum(deferred(result).values())
    waiting = f", {held} deferred" if result.quota is not None else ""
    line = (
        f"{sent} sent{reports}, {failed} failed, {retry} to retry later{waiting} "
        f"→ {outcome.destination}"
    )
    if not result.mailings:
        line = f"nothing due at {local(now, series)}; {line}"
    if result.quota is not None:
        reopens = local(datetime.fromtimestamp(result.quota.reopens_at, UTC), series)
        line += (
            f"; {result.quota}: the {held} deferred wait{'s' if held == 1 else ''} until "
            f"{reopens} (the next send-due or the daemon sends them then)"
        )
    return line
