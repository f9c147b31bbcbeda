"""Hostile organiser input files: special files, bombs, mixed encodings, limits.

Every case runs as an organiser would: the shipped config is copied, one file
is broken, and ``invite-mailer validate`` (or the loader the commands use) must
end with a clear message naming the file (and the line where one exists),
never hang, never exhaust memory and never print a traceback.

Cases that hang or exhaust memory without the fix run ``validate`` in a child
process with a memory limit and a timeout, so a regression fails the test
instead of the machine.
"""

from __future__ import annotations

import codecs
import io
import os
import re
import resource
import stat
import subprocess
import sys
import time
import zipfile
from datetime import datetime
from email import policy
from email.parser import BytesParser
from pathlib import Path
from zoneinfo import ZoneInfo

import openpyxl
import pytest

from invite_mailer.cli.optouts import file_lines
from invite_mailer.core.plan import EmptyLedger, PlanInput, plan
from invite_mailer.errors import ConfigError
from invite_mailer.inputs.addresses import load_address_list, load_attendance
from invite_mailer.inputs.config import load_config
from invite_mailer.inputs.contacts import load_contacts
from invite_mailer.inputs.series import Kind
from support.cli import run
from support.project import clean_environ

BERLIN = ZoneInfo("Europe/Berlin")
SERIES = "config/series.yaml"
CONTACTS = "config/contacts.csv"
HEADER = "email;anrede;titel;vorname;nachname;organisation;anmeldungen"
EVENTS = ("verwaltung", "kreislaufwirtschaft", "allianzen", "forschung")

MEMORY_LIMIT = 1536 * 1024 * 1024


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def run_bounded(project: Path, *args: str, timeout: float = 60) -> tuple[int, str]:
    """``invite-mailer ARGS`` in a child process that may neither hang nor grow without bound."""
    env = clean_environ()
    started = time.monotonic()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "invite_mailer", *args],
            cwd=project,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            preexec_fn=_limit_memory,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"invite-mailer {' '.join(args)} did not finish within {timeout} s")
    output = done.stdout + done.stderr
    assert time.monotonic() - started < timeout
    return done.returncode, output


def assert_clear_error(code: int, output: str, file: str, *patterns: str) -> None:
    assert code == 1, output
    assert "Traceback" not in output, output
    assert file in output, output
    for pattern in patterns:
        assert re.search(pattern, output), (pattern, output)
    assert "hint:" in output, output


def edit(project: Path, name: str, old: str, new: str) -> None:
    path = project / name
    text = path.read_text(encoding="utf-8")
    assert old in text, f"{old!r} not in {name}"
    path.write_text(text.replace(old, new, 1), encoding="utf-8")


def line_in(project: Path, name: str, needle: str) -> int:
    lines = (project / name).read_text(encoding="utf-8").splitlines()
    return next(n for n, line in enumerate(lines, start=1) if needle in line)


# --- special files -------------------------------------------------------------------

SPECIAL_TARGETS = [
    "config/settings.toml",
    "config/optout.txt",
    "config/attendance/verwaltung.csv",
    "config/contacts.csv",
    "config/series.yaml",
]


@pytest.mark.slow
@pytest.mark.parametrize("name", SPECIAL_TARGETS)
def test_a_fifo_is_refused_without_blocking(project: Path, name: str) -> None:
    path = project / name
    path.parent.mkdir(exist_ok=True)
    path.unlink(missing_ok=True)
    os.mkfifo(path)
    code, output = run_bounded(project, "validate", timeout=30)
    assert_clear_error(code, output, name, r"not a regular file", r"FIFO|pipe")


@pytest.mark.slow
@pytest.mark.parametrize("name", SPECIAL_TARGETS)
def test_a_link_to_dev_zero_is_refused_without_reading_it(project: Path, name: str) -> None:
    path = project / name
    path.parent.mkdir(exist_ok=True)
    path.unlink(missing_ok=True)
    path.symlink_to("/dev/zero")
    code, output = run_bounded(project, "validate", timeout=30)
    assert_clear_error(code, output, name, r"not a regular file|outside the config folder")


def test_a_directory_named_like_the_opt_out_list_is_refused(project: Path) -> None:
    path = project / "config/optout.txt"
    path.unlink()
    path.mkdir()
    code, output = run(["validate"])
    assert_clear_error(code, output, "config/optout.txt", r"not a regular file", r"folder")


@pytest.mark.slow
def test_optout_commands_read_the_list_the_same_safe_way(project: Path) -> None:
    path = project / "config/optout.txt"
    path.unlink()
    os.mkfifo(path)
    code, output = run_bounded(project, "optout", "list", timeout=30)
    assert_clear_error(code, output, "optout.txt", r"not a regular file")
    # The line finder of ``optout list`` reads with the same reader: same answer.
    with pytest.raises(ConfigError, match="not a regular file"):
        file_lines(path)


def test_file_lines_and_the_address_list_agree(tmp_path: Path) -> None:
    path = tmp_path / "optout.txt"
    path.write_bytes(
        "# Liste\nJürgen@Example.org\n\nTom@example.org # am Telefon\n".encode("cp1252")
    )
    assert set(file_lines(path)) == load_address_list(path)
    assert file_lines(path) == {"jürgen@example.org": 2, "tom@example.org": 4}


def test_a_dangling_link_as_opt_out_list_is_an_error_not_an_empty_list(project: Path) -> None:
    path = project / "config/optout.txt"
    path.unlink()
    path.symlink_to(project / "nowhere.txt")
    code, output = run(["validate"])
    assert_clear_error(code, output, "config/optout.txt", r"not found")


@pytest.mark.parametrize(
    "name", ["config/attendance/verwaltung.csv", "config/optout.txt", "config/contacts.csv"]
)
def test_a_link_to_a_file_outside_the_config_folder_is_refused(project: Path, name: str) -> None:
    secret = project / "secret.csv"
    secret.write_text("email\nleak@example.org\n", encoding="utf-8")
    path = project / name
    path.parent.mkdir(exist_ok=True)
    path.unlink(missing_ok=True)
    path.symlink_to(secret)
    code, output = run(["validate"])
    assert_clear_error(code, output, name, r"outside the config folder")


def test_a_link_inside_the_config_folder_is_fine(project: Path) -> None:
    lists = project / "config/listen"
    lists.mkdir()
    (lists / "verwaltung.txt").write_text("jana.mueller@example.org\n", encoding="utf-8")
    (project / "config/attendance").mkdir()
    (project / "config/attendance/verwaltung.csv").symlink_to("../listen/verwaltung.txt")
    config = load_config(project / "config")
    assert config.attendance == {"verwaltung": frozenset({"jana.mueller@example.org"})}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "size"),
    [
        ("config/contacts.csv", 300 * 1024 * 1024),
        ("config/optout.txt", 300 * 1024 * 1024),
        ("config/attendance/verwaltung.csv", 300 * 1024 * 1024),
        ("config/series.yaml", 30 * 1024 * 1024),
    ],
)
def test_an_oversized_file_is_refused_before_it_is_read(
    project: Path, name: str, size: int
) -> None:
    path = project / name
    path.parent.mkdir(exist_ok=True)
    path.unlink(missing_ok=True)
    with path.open("wb") as file:
        file.truncate(size)  # sparse: costs no disk, but would cost memory to read
    code, output = run_bounded(project, "validate", timeout=30)
    assert_clear_error(code, output, name, r"too large", r"MB")


# --- encodings -----------------------------------------------------------------------


def _contacts_with_one_cp1252_line(project: Path, *, bom: bool = False) -> int:
    path = project / CONTACTS
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    lines.append("juergen.weiss@example.org;Herr;;Jürgen;Weiß;Stadt Süd;verwaltung\n")
    data = b"".join(line.encode("utf-8") for line in lines[:-1])
    data += lines[-1].encode("cp1252")
    path.write_bytes((codecs.BOM_UTF8 if bom else b"") + data)
    return len(lines)


@pytest.mark.parametrize("bom", [False, True], ids=["utf-8", "utf-8-bom"])
def test_one_windows_1252_line_in_a_utf8_file_is_reported(project: Path, bom: bool) -> None:
    number = _contacts_with_one_cp1252_line(project, bom=bom)
    code, output = run(["validate"])
    assert_clear_error(
        code, output, CONTACTS, rf"{CONTACTS}, line {number}\b", r"not UTF-8", r"rest of the file"
    )
    assert "save" in output and "UTF-8" in output


def test_a_file_entirely_in_windows_1252_is_still_accepted(project: Path) -> None:
    path = project / CONTACTS
    path.write_bytes(path.read_text(encoding="utf-8").replace("ı", "i").encode("cp1252"))
    config = load_config(project / "config")
    assert any(c.nachname == "Müller" for c in config.contacts)


@pytest.mark.parametrize(
    "encode",
    [
        lambda text: text.encode("utf-32"),
        lambda text: codecs.BOM_UTF32_BE + text.encode("utf-32-be"),
        lambda text: codecs.BOM_UTF8 + codecs.BOM_UTF8 + text.encode("utf-8"),
        lambda text: codecs.BOM_UTF16_LE + text.encode("utf-16-le"),
    ],
    ids=["utf-32-le", "utf-32-be", "double-utf-8-bom", "utf-16-le"],
)
def test_bom_variants_are_read(tmp_path: Path, encode: object) -> None:
    path = tmp_path / "contacts.csv"
    assert callable(encode)
    path.write_bytes(encode(f"{HEADER}\njana@example.org;Frau;;Jana;Müller;;verwaltung\n"))
    (contact,) = load_contacts(path, EVENTS)
    assert contact.nachname == "Müller" and contact.registrations == {"verwaltung"}


# --- bombs and limits ----------------------------------------------------------------

ALIAS_BOMB = """\
a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
"""


@pytest.mark.slow
def test_a_yaml_alias_bomb_is_refused_quickly(project: Path) -> None:
    path = project / SERIES
    path.write_text(path.read_text(encoding="utf-8") + ALIAS_BOMB, encoding="utf-8")
    started = time.monotonic()
    code, output = run_bounded(project, "validate", timeout=60)
    assert_clear_error(code, output, SERIES, r"alias", rf"{SERIES}, line \d+")
    assert time.monotonic() - started < 30


@pytest.mark.slow
def test_a_few_aliases_are_still_fine(project: Path) -> None:
    edit(
        project,
        SERIES,
        "    materials: []\n  - id: kreislaufwirtschaft",
        "    materials: &none []\n  - id: kreislaufwirtschaft",
    )
    edit(
        project,
        SERIES,
        "    materials: []\n  - id: allianzen",
        "    materials: *none\n  - id: allianzen",
    )
    code, output = run(["validate"])
    assert code == 0, output


def test_a_self_referencing_yaml_alias_is_refused(project: Path) -> None:
    path = project / SERIES
    path.write_text(path.read_text(encoding="utf-8") + "loop: &loop [*loop]\n", encoding="utf-8")
    code, output = run(["validate"])
    assert_clear_error(code, output, SERIES, r"refers to itself|alias")


@pytest.mark.slow
def test_deeply_nested_yaml_is_refused(project: Path) -> None:
    path = project / SERIES
    depth = 5000
    path.write_text(
        path.read_text(encoding="utf-8") + "deep: " + "[" * depth + "]" * depth + "\n",
        encoding="utf-8",
    )
    code, output = run(["validate"])
    assert_clear_error(code, output, SERIES, r"nested too deeply")


_SHEET_HEAD = (
    b'<?xml version="1.0" encoding="UTF-8" standalone="yes"?>'
    b'<worksheet xmlns="http://schemas.openxmlformats.org/spreadsheetml/2006/main"><sheetData>'
    b'<row r="1"><c r="A1" t="inlineStr"><is><t>email</t></is></c>'
    b'<c r="B1" t="inlineStr"><is><t>nachname</t></is></c></row>'
    b'<row r="2"><c r="A2" t="inlineStr"><is><t>jana@example.org</t></is></c>'
    b'<c r="B2" t="inlineStr"><is><t>'
)
_SHEET_TAIL = b"</t></is></c></row></sheetData></worksheet>"


def _xlsx_bomb(path: Path, cell_bytes: int, chunk: bytes = b"x" * (1 << 20)) -> None:
    """A valid workbook whose second row holds one cell of *cell_bytes* letters
    (written as repetitions of *chunk*, one MiB)."""
    workbook = openpyxl.Workbook()
    workbook.active.append(["email"])
    buffer = io.BytesIO()
    workbook.save(buffer)
    sheet = "xl/worksheets/sheet1.xml"
    with zipfile.ZipFile(buffer) as source, zipfile.ZipFile(path, "w", compresslevel=1) as target:
        for item in source.infolist():
            if item.filename != sheet:
                target.writestr(item, source.read(item), compress_type=zipfile.ZIP_DEFLATED)
        info = zipfile.ZipInfo(sheet)
        info.compress_type = zipfile.ZIP_DEFLATED
        # Streamed, so the test itself never holds the cell in memory.
        with target.open(info, "w", force_zip64=True) as out:
            out.write(_SHEET_HEAD)
            for _ in range(cell_bytes >> 20):
                out.write(chunk)
            out.write(_SHEET_TAIL)


@pytest.mark.slow
def test_an_xlsx_zip_bomb_is_refused_before_it_is_unpacked(project: Path) -> None:
    (project / CONTACTS).unlink()
    bomb = project / "config/contacts.xlsx"
    _xlsx_bomb(bomb, 1536 * 1024 * 1024)
    assert bomb.stat().st_size < 5 * 1024 * 1024
    code, output = run_bounded(project, "validate", timeout=60)
    assert_clear_error(code, output, "contacts.xlsx", r"unpack|uncompressed|compress")


@pytest.mark.slow
def test_a_workbook_that_packs_well_but_not_suspiciously_is_bounded_too(project: Path) -> None:
    # Compressed about four times, like real sheets: not a "bomb" by its ratio,
    # but more than openpyxl should be given to hold in memory.
    (project / CONTACTS).unlink()
    heavy = project / "config/contacts.xlsx"
    chunk = os.urandom(1 << 18).hex().encode() + b"0" * (1 << 19)
    _xlsx_bomb(heavy, 160 * 1024 * 1024, chunk)
    assert heavy.stat().st_size < 64 * 1024 * 1024
    code, output = run_bounded(project, "validate", timeout=60)
    assert_clear_error(code, output, "contacts.xlsx", r"unpack|uncompressed")


@pytest.mark.slow
def test_a_large_but_honest_workbook_still_loads(tmp_path: Path) -> None:
    workbook = openpyxl.Workbook()
    workbook.active.append(["email", "nachname", "organisation"])
    for i in range(20_000):
        workbook.active.append([f"p{i}@example.org", f"Müller {i}", f"Stadt {i % 50}"])
    path = tmp_path / "contacts.xlsx"
    workbook.save(path)
    assert len(load_contacts(path, EVENTS)) == 20_000


def test_a_workbook_row_with_too_many_values_gets_a_workbook_hint(tmp_path: Path) -> None:
    workbook = openpyxl.Workbook()
    workbook.active.append(["email", "nachname"])
    workbook.active.append(["jana@example.org", "Müller", "Stadt Nord; Amt 3"])
    path = tmp_path / "contacts.xlsx"
    workbook.save(path)
    with pytest.raises(ConfigError) as caught:
        load_contacts(path, EVENTS)
    (problem,) = caught.value.problems
    assert "3 values" in problem.message and "row 2" in str(problem)
    assert problem.hint is not None
    assert "delimiter" not in problem.hint and "double quotes" not in problem.hint
    assert "column C" in problem.hint and "header" in problem.hint


@pytest.mark.slow
def test_too_many_rows_are_refused_with_a_clear_message(tmp_path: Path) -> None:
    path = tmp_path / "contacts.csv"
    with path.open("w", encoding="utf-8") as out:
        out.write("email\n")
        out.write("".join(f"p{i}@example.org\n" for i in range(250_001)))
    with pytest.raises(ConfigError) as caught:
        load_contacts(path, EVENTS)
    message = str(caught.value)
    assert "contacts.csv" in message and "rows" in message and "200,000" in message


def test_an_overlong_field_says_so(tmp_path: Path) -> None:
    path = tmp_path / "contacts.csv"
    path.write_text(f"email;nachname\njana@example.org;{'M' * 200_000}\n", encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_contacts(path, EVENTS)
    (problem,) = caught.value.problems
    assert problem.line == 2
    assert "longer than" in problem.message and "characters" in problem.message


def test_an_overlong_address_is_refused_without_validating_it(tmp_path: Path) -> None:
    path = tmp_path / "contacts.csv"
    path.write_text(f"email\n{'a' * 100_000}@example.org\n", encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_contacts(path, EVENTS)
    assert "characters long" in str(caught.value) and caught.value.line == 2


@pytest.mark.slow
def test_a_20_mb_description_is_refused_by_file_size(project: Path) -> None:
    edit(project, SERIES, "description: |\n", "description: |\n  " + "x" * 20_000_000 + "\n")
    code, output = run(["validate"])
    assert_clear_error(code, output, SERIES, r"too large")


@pytest.mark.parametrize(
    ("old", "new", "needle", "pattern"),
    [
        (
            "description: |\n",
            "description: |\n  " + "Text " * 20_000 + "\n",
            "description: |",
            r"'description'.*characters",
        ),
        (
            'title: "Verwaltung transformieren – Effizienz steigern"',
            'title: "' + "T" * 500 + '"',
            'title: "TTT',
            r"'events\[verwaltung\]\.title'",
        ),
        (
            "join_url: https://example.org/transferreihe/verwaltung",
            "join_url: https://example.org/" + "a" * 5000,
            "join_url: https://example.org/aaa",
            r"join_url",
        ),
        (
            "    materials: []\n  - id: kreislaufwirtschaft",
            "    materials:\n      - {title: Folien, url: https://example.org/"
            + "b" * 5000
            + "}\n  - id: kreislaufwirtschaft",
            "{title: Folien",
            r"materials",
        ),
    ],
    ids=["description", "event-title", "join-url", "material-url"],
)
def test_text_fields_of_the_series_are_bounded(
    project: Path, old: str, new: str, needle: str, pattern: str
) -> None:
    edit(project, SERIES, old, new)
    line = line_in(project, SERIES, needle)
    code, output = run(["validate"])
    assert_clear_error(code, output, SERIES, pattern, rf"{SERIES}, line {line}\b", r"at most")


# --- clear messages instead of tracebacks --------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("old", "new", "needle"),
    [
        ("date: 2024-11-14", "date: 9999-12-31", "date: 9999-12-31"),
        ("date: 2024-11-14", "date: 0001-01-01", "date: 0001-01-01"),
        ("reminder:   {before: 1 day", "reminder:   {before: 999999999 days", "reminder:"),
        ('{send_at: "2024-10-24 10:00"', '{send_at: "9999-12-31 23:59"', "invitation:"),
        ('{send_at: "2024-10-24 10:00"', '{send_at: "0001-01-01 00:00"', "invitation:"),
        ("wait_for_materials: 14 days", "wait_for_materials: 99999999 weeks", "followup:"),
        ("after: 1 day", "after: 99999999999999999999 hours", "followup:"),
    ],
    ids=[
        "9999-12-31",
        "0001-01-01",
        "before-huge",
        "send-at-max",
        "send-at-min",
        "wait-weeks-huge",
        "after-hours-huge",
    ],
)
def test_dates_at_the_calendar_limits_are_clear_errors(
    project: Path, old: str, new: str, needle: str
) -> None:
    edit(project, SERIES, old, new)
    line = line_in(project, SERIES, needle)
    code, output = run(["validate"])
    assert_clear_error(code, output, SERIES, rf"{SERIES}, line {line}\b")
    code, output = run(["plan", "--now", "2024-11-01T10:00"])
    assert code == 1 and "Traceback" not in output and SERIES in output


@pytest.mark.parametrize(
    ("old", "new", "needle", "field"),
    [
        (
            "title: Online-Transferreihe",
            "title: |\n  Online-\n  Transferreihe",
            "title: |",
            "'title'",
        ),
        (
            'title: "Allianzen bilden – Engagement fördern"',
            'title: "Allianzen bilden\\r\\nBcc: x@evil.example"',
            "Allianzen bilden",
            "title",
        ),
        (
            'name: "KomKomIn – Wissenschaftliches Begleitvorhaben"',
            'name: "KomKomIn\\u2028Begleitvorhaben"',
            "KomKomIn\\u2028",
            "organiser.name",
        ),
        (
            'subtitle: "Kommunen innovativ',
            'subtitle: "Kommunen\\tinnovativ',
            "subtitle:",
            "subtitle",
        ),
    ],
    ids=[
        "block-scalar-series-title",
        "crlf-event-title",
        "line-separator-organiser",
        "tab-subtitle",
    ],
)
def test_one_line_fields_refuse_line_breaks_and_control_characters(
    project: Path, old: str, new: str, needle: str, field: str
) -> None:
    edit(project, SERIES, old, new)
    line = line_in(project, SERIES, needle)
    code, output = run(["validate"])
    assert_clear_error(
        code, output, SERIES, re.escape(field), rf"{SERIES}, line {line}\b", r"one line"
    )


def test_control_characters_in_a_description_are_refused(project: Path) -> None:
    edit(
        project,
        SERIES,
        "description: >-\n      Regionale Stoffkreisläufe, Sekundärrohstoffe und die Rolle der "
        "Kommunen als\n      Auftraggeberinnen und Impulsgeberinnen.",
        'description: "Regionale \\x1b[31mStoffkreisläufe"',
    )
    line = line_in(project, SERIES, "\\x1b[31m")
    code, output = run(["validate"])
    assert_clear_error(
        code, output, SERIES, r"description", r"control character", rf"{SERIES}, line {line}\b"
    )


# --- all problems at once, only real ones ----------------------------------------------


def _many_contacts(project: Path, count: int, bad_row: int) -> None:
    rows = [HEADER]
    for i in range(count):
        address = "kaputt@" if i + 2 == bad_row else f"p{i}@example.org"
        rows.append(f"{address};Frau;;Eva;Neu {i};Org;verwaltung,allianzen")
    (project / CONTACTS).write_text("\n".join(rows) + "\n", encoding="utf-8")


@pytest.mark.slow
def test_an_invalid_series_causes_no_phantom_contact_problems(project: Path) -> None:
    _many_contacts(project, 1900, bad_row=1500)
    edit(project, SERIES, "timezone: Europe/Berlin", "timezone: Mars/Olympus")
    code, output = run(["validate"])
    assert code == 1, output
    assert "Mars/Olympus" in output
    assert "more problems" not in output, output
    assert "unknown event" not in output, output
    # The one real contact problem, far down the list, is still found.
    assert re.search(rf"{CONTACTS}, line 1500\b.*kaputt@", output), output


def test_contacts_are_checked_against_the_readable_event_ids(project: Path) -> None:
    """A broken rule elsewhere in the series does not hide a misspelt registration."""
    edit(project, SERIES, "reminder:   {before: 1 day", "reminder:   {before: 1 tick")
    path = project / CONTACTS
    path.write_text(
        path.read_text(encoding="utf-8") + "neu@example.org;;;Eva;Neu;;verwaltnug\n",
        encoding="utf-8",
    )
    code, output = run(["validate"])
    assert code == 1, output
    assert "tick" in output and "'verwaltnug'" in output, output


@pytest.mark.slow
def test_template_and_attendance_problems_come_with_the_series_problems(project: Path) -> None:
    edit(project, SERIES, "timezone: Europe/Berlin", "timezone: Mars/Olympus")
    (project / "templates/email/reminder.subject.j2").write_text(
        "Erinnerung: {{ event.title }\n", encoding="utf-8"
    )
    (project / "config/attendance").mkdir()
    (project / "config/attendance/verwaltung.csv").write_text("tom@\n", encoding="utf-8")
    (project / "config/optout.txt").write_text("nicht anschreiben\n", encoding="utf-8")
    code, output = run(["validate"])
    assert code == 1, output
    assert "Mars/Olympus" in output
    assert "reminder.subject.j2" in output and "syntax" in output, output
    assert "verwaltung.csv" in output and "'tom@'" in output, output
    assert "optout.txt" in output and "nicht anschreiben" in output, output


@pytest.mark.slow
def test_template_problems_come_with_the_settings_problems(project: Path) -> None:
    edit(project, "config/settings.toml", 'kind = "outbox"', 'kind = "pigeon"')
    (project / "templates/email/invitation.txt.j2").write_text("{% if %}\n", encoding="utf-8")
    code, output = run(["validate"])
    assert code == 1, output
    assert "transport.kind" in output and "invitation.txt.j2" in output, output


# --- attendance and audiences ----------------------------------------------------------


@pytest.mark.slow
def test_attendance_never_adds_people_to_the_reminder(project: Path) -> None:
    """Someone who attended without registering gets the follow-up, never a reminder."""
    path = project / CONTACTS
    path.write_text(
        path.read_text(encoding="utf-8") + "gast@example.org;;;Gabi;Gast;;\n", encoding="utf-8"
    )
    (project / "config/attendance").mkdir()
    (project / "config/attendance/verwaltung.csv").write_text(
        "gast@example.org\n", encoding="utf-8"
    )
    config = load_config(project / "config")
    now = datetime(2024, 11, 13, 15, 0, tzinfo=BERLIN)
    mailings = {m.id: m for m in plan(PlanInput.of(config), EmptyLedger(), now)}
    assert "gast@example.org" not in mailings["reminder:verwaltung"].audience
    assert "gast@example.org" in mailings["followup:verwaltung"].audience
    registered = {c.key for c in config.contacts if c.is_registered("verwaltung")}
    assert set(mailings["reminder:verwaltung"].audience) == registered

    code, output = run(["send-due", "--now", "2024-11-13T15:00"])
    assert code == 0, output
    mails = [
        BytesParser(policy=policy.default).parsebytes(eml.read_bytes())
        for eml in (project / "outbox").rglob("*.eml")
    ]
    reminders = [m for m in mails if str(m["Subject"]).startswith("Erinnerung")]
    assert len(reminders) == len(registered)
    assert not any("gast@example.org" in str(m["To"]) for m in reminders)


def test_a_reminder_for_attendees_is_refused(project: Path) -> None:
    edit(
        project,
        SERIES,
        "reminder:   {before: 1 day, audience: registered}",
        "reminder:   {before: 1 day, audience: attended}",
    )
    code, output = run(["validate"])
    assert_clear_error(code, output, SERIES, r"attended", r"reminder")


def test_attended_followups_go_only_to_attendees(project: Path) -> None:
    edit(project, SERIES, "wait_for_materials: 14 days}", "wait_for_materials: 14 days}")
    edit(
        project,
        SERIES,
        'followup:   {after: 1 day, at: "10:00", audience: registered',
        'followup:   {after: 1 day, at: "10:00", audience: attended',
    )
    (project / "config/attendance").mkdir()
    (project / "config/attendance/verwaltung.csv").write_text(
        "thomas.schmidt@example.org\n", encoding="utf-8"
    )
    config = load_config(project / "config")
    data = PlanInput(config.series, config.contacts.contacts, attendance=config.attendance)
    now = datetime(2024, 11, 15, 10, 5, tzinfo=BERLIN)
    mailing = next(m for m in plan(data, EmptyLedger(), now) if m.id == "followup:verwaltung")
    assert mailing.kind is Kind.FOLLOWUP
    assert mailing.audience == ("thomas.schmidt@example.org",)


# --- the hundred thousand ---------------------------------------------------------------


@pytest.mark.slow
def test_a_hundred_thousand_contacts_still_load(tmp_path: Path) -> None:
    path = tmp_path / "contacts.csv"
    with path.open("w", encoding="utf-8") as out:
        out.write(HEADER + "\n")
        out.write(
            "".join(f"p{i}@example.org;Frau;;Eva;Neu {i};Org;verwaltung\n" for i in range(100_000))
        )
    assert len(load_contacts(path, EVENTS)) == 100_000


def test_attendance_lists_are_read_when_the_series_is_broken(tmp_path: Path) -> None:
    folder = tmp_path / "attendance"
    folder.mkdir()
    (folder / "irgendwas.csv").write_text("tom@\n", encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_attendance(tmp_path, None)
    assert "'tom@'" in str(caught.value)


# --- more hostile shapes ----------------------------------------------------------------


@pytest.mark.slow
def test_a_line_of_millions_of_delimiters_is_refused_without_splitting_it(project: Path) -> None:
    path = project / CONTACTS
    with path.open("a", encoding="utf-8") as out:
        out.write("x@example.org" + ";" * 60_000_000 + "\n")
    number = len(path.read_bytes().splitlines())
    code, output = run_bounded(project, "validate", timeout=60)
    assert_clear_error(code, output, CONTACTS, rf"{CONTACTS}, line {number}\b", r"characters long")


@pytest.mark.slow
def test_a_yaml_tag_is_a_clear_error_with_its_line(project: Path) -> None:
    edit(project, SERIES, "id: transferreihe-2024", 'id: !!python/object/apply:os.system ["id"]')
    line = line_in(project, SERIES, "!!python")
    code, output = run(["validate"])
    assert_clear_error(code, output, SERIES, rf"{SERIES}, line {line}\b", r"tag")


def test_a_link_loop_is_a_clear_error(project: Path) -> None:
    path = project / "config/optout.txt"
    path.unlink()
    path.symlink_to("optout.txt")
    code, output = run(["validate"])
    assert_clear_error(code, output, "config/optout.txt", r"cannot read the file")


def test_a_series_that_is_not_utf8_names_the_line(project: Path) -> None:
    path = project / SERIES
    text = path.read_text(encoding="utf-8")
    path.write_bytes(text.encode("utf-8").replace("Städte".encode(), "Städte".encode("cp1252")))
    line = next(n for n, row in enumerate(text.splitlines(), start=1) if "Städte" in row)
    code, output = run(["validate"])
    assert_clear_error(code, output, SERIES, rf"{SERIES}, line {line}\b", r"not UTF-8")


@pytest.mark.slow
def test_a_device_inside_the_config_folder_is_refused_unread(project: Path) -> None:
    path = project / "config/optout.txt"
    path.unlink()
    try:
        os.mknod(path, stat.S_IFCHR | 0o444, os.makedev(1, 5))  # what /dev/zero is
    except PermissionError:
        pytest.skip("creating device files needs a privilege this machine does not grant")
    code, output = run_bounded(project, "validate", timeout=30)
    assert_clear_error(code, output, "config/optout.txt", r"not a regular file", r"device")
