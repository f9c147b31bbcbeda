"""Contacts, opt-outs and attendance lists, read from real files."""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import openpyxl
import pytest

from invite_mailer.errors import ConfigError
from invite_mailer.inputs.addresses import load_address_list, load_attendance
from invite_mailer.inputs.contacts import Contact, ContactList, find_contacts_file, load_contacts
from invite_mailer.inputs.tables import MAX_PROBLEMS

ROOT = Path(__file__).resolve().parents[1]
EVENTS = ("verwaltung", "kreislaufwirtschaft", "allianzen", "forschung")
HEADER = "email;anrede;titel;vorname;nachname;organisation;anmeldungen"


def write(folder: Path, text: str, name: str = "contacts.csv", encoding: str = "utf-8") -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode(encoding))
    return path


def xlsx_bytes(*rows: list[object], sheets: tuple[str, ...] = ("Kontakte",)) -> bytes:
    workbook = openpyxl.Workbook()
    first = workbook.active
    assert first is not None
    first.title = sheets[0]
    for row in rows:
        first.append(row)
    for extra in sheets[1:]:
        workbook.create_sheet(extra)
    buffer = io.BytesIO()
    workbook.save(buffer)
    return buffer.getvalue()


def load(path: Path) -> ContactList:
    return load_contacts(path, EVENTS)


# --- files that load ------------------------------------------------------------------


def test_shipped_contacts_load() -> None:
    contacts = load(ROOT / "config" / "contacts.csv")
    assert len(contacts) == 12
    assert contacts.warnings == ()
    gross = contacts.by_key("sabine.gross@example.org")
    assert gross is not None
    assert (gross.anrede, gross.titel, gross.nachname) == ("Frau", "Prof. Dr.", "Groß")
    assert gross.registrations == {"forschung"}
    jana = contacts.by_key("JANA.MUELLER@example.org")
    assert jana is not None
    assert jana.nachname == "Müller"
    assert jana.organisation == "Stadt Musterhausen, Amt für Digitalisierung"
    assert jana.registered_all and jana.is_registered("allianzen")
    assert [c.vorname for c in contacts][5:7] == ["Özlem", "Björn"]
    assert contacts.contacts[5].nachname == "Yılmaz"
    assert contacts.contacts[0].row == 2 and contacts.contacts[-1].row == 13


@pytest.mark.parametrize("delimiter", [";", ",", "\t"])
def test_delimiters(tmp_path: Path, delimiter: str) -> None:
    rows = [
        ["email", "anrede", "vorname", "nachname", "anmeldungen"],
        ["jana@example.org", "Frau", "Jana", "Müller", "verwaltung"],
        ["tom@example.org", "Herr", "Tom", "Weiß", "alle"],
    ]
    path = write(tmp_path, "\n".join(delimiter.join(row) for row in rows) + "\n")
    contacts = load(path)
    assert [c.email for c in contacts] == ["jana@example.org", "tom@example.org"]
    assert [c.nachname for c in contacts] == ["Müller", "Weiß"]
    assert contacts.contacts[1].registered_all


def test_utf8_with_bom_and_crlf(tmp_path: Path) -> None:
    path = write(
        tmp_path, f"{HEADER}\r\njana@example.org;Frau;;Jana;Müller;Ämter;\r\n", "contacts.csv"
    )
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    (jana,) = load(path).contacts
    assert (jana.email, jana.nachname, jana.organisation) == ("jana@example.org", "Müller", "Ämter")


def test_windows_1252(tmp_path: Path) -> None:
    text = (
        f"{HEADER}\n"
        "juergen@example.org;Herr;Dr.;Jürgen;Weiß;Amt für Straßenbau;verwaltung\n"
        "oe@example.org;Frau;;Örs;Schäfer-Lüdtke;Büro „Nord“ – Süd;\n"
    )
    path = write(tmp_path, text, encoding="cp1252")
    assert b"\xfc" in path.read_bytes()  # really Windows-1252 on disk
    first, second = load(path).contacts
    assert (first.vorname, first.nachname, first.organisation) == (
        "Jürgen",
        "Weiß",
        "Amt für Straßenbau",
    )
    assert (second.vorname, second.nachname, second.organisation) == (
        "Örs",
        "Schäfer-Lüdtke",
        "Büro „Nord“ – Süd",
    )


def test_quoted_fields_with_delimiter_and_newline(tmp_path: Path) -> None:
    text = (
        "email,anrede,nachname,organisation,anmeldungen\n"
        'jana@example.org,Frau,Müller,"Stadt Musterhausen, Amt 3","verwaltung,\n'
        'allianzen"\n'
        'tom@example.org,Herr,"Meier ""Tom""","Kreis A, B",forschung\n'
        "bad@,Herr,X,Y,\n"
    )
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load(path)
    # The quoted line break makes line 5 the physical line of the bad address.
    assert [p.line for p in caught.value.problems] == [5]
    path.write_text(text.replace("bad@,Herr,X,Y,\n", ""), encoding="utf-8")
    jana, tom = load(path).contacts
    assert jana.organisation == "Stadt Musterhausen, Amt 3"
    assert jana.registrations == {"verwaltung", "allianzen"}
    assert (tom.nachname, tom.organisation, tom.row) == ('Meier "Tom"', "Kreis A, B", 4)


def test_excel_sep_line(tmp_path: Path) -> None:
    path = write(tmp_path, "sep=,\nemail,nachname\njana@example.org,Müller;Meier\n")
    (jana,) = load(path).contacts
    assert (jana.nachname, jana.row) == ("Müller;Meier", 3)


def test_xlsx(tmp_path: Path) -> None:
    path = tmp_path / "contacts.xlsx"
    path.write_bytes(
        xlsx_bytes(
            ["E-Mail", "Anrede", "Titel", "Vorname", "Nachname", "Organisation", "Anmeldungen"]
            + ["PLZ"],
            ["jana@example.org", "Frau", "Dr.", "Jana", "Müller", "Stadt, Amt", "alle", 12345],
            [None, None, None, None, None, None, None, None],
            ["tom@example.org", "hr.", None, "Tom", "Weiß", None, "verwaltung, forschung", None],
        )
    )
    contacts = load(path)
    jana, tom = contacts.contacts
    assert (jana.titel, jana.nachname, jana.extra["PLZ"], jana.row) == ("Dr.", "Müller", "12345", 2)
    assert (tom.anrede, tom.registrations, tom.extra["PLZ"], tom.row) == (
        "Herr",
        {"verwaltung", "forschung"},
        "",
        4,
    )
    assert contacts.source == path


def test_xlsx_reads_first_sheet_and_says_so(tmp_path: Path) -> None:
    path = tmp_path / "contacts.xlsx"
    path.write_bytes(xlsx_bytes(["email"], ["jana@example.org"], sheets=("Kontakte", "Notizen")))
    contacts = load(path)
    assert len(contacts) == 1
    assert "only the first, 'Kontakte'" in str(contacts.warnings[0])


def test_english_headers_and_extra_columns(tmp_path: Path) -> None:
    text = (
        " E-Mail ;Salutation;TITLE;First Name;last_name;Organization;Registrations;"
        "Abteilung;;Telefon Büro\n"
        "Jana.Mueller@EXAMPLE.org;frau;Dr.;Jana;Müller;Stadt;Verwaltung Forschung;"
        "Referat 3;;+49 30 1234\n"
    )
    (jana,) = load(write(tmp_path, text)).contacts
    assert jana.email == "Jana.Mueller@example.org"  # domain normalised, local part kept
    assert jana.key == "jana.mueller@example.org"
    assert (jana.anrede, jana.titel, jana.vorname, jana.organisation) == (
        "Frau",
        "Dr.",
        "Jana",
        "Stadt",
    )
    assert jana.registrations == {"verwaltung", "forschung"}
    assert dict(jana.extra) == {"Abteilung": "Referat 3", "Telefon Büro": "+49 30 1234"}


@pytest.mark.parametrize(
    ("written", "expected"),
    [
        ("Frau", "Frau"),
        ("FRAU", "Frau"),
        ("Fr.", "Frau"),
        ("herr", "Herr"),
        ("Hr.", "Herr"),
        ("", ""),
        ("Divers", ""),
        ("keine", ""),
        ("-", ""),
    ],
)
def test_anrede_variants(tmp_path: Path, written: str, expected: str) -> None:
    (contact,) = load(write(tmp_path, f"email;anrede\na@example.org;{written}\n")).contacts
    assert contact.anrede == expected


@pytest.mark.parametrize(
    ("written", "ids", "everything"),
    [
        ("", set(), False),
        ("alle", set(), True),
        ("*", set(), True),
        ("All", set(), True),
        ("verwaltung", {"verwaltung"}, False),
        ("Verwaltung;  allianzen", {"verwaltung", "allianzen"}, False),
        ("forschung verwaltung,forschung", {"forschung", "verwaltung"}, False),
    ],
)
def test_anmeldungen(tmp_path: Path, written: str, ids: set[str], everything: bool) -> None:
    path = write(tmp_path, f'email,anmeldungen\na@example.org,"{written}"\n')
    (contact,) = load(path).contacts
    assert (contact.registrations, contact.registered_all) == (ids, everything)


def test_names_are_tidied(tmp_path: Path) -> None:
    decomposed = "Mu\u0308ller"  # as macOS writes umlauts
    path = write(tmp_path, f"email;vorname;nachname\na@example.org;Anna  Lena;  {decomposed} \n")
    (contact,) = load(path).contacts
    assert (contact.vorname, contact.nachname) == ("Anna Lena", "Müller")


def test_empty_rows_are_skipped(tmp_path: Path) -> None:
    path = write(tmp_path, f"\n{HEADER}\n\n;;;;;;\njana@example.org;;;;;;\n\n")
    (jana,) = load(path).contacts
    assert jana.row == 5


def test_duplicates_are_merged_with_a_warning(tmp_path: Path) -> None:
    text = (
        "email;anrede;vorname;nachname;anmeldungen;Abteilung\n"
        "jana.mueller@example.org;;Jana;Müller;verwaltung;\n"
        "tom@example.org;Herr;Tom;Weiß;;\n"
        "JANA.MUELLER@example.org;Frau;Jana;Mueller;forschung;Referat 3\n"
    )
    path = write(tmp_path, text)
    contacts = load(path)
    assert [c.key for c in contacts] == ["jana.mueller@example.org", "tom@example.org"]
    jana = contacts.contacts[0]
    assert (jana.email, jana.anrede, jana.nachname, jana.row) == (
        "jana.mueller@example.org",
        "Frau",
        "Müller",
        2,
    )
    assert jana.registrations == {"verwaltung", "forschung"}
    assert jana.extra["Abteilung"] == "Referat 3"
    (warning,) = contacts.warnings
    assert warning.line == 4
    text = str(warning)
    assert str(path) in text and "line 2" in text and "'Mueller'" in text and "'Müller'" in text


def test_csv_next_to_xlsx_is_preferred_with_a_warning(tmp_path: Path) -> None:
    write(tmp_path, "email\njana@example.org\n")
    (tmp_path / "contacts.xlsx").write_bytes(xlsx_bytes(["email"], ["tom@example.org"]))
    path = find_contacts_file(tmp_path)
    assert path.name == "contacts.csv"
    contacts = load(path)
    assert [c.email for c in contacts] == ["jana@example.org"]
    assert "contacts.xlsx" in str(contacts.warnings[0])


def test_find_contacts_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        find_contacts_file(tmp_path)
    assert "no contacts file" in str(caught.value)
    (tmp_path / "Contacts.CSV").write_text("email\n", encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        find_contacts_file(tmp_path)
    assert "'Contacts.CSV'" in str(caught.value.hint)
    (tmp_path / "contacts.xlsx").write_bytes(xlsx_bytes(["email"]))
    assert find_contacts_file(tmp_path) == tmp_path / "contacts.xlsx"


# --- opt-outs and attendance -----------------------------------------------------------


def test_optout_list(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "# Adressen, die nie angeschrieben werden\n\n  Jana.Mueller@EXAMPLE.org  \n"
        "tom@example.org   # bat am Telefon darum\n",
        "optout.txt",
    )
    assert load_address_list(path) == {"jana.mueller@example.org", "tom@example.org"}
    assert load_address_list(tmp_path / "missing.txt") == frozenset()
    assert load_address_list(ROOT / "config" / "optout.txt") == frozenset()


def test_attendance(tmp_path: Path) -> None:
    folder = tmp_path / "attendance"
    write(folder, "Jana.Mueller@example.org\ntom@example.org\n", "verwaltung.csv")
    write(
        folder,
        "Name;E-Mail;Dauer\nJürgen Weiß;juergen@example.org;120\nTelefon;;30\n",
        "forschung.csv",
        encoding="cp1252",
    )
    write(folder, "", "allianzen.csv")
    write(folder, "lock", "~$verwaltung.csv")
    attendance = load_attendance(tmp_path, EVENTS)
    assert attendance == {
        "verwaltung": {"jana.mueller@example.org", "tom@example.org"},
        "forschung": {"juergen@example.org"},
        "allianzen": frozenset(),  # a list was given: nobody attended
    }
    assert load_attendance(tmp_path / "nowhere", EVENTS) == {}


def test_attendance_keys_match_contact_keys(tmp_path: Path) -> None:
    contacts = load(write(tmp_path, "email\nJana.Mueller@Example.ORG\n"))
    write(tmp_path / "attendance", "JANA.MUELLER@example.org\n", "verwaltung.csv")
    (key,) = load_attendance(tmp_path, EVENTS)["verwaltung"]
    assert contacts.by_key(key) is not None


# --- broken and hostile input ------------------------------------------------------------

Case = tuple[str, str, bytes, tuple[str, ...]]  # loader, file name, content, expected texts


def _csv(text: str, encoding: str = "utf-8") -> bytes:
    return text.encode(encoding)


BROKEN: dict[str, Case] = {
    "invalid address": (
        "contacts",
        "contacts.csv",
        _csv(f"{HEADER}\njana.mueller@;Frau;;Jana;Müller;;\n"),
        ("line 2", "'jana.mueller@'", "after the @-sign", "hint:"),
    ),
    "name and address in one cell": (
        "contacts",
        "contacts.csv",
        _csv("email\nJana Müller <jana@example.org>\n"),
        ("line 2", "'Jana Müller <jana@example.org>'", "without name and angle brackets"),
    ),
    "missing email column": (
        "contacts",
        "contacts.csv",
        _csv("Name;Vorname;Adresse\nMüller;Jana;jana@example.org\n"),
        ("line 1", "no column 'email'", "'Name', 'Vorname', 'Adresse'"),
    ),
    "no header row": (
        "contacts",
        "contacts.csv",
        _csv("jana@example.org;Frau\n"),
        ("no column 'email'", "looks like a contact"),
    ),
    "unknown event id": (
        "contacts",
        "contacts.csv",
        _csv(f"{HEADER}\njana@example.org;Frau;;Jana;Müller;;verwaltung,Verwaltnug\n"),
        ("line 2", "'Verwaltnug'", "'anmeldungen'", "verwaltung, kreislaufwirtschaft"),
    ),
    "bad anrede": (
        "contacts",
        "contacts.csv",
        _csv(f"{HEADER}\njana@example.org;Frau Dr.;;Jana;Müller;;\n"),
        ("line 2", "'Frau Dr.'", "Frau, Herr"),
    ),
    "CR in a name": (
        "contacts",
        "contacts.csv",
        _csv(f'{HEADER}\njana@example.org;Frau;;"Jana\rBcc: x@evil.example";Müller;;\n'),
        ("line 2", "'vorname'", "line break", "Bcc: x@evil.example"),
    ),
    "LF in a name": (
        "contacts",
        "contacts.csv",
        _csv('email;nachname\nok@example.org;Ok\njana@example.org;"Mül\nler"\n'),
        ("line 3", "'nachname'", "line break", "'Mül\\nler'"),
    ),
    "script in a name": (
        "contacts",
        "contacts.csv",
        _csv(f"{HEADER}\njana@example.org;;;<script>alert(1)</script>;Müller;;\n"),
        ("line 2", "'<script>alert(1)</script>'", "'<'"),
    ),
    "control character": (
        "contacts",
        "contacts.csv",
        _csv(f"{HEADER}\njana@example.org;;;Jana;Mül\x07ler;;\n"),
        ("line 2", "U+0007", "'nachname'"),
    ),
    "bidi override in organisation": (
        "contacts",
        "contacts.csv",
        _csv(f"{HEADER}\njana@example.org;;;Jana;Müller;Stadt \u202egpj.exe;\n"),
        ("line 2", "U+202E", "'organisation'"),
    ),
    "angle brackets in an extra column": (
        "contacts",
        "contacts.csv",
        _csv("email;Abteilung\njana@example.org;<b>Referat</b>\n"),
        ("line 2", "'Abteilung'", "'<b>Referat</b>'"),
    ),
    "overlong name": (
        "contacts",
        "contacts.csv",
        _csv(f"email;nachname\njana@example.org;{'M' * 250}\n"),
        ("line 2", "250 characters", "at most 200"),
    ),
    "row without address": (
        "contacts",
        "contacts.csv",
        _csv(f"{HEADER}\njana@example.org;;;;;;\n;Herr;;Tom;Weiß;;\n"),
        ("line 3", "no email address", "'email'"),
    ),
    "unquoted delimiter": (
        "contacts",
        "contacts.csv",
        _csv(f"{HEADER}\njana@example.org;Frau;;Jana;Müller;Stadt; Amt 3;alle\n"),
        ("line 2", "8 values", "7 columns", "double quotes"),
    ),
    "unclosed quote": (
        "contacts",
        "contacts.csv",
        _csv(f'{HEADER}\njana@example.org;Frau;;Jana;Müller;"Stadt;\n'),
        ("line 2", "broken CSV", "unexpected end of data"),
    ),
    "value under a column without name": (
        "contacts",
        "contacts.csv",
        _csv("email;;nachname\njana@example.org;x;Müller\n"),
        ("line 2", "'x'", "column 2"),
    ),
    "same column twice": (
        "contacts",
        "contacts.csv",
        _csv("email;E-Mail\njana@example.org;jana@example.org\n"),
        ("line 1", "'email' and 'E-Mail'"),
    ),
    "hostile column name": (
        "contacts",
        "contacts.csv",
        _csv("email;<img src=x>\njana@example.org;1\n"),
        ("line 1", "'<img src=x>'"),
    ),
    "empty file": ("contacts", "contacts.csv", b"", ("no contacts", "empty")),
    "only blank lines": ("contacts", "contacts.csv", b"\r\n \r\n", ("no contacts",)),
    "header only": (
        "contacts",
        "contacts.csv",
        _csv(f"{HEADER}\n;;;;;;\n"),
        ("no contacts", "only the header"),
    ),
    "neither UTF-8 nor Windows-1252": (
        "contacts",
        "contacts.csv",
        _csv(f"{HEADER}\n") + b"jana@example.org;;;J\x81na;;;\n",
        ("line 2", "0x81", "CSV UTF-8"),
    ),
    "workbook saved as .csv": (
        "contacts",
        "contacts.csv",
        xlsx_bytes(["email"], ["jana@example.org"]),
        ("Excel workbook", ".xlsx"),
    ),
    "broken xlsx bytes": (
        "contacts",
        "contacts.xlsx",
        b"PK\x03\x04 this is not really a workbook",
        ("cannot read the Excel workbook", "save it again"),
    ),
    "xlsx with invalid address": (
        "contacts",
        "contacts.xlsx",
        xlsx_bytes(["email", "anrede"], ["jana@example.org", "Frau"], ["tom(at)example.org", "X"]),
        ("row 3", "'tom(at)example.org'", "'X'"),
    ),
    "unsupported format": (
        "contacts",
        "contacts.ods",
        b"whatever",
        (".ods", ".xlsx"),
    ),
    "invalid line in optout.txt": (
        "optout",
        "optout.txt",
        _csv("# Abmeldungen\njana@example.org\nnicht mehr anschreiben\n"),
        ("line 3", "'nicht mehr anschreiben'", "one complete address per line"),
    ),
    "invalid address in attendance column": (
        "attendance",
        "verwaltung.csv",
        _csv("Name,Email\nJana,jana@example.org\nTom,tom@\n"),
        ("verwaltung.csv", "line 3", "'tom@'"),
    ),
    "attendance file for unknown event": (
        "attendance",
        "verwaltnug.csv",
        _csv("jana@example.org\n"),
        ("verwaltnug.csv", "'verwaltnug' is not an event id", "verwaltung, kreislaufwirtschaft"),
    ),
    "attendance as workbook": (
        "attendance",
        "verwaltung.xlsx",
        xlsx_bytes(["email"], ["jana@example.org"]),
        ("verwaltung.xlsx", "not an attendance list", "CSV"),
    ),
}


def _loader(kind: str, tmp_path: Path, name: str, content: bytes) -> Callable[[], object]:
    if kind == "attendance":
        path = write(tmp_path / "attendance", "", name)
        path.write_bytes(content)
        return lambda: load_attendance(tmp_path, EVENTS)
    path = tmp_path / name
    path.write_bytes(content)
    if kind == "optout":
        return lambda: load_address_list(path)
    return lambda: load(path)


@pytest.mark.parametrize("case", BROKEN.values(), ids=BROKEN.keys())
def test_broken_input_is_a_config_error(tmp_path: Path, case: Case) -> None:
    kind, name, content, expected = case
    with pytest.raises(ConfigError) as caught:
        _loader(kind, tmp_path, name, content)()
    text = str(caught.value)
    assert name in text and str(tmp_path) in text, text
    for fragment in expected:
        assert fragment in text, f"{fragment!r} not in:\n{text}"


def test_all_problems_of_a_file_are_reported(tmp_path: Path) -> None:
    text = (
        f"{HEADER}\n"
        "jana@example.org;Frau;;Jana;Müller;;alle\n"
        "tom@;Herr;;Tom;Weiß;;\n"
        "kim@example.org;Dr.;;Kim;Schäfer;;forschung,zukunft\n"
        'lena@example.org;Frau;;Lena;"Hoff\nmann";;\n'
        ";Frau;;Maria;König;;\n"
    )
    with pytest.raises(ConfigError) as caught:
        load(write(tmp_path, text))
    problems = caught.value.problems
    assert [p.line for p in problems] == [3, 4, 4, 5, 7]
    rendered = str(caught.value)
    for fragment in ("'tom@'", "'Dr.'", "'zukunft'", "line break", "no email address"):
        assert fragment in rendered


def test_xlsx_problems_name_the_row_and_sheet(tmp_path: Path) -> None:
    path = tmp_path / "contacts.xlsx"
    path.write_bytes(
        xlsx_bytes(
            ["email", "nachname"],
            ["bad", "Müller"],
            ["ok@example.org", "Mül\nler"],
            sheets=("Kontakte", "Alt"),
        )
    )
    with pytest.raises(ConfigError) as caught:
        load(path)
    first, second = caught.value.problems
    assert str(first).startswith(f"{path}: sheet 'Kontakte', row 2: invalid email address 'bad'")
    assert "row 3" in str(second) and "line break" in str(second)


def test_many_problems_are_capped(tmp_path: Path) -> None:
    rows = "".join(f"person{i}@\n" for i in range(MAX_PROBLEMS + 50))
    with pytest.raises(ConfigError) as caught:
        load(write(tmp_path, "email\n" + rows))
    problems = caught.value.problems
    assert len(problems) == MAX_PROBLEMS + 1
    assert "50 more problems" in str(problems[-1])


def test_config_error_is_a_value_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no contacts"):
        load(write(tmp_path, ""))


@pytest.mark.slow
def test_hundred_thousand_rows(tmp_path: Path) -> None:
    path = tmp_path / "contacts.csv"
    with path.open("w", encoding="utf-8", newline="") as out:
        out.write(f"{HEADER};Abteilung\n")
        for i in range(100_000):
            out.write(
                f'p{i}@stadt{i % 97}.example.org;Frau;Dr.;Jana;Müller {i};"Stadt; Amt {i % 9}";'
                f"verwaltung,allianzen;Referat {i % 7}\n"
            )
    started = time.perf_counter()
    contacts = load(path)
    elapsed = time.perf_counter() - started
    assert len(contacts) == 100_000
    assert contacts.by_key(f"p99999@stadt{99999 % 97}.example.org") is not None
    # About 3 s on a laptop; the bound only catches accidental quadratic work.
    assert elapsed < 30


def test_key_is_the_lower_cased_address_and_follows_changes() -> None:
    contact = Contact(email="Jana.Mueller@Example.org")
    assert contact.key == "jana.mueller@example.org"
    assert replace(contact, email="JM@example.org").key == "jm@example.org"
    assert Contact(email="jm@example.org").key == "jm@example.org"
    # The key is derived: it takes no part in equality beyond the address.
    assert contact == Contact(email="Jana.Mueller@Example.org")
