"""What the ``optout`` commands print: the list as a table or JSON, the answer to a removal."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.table import Table

from invite_mailer.cli.optouts import OptOutEntry, OptOutFiles, Removal
from invite_mailer.cli.output import cell, local

__all__ = ["optouts_json", "optouts_table", "removal_answer"]


def optouts_json(files: OptOutFiles, entries: Sequence[OptOutEntry]) -> dict[str, Any]:
    return {
        "series": files.series.id,
        "addresses": len({e.email for e in entries}),
        "optouts": [
            {
                "email": e.email,
                "stored_in": e.stored_in,
                "source": e.source,
                "created_at": e.created_at.isoformat() if e.created_at else None,
                "line": e.line,
            }
            for e in entries
        ],
    }


def optouts_table(files: OptOutFiles, entries: Sequence[OptOutEntry]) -> Table:
    table = Table(
        title=cell(f"Opt-outs of {files.series.id} ({len({e.email for e in entries})} addresses)")
    )
    for column in ("address", "stored in", "source", "since"):
        table.add_column(column)
    for entry in entries:
        where = "state database"
        if entry.stored_in == "file":
            where = str(files.optout_file) + (f", line {entry.line}" if entry.line else "")
        since = local(entry.created_at, files.series) if entry.created_at else ""
        table.add_row(*(cell(text) for text in (entry.email, where, entry.source, since)))
    return table


def removal_answer(key: str, outcome: Removal, where: str) -> tuple[str | None, str]:
    """``optout remove``: the label for stderr (``None``: all is well, stdout) and the message."""
    if outcome is Removal.REMOVED:
        return None, f"{key}: opt-out removed; this address gets mail again."
    if outcome is Removal.NOT_FOUND:
        return None, f"{key} was not opted out; nothing to do."
    if outcome is Removal.ONLY_IN_FILE:
        return "error:", (
            f"{key} is not in the state database but listed in {where}; "
            "to allow mail to it again, delete that line from the file."
        )
    return "warning:", (
        f"{key}: removed from the state database, but it is also "
        f"listed in {where} and stays blocked; delete that line from the file too."
    )
