"""Recipients: ``config/contacts.csv`` (or ``.xlsx``), opt-outs and attendance lists.

Organisers export these files from whatever office software they have, so the
readers accept what German Excel and LibreOffice write: ``;``, ``,`` or tab as
delimiter, UTF-8 with or without BOM, Windows-1252, quoted fields, ``.xlsx``.
Everything is validated here, at the boundary, and all problems of a file are
reported together, each with its line (CSV) or row (Excel).
"""

from __future__ import annotations

import codecs
import csv
import io
import re
import unicodedata
import warnings
import zipfile
from collections.abc import Collection, Generator, Iterator, Mapping, Sequence
from contextlib import closing
from dataclasses import dataclass, field, replace
from datetime import date, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any

from email_validator import EmailNotValidError, validate_email

from invite_mailer.errors import ConfigError, Problem, ProblemCollector
from invite_mailer.inputs.yamlfile import megabytes, read_config_file

ALL_EVENTS = "alle"

CONTACTS_FILES = ("contacts.csv", "contacts.xlsx")
ATTENDANCE_DIR = "attendance"

#: After this many problems in one file the rest are only counted: a systematic
#: mistake (a wrong export) would otherwise print one message per row.
MAX_PROBLEMS = 100

#: The largest contact list read: 100,000 contacts with extra columns take
#: about 20 MB. Excel workbooks are zip files; what they unpack to is limited
#: separately, before openpyxl sees them.
MAX_TABLE_BYTES = 64 * 1024 * 1024
#: 200,000 rows of seven columns unpack to about 95 MB; openpyxl holds about
#: twice what it unpacks, so this bounds its memory to a few hundred MB.
MAX_WORKBOOK_UNPACKED = 128 * 1024 * 1024
#: A part of a workbook that unpacks to more than this many times its size is
#: a zip bomb, not a spreadsheet (real sheets compress 5 to 20 times).
MAX_COMPRESSION_RATIO = 200
#: Rows of a contact list, and lines of an opt-out or attendance list.
MAX_ROWS = 200_000
MAX_LIST_LINES = 1_000_000
#: RFC 5321 limits a path to 256 octets; anything much longer is not an address.
_EMAIL_LIMIT = 320


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
    problems = _Problems(path)
    notes: list[Problem] = []
    place, rows = _open_table(path, problems, notes)
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
        contacts: list[Contact] = []
        positions: dict[str, int] = {}
        for count, (number, cells) in enumerate(rows, start=1):
            if count > MAX_ROWS:
                # First, and never hidden by the cap: it explains the rest.
                problems.problems.insert(
                    0,
                    Problem(
                        path,
                        f"the list has more than {MAX_ROWS:,} rows; reading stopped at "
                        f"{place.at(number)}",
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


def load_address_list(path: Path) -> frozenset[str]:
    """Addresses from a plain list such as ``config/optout.txt``, as lower-cased keys.

    One address per line; blank lines and ``#`` comments are skipped. A CSV with a
    column ``email`` works too. A missing file is an empty list; a link to a
    missing file is an error (a list that silently vanished would be worse).
    """
    return frozenset(address_lines(path))


def address_lines(path: Path) -> dict[str, int]:
    """Like :func:`load_address_list`, with the first line that names each address."""
    if not path.is_symlink() and not path.exists():
        return {}
    return _read_addresses(path, path.parent)


def load_attendance(
    config_dir: Path, event_ids: Collection[str] | None
) -> dict[str, frozenset[str]]:
    """Who attended which date: ``config/attendance/<event-id>.csv``.

    Returns lower-cased address keys per event id. Events without a file are
    absent from the result (no list given), which is different from an empty
    list (nobody attended). A missing folder gives ``{}``. With *event_ids*
    ``None`` (the series could not be read) the lists are still checked, under
    the names of their files.
    """
    folder = config_dir / ATTENDANCE_DIR
    if not folder.is_dir():
        return {}
    ids = {event_id.casefold(): event_id for event_id in event_ids or ()}
    known = _known(event_ids or ())
    problems = ProblemCollector()
    found: dict[str, set[str]] = {}
    for file in sorted(folder.iterdir()):
        name = file.name
        # Hidden files, Office lock files and editor backups are not lists.
        if name.startswith((".", "~$")) or name.endswith("~"):
            continue
        if file.is_dir() and not file.is_symlink():
            continue
        if file.suffix.lower() not in (".csv", ".txt"):
            problems.add(
                file,
                f"{name!r} is not an attendance list (only .csv and .txt files are read)",
                hint="save the list as CSV named <event-id>.csv, one address per line or "
                "with a column 'email'; ids: " + known,
            )
            continue
        event_id = file.stem if event_ids is None else ids.get(file.stem.casefold())
        if event_id is None:
            problems.add(
                file,
                f"{file.stem!r} is not an event id of the series",
                hint=f"name the file after the date's id: {known} (e.g. "
                f"{next(iter(event_ids or ()), 'verwaltung')}.csv)",
            )
            continue
        try:
            found.setdefault(event_id, set()).update(_read_addresses(file, config_dir))
        except ConfigError as exc:
            problems.extend(exc)
    problems.raise_if_any()
    return {event_id: frozenset(keys) for event_id, keys in found.items()}


# --- problems and places -------------------------------------------------------------


class _Problems(ProblemCollector):
    """A collector that lists at most :data:`MAX_PROBLEMS` problems and counts the rest."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path
        self.hidden = 0

    def append(self, problem: Problem) -> None:
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(problem)
        else:
            self.hidden += 1

    def add(
        self,
        path: Path | None,
        message: str,
        *,
        line: int | None = None,
        hint: str | None = None,
    ) -> None:
        self.append(Problem(path, message, line, hint))

    def extend(self, error: ConfigError) -> None:
        for problem in error.problems:
            self.append(problem)

    def raise_if_any(self) -> None:
        if self.hidden:
            self.problems.append(
                Problem(
                    self.path,
                    f"... and {self.hidden} more problems in this file (not shown)",
                    hint="fix the problems above first; they often have one common cause",
                )
            )
            self.hidden = 0
        super().raise_if_any()


@dataclass(frozen=True)
class _Place:
    """How messages point at a row: CSV by line number, Excel by row (and sheet)."""

    path: Path
    excel: bool = False
    sheet: str | None = None  # named only when the workbook has several sheets

    def at(self, number: int | None) -> str:
        return f"{'row' if self.excel else 'line'} {number}"

    def problem(self, number: int | None, message: str, hint: str | None = None) -> Problem:
        if not self.excel or number is None:
            return Problem(self.path, message, number, hint)
        # Problem renders "line N"; in a spreadsheet organisers look for a row.
        where = f"row {number}" if self.sheet is None else f"sheet {self.sheet!r}, row {number}"
        return Problem(self.path, f"{where}: {message}", None, hint)


def _show(value: str, limit: int = 60) -> str:
    """*value* for a message: quoted, escapes visible, long values cut."""
    return repr(value if len(value) <= limit else value[:limit] + "…")


def _known(event_ids: Collection[str]) -> str:
    return ", ".join(event_ids) or "(the series has no events)"


# --- reading files -------------------------------------------------------------------

Rows = Generator[tuple[int, list[str]], None, None]

_LINE = re.compile(r"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+\Z")
_SEP_LINE = re.compile(r'"?sep=(.)"?[\r\n]*', re.IGNORECASE)

#: No honest line of a list is this long; the csv module's cell limit is 131,072.
_LINE_LIMIT = 1_000_000

_QUOTE_HINT = (
    "a value containing the delimiter, a quote or a line break must be enclosed in double "
    'quotes, and quotes inside it doubled, e.g. "Stadt ""Nord"", Amt 3"'
)


def _lines(text: str) -> Iterator[str]:
    """Physical lines with their endings (only CR, LF and CRLF end a line, as in editors)."""
    return (match.group() for match in _LINE.finditer(text))


_UTF32_BOMS = (codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)
_UTF16_BOMS = (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)
_TEXT_HINT = "save it as 'CSV UTF-8' in Excel or as UTF-8 text in your editor"


def _read_text(path: Path, root: Path | None = None, *, limit: int = MAX_TABLE_BYTES) -> str:
    """Decode a text file: UTF-8 (BOM optional), UTF-16/32 with BOM, else Windows-1252."""
    data = read_config_file(path, limit=limit, root=root)
    if data.startswith(b"PK\x03\x04"):
        raise ConfigError.single(
            path,
            "this is an Excel workbook (or another zip file), not CSV text",
            hint="give it the extension .xlsx, or in Excel use 'Save as' > 'CSV UTF-8'",
        )
    text = _decode(path, data).lstrip("\ufeff")  # a BOM saved twice is still no text
    nul = text.find("\x00")
    if nul >= 0:
        raise ConfigError.single(
            path,
            "the file contains NUL characters; it is not a text file",
            line=text.count("\n", 0, nul) + 1,
            hint="export the list as 'CSV UTF-8' (or save it as .xlsx)",
        )
    return text


def _decode(path: Path, data: bytes) -> str:
    # UTF-32's little-endian BOM begins with UTF-16's: test it first.
    for boms, encoding in ((_UTF32_BOMS, "utf-32"), (_UTF16_BOMS, "utf-16")):
        if data.startswith(boms):  # Excel's "Unicode text" export is UTF-16
            try:
                return data.decode(encoding)
            except UnicodeDecodeError:
                raise ConfigError.single(
                    path,
                    f"the file starts like {encoding.upper()} text but is not readable as such",
                    hint=_TEXT_HINT,
                ) from None
    bom = data.startswith(codecs.BOM_UTF8)
    body = data[len(codecs.BOM_UTF8) :] if bom else data
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        pass
    # Either a Windows-1252 file (accepted), or UTF-8 with some lines pasted in
    # from one: decoding it as Windows-1252 would garble every umlaut of the
    # UTF-8 lines, so the foreign lines are reported instead.
    foreign: list[int] = []
    utf8 = bom
    for number, line in enumerate(body.split(b"\n"), start=1):
        if line.isascii():
            continue
        try:
            line.decode("utf-8")
            utf8 = True
        except UnicodeDecodeError:
            foreign.append(number)
    if utf8:
        shown = foreign[:20]
        problems = [
            Problem(
                path,
                "this line is not UTF-8 while the rest of the file is (it was probably pasted "
                "from a Windows-1252 file); its umlauts would be garbled",
                number,
                "save the file as UTF-8 ('CSV UTF-8' in Excel) and retype the umlauts and "
                "other special characters of this line",
            )
            for number in shown
        ]
        if len(foreign) > len(shown):
            problems.append(
                Problem(
                    path,
                    f"... and {len(foreign) - len(shown)} more lines that are not UTF-8",
                    hint="fix the lines above first; they often have one common cause",
                )
            )
        raise ConfigError(problems)
    try:
        return body.decode("cp1252")
    except UnicodeDecodeError as exc:
        raise ConfigError.single(
            path,
            f"the file is not readable text (byte 0x{body[exc.start]:02x} is neither UTF-8 "
            "nor Windows-1252)",
            line=body[: exc.start].count(b"\n") + 1,
            hint=_TEXT_HINT,
        ) from None


def _sniff(text: str) -> tuple[str, bool]:
    """The delimiter, from the first non-blank line; and whether line 1 is Excel's ``sep=``."""
    for number, line in enumerate(_lines(text), start=1):
        if number == 1:
            sep = _SEP_LINE.fullmatch(line)
            if sep:
                return sep.group(1), True
        if line.strip():
            counts = {";": 0, "\t": 0, ",": 0}  # ties go to ';', German Excel's choice
            quoted = False
            for char in line:
                if char == '"':
                    quoted = not quoted
                elif not quoted and char in counts:
                    counts[char] += 1
            best = max(counts, key=counts.__getitem__)
            return (best if counts[best] else ";"), False
    return ";", False


def _csv_rows(path: Path, text: str, problems: _Problems) -> Rows:
    """Records of a CSV text as (first physical line, stripped cells)."""
    delimiter, skip_sep_line = _sniff(text)
    reader = csv.reader(_bounded_lines(path, text, problems), delimiter=delimiter, strict=True)
    consumed = 0
    while True:
        start = consumed + 1
        try:
            record = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            # The reader resumes at the next line, so later problems are still found.
            message = f"broken CSV in the record starting here: {exc}"
            if "field limit" in str(exc):
                message = (
                    f"a value is longer than {csv.field_size_limit():,} characters; "
                    "probably a quote that is never closed"
                )
            problems.add(path, message, line=start, hint=_QUOTE_HINT)
            consumed = reader.line_num
            continue
        consumed = reader.line_num
        if skip_sep_line:
            skip_sep_line = False
            continue
        yield start, [cell.strip() for cell in record]


def _bounded_lines(path: Path, text: str, problems: _Problems) -> Iterator[str]:
    """The physical lines, each overlong one reported and read as empty.

    The csv module would build a list of every cell of a line first: a line of
    millions of delimiters would cost gigabytes before any check could run.
    """
    for number, line in enumerate(_lines(text), start=1):
        if len(line) > _LINE_LIMIT:
            problems.add(
                path,
                f"the line is {len(line):,} characters long (at most {_LINE_LIMIT:,})",
                line=number,
                hint="check that this is the right file; a contact needs one short line",
            )
            line = "\n"
        yield line


def _open_table(path: Path, problems: _Problems, notes: list[Problem]) -> tuple[_Place, Rows]:
    suffix = path.suffix.lower()
    if suffix in (".xlsx", ".xlsm"):
        return _open_workbook(path, problems, notes)
    if suffix in (".csv", ".txt"):
        return _Place(path), _csv_rows(path, _read_text(path), problems)
    raise ConfigError.single(
        path,
        f"cannot read {suffix} files" if suffix else "cannot read a file without extension",
        hint="save the contacts as CSV (.csv) or as Excel workbook (.xlsx); old .xls "
        "workbooks must be saved as .xlsx first",
    )


_EXCEL_HINT = (
    "open it in Excel or LibreOffice and save it again as Excel workbook (.xlsx), or export it "
    "as 'CSV UTF-8'"
)


def _open_workbook(path: Path, problems: _Problems, notes: list[Problem]) -> tuple[_Place, Rows]:
    import openpyxl  # only here: most runs read CSV, and the import costs ~70 ms

    # Read once and hand openpyxl the bytes that were checked, not the path.
    data = io.BytesIO(read_config_file(path, limit=MAX_TABLE_BYTES))
    _check_unpacked_size(path, data)
    try:
        # Real workbooks carry extensions openpyxl warns about (data validation,
        # conditional formatting); none of them matter for reading values.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            workbook = openpyxl.load_workbook(
                data, read_only=True, data_only=True, keep_links=False
            )
    except Exception as exc:  # openpyxl fails with many kinds on damaged files
        raise ConfigError.single(
            path, f"cannot read the Excel workbook: {_describe(exc)}", hint=_EXCEL_HINT
        ) from None
    sheets = workbook.worksheets
    if not sheets:
        workbook.close()
        raise ConfigError.single(path, "no contacts: the workbook has no worksheet")
    sheet = sheets[0]
    if len(sheets) > 1:
        notes.append(
            Problem(
                path,
                f"the workbook has {len(sheets)} sheets; only the first, {sheet.title!r}, is read",
                hint="delete the other sheets (or move the contacts to the first one)",
            )
        )
    place = _Place(path, excel=True, sheet=sheet.title if len(sheets) > 1 else None)
    return place, _sheet_rows(place, workbook, sheet, problems)


def _check_unpacked_size(path: Path, data: io.BytesIO) -> None:
    """Refuse a zip bomb before openpyxl unpacks it.

    zipfile never unpacks more than a member's declared size (it stops there
    and checks the CRC), so the declared sizes are a safe bound.
    """
    try:
        with zipfile.ZipFile(data) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return  # not a zip at all: openpyxl's own message says so
    finally:
        data.seek(0)
    hint = (
        "this is not an ordinary workbook; open it in Excel or LibreOffice, delete what is "
        "not a contact and save it again, or export it as 'CSV UTF-8'"
    )
    total = sum(member.file_size for member in members)
    if total > MAX_WORKBOOK_UNPACKED:
        raise ConfigError.single(
            path,
            f"the workbook would unpack to {megabytes(total)} (at most "
            f"{megabytes(MAX_WORKBOOK_UNPACKED)})",
            hint=hint,
        )
    for member in members:
        ratio = member.file_size / max(member.compress_size, 1)
        if member.file_size > 1024 * 1024 and ratio > MAX_COMPRESSION_RATIO:
            raise ConfigError.single(
                path,
                f"the part {member.filename!r} of the workbook would unpack to "
                f"{megabytes(member.file_size)}, {ratio:,.0f} times its compressed size",
                hint=hint,
            )


def _sheet_rows(place: _Place, workbook: Any, sheet: Any, problems: _Problems) -> Rows:
    number = 0
    try:
        # Some programs write a wrong sheet size; without it openpyxl reads every row.
        sheet.reset_dimensions()
        for number, values in enumerate(sheet.iter_rows(min_row=1, values_only=True), start=1):
            yield number, [_cell_text(value) for value in values]
    except Exception as exc:  # a damaged sheet inside an intact zip
        problems.append(
            place.problem(
                number + 1, f"cannot read the Excel workbook: {_describe(exc)}", _EXCEL_HINT
            )
        )
    finally:
        workbook.close()


def _cell_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))  # 12345.0 from a number cell means 12345
    if isinstance(value, datetime):
        return value.date().isoformat() if value.time() == datetime.min.time() else str(value)
    if isinstance(value, date):
        return value.isoformat()
    return str(value).strip()


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# --- contacts --------------------------------------------------------------------------

_FIELD_ALIASES: dict[str, tuple[str, ...]] = {
    "email": ("email", "mail", "emailadresse", "emailaddress"),
    "anrede": ("anrede", "salutation"),
    "titel": ("titel", "title"),
    "vorname": ("vorname", "firstname", "givenname"),
    "nachname": ("nachname", "lastname", "name", "surname", "familienname"),
    "organisation": ("organisation", "organization", "institution", "firma", "company"),
    "anmeldungen": ("anmeldungen", "anmeldung", "registrations", "registration", "events"),
}
_HEADERS = {alias: name for name, aliases in _FIELD_ALIASES.items() for alias in aliases}
_HEADER_LIST = "email;anrede;titel;vorname;nachname;organisation;anmeldungen"

_ANREDE = {
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
_ANREDE_HINT = (
    "write Frau, Herr or leave it empty (Divers, keine and - also mean: no salutation, "
    "'Guten Tag ...'); titles like Dr. belong in the column titel"
)

_ALL_TOKENS = frozenset({ALL_EVENTS, "all", "*"})
_SPLIT_EVENTS = re.compile(r"[\s,;]+")

# Line breaks, other control characters, Unicode line separators and bidi
# overrides, and angle brackets: contact data must never reach a mail header or
# HTML as anything but plain one-line text.
_HOSTILE = re.compile("[\x00-\x1f\x7f-\x9f<>\u2028\u2029\u202a-\u202e\u2066-\u2069]")

_NAME_LIMIT = 200
_ORGANISATION_LIMIT = 300
_EXTRA_LIMIT = 1000

_NO_EXTRA: Mapping[str, str] = MappingProxyType({})
_TEXT_FIELDS = ("anrede", "titel", "vorname", "nachname", "organisation")


def _header_key(text: str) -> str:
    return re.sub(r"[\s_.\-]+", "", text.casefold())


def _email_hint(value: str) -> str:
    if "<" in value or ">" in value:
        return "write only the address, without name and angle brackets"
    if value.count("@") > 1:
        return "one address per row; give each further address a row of its own"
    if value.casefold().startswith("mailto:"):
        return "remove 'mailto:'"
    return "write one complete address, e.g. jana.mueller@example.org"


def _column_letter(number: int) -> str:
    """Excel's name of the 1-based column *number*: 1 → A, 27 → AA."""
    letters = ""
    while number:
        number, rest = divmod(number - 1, 26)
        letters = chr(ord("A") + rest) + letters
    return letters


class _ContactReader:
    """Turns the rows of one contacts table into :class:`Contact` objects."""

    def __init__(
        self,
        place: _Place,
        header_number: int,
        header: Sequence[str],
        event_ids: Collection[str] | None,
        problems: _Problems,
    ) -> None:
        self.place = place
        self.problems = problems
        self.width = len(header)
        # None: the dates are unknown, so registrations are taken as written.
        self.events = (
            None if event_ids is None else {event_id.casefold(): event_id for event_id in event_ids}
        )
        self.known = _known(event_ids or ())
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
            column = _HEADERS.get(_header_key(name))
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
            elif _HOSTILE.search(name) or len(name) > _NAME_LIMIT:
                self.add(
                    number,
                    f"column name {_show(name)} is not usable",
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
                f"the first row must name the columns, e.g. {_HEADER_LIST} "
                "(E-Mail, Mail or E-Mail-Adresse also work for email)"
            )
            if any("@" in name for name in header):
                hint = f"the first row looks like a contact; insert a header row: {_HEADER_LIST}"
            self.add(number, f"no column 'email' in the header; columns found: {found}", hint)
            self.problems.raise_if_any()

    def contact(self, number: int, cells: list[str]) -> Contact | None:
        """The contact of one row, or ``None`` for an empty or invalid row."""
        if not any(cells):
            return None
        size = len(cells)
        if size > self.width and any(cells[self.width :]):
            if self.place.excel:
                # A workbook has no delimiter: the values simply sit right of the header.
                hint = (
                    f"the header row names columns A to {_column_letter(self.width)}, this row "
                    f"has values from column {_column_letter(self.width + 1)} on: name those "
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
            return None
        valid = True
        for index in self.unnamed:
            if index < size and cells[index]:
                self.add(
                    number,
                    f"value {_show(cells[index])} in column {index + 1}, which has no name "
                    "in the header",
                    "name the column in the first row, or delete the value",
                )
                valid = False

        def cell(column: str) -> str:
            index = self.columns.get(column)
            return cells[index] if index is not None and index < size else ""

        email = self._email(number, cell("email"))
        valid = valid and email is not None
        texts: dict[str, str] = {}
        for column, limit in (
            ("titel", _NAME_LIMIT),
            ("vorname", _NAME_LIMIT),
            ("nachname", _NAME_LIMIT),
            ("organisation", _ORGANISATION_LIMIT),
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
        anrede = self._anrede(number, cell("anrede"))
        registrations = self._events(number, cell("anmeldungen"))
        extra = _NO_EXTRA
        if self.extras:
            values: dict[str, str] = {}
            for index, name in self.extras:
                value = self._text(number, name, cells[index] if index < size else "", _EXTRA_LIMIT)
                if value is None:
                    valid = False
                else:
                    values[name] = value
            extra = MappingProxyType(values)
        if not valid or email is None or anrede is None or registrations is None:
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

    def _email(self, number: int, value: str) -> str | None:
        label = self.labels["email"]
        if not value:
            self.add(
                number,
                f"no email address in column {label!r}",
                "every contact needs an address; delete the row if the person is not to be mailed",
            )
            return None
        if len(value) > _EMAIL_LIMIT:
            self.add(
                number,
                f"the address {_show(value)} is {len(value):,} characters long (at most "
                f"{_EMAIL_LIMIT})",
                "check that the columns are not shifted",
            )
            return None
        try:
            return validate_email(value, check_deliverability=False).normalized
        except EmailNotValidError as exc:
            self.add(number, f"invalid email address {_show(value)}: {exc}", _email_hint(value))
            return None

    def _text(self, number: int, label: str, value: str, limit: int) -> str | None:
        if not value:
            return value
        bad = _HOSTILE.search(value)
        if bad is not None:
            char = bad.group()
            if char in "\r\n\u2028\u2029":
                what = "a line break"
            elif char in "<>":
                what = f"the character {char!r}"
            else:
                what = f"the control character U+{ord(char):04X}"
            self.add(
                number,
                f"value {_show(value)} in column {label!r} contains {what}",
                "contact data must be plain text on one line, without < and >; remove it",
            )
            return None
        if len(value) > limit:
            self.add(
                number,
                f"value {_show(value, 40)} in column {label!r} is {len(value)} characters long "
                f"(at most {limit})",
                "shorten it; check that the columns are not shifted",
            )
            return None
        return unicodedata.normalize("NFC", value)

    def _anrede(self, number: int, value: str) -> str | None:
        anrede = _ANREDE.get(" ".join(value.casefold().rstrip(".").split()))
        if anrede is None:
            label = self.labels.get("anrede", "anrede")
            self.add(
                number,
                f"value {_show(value)} in column {label!r} is not a salutation",
                _ANREDE_HINT,
            )
        return anrede

    def _events(self, number: int, value: str) -> tuple[frozenset[str], bool] | None:
        cached = self._registrations.get(value)
        if cached is not None:
            return cached
        ids: set[str] = set()
        unknown: list[str] = []
        registered_all = False
        for token in _SPLIT_EVENTS.split(value):
            folded = token.casefold()
            if not folded:
                continue
            if folded in _ALL_TOKENS:
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
                f"{', '.join(_show(t, 40) for t in unknown)} in column {label!r}",
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
        for name in _TEXT_FIELDS:
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


# --- address lists ---------------------------------------------------------------------

_COMMENT = re.compile(r"(?:^|\s)#.*")


def _address_key(value: str) -> str:
    return validate_email(value, check_deliverability=False).normalized.lower()


def _address_column(header: Sequence[str]) -> int | None:
    """The column holding addresses, if *header* is a CSV header row."""
    for index, name in enumerate(header):
        if _HEADERS.get(_header_key(name)) == "email":
            return index
    if any("@" in name for name in header):
        return None
    # Exports of video-conference tools: "User Email", "Teilnehmer-E-Mail", ...
    mail = [index for index, name in enumerate(header) if "mail" in name.casefold()]
    return mail[0] if len(mail) == 1 else None


def _read_addresses(path: Path, root: Path) -> dict[str, int]:
    """Lower-cased keys from a list, each with its first line.

    One address per line, or a CSV with a column email.
    """
    text = _read_text(path, root)
    problems = _Problems(path)
    keys: dict[str, int] = {}
    with closing(_csv_rows(path, text, _Problems(path))) as probe:
        header = next(
            ((n, cells) for n, cells in probe if any(cells) and not cells[0].startswith("#")),
            None,
        )
    column = None if header is None else _address_column(header[1])
    hint = "write one complete address per line (lines starting with # are comments)"
    if header is not None and column is not None:
        hint = "write one complete address per row in the column with the addresses"
        with closing(_csv_rows(path, text, problems)) as rows:
            for number, cells in rows:
                if number > MAX_LIST_LINES:
                    _too_many_lines(problems, path)
                    break
                if number <= header[0] or column >= len(cells) or not cells[column]:
                    continue  # e.g. participants who dialled in by phone
                _add_address(keys, problems, path, number, cells[column], hint)
    else:
        for number, line in enumerate(_lines(text), start=1):
            if number > MAX_LIST_LINES:
                _too_many_lines(problems, path)
                break
            value = _COMMENT.sub("", line).strip()
            if value:
                # Tolerate what a one-column spreadsheet export adds around an address.
                value = value.rstrip(";,\t ").strip('"').strip()
                _add_address(keys, problems, path, number, value, hint)
    problems.raise_if_any()
    return keys


def _too_many_lines(problems: _Problems, path: Path) -> None:
    problems.add(
        path,
        f"the list has more than {MAX_LIST_LINES:,} lines; reading stopped there",
        hint="check that this is the right file",
    )


def _add_address(
    keys: dict[str, int], problems: _Problems, path: Path, number: int, value: str, hint: str
) -> None:
    if len(value) > _EMAIL_LIMIT:
        problems.add(
            path,
            f"value {_show(value)} is {len(value):,} characters long; no address is that long",
            line=number,
            hint=hint,
        )
        return
    try:
        keys.setdefault(_address_key(value), number)
    except EmailNotValidError as exc:
        problems.add(
            path,
            f"invalid email address {_show(value)}: {exc}",
            line=number,
            hint=_email_hint(value) if "@" in value else hint,
        )
