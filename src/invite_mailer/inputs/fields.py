"""The columns of a contacts table, and what their values may hold.

Shared by the contact reader and the address lists: header names in German
and English, the salutations organisers write, the limits of each value and
the characters that must never reach a mail header or HTML. The checks of
single values raise :class:`BadValue` with a message and a hint; the reader
turns that into a problem at the row.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Collection, Mapping
from types import MappingProxyType

from email_validator import EmailNotValidError, validate_email

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
    """How to fix the invalid address *value*, judged by what it looks like."""
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
    """The event ids for a hint, or a note that there are none."""
    return ", ".join(event_ids) or "(the series has no events)"


class BadValue(ValueError):
    """A value that cannot be used: what is wrong with it, and how to fix it."""

    def __init__(self, message: str, hint: str) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


def email_address(value: str, label: str) -> str:
    """The normalised address in *value* (from the column *label*); BadValue if none."""
    if not value:
        raise BadValue(
            f"no email address in column {label!r}",
            "every contact needs an address; delete the row if the person is not to be mailed",
        )
    if len(value) > EMAIL_LIMIT:
        raise BadValue(
            f"the address {show(value)} is {len(value):,} characters long (at most {EMAIL_LIMIT})",
            "check that the columns are not shifted",
        )
    try:
        return validate_email(value, check_deliverability=False).normalized
    except EmailNotValidError as exc:
        raise BadValue(f"invalid email address {show(value)}: {exc}", email_hint(value)) from None


def plain_text(value: str, label: str, limit: int) -> str:
    """*value* in NFC if it is one line of at most *limit* plain characters; else BadValue."""
    bad = HOSTILE.search(value)
    if bad is not None:
        char = bad.group()
        if char in "\r\n\u2028\u2029":
            what = "a line break"
        elif char in "<>":
            what = f"the character {char!r}"
        else:
            what = f"the control character U+{ord(char):04X}"
        raise BadValue(
            f"value {show(value)} in column {label!r} contains {what}",
            "contact data must be plain text on one line, without < and >; remove it",
        )
    if len(value) > limit:
        raise BadValue(
            f"value {show(value, 40)} in column {label!r} is {len(value)} characters long "
            f"(at most {limit})",
            "shorten it; check that the columns are not shifted",
        )
    return unicodedata.normalize("NFC", value)


def salutation(value: str, label: str) -> str:
    """``Frau``, ``Herr`` or ``""`` for what organisers write; BadValue for anything else."""
    anrede = ANREDE.get(" ".join(value.casefold().rstrip(".").split()))
    if anrede is None:
        raise BadValue(f"value {show(value)} in column {label!r} is not a salutation", ANREDE_HINT)
    return anrede
