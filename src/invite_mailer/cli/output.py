"""Turning plans and ledger contents into tables for people and JSON for machines."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from babel.dates import format_datetime as babel_datetime
from rich.table import Table
from rich.text import Text

from invite_mailer.core.plan import Mailing, MailingState
from invite_mailer.delivery.ledger import Delivery
from invite_mailer.inputs.series import Series

STATE_STYLES = {
    MailingState.SCHEDULED: "cyan",
    MailingState.OPEN: "bold yellow",
    MailingState.WAITING: "magenta",
    MailingState.DONE: "green",
    MailingState.CLOSED: "dim",
    MailingState.WITHDRAWN: "dim strike",
}


def local(moment: datetime, series: Series) -> str:
    """``Mi., 13.11.2024 14:00`` in the series' zone."""
    return babel_datetime(moment.astimezone(series.zone), "EE, dd.MM.yyyy HH:mm", locale="de_DE")


def event_label(mailing: Mailing, series: Series) -> str:
    if not mailing.event:
        return "(series)"
    return f"{mailing.event} ({series.event(mailing.event).date:%d.%m.})"


def mailing_json(mailing: Mailing, *, with_recipients: bool = False) -> dict[str, Any]:
    data: dict[str, Any] = {
        "id": mailing.id,
        "kind": str(mailing.kind),
        "event": mailing.event or None,
        "due": mailing.due.isoformat(),
        "deadline": mailing.deadline.isoformat(),
        "state": str(mailing.state),
        "recipients": len(mailing.audience),
        "sent": mailing.sent,
        "failed": mailing.failed,
        "uncertain": mailing.uncertain,
        "outstanding": len(mailing.outstanding),
        "opted_out": mailing.opted_out,
        "note": mailing.note,
    }
    if with_recipients:
        data["outstanding_recipients"] = list(mailing.outstanding)
    return data


# Control characters (ESC starts terminal commands) and bidirectional overrides
# (they reorder what a reader sees); line breaks and tabs are left alone.
_UNPRINTABLE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def printable(text: str) -> str:
    """*text* safe for a terminal: data cannot move the cursor, clear or recolour it."""
    return _UNPRINTABLE.sub(_escape, text)


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def cell(text: str, style: str = "") -> Text:
    """A table cell of data: a Text, never a str, so "[/]" is not read as rich markup."""
    return Text(printable(text), style=style)


def state_cell(state: MailingState) -> Text:
    return cell(str(state), STATE_STYLES[state])


def plan_table(mailings: Sequence[Mailing], series: Series, now: datetime) -> Table:
    table = Table(
        title=cell(f"{series.title} — plan at {local(now, series)} ({series.timezone})"),
        title_justify="left",
    )
    for column in ("kind", "event", "due", "deadline", "state", "recipients", "sent"):
        table.add_column(column, justify="right" if column in ("recipients", "sent") else "left")
    table.add_column("note")
    for m in mailings:
        table.add_row(
            cell(str(m.kind)),
            cell(event_label(m, series)),
            cell(local(m.due, series)),
            cell(local(m.deadline, series)),
            state_cell(m.state),
            cell(str(len(m.audience))),
            cell(str(m.sent) + (f" (+{m.failed} failed)" if m.failed else "")),
            cell(m.note),
        )
    return table


def status_table(
    mailings: Sequence[Mailing],
    pending_retry: Mapping[str, int],
    series: Series,
) -> Table:
    table = Table(title=cell(f"{series.title} — deliveries"), title_justify="left")
    for column in ("mailing", "state", "sent", "failed", "uncertain", "pending", "opted out"):
        table.add_column(column, justify="left" if column in ("mailing", "state") else "right")
    for m in mailings:
        table.add_row(
            cell(f"{m.kind} {event_label(m, series)}"),
            state_cell(m.state),
            cell(str(m.sent)),
            cell(str(m.failed), "red") if m.failed else cell("0"),
            cell(str(m.uncertain), "yellow") if m.uncertain else cell("0"),
            cell(
                str(len(m.outstanding))
                + (f" ({pending_retry[m.id]} retrying)" if pending_retry.get(m.id) else "")
            ),
            cell(str(m.opted_out)),
        )
    return table


def delivery_json(delivery: Delivery) -> dict[str, Any]:
    return {
        "kind": delivery.kind,
        "event": delivery.event or None,
        "email": delivery.email,
        "state": str(delivery.state),
        "attempts": delivery.attempts,
        "answer": delivery.last_response,
        "message_id": delivery.message_id,
        "last_attempt_at": delivery.last_attempt_at.isoformat()
        if delivery.last_attempt_at
        else None,
    }


def deliveries_table(title: str, deliveries: Sequence[Delivery], series: Series) -> Table:
    table = Table(title=cell(title), title_justify="left")
    for column in ("mailing", "recipient", "attempts", "last attempt", "server answer"):
        table.add_column(column)
    for d in deliveries:
        table.add_row(
            cell(f"{d.kind} {d.event or '(series)'}"),
            cell(d.email),
            cell(str(d.attempts)),
            cell(local(d.last_attempt_at, series) if d.last_attempt_at else ""),
            cell(d.last_response or ""),
        )
    return table
