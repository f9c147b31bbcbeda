"""Loading every config file at once, with all problems reported together."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from invite_mailer.compose import Composer
from invite_mailer.contacts import (
    ContactList,
    find_contacts_file,
    load_address_list,
    load_attendance,
    load_contacts,
)
from invite_mailer.errors import ConfigError, Problem, ProblemCollector
from invite_mailer.plan import PlanInput
from invite_mailer.series import Series, load_series
from invite_mailer.settings import Settings, load_settings, settings_warnings

OPTOUT_FILE = "optout.txt"


@dataclass(frozen=True)
class Config:
    """Everything read from the config folder, validated."""

    config_dir: Path
    templates_dir: Path
    settings: Settings
    series: Series
    contacts: ContactList
    composer: Composer
    optouts: frozenset[str] = frozenset()
    attendance: Mapping[str, frozenset[str]] = field(default_factory=dict)
    warnings: tuple[Problem, ...] = ()

    def plan_input(self, extra_optouts: frozenset[str] = frozenset()) -> PlanInput:
        return PlanInput(
            series=self.series,
            contacts=self.contacts.contacts,
            optouts=self.optouts | extra_optouts,
            attendance=self.attendance,
        )


def default_templates_dir(config_dir: Path) -> Path:
    """``templates/email`` beside the config folder."""
    return config_dir.resolve().parent / "templates" / "email"


def load_config(
    config_dir: Path,
    templates_dir: Path | None = None,
    *,
    env_file: Path | None = Path(".env"),
) -> Config:
    """Read settings, series, contacts, opt-outs, attendance and templates.

    Files are checked independently where possible, so one run reports the
    problems of every file, not just the first broken one.
    """
    templates_dir = templates_dir or default_templates_dir(config_dir)
    problems = ProblemCollector()
    if not config_dir.is_dir():
        raise ConfigError.single(
            config_dir,
            "config folder not found",
            hint="run from the folder that contains config/, or pass --config DIR",
        )

    settings = series = contacts = None
    try:
        settings = load_settings(config_dir, env_file=env_file)
    except ConfigError as exc:
        problems.extend(exc)
    try:
        series = load_series(config_dir)
    except ConfigError as exc:
        problems.extend(exc)
    event_ids = [e.id for e in series.events] if series else None
    try:
        contacts = load_contacts(find_contacts_file(config_dir), event_ids or ())
    except ConfigError as exc:
        if series is not None:
            problems.extend(exc)
        else:
            # Without a valid series the event ids are unknown; report only
            # what does not depend on them.
            problems.problems.extend(p for p in exc if "unknown event" not in p.message)
    optouts: frozenset[str] = frozenset()
    try:
        optouts = load_address_list(config_dir / OPTOUT_FILE)
    except ConfigError as exc:
        problems.extend(exc)
    attendance: Mapping[str, frozenset[str]] = {}
    if event_ids is not None:
        try:
            attendance = load_attendance(config_dir, event_ids)
        except ConfigError as exc:
            problems.extend(exc)
    composer = None
    if settings is not None and series is not None:
        try:
            composer = Composer(
                settings, series, templates_dir=templates_dir, config_dir=config_dir
            )
        except ConfigError as exc:
            problems.extend(exc)
    problems.raise_if_any()
    assert settings is not None and series is not None
    assert contacts is not None and composer is not None
    return Config(
        config_dir=config_dir,
        templates_dir=templates_dir,
        settings=settings,
        series=series,
        contacts=contacts,
        composer=composer,
        optouts=optouts,
        attendance=attendance,
        warnings=(*settings_warnings(config_dir, settings), *contacts.warnings),
    )
