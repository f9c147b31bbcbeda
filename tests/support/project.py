"""A project as an organiser has it: the shipped ``config/`` and ``templates/`` in a folder.

Every test and benchmark that runs invite-mailer the way an operator does
starts from such a copy, with no ``INVITE_MAILER_*`` variable of the caller's
shell in the way, so it sees exactly the shipped settings.
"""

from __future__ import annotations

import os
import shutil
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
