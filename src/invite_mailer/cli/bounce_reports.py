"""``invite-mailer bounces``: reading bounce and complaint reports into the ledger.

Reports come as single ``.eml`` files, mbox files or Maildir folders (the
layout Dovecot, Postfix's ``local`` and most mail programs write). Every
message is read and recorded (see :mod:`invite_mailer.delivery.bounce_sql`);
nothing is deleted: a message of a Maildir that has been read is moved from
``new/`` to ``cur/`` and flagged as seen, as a mail program would, and files
and mbox files are only read. A report read twice counts once.
"""

from __future__ import annotations

import mailbox
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from rich.table import Table

from invite_mailer.cli.optouts import OptOutFiles
from invite_mailer.cli.output import cell, local
from invite_mailer.delivery.bounce_intake import Intake
from invite_mailer.delivery.bounce_sql import BounceRecord
from invite_mailer.delivery.bounces import MAX_REPORT_BYTES
from invite_mailer.delivery.imap_poll import poll
from invite_mailer.delivery.ledger import Ledger
from invite_mailer.delivery.ledger_open import ledger_exists
from invite_mailer.delivery.return_path import ReturnPaths
from invite_mailer.errors import ConfigError
from invite_mailer.inputs.series import Series
from invite_mailer.inputs.settings import SETTINGS_FILE

__all__ = [
    "bounce_records_json",
    "bounces_json",
    "bounces_table",
    "import_json",
    "import_lines",
    "fetch_reports",
    "import_reports",
    "recorded_bounces",
]


def _messages(path: Path) -> Iterator[tuple[str, bytes, mailbox.Maildir | None, str]]:
    """(where, raw bytes, the Maildir and key to mark it read) of every message at *path*."""
    if path.is_dir():
        if not all((path / sub).is_dir() for sub in ("cur", "new", "tmp")):
            raise ConfigError.single(
                path,
                "a folder that is not a Maildir (no cur/, new/ and tmp/ in it)",
                hint="pass a Maildir folder, an mbox file or .eml files",
            )
        box = mailbox.Maildir(path, factory=None, create=False)
        for key in sorted(box.keys()):
            with box.get_file(key) as file:
                yield f"{path}/{key}", file.read(MAX_REPORT_BYTES + 1), box, key
        return
    try:
        with path.open("rb") as file:
            start = file.read(5)
    except OSError as exc:
        raise ConfigError.single(
            path, f"cannot be read: {exc.strerror}", hint="pass a readable file or folder"
        ) from None
    if start == b"From ":
        mbox = mailbox.mbox(path, factory=None, create=False)
        try:
            for number, key in enumerate(mbox.keys(), start=1):
                with mbox.get_file(key) as file:
                    yield f"{path} #{number}", file.read(MAX_REPORT_BYTES + 1), None, ""
        finally:
            mbox.close()
        return
    with path.open("rb") as file:
        yield str(path), file.read(MAX_REPORT_BYTES + 1), None, ""


def _mark_read(box: mailbox.Maildir, key: str) -> None:
    message = box.get_message(key)
    if message.get_subdir() == "cur" and "S" in message.get_flags():
        return
    message.set_subdir("cur")
    message.add_flag("S")
    box[key] = message  # the same file, renamed into cur/ with its flags


async def import_reports(
    files: OptOutFiles, paths: list[Path], *, now: datetime, soft_limit: int
) -> Intake:
    """Read every report at *paths* into the ledger."""
    async with Ledger.open(files.ledger_path) as ledger:
        paths_back = ReturnPaths(files.settings, files.series.id)
        intake = Intake(ledger, files.series.id, soft_limit, paths_back)
        for path in paths:
            for where, data, box, key in _messages(path):
                await intake.take(where, data, now)
                if box is not None:
                    _mark_read(box, key)
    return intake


async def fetch_reports(files: OptOutFiles, *, now: datetime) -> Intake:
    """Read what is new in the ``[imap]`` mailbox into the ledger."""
    settings = files.settings
    if not settings.imap.enabled:
        raise ConfigError.single(
            files.optout_file.parent / SETTINGS_FILE,
            "no bounce mailbox is set up (imap.host is empty)",
            hint="set [imap] host, username and folder in settings.toml and the password in "
            "INVITE_MAILER_IMAP__PASSWORD; or read files with: invite-mailer bounces import",
        )
    async with Ledger.open(files.ledger_path) as ledger:
        paths_back = ReturnPaths(settings, files.series.id)
        intake = Intake(ledger, files.series.id, settings.bounces.soft_limit, paths_back)
        await poll(settings.imap, intake, now)
    return intake


async def recorded_bounces(files: OptOutFiles) -> list[BounceRecord]:
    if not ledger_exists(files.ledger_path):
        return []
    async with Ledger.open(files.ledger_path) as ledger:
        return await ledger.bounces(files.series.id)


# --- what the commands print ------------------------------------------------------------


def import_lines(result: Intake) -> list[str]:
    lines = []
    for r in result.recorded:
        b = r.bounce
        what = f"{b.kind} bounce" if b.kind != "complaint" else "complaint"
        said = f" {b.status}" if b.status else ""
        state = "suppressed" if r.suppressed else f"{r.soft_count} soft so far"
        again = "" if r.new else " (already recorded)"
        lines.append(f"{r.email}: {what}{said}, {state}{again}")
    for where, why in result.ignored:
        lines.append(f"{where}: ignored, {why}")
    lines.append(
        f"{result.read} message(s) read; {len(result.suppressed)} address(es) newly suppressed"
        " (they get no further mail of the series; 'optout remove' undoes it)"
    )
    return lines


def import_json(result: Intake) -> dict[str, object]:
    return {
        "read": result.read,
        "recorded": [
            {
                "email": r.email,
                "reported_as": r.bounce.email,
                "kind": str(r.bounce.kind),
                "status": r.bounce.status,
                "diagnostic": r.bounce.diagnostic,
                "new": r.new,
                "suppressed": r.suppressed,
                "soft_count": r.soft_count,
            }
            for r in result.recorded
        ],
        "ignored": [{"where": where, "why": why} for where, why in result.ignored],
        "suppressed": result.suppressed,
    }


def bounces_json(series: Series, records: list[BounceRecord]) -> dict[str, object]:
    return {"series": series.id, "bounces": bounce_records_json(records)}


def bounce_records_json(records: list[BounceRecord]) -> list[dict[str, Any]]:
    return [r.to_json() for r in records]


def bounces_table(series: Series, records: list[BounceRecord]) -> Table:
    table = Table(title=cell(f"Bounces and complaints of {series.id} ({len(records)})"))
    for column in ("address", "kind", "status", "server's answer", "recorded"):
        table.add_column(column)
    for r in records:
        table.add_row(
            *(
                cell(text)
                for text in (
                    r.email,
                    str(r.kind),
                    r.status,
                    r.diagnostic,
                    local(r.received_at, series),
                )
            )
        )
    return table
