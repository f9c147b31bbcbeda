"""The options every command shares, and the one place errors become exit codes."""

from __future__ import annotations

import functools
import logging
import sys
import traceback
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click
from email_validator import EmailNotValidError, validate_email

from invite_mailer.cli import commands
from invite_mailer.cli.output import err, json_logs, say, verbose, warn
from invite_mailer.errors import (
    EXIT_FAILED,
    EXIT_INVALID,
    EXIT_SOFTWARE,
    EXIT_TEMPFAIL,
    ConfigError,
    InviteMailerError,
    PermanentFailure,
)
from invite_mailer.inputs.config import Config, load_config
from invite_mailer.inputs.series import Kind

LASTING_OS_ERRORS = (
    PermissionError,
    FileNotFoundError,
    FileExistsError,
    IsADirectoryError,
    NotADirectoryError,
)

log = logging.getLogger("invite_mailer.cli")

F = TypeVar("F", bound=Callable[..., Any])


def common(func: F) -> F:
    """--config and --templates on every command."""
    func = click.option(
        "--templates",
        type=click.Path(file_okay=False, path_type=Path),
        default=None,
        help="Template folder [default: templates/email beside the config folder].",
    )(func)
    func = click.option(
        "--config",
        "config_dir",
        type=click.Path(file_okay=False, path_type=Path),
        default=Path("config"),
        show_default=True,
        help="Config folder (settings.toml, series.yaml, contacts.csv).",
    )(func)
    return func


def with_now(func: F) -> F:
    return click.option(
        "--now",
        "now_text",
        metavar="ISO-8601",
        help="Pretend it is this moment (naive times are in the series' time zone).",
    )(func)


def with_json(func: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")(func)


def handle_errors(func: F) -> F:
    """Turn every error into one clear message and an exit code, never a traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (click.exceptions.ClickException, click.exceptions.Abort, click.exceptions.Exit):
            raise
        except Exception as exc:  # the last stop before the user: no traceback
            _fail(exc)

    return wrapper  # type: ignore[return-value]


def _fail(exc: BaseException) -> NoReturn:
    exc = _only_cause(exc)
    if isinstance(exc, ConfigError):
        count = len(exc.problems)
        lines = [f"{count} problem{'s' if count != 1 else ''} found; nothing was sent."]
        lines += [f"- {problem}" for problem in exc.problems]
        say(err, "error:", "\n".join(lines))
        sys.exit(EXIT_INVALID)
    if isinstance(exc, PermanentFailure):
        say(err, "error:", str(exc))
        sys.exit(EXIT_FAILED)
    if isinstance(exc, InviteMailerError):
        say(err, "error:", str(exc))
        sys.exit(EXIT_TEMPFAIL if exc.temporary else EXIT_INVALID)
    if isinstance(exc, OSError):
        say(err, "error:", commands.describe_os_error(exc))
        # A missing file or permission stays so until someone fixes it; a full
        # disk or too many open files may pass.
        sys.exit(EXIT_INVALID if isinstance(exc, LASTING_OS_ERRORS) else EXIT_TEMPFAIL)
    message = f"{type(exc).__name__}: {exc}\n  this is a bug; please report it" + (
        " with the traceback below" if verbose() else " (run with --verbose for the traceback)"
    )
    if json_logs():
        log.critical(message, exc_info=exc if verbose() else None)
    else:
        say(err, "error:", message)
        if verbose():
            traceback.print_exception(exc, file=sys.stderr)
    sys.exit(EXIT_SOFTWARE)


def _only_cause(exc: BaseException) -> BaseException:
    """The one error inside an exception group (asyncio task groups wrap them)."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def now_of(text: str | None, config: Config) -> datetime:
    """``--now``, or a usage error that says what was wrong with it."""
    try:
        return commands.parse_now(text, config)
    except ConfigError as exc:
        problem = exc.problems[0]
        hint = f" ({problem.hint})" if problem.hint else ""
        raise click.BadParameter(f"{problem.message}{hint}", param_hint="'--now'") from None


def plain_address(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """``send-test --to``: one plain address, nothing a header could be built from."""
    try:
        return validate_email(value, check_deliverability=False).normalized
    except EmailNotValidError as exc:
        raise click.BadParameter(
            f"{value!r} is not one plain email address: {exc} "
            "(write it like tester@example.org, without a name or a second address)"
        ) from None


def load(config_dir: Path, templates: Path | None) -> Config:
    config = load_config(config_dir, templates)
    for warning in config.warnings:
        warn(warning)
    return config


def kind_choice() -> click.Choice[str]:
    return click.Choice([k.value for k in Kind])


def config_only(func: F) -> F:
    """--config alone: opt-out commands read only settings.toml, series.yaml and optout.txt."""
    return click.option(
        "--config",
        "config_dir",
        type=click.Path(file_okay=False, path_type=Path),
        default=Path("config"),
        show_default=True,
        help="Config folder (settings.toml, series.yaml, optout.txt).",
    )(func)
