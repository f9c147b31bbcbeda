"""The event series: ``config/series.yaml`` turned into typed, time-zone-aware models."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from datetime import UTC, date, datetime, time, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
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
from invite_mailer.inputs.yamlfile import LocatedDocument, load_yaml

SERIES_FILE = "series.yaml"

_SLUG = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")

#: Dates outside this range are typing mistakes, and near the ends of Python's
#: calendar (years 1 and 9999) the derived times (a reminder a day before, a
#: follow-up 14 days after) could not even be computed.
EARLIEST = date(1970, 1, 1)
LATEST = date(9000, 12, 31)

#: The longest duration a rule may name (ten years): anything longer is a
#: typing mistake and would push derived times off the calendar.
MAX_DURATION_DAYS = 3660

# Subjects, display names and calendar summaries are one line: a line break
# would end a mail header, and control or bidi characters garble or disguise
# what the recipient sees.
_NOT_ONE_LINE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
# Longer texts may have line breaks and tabs, nothing else of that kind.
_NOT_TEXT = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


class Kind(StrEnum):
    """The kinds of mail. Values are the template names."""

    INVITATION = "invitation"
    REMINDER = "reminder"
    FOLLOWUP = "followup"
    UPDATE = "update"
    CANCELLATION = "cancellation"


class Audience(StrEnum):
    ALL = "all"
    REGISTERED = "registered"
    ATTENDED = "attended"


# --- durations and clock times -------------------------------------------------

_UNITS: dict[str, tuple[str, int]] = {}
for _names, _unit, _factor in (
    (("week", "weeks", "woche", "wochen", "w"), "days", 7),
    (("day", "days", "tag", "tage", "tagen", "d"), "days", 1),
    (("hour", "hours", "stunde", "stunden", "h"), "seconds", 3600),
    (("minute", "minutes", "minute", "minuten", "min", "m"), "seconds", 60),
):
    for _name in _names:
        _UNITS[_name] = (_unit, _factor)


class Duration(BaseModel):
    """A span like ``1 day`` or ``2 hours``.

    Days and weeks are calendar days on the local wall clock (so "1 day before
    14:00" is 14:00 the day before, also across a daylight-saving change);
    hours and minutes are elapsed time.
    """

    model_config = ConfigDict(frozen=True)

    days: int = Field(0, ge=0, le=MAX_DURATION_DAYS)
    seconds: int = Field(0, ge=0, le=MAX_DURATION_DAYS * 86400)

    @model_validator(mode="before")
    @classmethod
    def _parse(cls, value: Any) -> Any:
        if isinstance(value, Duration | dict):
            return value
        if isinstance(value, timedelta):
            return {"days": value.days, "seconds": value.seconds}
        if not isinstance(value, str):
            raise ValueError('write a duration like "1 day", "14 days" or "2 hours"')
        days = seconds = 0
        parts = re.findall(r"(\d+)\s*([A-Za-zä]+)", value.strip().lower())
        rest = re.sub(r"(\d+)\s*([A-Za-zä]+)|,|\band\b|\bund\b|\s", "", value.strip().lower())
        if not parts or rest:
            raise ValueError(
                f'{value!r} is not a duration; write e.g. "1 day", "14 days", "2 hours"'
            )
        for amount, unit in parts:
            if unit not in _UNITS:
                raise ValueError(
                    f"unknown unit {unit!r} in {value!r}; use weeks, days, hours or minutes"
                )
            kind, factor = _UNITS[unit]
            if kind == "days":
                days += int(amount) * factor
            else:
                seconds += int(amount) * factor
        if days * 86400 + seconds > MAX_DURATION_DAYS * 86400:
            raise ValueError(
                f"{value!r} is too long (at most {MAX_DURATION_DAYS} days, about ten years); "
                'write e.g. "1 day" or "14 days"'
            )
        return {"days": days, "seconds": seconds}

    def __str__(self) -> str:
        parts = []
        if self.days:
            parts.append(f"{self.days} day" + ("s" if self.days != 1 else ""))
        hours, minutes = divmod(self.seconds // 60, 60)
        if hours:
            parts.append(f"{hours} hour" + ("s" if hours != 1 else ""))
        if minutes:
            parts.append(f"{minutes} minute" + ("s" if minutes != 1 else ""))
        return " ".join(parts) or "0 minutes"


def _parse_clock(value: Any) -> Any:
    if isinstance(value, time):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        raise ValueError(f'write clock times in quotes as "HH:MM", e.g. "14:00" (got {value})')
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(\d{1,2})[:.](\d{2})\s*(?:uhr)?\s*", value, re.IGNORECASE)
        if not match:
            raise ValueError(f'{value!r} is not a clock time; write "HH:MM", e.g. "14:00"')
        hour, minute = int(match.group(1)), int(match.group(2))
        if hour > 23 or minute > 59:
            raise ValueError(f"{value!r} is not a valid time of day")
        return time(hour, minute)
    raise ValueError('write clock times as "HH:MM", e.g. "14:00"')


Clock = Annotated[time, BeforeValidator(_parse_clock)]


def _parse_local_datetime(value: Any) -> Any:
    if isinstance(value, datetime):
        return value
    if isinstance(value, str):
        text = value.strip().replace("T", " ")
        for fmt in ("%Y-%m-%d %H:%M", "%Y-%m-%d %H:%M:%S", "%d.%m.%Y %H:%M"):
            try:
                return datetime.strptime(text, fmt)
            except ValueError:
                continue
    raise ValueError(
        f'{value!r} is not a date and time; write "YYYY-MM-DD HH:MM", e.g. "2024-10-24 10:00"'
    )


def _naive(value: datetime) -> datetime:
    if value.tzinfo is not None:
        raise ValueError("write the local time without an offset; the series' timezone applies")
    _in_range(value.date())
    return value


def _in_range(value: date) -> date:
    if not EARLIEST <= value <= LATEST:
        raise ValueError(
            f"{value.isoformat()} is outside the supported range {EARLIEST.year}..{LATEST.year}; "
            "check the year"
        )
    return value


LocalDateTime = Annotated[datetime, BeforeValidator(_parse_local_datetime), AfterValidator(_naive)]
Day = Annotated[date, AfterValidator(_in_range)]


def _describe_char(char: str) -> str:
    if char in "\r\n\u2028\u2029":
        return "a line break"
    if char == "\t":
        return "a tab"
    return f"the control character U+{ord(char):04X}"


def _one_line(limit: int) -> AfterValidator:
    def check(value: str) -> str:
        bad = _NOT_ONE_LINE.search(value)
        if bad is not None:
            raise ValueError(
                f"contains {_describe_char(bad.group())}; write it on one line, as plain text "
                "(in YAML without | or >)"
            )
        if len(value) > limit:
            raise ValueError(f"is {len(value):,} characters long (at most {limit:,}); shorten it")
        return value

    return AfterValidator(check)


def _text(limit: int) -> AfterValidator:
    def check(value: str) -> str:
        bad = _NOT_TEXT.search(value)
        if bad is not None:
            raise ValueError(
                f"contains {_describe_char(bad.group())}; remove it (line breaks are fine)"
            )
        if len(value) > limit:
            raise ValueError(
                f"is {len(value):,} characters long (at most {limit:,}); shorten it, or link "
                "a longer text"
            )
        return value

    return AfterValidator(check)


Title = Annotated[str, Field(min_length=1), _one_line(200)]
Line = Annotated[str, _one_line(300)]


def _check_slug(value: str) -> str:
    if not _SLUG.match(value):
        raise ValueError(
            f"{value!r} is not a valid id; use lower-case letters, digits and '-', "
            "e.g. 'verwaltung'"
        )
    return value


Slug = Annotated[str, AfterValidator(_check_slug)]


def localize(day: date, clock: time, zone: ZoneInfo) -> datetime:
    """The aware moment for a wall-clock time.

    A time that does not exist (skipped by the spring daylight-saving change)
    moves forward by the gap, so nothing is ever sent early; an ambiguous time
    (autumn) takes its first occurrence.
    """
    naive = datetime.combine(day, clock)
    aware = naive.replace(tzinfo=zone, fold=0)
    # Round-trip through UTC: a non-existent time comes back shifted forward.
    return aware.astimezone(UTC).astimezone(zone)


def shift(moment: datetime, by: Duration, *, sign: int = 1) -> datetime:
    """Move *moment* by a duration: days on the wall clock, the rest in real time."""
    zone = moment.tzinfo
    assert isinstance(zone, ZoneInfo)
    local = moment.replace(tzinfo=None) + timedelta(days=sign * by.days)
    moved = localize(local.date(), local.time(), zone)
    # Aware arithmetic within one zone is wall-clock arithmetic in Python;
    # elapsed time must be added in UTC.
    utc = moved.astimezone(UTC) + timedelta(seconds=sign * by.seconds)
    return utc.astimezone(zone)


# --- the series ------------------------------------------------------------------


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)


class Organiser(_Model):
    name: Annotated[str, _one_line(200)]
    email: EmailStr


class Material(_Model):
    """A result of a date: a link, or a small file to attach."""

    title: Title
    url: HttpUrl | None = None
    file: Path | None = None
    description: Annotated[str, _text(2_000)] = ""

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
    description: Annotated[str, _text(10_000)] = ""
    speakers: Annotated[list[Annotated[str, _one_line(200)]], Field(max_length=50)] = []
    materials: Annotated[list[Material], Field(max_length=50)] = []
    cancelled: bool = False
    cancel_reason: Annotated[str, _text(2_000)] = ""

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


class Mailings(_Model):
    invitation: InvitationRule | None = None
    reminder: ReminderRule = ReminderRule()
    followup: FollowupRule = FollowupRule()
    updates: UpdateRule = UpdateRule()


class Series(_Model):
    """The whole ``series.yaml``."""

    id: Slug
    title: Title
    subtitle: Line = ""
    organiser: Organiser
    timezone: Annotated[str, Field(max_length=100)] = "Europe/Berlin"
    registration_url: HttpUrl | None = None
    description: Annotated[str, _text(20_000)] = ""
    audience: Annotated[str, _text(5_000)] = ""
    imprint: Annotated[str, _text(5_000)] = ""
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
    if not all(isinstance(ident, str) and _SLUG.match(ident) for ident in ids):
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
