"""``invite-mailer migrate``: upgrade the ledger's schema, or move it to PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import click
from pydantic import ValidationError

from invite_mailer.cli.options import handle_errors, with_json
from invite_mailer.cli.output import echo, print_json
from invite_mailer.delivery.ledger_migrate import move_to_postgres, upgrade
from invite_mailer.errors import ConfigError
from invite_mailer.inputs.settings import SETTINGS_FILE
from invite_mailer.inputs.settings_file import load_settings
from invite_mailer.inputs.state_settings import StateSettings

__all__ = ["migrate"]


@click.command()
@click.option(
    "--config",
    "config_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("config"),
    show_default=True,
    help="Config folder whose settings.toml names the ledger ([state] url).",
)
@click.option("--from", "source", metavar="URL", help="Move this SQLite ledger (sqlite:///…).")
@click.option("--to", "target", metavar="URL", help="… into this PostgreSQL database.")
@with_json
@handle_errors
def migrate(config_dir: Path, source: str | None, target: str | None, as_json: bool) -> None:
    """Apply the ledger's schema migrations, or move an SQLite ledger to PostgreSQL.

    \b
    invite-mailer migrate
    invite-mailer migrate --from sqlite:///state/invite-mailer.db \\
                          --to postgresql://invite_mailer@db.example.org/invite_mailer
    """
    if source is None and target is None:
        state = load_settings(config_dir).state
        done = upgrade(state.target)
        if as_json:
            print_json({"ledger": done.where, "from": done.before, "to": done.after})
        elif done.before == done.after:
            echo(f"{done.where}: schema version {done.after}, nothing to do")
        else:
            echo(f"{done.where}: schema version {done.before} -> {done.after}")
        return
    old, new = _state("--from", source), _state("--to", target)
    if old.is_postgresql or not new.is_postgresql:
        raise _usage("--from names an SQLite ledger (sqlite:///…) and --to a PostgreSQL one")
    moved = move_to_postgres(old.path, new.url)
    if as_json:
        print_json({"from": moved.source, "to": moved.target, "rows": moved.rows})
        return
    for table, count in moved.rows.items():
        echo(f"{table}: {count} row(s)")
    echo(f"moved {moved.source} to {moved.target}; set [state] url to it and start the nodes")


def _state(option: str, url: str | None) -> StateSettings:
    if url is None:
        raise _usage("--from and --to go together")
    try:
        return StateSettings(url=url)
    except ValidationError as exc:
        reasons = "; ".join(str(e["msg"]).removeprefix("Value error, ") for e in exc.errors())
        raise _usage(f"{option}: {reasons}") from None


def _usage(message: str) -> ConfigError:
    return ConfigError.single(
        Path(SETTINGS_FILE),
        message,
        hint="invite-mailer migrate --from sqlite:///state/invite-mailer.db "
        "--to postgresql://user@host/database",
    )
