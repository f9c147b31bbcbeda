"""Wake-ups of the daemon between its planned jobs, and the warnings of a pass.

Jobs for mailings are planned at their due time (see ``Daemon.reschedule``).
Some things become due between plans: a confirmation waits a quiet period
after a registration, which arrives at any moment. :func:`soon` wakes the
daemon after a delay measured on its own clock, so a daemon on virtual time
is never woken in a loop.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from datetime import datetime, timedelta, tzinfo

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.date import DateTrigger
from apscheduler.triggers.interval import IntervalTrigger

from invite_mailer.core.plan import Mailing, MailingState
from invite_mailer.delivery.ledger import Ledger
from invite_mailer.errors import QuotaReached
from invite_mailer.inputs.series import Kind

__all__ = [
    "LEASE_JOB",
    "QUOTA_JOB",
    "WAKE_UPS",
    "REGISTRATION_JOB",
    "every",
    "soon",
    "wake_for_confirmations",
    "wake_for_quota",
    "warn_waiting",
]

log = logging.getLogger("invite_mailer.service.daemon")

REGISTRATION_JOB = "registration"
"""The pass that records a registration made by link."""
QUOTA_JOB = "quota"
"""The pass when the relay's quota reopens."""
LEASE_JOB = "lease"
"""The pass when another node's claim runs out (see wake_for_leases)."""
WAKE_UPS = (REGISTRATION_JOB, QUOTA_JOB, LEASE_JOB)
"""One-off passes: a reschedule after a reload keeps them."""


def every(
    scheduler: AsyncIOScheduler,
    run: Callable[[], Awaitable[None]] | Callable[[], None],
    job_id: str,
    seconds: float,
    zone: tzinfo,
) -> None:
    """Run *run* every *seconds*; a run never overlaps the one before."""
    scheduler.add_job(
        run,
        IntervalTrigger(seconds=seconds, timezone=zone),
        id=job_id,
        replace_existing=True,
        coalesce=True,
        max_instances=1,
        misfire_grace_time=None,
    )


def wake_for_quota(
    scheduler: AsyncIOScheduler, run: Callable[[], Awaitable[None]], quota: QuotaReached | None
) -> None:
    """A pass when a full hour's or day's quota reopens (the sweep would come within a
    minute; this is on time)."""
    if quota is not None:
        soon(scheduler, run, QUOTA_JOB, quota.reopens_at - time.time())


async def wake_for_leases(
    scheduler: AsyncIOScheduler, run: Callable[[], Awaitable[None]], ledger: Ledger
) -> None:
    """On a shared ledger, a pass when a claim of another node runs out (it may have
    died with it): its mails go out again then, not at the next sweep."""
    lease_end = await ledger.next_lease_end() if ledger.shared else None
    if lease_end is not None:
        soon(scheduler, run, LEASE_JOB, lease_end - time.time())


def soon(
    scheduler: AsyncIOScheduler,
    run: Callable[[], Awaitable[None]],
    job_id: str,
    delay: float,
) -> None:
    """Run *run* once, *delay* seconds from now (a moment later, so it is due then)."""
    at = datetime.now(scheduler.timezone) + timedelta(seconds=max(0.0, delay) + 0.5)
    scheduler.add_job(
        run,
        DateTrigger(run_date=at),
        id=job_id,
        replace_existing=True,
        coalesce=True,
        misfire_grace_time=None,
    )


def wake_for_confirmations(
    scheduler: AsyncIOScheduler,
    run: Callable[[], Awaitable[None]],
    mailings: list[Mailing],
    now: datetime,
) -> None:
    """A wake-up when each waiting confirmation's quiet period is over."""
    for mailing in mailings:
        if mailing.kind is Kind.CONFIRMATION and mailing.state is MailingState.SCHEDULED:
            soon(scheduler, run, mailing.id, (mailing.due - now).total_seconds())


def warn_waiting(
    mailings: list[Mailing], now: datetime, last: MutableMapping[str, datetime]
) -> None:
    """Once a day per mailing: the follow-up waits for its materials."""
    for mailing in mailings:
        if mailing.state is not MailingState.WAITING:
            continue
        previous = last.get(mailing.id)
        if previous is None or now - previous >= timedelta(days=1):
            last[mailing.id] = now
            log.warning(
                "mailing %s is waiting for materials: add them to series.yaml "
                "(it goes out as soon as they are listed; deadline %s)",
                mailing.id,
                mailing.deadline.isoformat(),
            )
