"""When each mailing will have gone out under the relay's quotas (pure, time passed in).

A pass sends what is time-critical first (:data:`PRIORITY`), as fast as the
quotas allow. :func:`forecast` replays that from *now* over the mailings of a
plan: one mail at a time, at the earliest moment every window (a minute, an
hour, a day) has room for it, counting the sends already made, each mailing
from its due time until its deadline. What the deadline leaves unsent is the
number of recipients the mailing will not reach.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from invite_mailer.core.plan import Mailing, MailingState

__all__ = ["PRIORITY", "Finish", "forecast", "priority"]

#: The order in which a pass sends its mails: changes to a date, then what
#: concerns the next date, then follow-ups, then the invitation backlog.
PRIORITY = {
    "update": 0,
    "cancellation": 0,
    "reminder": 1,
    "confirmation": 1,
    "followup": 2,
    "invitation": 3,
}

Quota = tuple[int, float]  # (mails, window in seconds)


def priority(kind: object) -> int:
    return PRIORITY.get(str(kind), 2)


@dataclass(frozen=True)
class Finish:
    """How a mailing ends under the quotas."""

    last_send: datetime | None  # when its last mail goes out (None: none does)
    unreached: int  # recipients its window closes on


def forecast(
    mailings: Sequence[Mailing],
    quotas: Sequence[Quota],
    sent: Iterable[datetime],
    now: datetime,
) -> dict[str, Finish]:
    """Per mailing id, when the mailings still to send finish; {} without quotas."""
    limits = [(limit, window) for limit, window in quotas if limit > 0]
    if not limits:
        return {}
    active = [
        m
        for m in mailings
        if m.state in (MailingState.SCHEDULED, MailingState.OPEN)
        and m.outstanding
        and m.deadline > now
    ]
    remaining = {m.id: len(m.outstanding) for m in active}
    last: dict[str, float] = {}
    times = sorted(moment.timestamp() for moment in sent)
    t = now.timestamp()
    due = {m.id: m.due.timestamp() for m in active}
    deadline = {m.id: m.deadline.timestamp() for m in active}
    order = sorted(active, key=lambda m: (priority(m.kind), m.due))
    while True:
        ready = next(
            (m for m in order if remaining[m.id] and due[m.id] <= t < deadline[m.id]), None
        )
        if ready is None:
            later = [due[m.id] for m in order if remaining[m.id] and due[m.id] > t]
            if not later:
                break
            t = min(later)
            continue
        allowed = t
        for limit, window in limits:
            if len(times) >= limit:
                allowed = max(allowed, times[-limit] + window)
        if allowed > t:
            t = allowed  # the mailings ready may be others by then
            continue
        times.append(t)
        remaining[ready.id] -= 1
        last[ready.id] = t
    zone = now.tzinfo or UTC
    return {
        m.id: Finish(
            datetime.fromtimestamp(last[m.id], UTC).astimezone(zone) if m.id in last else None,
            remaining[m.id],
        )
        for m in active
    }
