"""The command line: parse, load, call the core, print, return an exit code."""

from __future__ import annotations

import asyncio
import logging
import sys
from datetime import UTC, datetime
from pathlib import Path

import click

from invite_mailer import __version__
from invite_mailer.cli import advisories as advice
from invite_mailer.cli import commands, optout_output, output, send_due_report
from invite_mailer.cli.bounce_commands import bounces
from invite_mailer.cli.health import health as node_health
from invite_mailer.cli.migrate import migrate
from invite_mailer.cli.options import (
    common,
    config_only,
    handle_errors,
    kind_choice,
    load,
    now_of,
    plain_address,
    with_json,
    with_now,
)
from invite_mailer.cli.output import echo, err, out, print_json, say, warn
from invite_mailer.delivery.dispatch import Outcome
from invite_mailer.errors import (
    EXIT_FAILED,
    EXIT_INVALID,
    EXIT_OK,
    EXIT_TEMPFAIL,
    EXIT_USAGE,
    TransportError,
)
from invite_mailer.inputs.series import Kind
from invite_mailer.logs import setup_logging
from invite_mailer.mail.checks import validate_sample


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="invite-mailer")
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="Log lines for people or JSON for machines.",
)
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def cli(log_format: str, verbose: bool) -> None:
    """Send invitations, reminders and follow-ups for an event series."""
    setup_logging(log_format, logging.DEBUG if verbose else logging.INFO)


@cli.command()
@common
@handle_errors
def validate(config_dir: Path, templates: Path | None) -> None:
    """Check all files and render every mail for every recipient; send nothing."""
    config = load(config_dir, templates)
    result = commands.validate(config)
    for warning in result.advisories:
        warn(warning)
    out.print(output.validation_line(result))


@cli.command("plan")
@common
@with_now
@with_json
@handle_errors
def plan_command(
    config_dir: Path, templates: Path | None, now_text: str | None, as_json: bool
) -> None:
    """The timeline: every mailing with due time, deadline, state and counts."""
    config = load(config_dir, templates)
    now = now_of(now_text, config)
    report = asyncio.run(commands.current_plan(config, now))
    registered = asyncio.run(commands.registered_counts(config))
    finishes = report.finishes
    if as_json:
        print_json(output.plan_json(report.mailings, config.series, now, registered, finishes))
    else:
        out.print(output.plan_table(report.mailings, config.series, now, finishes))
        echo(output.registered_caption(registered, config.series))


@cli.command()
@click.argument("kind", type=kind_choice())
@click.option("--event", "event_id", metavar="ID", help="The date (reminder, follow-up).")
@click.option("--contact", "email", metavar="EMAIL", help="Render for this contact.")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("preview"),
    show_default=True,
)
@common
@with_now
@handle_errors
def preview(
    kind: str,
    event_id: str | None,
    email: str | None,
    out: Path,
    config_dir: Path,
    templates: Path | None,
    now_text: str | None,
) -> None:
    """Write the exact message as .eml, and its HTML part as .html."""
    config = load(config_dir, templates)
    now = now_of(now_text, config)
    view = asyncio.run(commands.snapshot(config))
    written = commands.preview(
        config, Kind(kind), event_id=event_id, email=email, out=out, now=now, view=view
    )
    for path in written:
        click.echo(str(path))


@cli.command("send-due")
@common
@with_now
@with_json
@handle_errors
def send_due(config_dir: Path, templates: Path | None, now_text: str | None, as_json: bool) -> None:
    """One pass: send everything due and open, then exit (safe to repeat, e.g. from cron)."""
    config = load(config_dir, templates)
    now = now_of(now_text, config)
    with commands.locked(config):
        if sys.stderr.isatty() and not as_json:
            with output.progress_bars() as on_progress:
                outcome = asyncio.run(commands.send_due(config, now, on_progress=on_progress))
        else:
            outcome = asyncio.run(commands.send_due(config, now))
    for delivery in outcome.recovered:
        say(err, "uncertain:", output.recovered_line(delivery))
    if as_json:
        print_json(send_due_report.send_due_json(outcome, now))
    else:
        echo(send_due_report.send_due_line(outcome, now, config.series))
        for mailing_id, email, answer in outcome.result.failures:
            say(err, "failed:", f"{mailing_id} {email}: {answer}")
    code = _send_due_exit(outcome)
    if code != EXIT_OK:
        sys.exit(code)


def _send_due_exit(outcome: commands.SendDueResult) -> int:
    """Warn about what stopped the pass; the exit code of ``send-due``."""
    result = outcome.result
    if result.sender_refused is not None:
        say(
            err,
            "error:",
            f"the relay refuses the sender address: {result.sender_refused}\n"
            "  hint: check [sender] address in settings.toml and that your SMTP account may "
            "send as it; nothing was marked failed, the next run tries again",
        )
    if outcome.stopped_by is not None:
        say(
            err,
            "warning:",
            f"stopped early ({outcome.stopped_by}): {outcome.given_back} mails given back; "
            "they go out at the next run",
        )
    if result.total(Outcome.FAILED) or result.sender_refused is not None:
        return EXIT_FAILED
    if outcome.stopped_by is not None:
        # Nothing is wrong, but the work is not done: a passing condition, try again.
        return EXIT_TEMPFAIL
    return EXIT_OK


@cli.command()
@common
@with_now
@with_json
@click.option(
    "--failed", "only_failed", is_flag=True, help="List failed recipients with the server's answer."
)
@handle_errors
def status(
    config_dir: Path, templates: Path | None, now_text: str | None, as_json: bool, only_failed: bool
) -> None:
    """What was sent, failed, uncertain and pending, per mailing."""
    config = load(config_dir, templates)
    now = now_of(now_text, config)
    result = asyncio.run(commands.status(config, now))
    if as_json:
        print_json(output.status_json(result, now, only_failed=only_failed))
    else:
        if not only_failed:
            retrying = output.retrying_by_mailing(result.retrying)
            out.print(output.status_table(result.mailings, retrying, config.series))
            echo(output.registered_caption(result.registered, config.series))
        if result.failed:
            out.print(output.deliveries_table("Failed (not retried)", result.failed, config.series))
        elif only_failed:
            echo("No failed deliveries.")
        if result.uncertain:
            out.print(
                output.deliveries_table(output.UNCERTAIN_TITLE, result.uncertain, config.series)
            )
        if result.bounces and not only_failed:
            from invite_mailer.cli.bounce_reports import bounces_table

            out.print(bounces_table(config.series, result.bounces))
        if result.nodes and not only_failed:
            out.print(output.nodes_table(result))
    if result.failed:
        sys.exit(EXIT_FAILED)


@cli.command("send-test")
@click.argument("kind", type=kind_choice())
@click.option(
    "--to", "to", required=True, metavar="ADDR", callback=plain_address, help="Test address."
)
@click.option("--event", "event_id", metavar="ID")
@click.option("--contact", "email", metavar="EMAIL", help="Render as for this contact.")
@common
@with_now
@handle_errors
def send_test(
    kind: str,
    to: str,
    event_id: str | None,
    email: str | None,
    config_dir: Path,
    templates: Path | None,
    now_text: str | None,
) -> None:
    """Send one rendered sample to a test address (not recorded as a delivery)."""
    config = load(config_dir, templates)
    now = now_of(now_text, config)
    try:
        answer = asyncio.run(
            commands.send_test(config, Kind(kind), to=to, event_id=event_id, email=email, now=now)
        )
    except TransportError as exc:
        say(err, "failed:", str(exc))
        sys.exit(EXIT_FAILED)
    echo(f"sent test {kind} to {to} via {commands.destination(config)}: {answer}")


@cli.command()
@common
@handle_errors
def run(config_dir: Path, templates: Path | None) -> None:
    """The daemon: schedule every mailing, catch up, reload on edits, stop on SIGTERM."""
    from invite_mailer.service.daemon import main

    # The daemon reports start-up problems itself, through the log (JSON too),
    # with an exit status that systemd does not restart on.
    sys.exit(main(config_dir, templates))


@cli.command()
@common
@handle_errors
def health(config_dir: Path, templates: Path | None) -> None:
    """Exit 0 if the daemon's heartbeat is fresh (for container and monitoring checks)."""
    ok, message = node_health(config_dir, datetime.now(UTC))
    click.echo(message)
    sys.exit(EXIT_OK if ok else EXIT_INVALID)


# --- opt-outs ----------------------------------------------------------------------------


@cli.group()
def optout() -> None:
    """Addresses that must never be mailed: list, add, remove."""


@optout.command("list")
@config_only
@with_json
@handle_errors
def optout_list(config_dir: Path, as_json: bool) -> None:
    """Opt-outs from the state database (one-click link, optout add) and config/optout.txt."""
    from invite_mailer.cli import optouts

    files = optouts.load(config_dir)
    entries = asyncio.run(optouts.entries(files))
    if as_json:
        print_json(optout_output.optouts_json(files, entries))
    elif not entries:
        echo(f"No opt-outs for {files.series.id}.")
    else:
        out.print(optout_output.optouts_table(files, entries))


@optout.command("add")
@click.argument("addresses", nargs=-1, required=True, metavar="EMAIL...")
@click.option(
    "--source",
    default="cli",
    show_default=True,
    help="Where the request came from, e.g. 'Mail vom 12.11.2024'.",
)
@config_only
@handle_errors
def optout_add(addresses: tuple[str, ...], source: str, config_dir: Path) -> None:
    """Never mail these addresses again (recorded in the state database)."""
    from invite_mailer.cli import optouts

    files = optouts.load(config_dir)
    result = asyncio.run(optouts.add(files, list(addresses), now=datetime.now(UTC), source=source))
    for email, added in result.items():
        echo(f"{email}: {'opted out' if added else 'was already opted out'}")
    echo("Takes effect with the next delivery pass (a running daemon checks every minute).")


@optout.command("remove")
@click.argument("address", metavar="EMAIL")
@config_only
@handle_errors
def optout_remove(address: str, config_dir: Path) -> None:
    """Allow mail to an address again (opt-outs in the state database only)."""
    from invite_mailer.cli import optouts

    files = optouts.load(config_dir)
    outcome = asyncio.run(optouts.remove(files, address))
    key = address.strip().lower()
    line = optouts.file_lines(files.optout_file).get(key)
    where = str(files.optout_file) + (f", line {line}" if line else "")
    label, message = optout_output.removal_answer(key, outcome, where)
    if label is None:
        echo(message)
        return
    # Still blocked by the file: what was asked for did not happen.
    say(err, label, message)
    sys.exit(EXIT_INVALID)


# --- registrations -----------------------------------------------------------------------


@cli.group("registrations")
def registrations_group() -> None:
    """Who is registered for which date: list, add, remove."""


@registrations_group.command("list")
@click.option("--event", "event_id", metavar="ID", help="Only this date.")
@click.option("--csv", "as_csv", is_flag=True, help="CSV (;) on standard output.")
@click.option(
    "--xlsx",
    "xlsx",
    type=click.Path(dir_okay=False, path_type=Path),
    metavar="FILE",
    help="Write an Excel workbook.",
)
@common
@with_json
@handle_errors
def registrations_list(
    event_id: str | None,
    as_csv: bool,
    xlsx: Path | None,
    config_dir: Path,
    templates: Path | None,
    as_json: bool,
) -> None:
    """The contact list's registrations merged with links and CLI, with source and time."""
    from invite_mailer.cli import registrations as regs

    if sum((as_json, as_csv, xlsx is not None)) > 1:
        raise click.UsageError("choose one of --json, --csv and --xlsx")
    config = load(config_dir, templates)
    found = asyncio.run(regs.entries(config, event_id))
    if as_json:
        print_json({"series": config.series.id, "registrations": [e.json() for e in found]})
    elif as_csv:
        click.echo(regs.as_csv(found), nl=False)
    elif xlsx is not None:
        with commands.writing(xlsx, "--xlsx"):
            regs.write_xlsx(found, xlsx)
        echo(f"{len(found)} registration(s) written to {xlsx}")
    else:
        out.print(output.registrations_table(found, config.series))


@registrations_group.command("add")
@click.argument("email", metavar="EMAIL")
@click.option("--event", "event_id", metavar="ID", required=True, help="The date.")
@common
@with_now
@handle_errors
def registrations_add(
    email: str, event_id: str, config_dir: Path, templates: Path | None, now_text: str | None
) -> None:
    """Register a contact for a date (recorded in the state database, source "cli")."""
    from invite_mailer.cli import registrations as regs

    config = load(config_dir, templates)
    contact, changed = asyncio.run(regs.add(config, email, event_id, now_of(now_text, config)))
    if changed:
        echo(
            f"{contact.email}: registered for {event_id}; the confirmation goes out with the "
            "next delivery pass (a running daemon checks every minute)"
        )
    else:
        echo(f"{contact.email}: was already registered for {event_id}")


@registrations_group.command("remove")
@click.argument("email", metavar="EMAIL")
@click.option("--event", "event_id", metavar="ID", required=True, help="The date.")
@common
@with_now
@handle_errors
def registrations_remove(
    email: str, event_id: str, config_dir: Path, templates: Path | None, now_text: str | None
) -> None:
    """Withdraw a registration (outweighs the contact list's anmeldungen)."""
    from invite_mailer.cli import registrations as regs

    config = load(config_dir, templates)
    contact, changed = asyncio.run(regs.remove(config, email, event_id, now_of(now_text, config)))
    if changed:
        echo(f"{contact.email}: registration for {event_id} withdrawn; no reminder for it")
    else:
        echo(f"{contact.email}: was not registered for {event_id} (nothing changed)")


# --- rehearsal ---------------------------------------------------------------------------


@cli.command()
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("rehearsal"),
    show_default=True,
    help="Folder for index.html and the mails (replaced on every run).",
)
@common
@with_json
@handle_errors
def rehearse(out_dir: Path, config_dir: Path, templates: Path | None, as_json: bool) -> None:
    """The whole series in virtual time into a folder, with an overview; nothing is sent."""
    from invite_mailer.cli.rehearse import rehearse as play

    config = load(config_dir, templates)
    validate_sample(config)
    advisories = advice.advisories(config)
    for warning in advisories:
        warn(warning)
    result = asyncio.run(play(config, out_dir))
    if as_json:
        print_json(output.rehearsal_json(result, advisories))
        return
    for line in output.rehearsal_lines(result):
        echo(line)


cli.add_command(bounces)
cli.add_command(migrate)


def main(argv: list[str] | None = None) -> int:
    try:
        cli.main(args=argv, prog_name="invite-mailer", standalone_mode=True)
    except SystemExit as exc:
        return int(exc.code or 0) if not isinstance(exc.code, str) else EXIT_USAGE
    return EXIT_OK
