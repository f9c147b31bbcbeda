"""A corpus of broken and hostile organiser input.

Each case copies the shipped config, breaks one thing, runs ``invite-mailer
validate`` and ``send-due`` as a user would, and expects: exit code 1, a
message naming the file (and the line where one exists) and the problem, and
nothing sent.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from support.cli import run

ROOT = Path(__file__).resolve().parent.parent

Mutation = Callable[[Path], None]


@dataclass(frozen=True)
class Case:
    id: str
    mutate: Mutation
    file: str  # file name the message must name
    expect: str  # regex the message must match
    line: int | None = None  # line the message must name
    env: tuple[tuple[str, str], ...] = ()


def edit(name: str, old: str, new: str, count: int = 1) -> Mutation:
    def apply(root: Path) -> None:
        path = root / name
        text = path.read_text(encoding="utf-8")
        assert old in text, f"{old!r} not in {name}"
        path.write_text(text.replace(old, new, count), encoding="utf-8")

    return apply


def write(name: str, content: str | bytes) -> Mutation:
    def apply(root: Path) -> None:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")

    return apply


def remove(name: str) -> Mutation:
    return lambda root: (root / name).unlink()


def append_contact(row: str) -> Mutation:
    def apply(root: Path) -> None:
        path = root / "config/contacts.csv"
        path.write_text(path.read_text(encoding="utf-8") + row + "\n", encoding="utf-8")

    return apply


def line_of(name: str, needle: str) -> int:
    text = (ROOT / name).read_text(encoding="utf-8")
    for number, line in enumerate(text.splitlines(), start=1):
        if needle in line:
            return number
    raise AssertionError(f"{needle!r} not in {name}")


SERIES = "config/series.yaml"
SETTINGS = "config/settings.toml"
CONTACTS = "config/contacts.csv"
FIRST_DATE = line_of(SERIES, "date: 2024-11-14")
CONTACT_ROWS = len((ROOT / CONTACTS).read_text(encoding="utf-8").splitlines())

CASES = [
    # --- series.yaml
    Case(
        "yaml-syntax",
        edit(SERIES, "  - id: allianzen", "  - id: allianzen\n   oops: [1, 2"),
        "series.yaml",
        r"YAML syntax error",
    ),
    Case(
        "yaml-tab",
        edit(SERIES, '    start: "14:00"', '\tstart: "14:00"'),
        "series.yaml",
        r"YAML syntax error",
    ),
    Case(
        "missing-date",
        edit(SERIES, "    date: 2024-11-14\n", ""),
        "series.yaml",
        r"events\[verwaltung\]\.date' is missing",
    ),
    Case(
        "impossible-date",
        edit(SERIES, "date: 2024-11-14", "date: 2024-11-31"),
        "series.yaml",
        r"date.*(day|range)",
        FIRST_DATE,
    ),
    Case(
        "end-before-start",
        edit(SERIES, 'end: "16:00"', 'end: "13:00"'),
        "series.yaml",
        r"end 13:00 is not after start 14:00",
    ),
    Case(
        "bad-clock",
        edit(SERIES, 'start: "14:00"', 'start: "25:00"'),
        "series.yaml",
        r"not a valid time of day",
    ),
    Case(
        "unknown-timezone",
        edit(SERIES, "timezone: Europe/Berlin", "timezone: Europe/Bärlin"),
        "series.yaml",
        r"unknown time zone 'Europe/Bärlin'",
        line_of(SERIES, "timezone:"),
    ),
    Case(
        "bad-duration",
        edit(SERIES, "before: 1 day", "before: 1 fortnight"),
        "series.yaml",
        r"unknown unit 'fortnight'",
    ),
    Case(
        "duplicate-event-id",
        edit(SERIES, "id: allianzen", "id: verwaltung"),
        "series.yaml",
        r"two events have the id 'verwaltung'",
    ),
    Case(
        "duplicate-key",
        edit(SERIES, "timezone: Europe/Berlin", "timezone: Europe/Berlin\ntimezone: UTC"),
        "series.yaml",
        r"key 'timezone' appears twice",
    ),
    Case(
        "unknown-key",
        edit(
            SERIES,
            "    join_url: https://example.org/transferreihe/allianzen",
            "    joinurl: https://example.org/transferreihe/allianzen",
        ),
        "series.yaml",
        r"unknown key 'events\[allianzen\]\.joinurl'",
    ),
    Case(
        "bad-url",
        edit(
            SERIES,
            "join_url: https://example.org/transferreihe/forschung",
            "join_url: example dot org",
        ),
        "series.yaml",
        r"join_url",
    ),
    Case(
        "missing-material-file",
        edit(
            SERIES,
            "    materials: []",
            "    materials: [{title: Folien, file: materials/folien.pdf}]",
        ),
        "series.yaml",
        r"material file 'materials/folien.pdf' of event 'verwaltung' not found",
    ),
    Case(
        "bad-send-at",
        edit(SERIES, 'send_at: "2024-10-24 10:00"', 'send_at: "next thursday"'),
        "series.yaml",
        r"not a date and time",
    ),
    Case("missing-series", remove(SERIES), "series.yaml", r"file not found"),
    # --- settings.toml
    Case(
        "toml-syntax",
        edit(SETTINGS, 'host = "localhost"', "host = localhost"),
        "settings.toml",
        r"TOML syntax error",
        line_of(SETTINGS, 'host = "localhost"'),
    ),
    Case(
        "unknown-setting",
        edit(SETTINGS, "port = 587", "port = 587\nprot = 25"),
        "settings.toml",
        r"unknown setting 'smtp.prot'",
    ),
    Case(
        "password-in-file",
        edit(SETTINGS, 'username = ""', 'username = "u"\npassword = "secret"'),
        "settings.toml",
        r"password must not be written into the settings file",
    ),
    Case(
        "bad-port",
        edit(SETTINGS, "port = 587", 'port = "abc"'),
        "settings.toml",
        r"smtp.port",
        line_of(SETTINGS, "port = 587"),
    ),
    Case(
        "bad-transport",
        edit(SETTINGS, 'kind = "outbox"', 'kind = "pigeon"'),
        "settings.toml",
        r"transport.kind",
    ),
    Case(
        "bad-env",
        lambda root: None,
        "settings.toml",
        r"smtp.port.*environment variable INVITE_MAILER_SMTP__PORT",
        env=(("INVITE_MAILER_SMTP__PORT", "not-a-port"),),
    ),
    Case(
        "header-in-sender",
        edit(
            SETTINGS,
            'address = "KomKomIn Transferreihe <transferreihe@example.org>"',
            'address = "KomKomIn <x@example.org>\\r\\nBcc: victim@example.com"',
        ),
        "settings.toml",
        r"sender.address",
    ),
    # --- contacts
    Case(
        "invalid-address",
        append_contact("not-an-address;Frau;;Eva;Fehler;Org;"),
        "contacts.csv",
        r"not-an-address",
        CONTACT_ROWS + 1,
    ),
    Case(
        "unknown-event",
        append_contact("eva@example.org;Frau;;Eva;Neu;Org;verwaltung,sommerfest"),
        "contacts.csv",
        r"sommerfest",
        CONTACT_ROWS + 1,
    ),
    Case(
        "bad-anrede",
        append_contact("eva@example.org;Madame;;Eva;Neu;Org;"),
        "contacts.csv",
        r"Madame",
        CONTACT_ROWS + 1,
    ),
    Case(
        "crlf-in-name",
        append_contact('eva@example.org;Frau;;"Eva\r\nBcc: victim@example.com";Neu;Org;'),
        "contacts.csv",
        r"(control|line break|newline|CR|LF)",
    ),
    Case(
        "script-in-name",
        append_contact("eva@example.org;Frau;;<script>alert(1)</script>;Neu;Org;"),
        "contacts.csv",
        r"(<|>|script)",
    ),
    Case(
        "header-injection-address",
        append_contact('"eva@example.org\r\nBcc: victim@example.com";Frau;;Eva;Neu;Org;'),
        "contacts.csv",
        r"eva@example.org",
    ),
    Case(
        "missing-email-column",
        edit(CONTACTS, "email;anrede", "mail_adresse;anrede"),
        "contacts.csv",
        r"email",
    ),
    Case("empty-contacts", write(CONTACTS, ""), "contacts.csv", r"(no contacts|empty)"),
    Case(
        "optout-invalid",
        write("config/optout.txt", "ok@example.org\nkaputt\n"),
        "optout.txt",
        r"kaputt",
        2,
    ),
    Case(
        "attendance-unknown-event",
        write("config/attendance/sommerfest.csv", "email\na@example.org\n"),
        "sommerfest.csv",
        r"sommerfest",
    ),
    # --- templates
    Case(
        "template-syntax",
        edit("templates/email/invitation.txt.j2", "{{", "{{ {%", 1),
        "invitation.txt.j2",
        r"(syntax|unexpected|expected)",
    ),
    Case(
        "template-undefined",
        edit("templates/email/reminder.txt.j2", "{{", "{{ no_such_variable }}{{", 1),
        "reminder.txt.j2",
        r"no_such_variable",
    ),
    Case(
        "oversized-attachment",
        lambda root: (
            (
                write("config/materials/big.pdf", b"%PDF" + b"0" * (6 * 1024 * 1024))(root),
                edit(
                    SERIES,
                    "    materials: []",
                    "    materials: [{title: Folien, file: materials/big.pdf}]",
                )(root),
            )
            and None
        ),
        "big.pdf",
        r"(link|url)",
    ),
]


@pytest.mark.slow
def test_shipped_config_is_valid(project: Path) -> None:
    code, output = run(["validate"])
    assert code == 0, output
    assert "OK" in output


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_reported_and_nothing_sent(project: Path, case: Case) -> None:
    case.mutate(project)
    env = dict(case.env)
    code, output = run(["validate"], env)
    assert code == 1, output
    assert "Traceback" not in output
    assert case.file in output, output
    assert re.search(case.expect, output), output
    if case.line is not None:
        assert re.search(rf"{re.escape(case.file)}, (line|row) {case.line}\b", output), output
    assert "hint:" in output or "hint" in output.lower(), output

    code, output = run(["send-due", "--now", "2024-11-13T15:00"], env)
    assert code == 1, output
    assert not (project / "outbox").exists() or not any((project / "outbox").iterdir())


def test_all_problems_of_a_file_are_reported_together(project: Path) -> None:
    edit(SERIES, "timezone: Europe/Berlin", "timezone: Mars/Olympus")(project)
    edit(SERIES, 'end: "16:00"', 'end: "13:00"')(project)
    append_contact("kaputt;Frau;;Eva;Neu;Org;")(project)
    code, output = run(["validate"])
    assert code == 1
    assert "Mars/Olympus" in output and "end 13:00" in output and "kaputt" in output
    assert "3 problems found" in output


@pytest.mark.slow
def test_duplicates_and_windows_1252_are_accepted_with_a_warning(project: Path) -> None:
    text = (project / CONTACTS).read_text(encoding="utf-8")
    text += "JANA.MUELLER@example.org;Frau;Dr.;Jana;Müller;Stadt Musterhausen;forschung\n"
    # Windows-1252 has no dotless ı; everything else in the shipped list fits.
    (project / CONTACTS).write_bytes(text.replace("ı", "i").encode("cp1252"))
    code, output = run(["validate"])
    assert code == 0, output
    assert "warning" in output.lower() and "jana.mueller@example.org" in output.lower()


@pytest.mark.parametrize(
    "breakage",
    [
        pytest.param(
            edit(SERIES, "timezone: Europe/Berlin", "timezone: Mars/Olympus"), id="series"
        ),
        pytest.param(edit(SETTINGS, "port = 587", 'port = "abc"'), id="settings"),
    ],
)
def test_templates_are_checked_when_settings_or_series_are_broken(
    project: Path, breakage: Mutation
) -> None:
    """Reading the templates needs neither file: their mistakes come in the same run."""
    breakage(project)
    edit("templates/email/invitation.txt.j2", "{{", "{{ {%", 1)(project)
    code, output = run(["validate"])
    assert code == 1, output
    assert "Traceback" not in output
    assert "invitation.txt.j2" in output and "syntax" in output, output
    assert "2 problems found" in output, output


def test_a_mailing_time_that_cannot_be_computed_is_reported(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The series' limits keep every time computable; should one still overflow,
    the loader names series.yaml instead of failing later, in the plan."""
    from invite_mailer.inputs import config

    def overflowing(series: object) -> None:
        raise OverflowError("date value out of range")

    monkeypatch.setattr(config, "mailing_times", overflowing)
    code, output = run(["validate"])
    assert code == 1, output
    assert "series.yaml" in output, output
    assert "a mailing time of the series cannot be computed: date value out of range" in output
    assert "years 1970 to 9000" in output, output
