"""When each mailing of a series is due, by its rules alone.

A pure function of series.yaml: the loader uses it to check that every time
can be computed, the plan to know what exists when.
"""

from __future__ import annotations

from datetime import datetime

from invite_mailer.inputs.series import Event, Kind, Series
from invite_mailer.inputs.values import localize, shift

__all__ = ["mailing_times"]


def mailing_times(series: Series) -> list[tuple[Kind, Event | None, datetime, datetime]]:
    """Due time and deadline of every mailing the rules produce, in time order.

    Cancelled dates still appear (their reminder and follow-up are withdrawn
    by :func:`plan`), so the timeline stays complete.
    """
    rules = series.mailings
    times: list[tuple[Kind, Event | None, datetime, datetime]] = []
    zone = series.zone
    if rules.invitation is not None and rules.invitation.enabled:
        send_at = rules.invitation.send_at
        due = localize(send_at.date(), send_at.time(), zone)
        until = rules.invitation.until
        deadline = localize(until.date(), until.time(), zone) if until else series.first_start
        times.append((Kind.INVITATION, None, due, deadline))
    for event in series.events:
        if rules.reminder.enabled:
            due = shift(event.starts_at, rules.reminder.before, sign=-1)
            if rules.reminder.at is not None:
                due = localize(due.date(), rules.reminder.at, zone)
            times.append((Kind.REMINDER, event, due, event.starts_at))
        if rules.followup.enabled:
            due = shift(event.ends_at, rules.followup.after)
            if rules.followup.at is not None:
                due = localize(due.date(), rules.followup.at, zone)
            deadline = shift(due, rules.followup.wait_for_materials)
            times.append((Kind.FOLLOWUP, event, due, deadline))
    times.sort(key=lambda item: (item[2], item[1].starts_at if item[1] else item[2]))
    return times
