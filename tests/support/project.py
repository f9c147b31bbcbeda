"""A project as an organiser has it: the shipped ``config/`` and ``templates/`` in a folder.

Every test and benchmark that runs invite-mailer the way an operator does
starts from such a copy, with no ``INVITE_MAILER_*`` variable of the caller's
shell in the way, so it sees exactly the shipped settings.
"""

from __future__ import annotations

import os
import shutil
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING
from zoneinfo import ZoneInfo

if TYPE_CHECKING:
    import pytest

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "config"
TEMPLATES = ROOT / "templates"
ENV_PREFIX = "INVITE_MAILER_"


def copy_project(target: Path) -> Path:
    """The shipped ``config/`` and ``templates/`` under *target*; returns *target*."""
    shutil.copytree(CONFIG, target / "config")
    shutil.copytree(TEMPLATES, target / "templates")
    return target


def clean_environ() -> dict[str, str]:
    """This process's environment without any ``INVITE_MAILER_*`` setting."""
    return {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}


def strip_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Remove every ``INVITE_MAILER_*`` variable for the rest of the test."""
    for name in list(os.environ):
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)


@contextmanager
def shipped_environment() -> Iterator[None]:
    """No ``INVITE_MAILER_*`` variable of the caller's environment while inside.

    For module-scoped fixtures and benchmarks, where no ``monkeypatch`` exists.
    """
    saved = {k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIX)}
    for name in saved:
        del os.environ[name]
    try:
        yield
    finally:
        os.environ.update(saved)


def use_project(target: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project copy under *target* as the working directory, the environment stripped."""
    copy_project(target)
    monkeypatch.chdir(target)
    strip_environment(monkeypatch)
    return target


SHIPPED_STATE_URL = 'url = "sqlite:///state/invite-mailer.db"'


def use_state_url(project: Path, url: str) -> None:
    """Point the project's ``[state]`` at *url* in its settings.toml, as an organiser does.

    A setting in the file reaches every child process too, which the test
    helpers start without the caller's ``INVITE_MAILER_*`` variables.
    """
    path = project / "config" / "settings.toml"
    text = path.read_text(encoding="utf-8")
    assert text.count(SHIPPED_STATE_URL) == 1, f"no shipped [state] url in {path}"
    path.write_text(text.replace(SHIPPED_STATE_URL, f'url = "{url}"'), encoding="utf-8")


def ledger_of(project: Path) -> Path | str:
    """Where the project's ledger lives: its SQLite file, or its PostgreSQL URL.

    Read from config/settings.toml as invite-mailer reads it, for tests that
    look at the ledger directly (``support.postgres.query``, ``Ledger.open``).
    """
    with (project / "config" / "settings.toml").open("rb") as file:
        url = str(
            tomllib.load(file).get("state", {}).get("url", "sqlite:///state/invite-mailer.db")
        )
    if url.startswith(("postgresql://", "postgres://")):
        return url
    return project / url.removeprefix("sqlite:///")


def keep_only_first_event(config: Path) -> None:
    """Cut the copied series down to its first date: fewer calendar files, cheaper mails."""
    path = config / "series.yaml"
    text = path.read_text(encoding="utf-8")
    first = text.index("  - id: ")
    second = text.index("  - id: ", first + 1)
    path.write_text(text[:second] + text[text.index("mailings:") :], encoding="utf-8")


BERLIN = ZoneInfo("Europe/Berlin")
# Next year's November always lies ahead.
FUTURE_SERIES_YEAR = str(datetime.now(BERLIN).year + 1)


def series_due_now(project: Path) -> None:
    """The shipped series moved into the future, its invitation due an hour ago."""
    path = project / "config" / "series.yaml"
    text = path.read_text(encoding="utf-8").replace("2024-1", f"{FUTURE_SERIES_YEAR}-1")
    an_hour_ago = (datetime.now(BERLIN) - timedelta(hours=1)).strftime("%Y-%m-%d %H:%M")
    text = text.replace(f'send_at: "{FUTURE_SERIES_YEAR}-10-24 10:00"', f'send_at: "{an_hour_ago}"')
    path.write_text(text, encoding="utf-8")
