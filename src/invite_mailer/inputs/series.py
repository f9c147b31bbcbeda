"""The event series: ``config/series.yaml`` turned into typed, time-zone-aware models."""

from __future__ import annotations

import functools
import hashlib
import json
import os
from datetime import datetime, time
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    EmailStr,
    Field,
    HttpUrl,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from invite_mailer.errors import ConfigError, Problem
from invite_mailer.inputs.values import (
    SLUG,
    Clock,
    Day,
    Duration,
    Line,
    LocalDateTime,
    Slug,
    Title,
    localize,
    long_text,
    one_line,
)
from invite_mailer.inputs.yamlfile import LocatedDocument, load_yaml

SERIES_FILE = "series.yaml"


class Kind(StrEnum):
    """The kinds of mail. Values are the template names."""

    INVITATION = "invitation"
    REMINDER = "reminder"
    FOLLOWUP = "followup"
    UPDATE = "update"
    CANCELLATION = "cancellation"
    CONFIRMATION = "confirmation"


class RegistrationMode(StrEnum):
    """How registrations reach invite-mailer (``registration.mode``)."""

    EXTERNAL = "external"  # the organiser's own form; the contact list's anmeldungen
    LINKS = "links"  # personal signed links per date, served by the daemon's web app


class Genus(StrEnum):
    """The grammatical gender of the series' title, for its article in mails."""

    FEMININE = "f"
    MASCULINE = "m"
    NEUTER = "n"
    PLURAL = "pl"


class Audience(StrEnum):
    ALL = "all"
    REGISTERED = "registered"
    ATTENDED = "attended"


# --- the series ------------------------------------------------------------------


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)


class Organiser(_Model):
    name: Annotated[str, one_line(200)]
    email: EmailStr


class Material(_Model):
    """A result of a date: a link, or a small file to attach."""

    title: Title
    url: HttpUrl | None = None
    file: Path | None = None
    description: Annotated[str, long_text(2_000)] = ""

    @model_validator(mode="after")
    def _one_of(self) -> Material:
        if (self.url is None) == (self.file is None):
            raise ValueError("a material needs either url: or file: (exactly one of them)")
        return self


class Event(_Model):
    """One date of the series."""

    id: Slug
    title: Title
    date: Day
    start: Clock
    end: Clock
    join_url: HttpUrl | None = None
    description: Annotated[str, long_text(10_000)] = ""
    speakers: Annotated[list[Annotated[str, one_line(200)]], Field(max_length=50)] = []
    materials: Annotated[list[Material], Field(max_length=50)] = []
    cancelled: bool = False
    cancel_reason: Annotated[str, long_text(2_000)] = ""

    _zone: ZoneInfo = PrivateAttr(default=ZoneInfo("UTC"))

    @model_validator(mode="after")
    def _order(self) -> Event:
        if self.end <= self.start:
            raise ValueError(
                f"end {self.end:%H:%M} is not after start {self.start:%H:%M}; "
                "events must end later on the same day"
            )
        return self

    @property
    def zone(self) -> ZoneInfo:
        return self._zone

    @property
    def starts_at(self) -> datetime:
        return localize(self.date, self.start, self._zone)

    @property
    def ends_at(self) -> datetime:
        return localize(self.date, self.end, self._zone)

    def fingerprint(self) -> dict[str, str]:
        """What a recipient relies on: when, what, where to join, whether it happens.

        Materials and descriptions are deliberately left out: changing them
        sends nothing.
        """
        return {
            "start": self.starts_at.isoformat(),
            "end": self.ends_at.isoformat(),
            "title": self.title,
            "join_url": str(self.join_url or ""),
            "cancelled": "yes" if self.cancelled else "",
        }

    @functools.cached_property
    def version(self) -> str:
        """A short hash of :meth:`fingerprint`: equal versions describe the same date.

        Cached: the event is frozen, and every mail of a pass records it.
        """
        data = json.dumps(self.fingerprint(), sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(data.encode()).hexdigest()[:16]


def _before_the_date(value: Audience) -> Audience:
    if value is Audience.ATTENDED:
        raise ValueError(
            "'attended' is known only after a date, and this mail goes out before it; "
            "use registered or all"
        )
    return value


class InvitationRule(_Model):
    send_at: LocalDateTime
    audience: Annotated[Audience, AfterValidator(_before_the_date)] = Audience.ALL
    until: LocalDateTime | None = None
    enabled: bool = True


class ReminderRule(_Model):
    before: Duration = Duration(days=1)
    at: Clock | None = None
    audience: Annotated[Audience, AfterValidator(_before_the_date)] = Audience.REGISTERED
    enabled: bool = True


class FollowupRule(_Model):
    after: Duration = Duration(days=1)
    at: Clock | None = Field(default_factory=lambda: time(10, 0))
    audience: Audience = Audience.REGISTERED
    wait_for_materials: Duration = Duration(days=14)
    enabled: bool = True


class UpdateRule(_Model):
    """Changes to a date after mail about it went out: "Änderung" and "Absage" mails."""

    grace: Duration = Duration(seconds=600)
    enabled: bool = True


class ConfirmationRule(_Model):
    """The "Anmeldebestätigung" after a new registration.

    It goes out once *quiet* has passed since the person's latest new
    registration, so several registrations in quick succession give one
    mail; *join_link* says whether it carries the join link (else the
    reminder brings it).
    """

    quiet: Duration = Duration(seconds=30)
    join_link: bool = True
    enabled: bool = True


class Mailings(_Model):
    invitation: InvitationRule | None = None
    reminder: ReminderRule = ReminderRule()
    followup: FollowupRule = FollowupRule()
    updates: UpdateRule = UpdateRule()
    confirmation: ConfirmationRule = ConfirmationRule()


class Registration(_Model):
    """``registration:`` of series.yaml: how people register for the dates."""

    mode: RegistrationMode = RegistrationMode.EXTERNAL

    @property
    def links(self) -> bool:
        return self.mode is RegistrationMode.LINKS


class Series(_Model):
    """The whole ``series.yaml``."""

    id: Slug
    title: Title
    # None: mails name the title as "Reihe „…“", right for any title.
    title_genus: Genus | None = None
    subtitle: Line = ""
    organiser: Organiser
    timezone: Annotated[str, Field(max_length=100)] = "Europe/Berlin"
    registration_url: HttpUrl | None = None
    registration: Registration = Registration()
    description: Annotated[str, long_text(20_000)] = ""
    audience: Annotated[str, long_text(5_000)] = ""
    imprint: Annotated[str, long_text(5_000)] = ""
    privacy_url: HttpUrl | None = None
    events: list[Event] = Field(min_length=1, max_length=500)
    mailings: Mailings

    @field_validator("timezone")
    @classmethod
    def _zone_exists(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(
                f"unknown time zone {value!r}; use an IANA name such as 'Europe/Berlin'"
            ) from None
        return value

    @model_validator(mode="after")
    def _check(self) -> Series:
        seen: set[str] = set()
        for event in self.events:
            if event.id in seen:
                raise ValueError(f"two events have the id {event.id!r}; ids must be unique")
            seen.add(event.id)
            event._zone = self.zone
        return self

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    @property
    def active_events(self) -> list[Event]:
        return [e for e in self.events if not e.cancelled]

    def event(self, event_id: str) -> Event:
        for event in self.events:
            if event.id == event_id:
                return event
        known = ", ".join(e.id for e in self.events)
        raise KeyError(f"no event {event_id!r} in the series (known: {known})")

    @property
    def first_start(self) -> datetime:
        return min(e.starts_at for e in self.active_events or self.events)


def load_series(config_dir: Path) -> Series:
    """Read and validate ``series.yaml``; every problem is reported with its line."""
    path = config_dir / SERIES_FILE
    document = load_yaml(path)
    return parse_series(document, path, config_dir)


def readable_event_ids(config_dir: Path) -> list[str] | None:
    """The event ids of a ``series.yaml`` that does not validate, if they can be read.

    Lets the contact list be checked against the real ids while an unrelated
    mistake (a time zone, a rule) is being fixed. ``None`` when the file cannot
    be parsed or some event has no usable id: then nothing is known.
    """
    try:
        document = load_yaml(config_dir / SERIES_FILE)
    except ConfigError:
        return None
    events = document.data.get("events") if isinstance(document.data, dict) else None
    if not isinstance(events, list) or not events:
        return None
    ids = [event.get("id") if isinstance(event, dict) else None for event in events]
    if not all(isinstance(ident, str) and SLUG.match(ident) for ident in ids):
        return None
    return [str(ident) for ident in ids]


def parse_series(document: LocatedDocument, path: Path, config_dir: Path) -> Series:
    if not isinstance(document.data, dict):
        raise ConfigError.single(
            path,
            "the file must be a mapping of keys (id:, title:, events:, mailings:, ...)",
            line=1,
            hint="compare with the shipped example config/series.yaml",
        )
    try:
        series = Series.model_validate(document.data)
    except ValidationError as exc:
        raise ConfigError(_problems(exc, document, path)) from None
    problems = []
    for index, event in enumerate(series.events):
        for m_index, material in enumerate(event.materials):
            # Only a missing name is reported here; what an existing path may be
            # (a regular file inside config/materials/) the composer checks.
            if material.file is not None and not os.path.lexists(config_dir / material.file):
                problems.append(
                    Problem(
                        path,
                        f"material file {str(material.file)!r} of event {event.id!r} not found "
                        f"(looked in {config_dir / material.file})",
                        document.line_of(("events", index, "materials", m_index, "file")),
                        "paths are relative to the config folder; check the name, or link "
                        "the file with url: instead",
                    )
                )
    if problems:
        raise ConfigError(problems)
    return series


_FIELD_HINTS: dict[str, str] = {
    "date": "write dates as YYYY-MM-DD, e.g. 2024-11-14",
    "timezone": "use an IANA zone name such as Europe/Berlin",
    "email": "write a complete address, e.g. transferreihe@example.org",
    "join_url": "write a complete link starting with https://",
    "registration_url": "write a complete link starting with https://",
    "url": "write a complete link starting with https://",
    "title_genus": (
        "write the gender of the title's noun: f (die Online-Transferreihe), "
        "m (der Klimadialog Kommunen), n (das Forum Stadt) or pl (die Kommunalwerkstätten); "
        "leave it out to have mails say 'Reihe „…“'"
    ),
}


def _problems(exc: ValidationError, document: LocatedDocument, path: Path) -> list[Problem]:
    problems = []
    for error in exc.errors():
        loc = tuple(part for part in error["loc"] if not _is_union_tag(part))
        where = _describe(loc, document.data)
        message = error["msg"].removeprefix("Value error, ")
        kind = error["type"]
        hint: str | None = None
        if kind == "missing":
            message = f"{where} is missing"
            hint = "add it; compare with the shipped example config/series.yaml"
        elif kind == "extra_forbidden":
            message = f"unknown key {where}"
            hint = "check the spelling; the organiser guide lists every key"
        else:
            last = next((p for p in reversed(loc) if isinstance(p, str)), "")
            hint = _FIELD_HINTS.get(last)
            # Our validators write "what is wrong; how to fix it".
            if "; " in message:
                message, _, advice = message.rpartition("; ")
                hint = hint or advice
            message = f"{where}: {message}"
            hint = hint or "compare with the shipped example config/series.yaml"
        line = document.line_of(loc)
        if kind == "value_error" and message.split(": ", 1)[-1].startswith("end "):
            line = document.line_of((*loc, "end"))
        problems.append(Problem(path, message, line, hint))
    return problems


def _is_union_tag(part: object) -> bool:
    return isinstance(part, str) and ("[" in part or part in ("function-after",))


def _describe(loc: tuple[Any, ...], data: Any) -> str:
    text = ""
    node = data
    for part in loc:
        if isinstance(part, int):
            label = f"[{part + 1}]"
            if isinstance(node, list) and part < len(node) and isinstance(node[part], dict):
                ident = node[part].get("id") or node[part].get("title")
                if ident:
                    label = f"[{ident}]"
            text += label
            node = node[part] if isinstance(node, list) and part < len(node) else None
        else:
            text += ("." if text else "") + str(part)
            node = node.get(part) if isinstance(node, dict) else None
    return f"'{text}'" if text else "the series"
