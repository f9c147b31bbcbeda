"""Turning plans and ledger contents into tables for people and JSON for machines."""

from __future__ import annotations

import contextlib
import json
import logging
import re
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import click
from babel.dates import format_datetime as babel_datetime
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from rich.text import Text

from invite_mailer.cli.commands import Status, ValidationReport
from invite_mailer.cli.registrations import Entry as RegistrationEntry
from invite_mailer.core.forecast import Finish
from invite_mailer.core.plan import Mailing, MailingState
from invite_mailer.delivery.dispatch import Outcome, ProgressCallback
from invite_mailer.delivery.ledger import Delivery, NodeRow
from invite_mailer.errors import Problem
from invite_mailer.inputs.series import Kind, Series

if TYPE_CHECKING:  # the rehearsal is imported only by the command that runs it
    from invite_mailer.cli.rehearse import Rehearsal

# Tables stay readable when piped into a file or a pager (rich would assume 80 columns).
# Markup off: names, relay answers and opt-out sources are data, and "[/]" in them
# must print as it is. Styling goes through Text objects (see say()).
out = Console(
    soft_wrap=True, width=None if sys.stdout.isatty() else 160, markup=False, highlight=False
)
err = Console(
    stderr=True,
    soft_wrap=True,
    width=None if sys.stderr.isatty() else 160,
    markup=False,
    highlight=False,
)

LABEL_STYLES = {
    "error:": "bold red",
    "warning:": "yellow",
    "failed:": "red",
    "uncertain:": "yellow",
}
LABEL_LEVELS = {"error:": logging.ERROR, "warning:": logging.WARNING, "failed:": logging.ERROR}

log = logging.getLogger("invite_mailer.cli")

# True for a relay that dropped the line after the data as for a process that
# was killed mid-send: both leave a mail whose fate only the relay knows.
UNCERTAIN_TITLE = (
    "Uncertain (the relay's answer never arrived: connection lost or process stopped "
    "while sending; sent again on the next run)"
)

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


def plan_table(
    mailings: Sequence[Mailing],
    series: Series,
    now: datetime,
    finishes: Mapping[str, Finish] | None = None,
) -> Table:
    table = Table(
        title=cell(f"{series.title} — plan at {local(now, series)} ({series.timezone})"),
        title_justify="left",
    )
    columns = ["kind", "event", "due", "deadline", "state", "recipients", "sent"]
    if finishes:
        columns.append("last mail (quota)")
    for column in columns:
        table.add_column(column, justify="right" if column in ("recipients", "sent") else "left")
    table.add_column("note")
    for m in mailings:
        row = [
            cell(str(m.kind)),
            cell(event_label(m, series)),
            cell(local(m.due, series)),
            cell(local(m.deadline, series)),
            state_cell(m.state),
            cell(str(len(m.audience))),
            cell(str(m.sent) + (f" (+{m.failed} failed)" if m.failed else "")),
        ]
        note = m.note
        if finishes:
            finish = finishes.get(m.id)
            last = finish.last_send if finish is not None else None
            row.append(cell(local(last, series) if last is not None else ""))
            if finish is not None and finish.unreached:
                late = f"{finish.unreached} recipient(s) not reached before the deadline"
                row[-1] = cell(row[-1].plain, "red")
                note = f"{note}; {late}" if note else late
        table.add_row(*row, cell(note))
    return table


def registered_caption(registered: Mapping[str, int], series: Series) -> str:
    """ "registered: verwaltung 5, kreislaufwirtschaft 4, ..." for the tables' captions."""
    parts = [f"{e.id} {registered.get(e.id, 0)}" for e in series.events if not e.cancelled]
    return "registered: " + ", ".join(parts)


def registrations_table(found: Sequence[RegistrationEntry], series: Series) -> Table:
    table = Table(
        title=cell(f"{series.title} — registrations ({len(found)})"), title_justify="left"
    )
    for column in ("date", "event", "address", "name", "source", "since"):
        table.add_column(column)
    for e in found:
        since = local(e.registered_at, series) if e.registered_at else "(contact list)"
        for_date = series.event(e.event).date
        table.add_row(
            *(cell(t) for t in (f"{for_date:%d.%m.%Y}", e.event, e.email, e.name, e.source, since))
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


# --- whole answers of commands -------------------------------------------------------


def plan_json(
    mailings: Sequence[Mailing],
    series: Series,
    now: datetime,
    registered: Mapping[str, int] | None = None,
    finishes: Mapping[str, Finish] | None = None,
) -> dict[str, Any]:
    finishes = finishes or {}
    listed = []
    for m in mailings:
        data = mailing_json(m)
        finish = finishes.get(m.id)
        if finish is not None:
            data["forecast"] = {
                "last_send": finish.last_send.isoformat() if finish.last_send else None,
                "unreached": finish.unreached,
            }
        listed.append(data)
    return {
        "series": series.id,
        "now": now.isoformat(),
        "timezone": series.timezone,
        "mailings": listed,
        "registered": {e.id: (registered or {}).get(e.id, 0) for e in series.events},
    }


def status_json(status: Status, now: datetime, *, only_failed: bool) -> dict[str, Any]:
    data: dict[str, Any] = {
        "now": now.isoformat(),
        "failed": [delivery_json(d) for d in status.failed],
        "uncertain": [delivery_json(d) for d in status.uncertain],
    }
    if not only_failed:
        data["mailings"] = [mailing_json(m) for m in status.mailings]
        data["retrying"] = [delivery_json(d) for d in status.retrying]
        data["bounces"] = [b.to_json() for b in status.bounces]
        data["registered"] = dict(status.registered)
        wall = time.time()
        data["nodes"] = [node_json(n, wall, status.heartbeat_seconds) for n in status.nodes]
    return data


def node_json(row: NodeRow, now: float, heartbeat_seconds: float) -> dict[str, Any]:
    def iso(at: float | None) -> str | None:
        return None if at is None else datetime.fromtimestamp(at, UTC).isoformat()

    return {
        "id": row.id,
        "host": row.host,
        "pid": row.pid,
        "role": row.role,
        "started": iso(row.started_at),
        "last_beat": iso(row.beat_at),
        "stopped": iso(row.stopped_at),
        "alive": row.alive(now, heartbeat_seconds),
        "holding": row.holding,
    }


def nodes_table(status: Status) -> Table:
    """The nodes on a shared ledger, with what each holds (``status`` with PostgreSQL)."""
    table = Table(title="Nodes on this ledger", title_justify="left")
    for column in ("node", "role", "state", "last beat", "holds"):
        table.add_column(column)
    wall = time.time()
    for row in status.nodes:
        data = node_json(row, wall, status.heartbeat_seconds)
        state = "alive" if data["alive"] else "stopped" if row.stopped_at else "dead"
        table.add_row(
            cell(row.id), cell(row.role), state, f"{wall - row.beat_at:.0f} s ago", str(row.holding)
        )
    return table


def retrying_by_mailing(retrying: Sequence[Delivery]) -> dict[str, int]:
    """How many deliveries of each mailing wait for another attempt."""
    counts: dict[str, int] = {}
    for d in retrying:
        mailing_id = f"{d.kind}:{d.event or 'series'}"
        counts[mailing_id] = counts.get(mailing_id, 0) + 1
    return counts


# --- printing ---------------------------------------------------------------------------


def say(console: Console, label: str, message: str) -> None:
    """*label* styled, *message* printed exactly as it is.

    With ``--log-format json`` what goes to stderr is a log record instead, so
    that every line there is JSON.
    """
    if console is err and json_logs():
        log.log(LABEL_LEVELS.get(label, logging.WARNING), message)
        return
    console.print(Text.assemble((label, LABEL_STYLES.get(label, "")), " ", printable(message)))


def echo(text: str) -> None:
    """A line for stdout; data in it cannot send commands to the terminal."""
    out.print(printable(text))


def warn(problem: Problem | str) -> None:
    say(err, "warning:", str(problem))


def print_json(data: object) -> None:
    """A command's whole answer as JSON on stdout (``--json``)."""
    click.echo(json.dumps(data, ensure_ascii=False, indent=2))


def verbose() -> bool:
    """Whether ``--verbose`` was given."""
    return bool(root_option("verbose"))


def json_logs() -> bool:
    """Whether ``--log-format json`` was given: then stderr carries log records only."""
    return root_option("log_format") == "json"


def root_option(name: str) -> object:
    """An option of the ``invite-mailer`` group itself, as given on this command line."""
    context = click.get_current_context(silent=True)
    return None if context is None else context.find_root().params.get(name)


def recovered_line(delivery: Delivery) -> str:
    """A delivery that was in flight when the last run stopped."""
    return (
        f"{delivery.kind} {delivery.event or '(series)'} to {delivery.email} was in "
        "flight when the last run stopped (the relay's answer never arrived); sending again"
    )


@contextlib.contextmanager
def progress_bars() -> Iterator[ProgressCallback]:
    """One progress bar per mailing on stderr, for as long as the pass runs."""
    with Progress(
        TextColumn("{task.description}", markup=False),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=True,
    ) as progress:
        tasks: dict[str, TaskID] = {}

        def on_progress(mailing: Mailing, key: str, outcome: Outcome) -> None:
            if mailing.id not in tasks:
                tasks[mailing.id] = progress.add_task(mailing.id, total=len(mailing.outstanding))
            progress.advance(tasks[mailing.id])

        yield on_progress


def _rehearsal_counts(result: Rehearsal) -> dict[str, int]:
    return {str(kind): result.count(str(kind)) for kind in Kind if result.count(str(kind))}


def rehearsal_json(result: Rehearsal, advisories: Sequence[Problem]) -> dict[str, Any]:
    return {
        "index": str(result.index),
        "mails": _rehearsal_counts(result),
        "waiting_for_materials": [r.mailing.id for r in result.waiting],
        "optouts": result.optouts,
        "warnings": [str(w) for w in advisories],
    }


def rehearsal_lines(result: Rehearsal) -> list[str]:
    counts = _rehearsal_counts(result)
    summary = ", ".join(f"{count} {kind}" for kind, count in counts.items()) or "no mails"
    lines = [f"Rehearsal written, nothing was sent: {summary}."]
    lines += [f"  {r.mailing.id}: waiting for materials (nothing sent)" for r in result.waiting]
    lines.append(f"Open {result.index} in a browser.")
    return lines


def validation_line(report: ValidationReport) -> Text:
    line = Text.assemble(
        ("OK", "green"),
        f": {report.contacts} contacts, {report.mailings} mailings, "
        f"{report.rendered} mails rendered without error.",
    )
    if report.dkim is not None:
        signer = report.dkim
        line.append(
            f"\nDKIM: every mail is signed for {signer.domain} with selector "
            f"{signer.selector}; receivers find the key in DNS at {signer.record_name}:\n"
        )
        line.append(signer.dns_record())
    return line
