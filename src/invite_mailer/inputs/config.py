"""Loading every config file at once, with all problems reported together."""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from invite_mailer.core.plan import PlanInput, mailing_times
from invite_mailer.errors import ConfigError, Problem, ProblemCollector
from invite_mailer.inputs.addresses import load_address_list, load_attendance
from invite_mailer.inputs.contacts import ContactList, find_contacts_file, load_contacts
from invite_mailer.inputs.series import SERIES_FILE, Series, load_series, readable_event_ids
from invite_mailer.inputs.settings import Settings, load_settings, settings_warnings
from invite_mailer.mail.compose import Composer

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
        _check_times(config_dir, series)
    except ConfigError as exc:
        problems.extend(exc)
        series = None
    # Without a valid series, check against the ids that can still be read, or
    # not at all: never against an empty set, which made every row "wrong".
    event_ids = [e.id for e in series.events] if series else readable_event_ids(config_dir)
    try:
        contacts = load_contacts(find_contacts_file(config_dir), event_ids)
    except ConfigError as exc:
        problems.extend(exc)
    optouts: frozenset[str] = frozenset()
    try:
        optouts = load_address_list(config_dir / OPTOUT_FILE)
    except ConfigError as exc:
        problems.extend(exc)
    attendance: Mapping[str, frozenset[str]] = {}
    try:
        attendance = load_attendance(config_dir, event_ids)
    except ConfigError as exc:
        problems.extend(exc)
    composer = None
    try:
        composer = _composer(settings, series, templates_dir, config_dir)
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


def _check_times(config_dir: Path, series: Series) -> None:
    """Every due time and deadline can be computed (the series' limits make sure of it)."""
    try:
        mailing_times(series)
    except (OverflowError, ValueError) as exc:
        raise ConfigError.single(
            config_dir / SERIES_FILE,
            f"a mailing time of the series cannot be computed: {exc}",
            hint="check the dates (years 1970 to 9000) and the durations of the mailings",
        ) from None


def _composer(
    settings: Settings | None, series: Series | None, templates_dir: Path, config_dir: Path
) -> Composer | None:
    """The composer; or, when settings or series are broken, just the template check.

    The templates are checked with stand-ins then, so their mistakes are
    reported in the same run; materials are checked only with the real
    series and settings (a stand-in would report phantom problems).
    """
    if settings is not None and series is not None:
        return Composer(settings, series, templates_dir=templates_dir, config_dir=config_dir)
    # An empty folder as config folder: the stand-in has no materials, and the
    # real series.yaml (broken, maybe not even a regular file) stays unread.
    with tempfile.TemporaryDirectory() as empty:
        Composer(
            settings or Settings.model_construct(),
            _stand_in_series(),
            templates_dir=templates_dir,
            config_dir=Path(empty),
        )
    return None


def _stand_in_series() -> Series:
    return Series.model_validate(
        {
            "id": "template-check",
            "title": "Vorlagenprüfung",
            "organiser": {"name": "Veranstalter", "email": "veranstalter@example.org"},
            "events": [
                {
                    "id": "termin",
                    "title": "Termin",
                    "date": "2024-01-11",
                    "start": "10:00",
                    "end": "11:00",
                }
            ],
            "mailings": {"invitation": {"send_at": "2023-12-01 10:00"}},
        }
    )
