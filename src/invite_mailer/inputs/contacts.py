"""Recipients: ``config/contacts.csv`` (or ``.xlsx``) as validated :class:`Contact` objects.

Organisers export this file from whatever office software they have; the
rows come from :mod:`invite_mailer.inputs.tables`, which accepts what German
Excel and LibreOffice write. Everything is validated here, at the boundary,
and all problems of a file are reported together, each with its line (CSV)
or row (Excel). Opt-outs and attendance lists are read by
:mod:`invite_mailer.inputs.addresses`.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import closing
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

from invite_mailer.errors import ConfigError, Problem
from invite_mailer.inputs.fields import (
    ALL_TOKENS,
    EXTRA_LIMIT,
    HEADER_LIST,
    HOSTILE,
    NAME_LIMIT,
    NO_EXTRA,
    ORGANISATION_LIMIT,
    SPLIT_EVENTS,
    TEXT_FIELDS,
    BadValue,
    column_letter,
    column_of,
    email_address,
    known_ids,
    plain_text,
    salutation,
    show,
)
from invite_mailer.inputs.tables import CappedProblems, Place, Rows, open_table

CONTACTS_FILES = ("contacts.csv", "contacts.xlsx")

#: Rows of a contact list.
MAX_ROWS = 200_000


@dataclass(frozen=True, slots=True)
class Contact:
    """One recipient, validated.

    ``email`` is the normalised address (as email-validator returns it);
    comparisons use ``key`` (lower-cased). ``registrations`` holds event ids;
    ``registered_all`` is true for ``alle``.
    """

    email: str
    anrede: str = ""  # "Frau", "Herr" or ""
    titel: str = ""  # "Dr.", "Prof. Dr." or ""
    vorname: str = ""
    nachname: str = ""
    organisation: str = ""
    registrations: frozenset[str] = frozenset()
    registered_all: bool = False
    extra: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    row: int | None = None  # line/row in the source file, for messages
    # Computed once: plans and the ledger hold a key per mail, and a new
    # string per call would cost ~80 bytes each time (8 MB per 100,000).
    key: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        lower = self.email.lower()
        object.__setattr__(self, "key", self.email if lower == self.email else lower)

    def is_registered(self, event_id: str) -> bool:
        return self.registered_all or event_id in self.registrations


@dataclass(frozen=True)
class ContactList:
    """The contacts of one file: in file order, duplicates merged into their first row."""

    contacts: tuple[Contact, ...]
    warnings: tuple[Problem, ...]
    source: Path
    _index: dict[str, Contact] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Built once: the dispatcher looks contacts up for every delivery.
        object.__setattr__(self, "_index", {c.key: c for c in self.contacts})

    def by_key(self, key: str) -> Contact | None:
        """The contact with this address (any upper/lower case), or ``None``."""
        return self._index.get(key.lower())

    def __len__(self) -> int:
        return len(self.contacts)

    def __iter__(self) -> Iterator[Contact]:
        return iter(self.contacts)


# --- public entry points ------------------------------------------------------------


def find_contacts_file(config_dir: Path) -> Path:
    """``contacts.csv`` in *config_dir*, else ``contacts.xlsx``; ConfigError if neither."""
    for name in CONTACTS_FILES:
        candidate = config_dir / name
        # Links and special files too: reading them says what is wrong with them.
        if candidate.is_symlink() or candidate.exists():
            return candidate
    hint = (
        "create contacts.csv with the header email;anrede;titel;vorname;nachname;"
        "organisation;anmeldungen and one contact per row (or save an Excel workbook as "
        "contacts.xlsx)"
    )
    # Case or format mistakes are common on systems that hide extensions.
    near = sorted(
        p.name
        for p in (config_dir.iterdir() if config_dir.is_dir() else ())
        if p.stem.lower() in ("contacts", "kontakte") and p.name not in CONTACTS_FILES
    )
    if near:
        hint = f"found {', '.join(map(repr, near))}; rename it to contacts.csv or contacts.xlsx"
        if any(name.lower().endswith(".xls") for name in near):
            hint += " (old .xls workbooks must be saved as .xlsx first)"
    raise ConfigError.single(
        config_dir, "no contacts file (looked for contacts.csv and contacts.xlsx)", hint=hint
    )


def load_contacts(path: Path, event_ids: Collection[str] | None) -> ContactList:
    """Read and validate a contacts file (``.csv`` or ``.xlsx``).

    Every problem of the file is raised together as one :class:`ConfigError`.
    Duplicate addresses are merged into their first row, with a warning.
    With *event_ids* ``None`` (the series could not be read) registrations
    are taken as written, not checked against the dates.
    """
    problems = CappedProblems(path)
    notes: list[Problem] = []
    place, rows = open_table(path, problems, notes)
    with closing(rows):
        header = next(((n, cells) for n, cells in rows if any(cells)), None)
        if header is None:
            problems.add(
                path,
                "no contacts: the file is empty",
                hint="the first row names the columns (email;anrede;titel;vorname;nachname;"
                "organisation;anmeldungen), then one contact per row",
            )
            raise ConfigError(problems.problems)
        reader = _ContactReader(place, header[0], header[1], event_ids, problems)
        contacts = _merged(reader, rows, notes)
    if not contacts and not problems.problems:
        problems.add(
            path,
            "no contacts: the file has only the header row",
            hint="add one contact per row below the header",
        )
    problems.raise_if_any()
    if path.suffix.lower() == ".csv" and path.with_suffix(".xlsx").is_file():
        notes.insert(
            0,
            Problem(
                path.with_suffix(".xlsx"),
                f"this workbook is ignored because {path.name} exists",
                hint="delete or rename one of the two so it is clear which list is used",
            ),
        )
    return ContactList(tuple(contacts), tuple(notes), path)


def _merged(reader: _ContactReader, rows: Rows, notes: list[Problem]) -> list[Contact]:
    """The contacts of *rows* in file order, a repeated address merged into its first row."""
    contacts: list[Contact] = []
    positions: dict[str, int] = {}
    for count, (number, cells) in enumerate(rows, start=1):
        if count > MAX_ROWS:
            # First, and never hidden by the cap: it explains the rest.
            reader.problems.problems.insert(
                0,
                Problem(
                    reader.place.path,
                    f"the list has more than {MAX_ROWS:,} rows; reading stopped at "
                    f"{reader.place.at(number)}",
                    hint="check that this is the right export; split a larger list into "
                    "several series",
                ),
            )
            break
        contact = reader.contact(number, cells)
        if contact is None:
            continue
        position = positions.get(contact.key)
        if position is None:
            positions[contact.key] = len(contacts)
            contacts.append(contact)
        else:
            contacts[position], warning = reader.merge(contacts[position], contact)
            notes.append(warning)
    return contacts


class _ContactReader:
    """Turns the rows of one contacts table into :class:`Contact` objects."""

    def __init__(
        self,
        place: Place,
        header_number: int,
        header: Sequence[str],
        event_ids: Collection[str] | None,
        problems: CappedProblems,
    ) -> None:
        self.place = place
        self.problems = problems
        self.width = len(header)
        # None: the dates are unknown, so registrations are taken as written.
        self.events = (
            None if event_ids is None else {event_id.casefold(): event_id for event_id in event_ids}
        )
        self.known = known_ids(event_ids or ())
        self.columns: dict[str, int] = {}
        self.labels: dict[str, str] = {}
        self.extras: list[tuple[int, str]] = []
        self.unnamed: list[int] = []
        # Many rows share the same registrations; parse (and store) each spelling once.
        self._registrations: dict[str, tuple[frozenset[str], bool]] = {}
        # Titles, first names and organisations repeat across a long list: one
        # string each, shared by every contact that has it.
        self._shared: dict[str, str] = {}
        self._read_header(header_number, header)

    def add(self, number: int | None, message: str, hint: str | None = None) -> None:
        self.problems.append(self.place.problem(number, message, hint))

    def _read_header(self, number: int, header: Sequence[str]) -> None:
        seen_extra: dict[str, str] = {}
        for index, name in enumerate(header):
            if not name:
                self.unnamed.append(index)
                continue
            column = column_of(name)
            if column is not None:
                if column in self.columns:
                    self.add(
                        number,
                        f"the columns {self.labels[column]!r} and {name!r} both mean {column!r}",
                        "delete or rename one of them",
                    )
                else:
                    self.columns[column] = index
                    self.labels[column] = name
            elif HOSTILE.search(name) or len(name) > NAME_LIMIT:
                self.add(
                    number,
                    f"column name {show(name)} is not usable",
                    "column names must be short plain text on one line, without < or >",
                )
            elif name.casefold() in seen_extra:
                self.add(
                    number,
                    f"the column {name!r} appears twice (also as {seen_extra[name.casefold()]!r})",
                    "rename or delete one of them",
                )
            else:
                seen_extra[name.casefold()] = name
                self.extras.append((index, name))
        if "email" not in self.columns:
            found = ", ".join(repr(name) for name in header if name) or "none"
            hint = (
                f"the first row must name the columns, e.g. {HEADER_LIST} "
                "(E-Mail, Mail or E-Mail-Adresse also work for email)"
            )
            if any("@" in name for name in header):
                hint = f"the first row looks like a contact; insert a header row: {HEADER_LIST}"
            self.add(number, f"no column 'email' in the header; columns found: {found}", hint)
            self.problems.raise_if_any()

    def contact(self, number: int, cells: list[str]) -> Contact | None:
        """The contact of one row, or ``None`` for an empty or invalid row."""
        if not any(cells) or self._overflows(number, cells):
            return None
        size = len(cells)
        # Every value is checked even after a bad one, so a row's problems come together.
        valid = self._unnamed_empty(number, cells)

        def cell(column: str) -> str:
            index = self.columns.get(column)
            return cells[index] if index is not None and index < size else ""

        email = self._email(number, cell("email"))
        texts = self._names(number, cell)
        anrede = self._anrede(number, cell("anrede"))
        registrations = self._events(number, cell("anmeldungen"))
        extra = self._extra(number, cells) if self.extras else NO_EXTRA
        if (
            not valid
            or email is None
            or texts is None
            or anrede is None
            or registrations is None
            or extra is None
        ):
            return None
        return Contact(
            email=email,
            anrede=anrede,
            registrations=registrations[0],
            registered_all=registrations[1],
            extra=extra,
            row=number,
            **texts,
        )

    def _overflows(self, number: int, cells: list[str]) -> bool:
        """Whether the row has values right of the last named column (reported)."""
        size = len(cells)
        if size <= self.width or not any(cells[self.width :]):
            return False
        if self.place.excel:
            # A workbook has no delimiter: the values simply sit right of the header.
            hint = (
                f"the header row names columns A to {column_letter(self.width)}, this row "
                f"has values from column {column_letter(self.width + 1)} on: name those "
                "columns in the header row, or delete the values there"
            )
        else:
            hint = (
                "a value probably contains the delimiter; enclose such values in double "
                'quotes, e.g. "Stadt Nord; Amt 3"'
            )
        self.add(
            number, f"the row has {size} values but the header only {self.width} columns", hint
        )
        return True

    def _unnamed_empty(self, number: int, cells: list[str]) -> bool:
        """Whether the columns without a name are empty; each value there is reported."""
        valid = True
        for index in self.unnamed:
            if index < len(cells) and cells[index]:
                self.add(
                    number,
                    f"value {show(cells[index])} in column {index + 1}, which has no name "
                    "in the header",
                    "name the column in the first row, or delete the value",
                )
                valid = False
        return valid

    def _names(self, number: int, cell: Callable[[str], str]) -> dict[str, str] | None:
        """Title, names and organisation of a row, or ``None`` if one is invalid."""
        texts: dict[str, str] = {}
        valid = True
        for column, limit in (
            ("titel", NAME_LIMIT),
            ("vorname", NAME_LIMIT),
            ("nachname", NAME_LIMIT),
            ("organisation", ORGANISATION_LIMIT),
        ):
            value = self._text(number, self.labels.get(column, column), cell(column), limit)
            if value is None:
                valid = False
            else:
                # Names go into "Sehr geehrte Frau Dr. Müller": no doubled spaces.
                text = " ".join(value.split())
                if column != "nachname":
                    text = self._shared.setdefault(text, text)
                texts[column] = text
        return texts if valid else None

    def _extra(self, number: int, cells: list[str]) -> Mapping[str, str] | None:
        """The values of the further columns, or ``None`` if one is invalid."""
        size = len(cells)
        values: dict[str, str] = {}
        valid = True
        for index, name in self.extras:
            value = self._text(number, name, cells[index] if index < size else "", EXTRA_LIMIT)
            if value is None:
                valid = False
            else:
                values[name] = value
        return MappingProxyType(values) if valid else None

    def _email(self, number: int, value: str) -> str | None:
        try:
            return email_address(value, self.labels["email"])
        except BadValue as bad:
            self.add(number, bad.message, bad.hint)
            return None

    def _text(self, number: int, label: str, value: str, limit: int) -> str | None:
        if not value:
            return value
        try:
            return plain_text(value, label, limit)
        except BadValue as bad:
            self.add(number, bad.message, bad.hint)
            return None

    def _anrede(self, number: int, value: str) -> str | None:
        try:
            return salutation(value, self.labels.get("anrede", "anrede"))
        except BadValue as bad:
            self.add(number, bad.message, bad.hint)
            return None

    def _events(self, number: int, value: str) -> tuple[frozenset[str], bool] | None:
        cached = self._registrations.get(value)
        if cached is not None:
            return cached
        ids: set[str] = set()
        unknown: list[str] = []
        registered_all = False
        for token in SPLIT_EVENTS.split(value):
            folded = token.casefold()
            if not folded:
                continue
            if folded in ALL_TOKENS:
                registered_all = True
            elif self.events is None:
                ids.add(folded)
            elif folded in self.events:
                ids.add(self.events[folded])
            else:
                unknown.append(token)
        if unknown:
            label = self.labels.get("anmeldungen", "anmeldungen")
            self.add(
                number,
                f"unknown event id{'s' if len(unknown) > 1 else ''} "
                f"{', '.join(show(t, 40) for t in unknown)} in column {label!r}",
                f"use the ids of series.yaml: {self.known}; or 'alle' for every date; "
                "separate several with commas",
            )
            return None
        result = (frozenset(ids), registered_all)
        self._registrations[value] = result
        return result

    def merge(self, first: Contact, later: Contact) -> tuple[Contact, Problem]:
        """*later* merged into *first*, and the warning that says so."""
        changes: dict[str, Any] = {}
        kept: list[str] = []
        for name in TEXT_FIELDS:
            old, new = getattr(first, name), getattr(later, name)
            if new and not old:
                changes[name] = new
            elif new and old != new:
                kept.append(f"{self.labels.get(name, name)} {old!r} (not {new!r})")
        if later.extra:
            extra = dict(first.extra)
            for key, new in later.extra.items():
                old = extra.get(key, "")
                if new and not old:
                    extra[key] = new
                elif new and old != new:
                    kept.append(f"{key} {old!r} (not {new!r})")
            changes["extra"] = MappingProxyType(extra)
        changes["registrations"] = first.registrations | later.registrations
        changes["registered_all"] = first.registered_all or later.registered_all
        message = (
            f"the address {later.email!r} appears again (first in {self.place.at(first.row)}); "
            "the rows were merged"
        )
        if kept:
            message += "; kept from the first row: " + ", ".join(kept)
        warning = self.place.problem(
            later.row,
            message,
            "delete the repeated row (addresses are compared ignoring upper and lower case)",
        )
        return replace(first, **changes), warning
