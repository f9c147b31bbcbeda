"""The columns of a contacts table, and what their values may hold.

Shared by the contact reader and the address lists: header names in German
and English, the salutations organisers write, the limits of each value and
the characters that must never reach a mail header or HTML.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from types import MappingProxyType

ALL_EVENTS = "alle"

#: RFC 5321 limits a path to 256 octets; anything much longer is not an address.
EMAIL_LIMIT = 320

FIELD_ALIASES: dict[str, tuple[str, ...]] = {
    "email": ("email", "mail", "emailadresse", "emailaddress"),
    "anrede": ("anrede", "salutation"),
    "titel": ("titel", "title"),
    "vorname": ("vorname", "firstname", "givenname"),
    "nachname": ("nachname", "lastname", "name", "surname", "familienname"),
    "organisation": ("organisation", "organization", "institution", "firma", "company"),
    "anmeldungen": ("anmeldungen", "anmeldung", "registrations", "registration", "events"),
}
HEADERS = {alias: name for name, aliases in FIELD_ALIASES.items() for alias in aliases}
HEADER_LIST = "email;anrede;titel;vorname;nachname;organisation;anmeldungen"

ANREDE = {
    "frau": "Frau",
    "fr": "Frau",
    "ms": "Frau",
    "mrs": "Frau",
    "herr": "Herr",
    "herrn": "Herr",
    "hr": "Herr",
    "mr": "Herr",
    "": "",
    "-": "",
    "–": "",
    "divers": "",
    "keine": "",
    "keine angabe": "",
}
ANREDE_HINT = (
    "write Frau, Herr or leave it empty (Divers, keine and - also mean: no salutation, "
    "'Guten Tag ...'); titles like Dr. belong in the column titel"
)

ALL_TOKENS = frozenset({ALL_EVENTS, "all", "*"})
SPLIT_EVENTS = re.compile(r"[\s,;]+")

# Line breaks, other control characters, Unicode line separators and bidi
# overrides, and angle brackets: contact data must never reach a mail header or
# HTML as anything but plain one-line text.
HOSTILE = re.compile("[\x00-\x1f\x7f-\x9f<>\u2028\u2029\u202a-\u202e\u2066-\u2069]")

NAME_LIMIT = 200
ORGANISATION_LIMIT = 300
EXTRA_LIMIT = 1000

NO_EXTRA: Mapping[str, str] = MappingProxyType({})
TEXT_FIELDS = ("anrede", "titel", "vorname", "nachname", "organisation")


def column_of(name: str) -> str | None:
    """The field a header cell names (``"E-Mail"`` → ``"email"``), or ``None``."""
    return HEADERS.get(re.sub(r"[\s_.\-]+", "", name.casefold()))


def email_hint(value: str) -> str:
    if "<" in value or ">" in value:
        return "write only the address, without name and angle brackets"
    if value.count("@") > 1:
        return "one address per row; give each further address a row of its own"
    if value.casefold().startswith("mailto:"):
        return "remove 'mailto:'"
    return "write one complete address, e.g. jana.mueller@example.org"


def column_letter(number: int) -> str:
    """Excel's name of the 1-based column *number*: 1 → A, 27 → AA."""
    letters = ""
    while number:
        number, rest = divmod(number - 1, 26)
        letters = chr(ord("A") + rest) + letters
    return letters


def show(value: str, limit: int = 60) -> str:
    """*value* for a message: quoted, escapes visible, long values cut."""
    return repr(value if len(value) <= limit else value[:limit] + "…")


def known_ids(event_ids: Collection[str]) -> str:
    return ", ".join(event_ids) or "(the series has no events)"
