"""``invite-mailer bounces``: import reports, fetch the mailbox, list what was recorded."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path

import click

from invite_mailer.cli.options import config_only, handle_errors, with_json
from invite_mailer.cli.output import echo, out, print_json
from invite_mailer.delivery.bounce_intake import Intake

__all__ = ["bounces"]


# --- bounces -----------------------------------------------------------------------------


@click.group()
def bounces() -> None:
    """Bounces and complaints: import reports, list what was recorded."""


@bounces.command("import")
@click.argument(
    "paths", nargs=-1, required=True, metavar="PATH...", type=click.Path(path_type=Path)
)
@config_only
@with_json
@handle_errors
def bounces_import(paths: tuple[Path, ...], config_dir: Path, as_json: bool) -> None:
    """Read bounce and complaint reports (.eml files, mbox files, Maildir folders)."""
    from invite_mailer.cli import bounce_reports as reports
    from invite_mailer.cli import optouts

    files = optouts.load(config_dir)
    limit = files.settings.bounces.soft_limit
    result = asyncio.run(
        reports.import_reports(files, list(paths), now=datetime.now(UTC), soft_limit=limit)
    )
    _print_intake(result, as_json)


@bounces.command("fetch")
@config_only
@with_json
@handle_errors
def bounces_fetch(config_dir: Path, as_json: bool) -> None:
    """Read the [imap] bounce mailbox once (the daemon polls it every imap.poll_seconds)."""
    from invite_mailer.cli import bounce_reports as reports
    from invite_mailer.cli import optouts

    files = optouts.load(config_dir)
    _print_intake(asyncio.run(reports.fetch_reports(files, now=datetime.now(UTC))), as_json)


def _print_intake(result: Intake, as_json: bool) -> None:
    from invite_mailer.cli import bounce_reports as reports

    if as_json:
        print_json(reports.import_json(result))
    else:
        for line in reports.import_lines(result):
            echo(line)


@bounces.command("list")
@config_only
@with_json
@handle_errors
def bounces_list(config_dir: Path, as_json: bool) -> None:
    """Every recorded bounce and complaint, with the server's answer."""
    from invite_mailer.cli import bounce_reports as reports
    from invite_mailer.cli import optouts

    files = optouts.load(config_dir)
    records = asyncio.run(reports.recorded_bounces(files))
    if as_json:
        print_json(reports.bounces_json(files.series, records))
    elif not records:
        echo(f"No bounces or complaints recorded for {files.series.id}.")
    else:
        out.print(reports.bounces_table(files.series, records))
