"""German wording that does not belong in templates: salutations, dates, times.

Pure functions, no I/O; dates and times are formatted with Babel's ``de_DE``
locale so weekday and month names are always the German ones, whatever the
machine's locale is.
"""

from __future__ import annotations

import re
from datetime import date, time

from babel.dates import format_date

LOCALE = "de_DE"

NEUTRAL_GREETING = "Guten Tag"
NO_NAME_SALUTATION = "Sehr geehrte Damen und Herren,"

# Anrede as written in office software exports ("Frau", "Hr.") -> formal opening.
_FORMAL = {
    "frau": "Sehr geehrte Frau",
    "fr": "Sehr geehrte Frau",
    "herr": "Sehr geehrter Herr",
    "hr": "Sehr geehrter Herr",
}

# Academic degrees that German correspondence never puts into a salutation
# (DIN 5008 practice: only "Prof." and "Dr." belong there). Written lower-case
# and without dots or spaces so "Dipl.-Ing." and "Dipl. Ing." both match.
_DEGREES = re.compile(
    r"^(dipl\S*|mag|ma|msc|meng|mba|mpa|llm|ba|bsc|beng|bed|med|staatsexamen)$",
)

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def clean(text: str) -> str:
    """Collapse all whitespace (line breaks included) to single spaces; drop control
    characters. Contact data is validated on loading; this is defence in depth."""
    return _CONTROL.sub("", " ".join(text.split()))


def salutation_title(titel: str) -> str:
    """The part of an academic title that belongs in a salutation.

    "Prof. Dr." and "Dr." are kept as written; degrees such as "Dipl.-Ing." or
    "M.A." are dropped ("Sehr geehrter Herr Dipl.-Ing. Schmidt" is not German
    usage). Anything else (e.g. "Prof.") is kept.
    """
    kept = [
        word
        for word in clean(titel).split(" ")
        if word and not _DEGREES.match(re.sub(r"[.\s-]", "", word).lower())
    ]
    return " ".join(kept)


def salutation(anrede: str, titel: str, vorname: str, nachname: str) -> str:
    """The first line of a letter, comma included.

    >>> salutation("Frau", "Dr.", "Jana", "Müller")
    'Sehr geehrte Frau Dr. Müller,'
    >>> salutation("Herr", "", "Thomas", "Schmidt")
    'Sehr geehrter Herr Schmidt,'
    >>> salutation("", "", "Alex", "Meyer")
    'Guten Tag Alex Meyer,'
    >>> salutation("", "", "", "")
    'Sehr geehrte Damen und Herren,'

    "Frau"/"Herr" need a family name; without one, and whenever the Anrede is
    empty or something else ("divers", "Firma"), the gender-neutral "Guten Tag"
    with the full name is used. No name at all gives "Sehr geehrte Damen und
    Herren,".
    """
    title = salutation_title(titel)
    first = clean(vorname)
    last = clean(nachname)
    formal = _FORMAL.get(clean(anrede).lower().rstrip("."))
    if formal and last:
        return " ".join(part for part in (formal, title, last) if part) + ","
    if first or last:
        return " ".join(part for part in (NEUTRAL_GREETING, title, first, last) if part) + ","
    return NO_NAME_SALUTATION


def full_name(titel: str, vorname: str, nachname: str) -> str:
    """ "Dr. Jana Müller": for display names and lists; empty when there is no name."""
    if not (clean(vorname) or clean(nachname)):
        return ""
    return " ".join(part for part in (clean(titel), clean(vorname), clean(nachname)) if part)


def date_long(day: date) -> str:
    """ "Donnerstag, 14. November 2024"."""
    return format_date(day, "EEEE, d. MMMM y", locale=LOCALE)


def date_short(day: date) -> str:
    """ "Do., 14.11.2024"."""
    return format_date(day, "EEE, dd.MM.y", locale=LOCALE)


def date_day_month(day: date) -> str:
    """ "14. November 2024"."""
    return format_date(day, "d. MMMM y", locale=LOCALE)


def date_numeric(day: date) -> str:
    """ "14.11.2024"."""
    return format_date(day, "dd.MM.y", locale=LOCALE)


def weekday(day: date) -> str:
    """ "Donnerstag"."""
    return format_date(day, "EEEE", locale=LOCALE)


def clock(moment: time) -> str:
    """ "14:00" (24-hour clock, no "Uhr")."""
    return f"{moment.hour:02d}:{moment.minute:02d}"


def time_range(start: time, end: time) -> str:
    """ "14:00–16:00 Uhr", with an en dash as German typography wants."""
    return f"{clock(start)}–{clock(end)} Uhr"


def relative_day(day: date, today: date) -> str:
    """How to say *day* as seen from *today*: "heute", "morgen", "übermorgen",
    otherwise "am Donnerstag, 14. November 2024"."""
    delta = (day - today).days
    if delta == 0:
        return "heute"
    if delta == 1:
        return "morgen"
    if delta == 2:
        return "übermorgen"
    return f"am {date_long(day)}"
