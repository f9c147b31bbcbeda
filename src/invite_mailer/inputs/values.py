"""The value types of ``series.yaml``, and wall-clock arithmetic.

Durations (``1 day``), clock times (``"14:00"``), local dates and times,
one-line and longer texts, ids: each parses what organisers write and says
what is wrong in a sentence that ends in how to fix it. :func:`localize` and
:func:`shift` turn them into aware moments, across daylight-saving changes.
"""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, time, timedelta
from typing import Annotated, Any
from zoneinfo import ZoneInfo

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator

SLUG = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")

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


# --- durations and clock times -------------------------------------------------

_UNITS: dict[str, tuple[str, int]] = {}
for _names, _unit, _factor in (
    (("week", "weeks", "woche", "wochen", "w"), "days", 7),
    (("day", "days", "tag", "tage", "tagen", "d"), "days", 1),
    (("hour", "hours", "stunde", "stunden", "h"), "seconds", 3600),
    (("minute", "minutes", "minute", "minuten", "min", "m"), "seconds", 60),
    (("second", "seconds", "sekunde", "sekunden", "sec", "s"), "seconds", 1),
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
                    f"unknown unit {unit!r} in {value!r}; "
                    "use weeks, days, hours, minutes or seconds"
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
        if self.seconds % 60:
            rest = self.seconds % 60
            parts.append(f"{rest} second" + ("s" if rest != 1 else ""))
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


def one_line(limit: int) -> AfterValidator:
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


def long_text(limit: int) -> AfterValidator:
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


Title = Annotated[str, Field(min_length=1), one_line(200)]
Line = Annotated[str, one_line(300)]


def _check_slug(value: str) -> str:
    if not SLUG.match(value):
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
