"""Opt-outs: addresses that must never be mailed.

They come from two places, and every delivery pass merges both:

- the ledger (the state database): the one-click endpoint and
  ``invite-mailer optout add`` write here, so ``config/`` can stay read-only;
- ``config/optout.txt``: a list the organisers keep by hand.

This module lists and changes them for ``invite-mailer optout``; it only needs
the settings and the series, so a broken contact list or template never stops
anyone from blocking an address.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from pathlib import Path

from email_validator import EmailNotValidError, validate_email

from invite_mailer.delivery.ledger import Ledger
from invite_mailer.delivery.ledger_open import ledger_exists
from invite_mailer.errors import ConfigError, ProblemCollector
from invite_mailer.inputs.addresses import address_lines, load_address_list
from invite_mailer.inputs.config import OPTOUT_FILE
from invite_mailer.inputs.series import Series, load_series
from invite_mailer.inputs.settings import Settings
from invite_mailer.inputs.settings_file import load_settings

__all__ = [
    "OptOutEntry",
    "OptOutFiles",
    "Removal",
    "add",
    "entries",
    "load",
    "normalise",
    "remove",
]

SOURCE_FILE = "optout.txt"
SOURCE_CLI = "cli"


@dataclass(frozen=True)
class OptOutFiles:
    """What opt-out commands need: where the ledger and the list are, and the series."""

    settings: Settings
    series: Series
    optout_file: Path

    @property
    def ledger_path(self) -> Path | str:
        return self.settings.state.target


@dataclass(frozen=True)
class OptOutEntry:
    email: str
    stored_in: str  # "ledger" or "file"
    source: str  # ledger: "one-click", "web form", "cli", ...; file: "optout.txt"
    created_at: datetime | None = None  # ledger entries only
    line: int | None = None  # file entries only


class Removal(StrEnum):
    REMOVED = "removed"  # was in the ledger, and nowhere else
    ONLY_IN_FILE = "only-in-file"  # not in the ledger; listed in optout.txt
    STILL_IN_FILE = "still-in-file"  # removed from the ledger, but optout.txt still has it
    NOT_FOUND = "not-found"


def load(config_dir: Path) -> OptOutFiles:
    """Settings and series of *config_dir* (problems of both reported together)."""
    problems = ProblemCollector()
    settings = series = None
    try:
        settings = load_settings(config_dir)
    except ConfigError as exc:
        problems.extend(exc)
    try:
        series = load_series(config_dir)
    except ConfigError as exc:
        problems.extend(exc)
    problems.raise_if_any()
    assert settings is not None and series is not None
    return OptOutFiles(settings, series, config_dir / OPTOUT_FILE)


def normalise(address: str) -> str:
    """The lower-cased address, or :class:`ConfigError` with a hint when it is not one."""
    try:
        return validate_email(address.strip(), check_deliverability=False).normalized.lower()
    except EmailNotValidError as exc:
        raise ConfigError.single(
            None,
            f"{address!r} is not a valid email address: {exc}",
            hint="write the complete address, e.g. jana.mueller@example.org",
        ) from None


def file_lines(path: Path) -> dict[str, int]:
    """Lower-cased address -> first line of *path* that names it.

    The same reader as the delivery passes use, so the list shows exactly the
    addresses that are blocked (and a FIFO or oversized file is refused).
    """
    return address_lines(path)


async def entries(files: OptOutFiles) -> list[OptOutEntry]:
    """Every opt-out: ledger entries (oldest first), then those of optout.txt."""
    result: list[OptOutEntry] = []
    if ledger_exists(files.ledger_path):
        async with Ledger.open(files.ledger_path) as ledger:
            for entry in await ledger.optout_entries(files.series.id):
                result.append(OptOutEntry(entry.email, "ledger", entry.source, entry.created_at))
    lines = file_lines(files.optout_file)
    for email in sorted(lines, key=lambda e: (lines[e], e)):
        result.append(OptOutEntry(email, "file", SOURCE_FILE, line=lines[email]))
    return result


async def add(
    files: OptOutFiles, addresses: list[str], *, now: datetime, source: str = SOURCE_CLI
) -> dict[str, bool]:
    """Block *addresses* in the ledger; address -> False when it already was."""
    keys = [normalise(address) for address in addresses]
    result: dict[str, bool] = {}
    async with Ledger.open(files.ledger_path) as ledger:
        for key in keys:
            result[key] = await ledger.add_optout(files.series.id, key, source=source, now=now)
    return result


async def remove(files: OptOutFiles, address: str) -> Removal:
    """Unblock *address* in the ledger; optout.txt is the organisers' file and not edited."""
    key = address.strip().lower()
    removed = False
    if ledger_exists(files.ledger_path):
        async with Ledger.open(files.ledger_path) as ledger:
            removed = await ledger.remove_optout(files.series.id, key)
    in_file = key in load_address_list(files.optout_file)
    if removed:
        return Removal.STILL_IN_FILE if in_file else Removal.REMOVED
    return Removal.ONLY_IN_FILE if in_file else Removal.NOT_FOUND
