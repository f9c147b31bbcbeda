"""Loading every config file at once, with all problems reported together."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from invite_mailer.errors import ConfigError, Problem, ProblemCollector
from invite_mailer.inputs.addresses import load_address_list, load_attendance
from invite_mailer.inputs.contacts import ContactList, find_contacts_file, load_contacts
from invite_mailer.inputs.materials import UNSAFE_HEADER_TEXT, File, Materials, load_materials
from invite_mailer.inputs.series import SERIES_FILE, Series, load_series, readable_event_ids
from invite_mailer.inputs.settings import SETTINGS_FILE, Settings
from invite_mailer.inputs.settings_file import load_settings, settings_warnings
from invite_mailer.inputs.templates import Templates, load_templates
from invite_mailer.inputs.timeline import mailing_times

OPTOUT_FILE = "optout.txt"

_T = TypeVar("_T")


@dataclass(frozen=True)
class Config:
    """Everything read from the config folder (and the templates), validated."""

    config_dir: Path
    templates_dir: Path
    settings: Settings
    series: Series
    contacts: ContactList
    templates: Templates
    materials: Materials = field(default_factory=dict)
    optouts: frozenset[str] = frozenset()
    attendance: Mapping[str, frozenset[str]] = field(default_factory=dict)
    warnings: tuple[Problem, ...] = ()


def default_templates_dir(config_dir: Path) -> Path:
    """``templates/email`` beside the config folder."""
    return config_dir.resolve().parent / "templates" / "email"


def load_config(
    config_dir: Path,
    templates_dir: Path | None = None,
    *,
    env_file: Path | None = Path(".env"),
) -> Config:
    """Read settings, series, contacts, opt-outs, attendance, templates and materials.

    Files are checked independently where possible, so one run reports the
    problems of every file, not just the first broken one.
    """
    templates_dir = templates_dir or default_templates_dir(config_dir)
    if not config_dir.is_dir():
        raise ConfigError.single(
            config_dir,
            "config folder not found",
            hint="run from the folder that contains config/, or pass --config DIR",
        )
    problems = ProblemCollector()
    settings = _attempt(problems, lambda: load_settings(config_dir, env_file=env_file))
    series = _attempt(problems, lambda: _load_series(config_dir))
    # Without a valid series, check against the ids that can still be read, or
    # not at all: never against an empty set, which made every row "wrong".
    event_ids = [e.id for e in series.events] if series else readable_event_ids(config_dir)
    contacts = _attempt(problems, lambda: load_contacts(find_contacts_file(config_dir), event_ids))
    optouts = _attempt(problems, lambda: load_address_list(config_dir / OPTOUT_FILE))
    attendance = _attempt(problems, lambda: load_attendance(config_dir, event_ids))
    # The templates are checked even when settings or series are broken, so
    # their mistakes are reported in the same run; materials and header values
    # only with the real series and settings.
    templates = load_templates(templates_dir, problems)
    materials: dict[str, tuple[File, ...]] = {}
    if settings is not None and series is not None:
        materials = load_mail_files(settings, series, config_dir, problems)
        check_links(settings, series, config_dir, problems)
    problems.raise_if_any()
    assert settings is not None and series is not None and contacts is not None
    return Config(
        config_dir=config_dir,
        templates_dir=templates_dir,
        settings=settings,
        series=series,
        contacts=contacts,
        templates=templates,
        materials=materials,
        optouts=optouts or frozenset(),
        attendance=attendance or {},
        warnings=(*settings_warnings(config_dir, settings), *contacts.warnings),
    )


def _attempt(problems: ProblemCollector, load: Callable[[], _T]) -> _T | None:
    """What *load* returns, or None with its problems added to *problems*."""
    try:
        return load()
    except ConfigError as exc:
        problems.extend(exc)
        return None


def _load_series(config_dir: Path) -> Series:
    series = load_series(config_dir)
    _check_times(config_dir, series)
    return series


def load_mail_files(
    settings: Settings, series: Series, config_dir: Path, problems: ProblemCollector
) -> dict[str, tuple[File, ...]]:
    """The material files, with the header values of settings and series checked."""
    materials = load_materials(series, config_dir, settings.limits.max_attachment_bytes, problems)
    check_header_values(settings, series, config_dir, problems)
    return materials


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


def check_links(
    settings: Settings, series: Series, config_dir: Path, problems: ProblemCollector
) -> None:
    """Registration links need the web app's public address and the secret that signs them."""
    if not series.registration.links:
        return
    if not settings.sender.web_url:
        problems.add(
            config_dir / SETTINGS_FILE,
            'registration.mode is "links" in series.yaml, but [sender] web_url is not set: '
            "the mails would carry no registration links",
            hint='set web_url = "https://..." in [sender] to the public address of the '
            "daemon's web app (unsubscribe.serve), or use registration.mode: external",
        )
    if not settings.unsubscribe.secret.get_secret_value():
        problems.add(
            config_dir / SETTINGS_FILE,
            'registration.mode is "links" in series.yaml, but the secret that signs the '
            "links is empty",
            hint="set INVITE_MAILER_UNSUBSCRIBE__SECRET in the environment or in .env",
        )


def check_header_values(
    settings: Settings, series: Series, config_dir: Path, problems: ProblemCollector
) -> None:
    """Values of the config files that end up in headers hold no line break or
    control character: one would split the header (or make the standard
    library refuse the whole mail)."""
    sender = settings.sender
    values = [
        (config_dir / SETTINGS_FILE, "[sender] address", sender.address),
        (config_dir / SETTINGS_FILE, "[sender] reply_to", sender.reply_to),
        (config_dir / SETTINGS_FILE, "[sender] unsubscribe_mailto", sender.unsubscribe_mailto),
        (config_dir / SETTINGS_FILE, "[sender] unsubscribe_url", sender.unsubscribe_url),
        (config_dir / SERIES_FILE, "the series title", series.title),
        (config_dir / SERIES_FILE, "the series id", series.id),
        *((config_dir / SERIES_FILE, f"the id of the date {e.id!r}", e.id) for e in series.events),
    ]
    for path, what, value in values:
        found = UNSAFE_HEADER_TEXT.search(value)
        if found is not None:
            kind = (
                "a line break" if found.group() in "\r\n\u2028\u2029\x85" else "a control character"
            )
            problems.add(
                path,
                f"{what} contains {kind} ({found.group()!r}), which cannot go into a mail header: "
                f"{value!r}",
                hint="write it on one line"
                + (" (no | or > block in YAML)" if path.name == SERIES_FILE else ""),
            )
