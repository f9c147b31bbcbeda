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

# Words of a professorship ("Prof.", "apl. Prof.", "Jun.-Prof.", "em.") and of a
# doctorate ("Dr.", "Dr.-Ing.", "Dr. rer. nat.", "Dr. h. c.", "PD"), written as in
# _DEGREES: lower-case, without dots, spaces and hyphens.
_QUALIFIERS = frozenset(
    {"apl", "jun", "em", "emer", "pd", "priv", "doz", "privdoz", "habil", "hc", "h", "c", "mult"}
    | {"rer", "nat", "pol", "phil", "med", "jur", "iur", "oec", "ing", "theol", "paed", "soc"}
    | {"agr", "dent", "vet", "sc", "techn", "rernat", "rerpol", "meddent", "medvet", "hcmult"}
)


def _norm(word: str) -> str:
    return re.sub(r"[.\s-]", "", word).lower()


def _is_professor(word: str) -> bool:
    return "prof" in _norm(word)


def _is_doctor(word: str) -> bool:
    return _norm(word).startswith("dr")


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def clean(text: str) -> str:
    """Collapse all whitespace (line breaks included) to single spaces; drop control
    characters. Contact data is validated on loading; this is defence in depth."""
    return _CONTROL.sub("", " ".join(text.split()))


def salutation_title(titel: str) -> str:
    """The academic title that belongs in a salutation: only the highest one.

    German usage (DIN 5008 and the common correspondence guides) names one
    title in a salutation: "Prof. Dr." becomes "Prof.", "Dr. Dr." or
    "Dr. rer. nat." becomes "Dr."; degrees such as "Dipl.-Ing." or "M.A." are
    dropped ("Sehr geehrter Herr Dipl.-Ing. Schmidt" is not German usage).
    A title this function does not know (e.g. "Senator") is kept as written.

    >>> salutation_title("Prof. Dr.")
    'Prof.'
    >>> salutation_title("Dr. Dr. h. c.")
    'Dr.'
    >>> salutation_title("Dipl.-Ing.")
    ''
    """
    words = [
        word
        for word in clean(titel).split(" ")
        if word and not _DEGREES.match(re.sub(r"[.\s-]", "", word).lower())
    ]
    highest = next(
        (
            title
            for title, test in (("Prof.", _is_professor), ("Dr.", _is_doctor))
            if any(test(word) for word in words)
        ),
        None,
    )
    if highest is None:
        return " ".join(words)
    rest = [
        word
        for word in words
        if not (_is_professor(word) or _is_doctor(word) or _norm(word) in _QUALIFIERS)
    ]
    return " ".join([highest, *rest])


def salutation(anrede: str, titel: str, vorname: str, nachname: str) -> str:
    """The first line of a letter, comma included.

    >>> salutation("Frau", "Dr.", "Jana", "Müller")
    'Sehr geehrte Frau Dr. Müller,'
    >>> salutation("Herr", "", "Thomas", "Schmidt")
    'Sehr geehrter Herr Schmidt,'
    >>> salutation("", "", "Alex", "Meyer")
    'Guten Tag Alex Meyer,'
    >>> salutation("Frau", "Prof. Dr.", "Sabine", "Groß")
    'Sehr geehrte Frau Prof. Groß,'
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


def display_name(titel: str, vorname: str, nachname: str, organisation: str) -> str:
    """The name a mail is addressed to: the person ("Dr. Jana Müller"), else the
    organisation ("Projektbüro Kreislaufregion"), else empty."""
    return full_name(titel, vorname, nachname) or clean(organisation)


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


# --- the series' name in a sentence --------------------------------------------------

GENERA = ("f", "m", "n", "pl")

# Definite articles by grammatical gender: nominative, accusative, dative.
_ARTICLES = {
    "f": ("die", "die", "der"),
    "m": ("der", "den", "dem"),
    "n": ("das", "das", "dem"),
    "pl": ("die", "die", "den"),
}
# "zu" and "von" with the dative article, contracted where German contracts them.
_ZU = {"f": "zur", "m": "zum", "n": "zum", "pl": "zu den"}
_VON = {"f": "von der", "m": "vom", "n": "vom", "pl": "von den"}


def title_phrases(title: str, genus: str | None) -> dict[str, str]:
    """The series' *title* with its article in the cases the templates need.

    *genus* is ``title_genus`` of ``series.yaml``: "f" (die Online-Transferreihe),
    "m" (der Klimadialog Kommunen), "n" (das Forum Stadt) or "pl" (die
    Kommunalwerkstätten). Without one, the title is named as "Reihe „…“", which
    is grammatical for every title:

    >>> title_phrases("Klimadialog Kommunen", "m")["zu"]
    'zum Klimadialog Kommunen'
    >>> title_phrases("Klimadialog Kommunen", None)["zu"]
    'zur Reihe „Klimadialog Kommunen“'

    The genitive is left out on purpose: masculine and neuter names need an
    ending there ("des Klimadialogs"), which no rule can add to any title.
    """
    noun = title if genus is not None else f"Reihe „{title}“"
    gender = genus or "f"
    nominative, accusative, dative = _ARTICLES[gender]
    return {
        "nominativ": f"{nominative} {noun}",
        "akkusativ": f"{accusative} {noun}",
        "dativ": f"{dative} {noun}",
        "zu": f"{_ZU[gender]} {noun}",
        "von": f"{_VON[gender]} {noun}",
    }
