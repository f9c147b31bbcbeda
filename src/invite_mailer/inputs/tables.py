"""Tables as organisers export them: text decoding, delimiter sniffing, CSV and Excel rows.

German Excel and LibreOffice write ``;``, ``,`` or tab as delimiter, UTF-8
with or without BOM, Windows-1252, quoted fields, ``.xlsx``. The readers here
accept all of that and turn a file into numbered rows of stripped cells;
what the cells mean is for the caller.
"""

from __future__ import annotations

import codecs
import csv
import io
import re
import warnings
import zipfile
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import Any

from invite_mailer.errors import ConfigError, Problem, ProblemCollector
from invite_mailer.inputs.yamlfile import megabytes, read_config_file

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


# --- problems and places -------------------------------------------------------------


class CappedProblems(ProblemCollector):
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
class Place:
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


def text_lines(text: str) -> Iterator[str]:
    """Physical lines with their endings (only CR, LF and CRLF end a line, as in editors)."""
    return (match.group() for match in _LINE.finditer(text))


_UTF32_BOMS = (codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)
_UTF16_BOMS = (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)
_TEXT_HINT = "save it as 'CSV UTF-8' in Excel or as UTF-8 text in your editor"


def read_text(path: Path, root: Path | None = None, *, limit: int = MAX_TABLE_BYTES) -> str:
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
    utf8, foreign = _utf8_lines(body)
    if utf8 or bom:
        raise ConfigError(_pasted_lines(path, foreign))
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


def _utf8_lines(body: bytes) -> tuple[bool, list[int]]:
    """Whether some non-ASCII line is UTF-8, and the numbers of the lines that are not."""
    foreign: list[int] = []
    utf8 = False
    for number, line in enumerate(body.split(b"\n"), start=1):
        if line.isascii():
            continue
        try:
            line.decode("utf-8")
            utf8 = True
        except UnicodeDecodeError:
            foreign.append(number)
    return utf8, foreign


def _pasted_lines(path: Path, foreign: list[int]) -> list[Problem]:
    """One problem per line that is not UTF-8 in a UTF-8 file (the first 20, then a count)."""
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
    return problems


def _sniff(text: str) -> tuple[str, bool]:
    """The delimiter, from the first non-blank line; and whether line 1 is Excel's ``sep=``."""
    for number, line in enumerate(text_lines(text), start=1):
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


def csv_rows(path: Path, text: str, problems: CappedProblems) -> Rows:
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


def _bounded_lines(path: Path, text: str, problems: CappedProblems) -> Iterator[str]:
    """The physical lines, each overlong one reported and read as empty.

    The csv module would build a list of every cell of a line first: a line of
    millions of delimiters would cost gigabytes before any check could run.
    """
    for number, line in enumerate(text_lines(text), start=1):
        if len(line) > _LINE_LIMIT:
            problems.add(
                path,
                f"the line is {len(line):,} characters long (at most {_LINE_LIMIT:,})",
                line=number,
                hint="check that this is the right file; a contact needs one short line",
            )
            line = "\n"
        yield line


def open_table(path: Path, problems: CappedProblems, notes: list[Problem]) -> tuple[Place, Rows]:
    """How to point at rows of *path*, and its rows: CSV or text by line, Excel by row.

    Problems found while reading go to *problems*; remarks (an ignored sheet)
    to *notes*. Files of other kinds raise :class:`ConfigError`.
    """
    suffix = path.suffix.lower()
    if suffix in (".xlsx", ".xlsm"):
        return _open_workbook(path, problems, notes)
    if suffix in (".csv", ".txt"):
        return Place(path), csv_rows(path, read_text(path), problems)
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


def _open_workbook(
    path: Path, problems: CappedProblems, notes: list[Problem]
) -> tuple[Place, Rows]:
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
    place = Place(path, excel=True, sheet=sheet.title if len(sheets) > 1 else None)
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


def _sheet_rows(place: Place, workbook: Any, sheet: Any, problems: CappedProblems) -> Rows:
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
