"""Hostile config, templates and contact data meet the composer.

Every case here comes from an attack on a running installation: material
files that point outside the config folder, templates that try to escape the
sandbox or exhaust the machine, names that smuggle addresses into ``To:``,
line breaks in values that end up in headers. Each must end in a clear
:class:`ConfigError` (file, line, hint) or in a correct mail, never in a
leaked file, a hang or a traceback.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import datetime
from email import message_from_bytes, policy
from email.headerregistry import Address
from email.utils import getaddresses
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from click.testing import CliRunner

from invite_mailer.cli import cli
from invite_mailer.errors import ConfigError
from invite_mailer.inputs.contacts import Contact
from invite_mailer.inputs.series import Kind, Series, load_series
from invite_mailer.inputs.settings import Settings
from invite_mailer.inputs.settings_file import load_settings
from invite_mailer.mail.compose import Composer
from support.project import copy_project, strip_environment
from support.samples import FIRST_DATE, set_materials

ROOT = Path(__file__).resolve().parents[1]
BERLIN = ZoneInfo("Europe/Berlin")
FOLLOWUP_NOW = datetime(2024, 11, 15, 10, 0, tzinfo=BERLIN)
INVITATION_NOW = datetime(2024, 10, 24, 10, 0, tzinfo=BERLIN)

JANA = Contact(
    email="jana.mueller@example.org",
    anrede="Frau",
    titel="Dr.",
    vorname="Jana",
    nachname="Müller",
    registered_all=True,
)


# --- fixtures ---------------------------------------------------------------------------


@pytest.fixture
def tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the shipped config and templates; returns the config folder."""
    strip_environment(monkeypatch)
    copy_project(tmp_path)
    (tmp_path / "config" / "materials").mkdir()
    return tmp_path / "config"


def templates_of(config: Path) -> Path:
    return config.parent / "templates" / "email"


def settings_of(config: Path) -> Settings:
    return load_settings(config, env_file=None)


def composer_of(config: Path, settings: Settings | None = None) -> Composer:
    return Composer.load(
        settings or settings_of(config),
        load_series(config),
        templates_dir=templates_of(config),
        config_dir=config,
    )


def with_material(config: Path, file: str) -> None:
    set_materials(config, FIRST_DATE, f"      - {{title: Protokoll, file: {file}}}\n")


def single_problem(caught: pytest.ExceptionInfo[ConfigError]) -> str:
    (problem,) = caught.value.problems
    assert problem.hint
    return str(problem)


def all_bytes(composer: Composer, series: Series, contact: Contact = JANA) -> bytes:
    """Every kind for *contact*, as sent."""
    out = []
    for kind in composer.kinds:
        event = None if kind == Kind.INVITATION else series.event("verwaltung")
        message = composer.compose(kind, contact, event=event, now=FOLLOWUP_NOW)
        out.append(message.as_bytes(policy=policy.SMTP))
    return b"".join(out)


# --- material files stay inside config/materials/ ---------------------------------------


def _outside_secret(config: Path) -> str:
    secret = config.parent / "secret.txt"
    secret.write_text("INVITE_MAILER_SMTP__PASSWORD=hunter2\n", encoding="utf-8")
    return str(secret)


@pytest.mark.slow
@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda config: "/proc/self/environ", id="proc-environ"),
        pytest.param(lambda config: "../../../../../../../../etc/passwd", id="traversal"),
        pytest.param(lambda config: "materials/../../secret.txt", id="traversal-via-materials"),
        pytest.param(_outside_secret, id="absolute-path"),
        pytest.param(lambda config: "settings.toml", id="config-file-outside-materials"),
        pytest.param(lambda config: "materials/../settings.toml", id="dotdot-to-settings"),
    ],
)
def test_material_paths_outside_the_materials_folder(tree: Path, make: object) -> None:
    _outside_secret(tree)
    file = make(tree)  # type: ignore[operator]
    with_material(tree, file)
    with pytest.raises(ConfigError) as caught:
        composer_of(tree)
    problem = caught.value.problems[0]
    assert problem.path == tree / "series.yaml"
    lines = problem.path.read_text(encoding="utf-8").splitlines()
    assert problem.line is not None and file in lines[problem.line - 1]
    assert "materials" in str(problem.hint)
    assert "outside" in problem.message or "not inside" in problem.message


@pytest.mark.slow
@pytest.mark.parametrize("target", ["settings.toml", "../secret.txt", "/etc/passwd"])
def test_material_symlink_pointing_outside(tree: Path, target: str) -> None:
    _outside_secret(tree)
    link = tree / "materials" / "protokoll.pdf"
    link.symlink_to(target if target.startswith("/") else Path("..") / target)
    with_material(tree, "materials/protokoll.pdf")
    with pytest.raises(ConfigError) as caught:
        composer_of(tree)
    text = single_problem(caught)
    assert "series.yaml" in text and "protokoll.pdf" in text
    assert "outside" in text


def test_material_symlink_inside_the_folder_is_fine(tree: Path) -> None:
    (tree / "materials" / "echt.pdf").write_bytes(b"%PDF-1.4 echt\n")
    (tree / "materials" / "protokoll.pdf").symlink_to("echt.pdf")
    with_material(tree, "materials/protokoll.pdf")
    composer = composer_of(tree)
    series = load_series(tree)
    message = composer.compose(
        Kind.FOLLOWUP, JANA, event=series.event("verwaltung"), now=FOLLOWUP_NOW
    )
    (part,) = message.iter_attachments()
    assert part.get_filename() == "protokoll.pdf"
    assert part.get_payload(decode=True) == b"%PDF-1.4 echt\n"


def test_special_files_are_not_read(tree: Path) -> None:
    """A FIFO would block for ever, a directory or /dev/zero would never end.

    The files are ordinary when the series is loaded and swapped afterwards,
    as a file may be between two reloads.
    """
    names = ("fifo.pdf", "ordner.pdf", "null.pdf")
    for name in names:
        (tree / "materials" / name).write_bytes(b"%PDF-1.4\n")
    set_materials(
        tree,
        FIRST_DATE,
        "".join(f"      - {{title: {n}, file: materials/{n}}}\n" for n in names),
    )
    series = load_series(tree)
    for name in names:
        (tree / "materials" / name).unlink()
    os.mkfifo(tree / "materials" / "fifo.pdf")
    (tree / "materials" / "ordner.pdf").mkdir()
    (tree / "materials" / "null.pdf").symlink_to("/dev/zero")
    import threading

    outcome: list[BaseException | None] = []

    def load() -> None:
        try:
            Composer.load(
                settings_of(tree), series, templates_dir=templates_of(tree), config_dir=tree
            )
            outcome.append(None)
        except BaseException as exc:  # the test reports what happened
            outcome.append(exc)

    worker = threading.Thread(target=load, daemon=True)
    worker.start()
    worker.join(timeout=30)
    if worker.is_alive():
        # Unblock the reader so the thread can end, then fail.
        fd = os.open(tree / "materials" / "fifo.pdf", os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        pytest.fail("reading the materials blocked on a FIFO")
    (error,) = outcome
    assert isinstance(error, ConfigError)
    messages = [p.message for p in error.problems]
    assert len(messages) == 3, messages
    assert "'materials/fifo.pdf' of 'verwaltung' is not a regular file" in messages[0]
    assert "'materials/ordner.pdf' of 'verwaltung' is not a regular file" in messages[1]
    assert "'materials/null.pdf' of 'verwaltung' lies outside" in messages[2]


@pytest.mark.slow
def test_material_size_is_checked_before_reading(tree: Path) -> None:
    import tracemalloc

    big = tree / "materials" / "gross.pdf"
    with big.open("wb") as file:
        file.truncate(64 * 1024 * 1024)  # sparse: no disk used
    with_material(tree, "materials/gross.pdf")
    settings = settings_of(tree)
    tracemalloc.start()
    try:
        with pytest.raises(ConfigError) as caught:
            composer_of(tree, settings)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    text = single_problem(caught)
    assert "gross.pdf" in text and "64,0 MB" in text
    assert peak < 16 * 1024 * 1024, f"{peak} bytes allocated: the file was read"


def test_validate_refuses_a_secret_material(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tree.parent)
    monkeypatch.setenv("INVITE_MAILER_SMTP__PASSWORD", "geheim-1234")
    with_material(tree, "/proc/self/environ")
    result = CliRunner().invoke(cli, ["validate", "--config", "config"])
    assert result.exit_code == 1, result.output
    assert "series.yaml" in result.output and "/proc/self/environ" in result.output
    assert "Traceback" not in result.output
    assert "geheim-1234" not in result.output


@pytest.mark.parametrize("make", ["fifo", "folder"])
def test_validate_names_a_special_material_for_what_it_is(
    tree: Path, monkeypatch: pytest.MonkeyPatch, make: str
) -> None:
    # Not "not found": the organiser sees the name exists and is the wrong kind of thing.
    monkeypatch.chdir(tree.parent)
    special = tree / "materials" / "folien.pdf"
    special.parent.mkdir(exist_ok=True)
    if make == "fifo":
        os.mkfifo(special)
    else:
        special.mkdir()
    with_material(tree, "materials/folien.pdf")
    result = CliRunner().invoke(cli, ["validate", "--config", "config"])
    assert result.exit_code == 1, result.output
    assert "is not a regular file" in result.output and "not found" not in result.output
    assert "Traceback" not in result.output


# --- templates run in a sandbox, bounded -------------------------------------------------


def put_line(config: Path, name: str, text: str) -> int:
    """Add *text* as a line of the template *name* that is rendered (the first
    of its content block, or the second line); returns its line number."""
    path = templates_of(config) / name
    lines = path.read_text(encoding="utf-8").split("\n")
    blocks = [n for n, line in enumerate(lines) if line.startswith("{% block content %}")]
    at = blocks[0] + 1 if blocks else 1
    lines.insert(at, text)
    path.write_text("\n".join(lines), encoding="utf-8")
    return at + 1


def render_error(config: Path, name: str = "invitation.txt.j2") -> ConfigError:
    """Compose an invitation; the ConfigError it must end in."""
    with pytest.raises(ConfigError) as caught:
        composer = composer_of(config)
        composer.compose(Kind.INVITATION, JANA, event=None, now=INVITATION_NOW)
    return caught.value


ESCAPES = [
    '{{ cycler.__init__.__globals__.os.popen("touch {marker}").read() }}',
    '{{ joiner.__init__.__globals__.os.popen("touch {marker}").read() }}',
    '{{ namespace.__init__.__globals__.os.popen("touch {marker}").read() }}',
    "{{ lipsum.__globals__['os'].popen('touch {marker}').read() }}",
    "{{ self.__init__.__globals__ }}",
    "{{ self._TemplateReference__context }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ contact.__class__.__init__.__globals__ }}",
    "{{ series.__class__.__mro__ }}",
    "{{ paragraphs.__wrapped__.__globals__['os'].popen('touch {marker}').read() }}",
    "{{ (events|first).__class__ }}",
    "{{ range.__self__ }}",
    "{% set x = events.__class__.__base__.__subclasses__() %}{{ x }}",
]


@pytest.mark.parametrize("payload", ESCAPES)
def test_sandbox_escapes_are_template_errors(tree: Path, payload: str) -> None:
    marker = tree.parent / "PWNED"
    line = put_line(tree, "invitation.txt.j2", payload.replace("{marker}", str(marker)))
    error = render_error(tree)
    (problem,) = error.problems
    assert problem.path == templates_of(tree) / "invitation.txt.j2"
    assert problem.line == line
    assert problem.hint and "sandbox" in problem.hint or "unknown" in problem.message
    assert not marker.exists()


def test_validate_does_not_run_commands(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    marker = tree.parent / "PWNED"
    put_line(
        tree,
        "reminder.subject.j2",
        f'{{{{ cycler.__init__.__globals__.os.popen("touch {marker}").read() }}}}',
    )
    monkeypatch.chdir(tree.parent)
    result = CliRunner().invoke(cli, ["validate", "--config", "config"])
    assert result.exit_code == 1, result.output
    assert "reminder.subject.j2, line 2" in result.output
    assert "Traceback" not in result.output
    assert not marker.exists()


@pytest.mark.parametrize(
    "statement",
    [
        "{% include '/etc/passwd' %}",
        "{% include '../../config/settings.toml' %}",
        "{% extends '../../config/settings.toml' %}",
        "{% import '/proc/self/environ' as env %}",
    ],
)
def test_templates_from_outside_the_folder(tree: Path, statement: str) -> None:
    put_line(tree, "invitation.txt.j2", statement)
    with pytest.raises(ConfigError) as caught:
        composer_of(tree)
    assert any(p.path == templates_of(tree) / "invitation.txt.j2" for p in caught.value.problems)


@pytest.mark.parametrize(
    "statement",
    [
        "{% include '../../config/settings.toml' ignore missing %}",
        "{% include contact.extra['datei'] %}",
    ],
)
def test_dynamic_includes_stay_in_the_folder(tree: Path, statement: str) -> None:
    (tree / "settings.toml").write_text(
        (tree / "settings.toml").read_text(encoding="utf-8") + "\n# GEHEIM-4711\n",
        encoding="utf-8",
    )
    put_line(tree, "invitation.txt.j2", statement)
    composer = composer_of(tree)
    contact = Contact(email="a@example.org", extra={"datei": "../../config/settings.toml"})
    try:
        message = composer.compose(Kind.INVITATION, contact, event=None, now=INVITATION_NOW)
    except ConfigError as exc:
        assert "GEHEIM" not in str(exc)
        return
    assert b"GEHEIM-4711" not in message.as_bytes(policy=policy.SMTP)


def test_symlinked_template_leading_outside(tree: Path) -> None:
    secret = tree.parent / "secret.txt"
    secret.write_text("GEHEIM-4711\n", encoding="utf-8")
    (templates_of(tree) / "fuss.j2").symlink_to(secret)
    put_line(tree, "invitation.txt.j2", "{% include 'fuss.j2' %}")
    with pytest.raises(ConfigError) as caught:
        composer = composer_of(tree)
        composer.compose(Kind.INVITATION, JANA, event=None, now=INVITATION_NOW)
    text = str(caught.value)
    assert "fuss.j2" in text and "outside the templates folder" in text
    assert "GEHEIM" not in text


@pytest.mark.parametrize(
    "payload",
    [
        '{{ "x" * 3000000000 }}',
        '{{ 3000000000 * "x" }}',
        "{{ [1] * 3000000000 }}",
        "{{ 9 ** 999999999 }}",
        "{% for i in range(10**9) %}x{% endfor %}",
        "{% for a in range(100000) %}{% for b in range(100000) %}xxxxxxxxxx{% endfor %}"
        "{% endfor %}",
        '{% set ns = namespace(s="xx") %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}'
        "{% endfor %}{{ ns.s|length }}",
        '{% set ns = namespace(s="xx") %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}'
        "{% endfor %}{{ ns.s|length }}",
        '{{ "%999999999s" % "x" }}',
        '{{ "{:999999999}".format("x") }}',
        '{{ "x"|center(3000000000) }}',
        '{{ "x".ljust(3000000000) }}',
        '{{ "x"|indent(3000000000, true) }}',
        '{{ ("x" * 1000)|replace("x", "y" * 1000000) }}',
        '{{ ("x" * 1000).replace("x", "y" * 1000000) }}',
        '{{ range(100000)|join("y" * 100000) }}',
        '{{ "%s"|format("x") ~ "%999999999d"|format(1) }}',
        "{% macro m(n) %}{{ m(n + 1) }}{% endmacro %}{{ m(0) }}",
        "{{ [1]|batch(3000000000, 'x')|list }}",
        "{{ lipsum(1000000000) }}",
        '{{ "{0:{1}}".format("x", 3000000000) }}',
        '{{ "%*s" % (3000000000, "x") }}',
        "{{ [1]|slice(3000000000, 'x')|list }}",
    ],
)
def test_runaway_templates_end_in_a_template_error(tree: Path, payload: str) -> None:
    line = put_line(tree, "invitation.txt.j2", payload)
    started = time.monotonic()
    error = render_error(tree)
    assert time.monotonic() - started < 30
    (problem,) = error.problems
    assert problem.path is not None and problem.path.name in (
        "invitation.txt.j2",
        "layout.txt.j2",
    )
    if "writes more than" not in problem.message:  # where the output stops is not known
        assert problem.path.name == "invitation.txt.j2" and problem.line == line
    assert "too large" in problem.message or "longer than" in problem.message
    assert problem.hint


@pytest.mark.slow
def test_loops_without_output_are_stopped_in_time(
    tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from invite_mailer.inputs import templates

    monkeypatch.setattr(templates, "MAX_RENDER_SECONDS", 0.5)
    put_line(
        tree,
        "invitation.txt.j2",
        "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}",
    )
    started = time.monotonic()
    error = render_error(tree)
    assert time.monotonic() - started < 20
    assert "longer than 0.5 seconds" in str(error)


def test_context_holds_no_secret(tree: Path) -> None:
    """Nothing a template can reach holds the SMTP password or the link secret."""
    from pydantic import SecretStr

    settings = settings_of(tree)
    settings = settings.model_copy(
        update={
            "smtp": settings.smtp.model_copy(update={"password": SecretStr("SMTP-GEHEIM")}),
            "unsubscribe": settings.unsubscribe.model_copy(
                update={"secret": SecretStr("LINK-GEHEIM-0123456789abcdef")}
            ),
            "sender": settings.sender.model_copy(
                update={"unsubscribe_url": "https://example.org/abmelden"}
            ),
        }
    )
    dump = (
        "{% for name in ['contact', 'series', 'events', 'event', 'next_event', "
        "'registered_events', 'attachments', 'unsubscribe_url', 'unsubscribe_mailto', "
        "'unsubscribe_address', 'kind', 'subject', 'salutation'] %}"
        "{{ name }}={{ self._TemplateReference__context.get(name) if false else '' }}"
        "{% endfor %}{{ contact }}{{ series }}{{ events }}{{ event }}{{ next_event }}"
        "{{ registered_events }}{{ attachments }}{{ unsubscribe_url }}"
    )
    put_line(tree, "reminder.txt.j2", dump)
    composer = composer_of(tree, settings)
    series = load_series(tree)
    message = composer.compose(
        Kind.REMINDER, JANA, event=series.event("verwaltung"), now=FOLLOWUP_NOW
    )
    text = message.get_body(preferencelist=("plain",))
    assert text is not None
    content = text.get_content()
    assert "Contact(" in content and "SeriesView(" in content
    assert "SMTP-GEHEIM" not in content and "LINK-GEHEIM" not in content


def test_contact_data_is_never_evaluated(tree: Path) -> None:
    composer = composer_of(tree)
    series = load_series(tree)
    put_line(tree, "invitation.html.j2", "")
    hostile = Contact(
        email="a@example.org",
        anrede="Frau",
        titel="{{ 7*7000 }}",
        vorname="{% for i in range(3) %}Z{% endfor %}",
        nachname="{{ cycler.__init__.__globals__ }}",
        organisation="{{ 6*7111 }}",
        registered_all=True,
    )
    for kind in composer.kinds:
        event = None if kind == Kind.INVITATION else series.event("verwaltung")
        message = composer.compose(kind, hostile, event=event, now=FOLLOWUP_NOW)
        for preference in ("plain", "html"):
            part = message.get_body(preferencelist=(preference,))
            assert part is not None
            content = part.get_content()
            assert "49000" not in content and "ZZZ" not in content and "42666" not in content
            assert "{{ 7*7000 }}" in content


@pytest.mark.slow
def test_contact_fields_and_extra_columns_are_escaped_in_html(tree: Path) -> None:
    tag = '<b onmouseover="x">fett</b>'
    for name in ("invitation", "reminder", "followup", "update", "cancellation"):
        put_line(tree, f"{name}.html.j2", '{{ contact.extra["Funktion"] }}')
    composer = composer_of(tree)
    series = load_series(tree)
    hostile = Contact(
        email="a@example.org",
        anrede="Frau",
        titel=tag,
        vorname=tag,
        nachname=tag,
        organisation=tag,
        registered_all=True,
        extra={"Funktion": tag},
    )
    for kind in composer.kinds:
        event = None if kind == Kind.INVITATION else series.event("verwaltung")
        message = composer.compose(kind, hostile, event=event, now=FOLLOWUP_NOW)
        html = message.get_body(preferencelist=("html",))
        assert html is not None
        content = html.get_content()
        assert "<b " not in content and "fett</b>" not in content, kind
        assert "&lt;b onmouseover=" in content, kind


# --- the To header names exactly one recipient --------------------------------------------

HOSTILE_PIECES = [
    "Mustermann-Schmidt,",
    "victim@evil.example,",
    "(Büro)",
    '"Zitat"',
    "Back\\slash",
    "<x@evil.example>",
    "a;b:c",
    "Wittgenstein",
    "von",
    "Hohenberg",
    "Ünïcödé",
    "Line\r\nBcc: x@evil.example",
    "[1]",
    "=?utf-8?q?x?=",
]


def hostile_name(length: int, ascii_only: bool) -> str:
    pieces = [p for p in HOSTILE_PIECES if p.isascii() or not ascii_only]
    out, n = "", 0
    while len(out) < length:
        out += pieces[n % len(pieces)] + " "
        n += 1
    return out[:length]


def to_addresses(data: bytes) -> tuple[list[tuple[str, str]], list[Address]]:
    """The To header of *data* as getaddresses and as policy.default see it."""
    head = data.split(b"\r\n\r\n", 1)[0]
    parsed = message_from_bytes(head + b"\r\n\r\n", policy=policy.default)
    raw = parsed.get_all("To")
    assert raw is not None and len(raw) == 1
    value = _unfolded(head.decode("utf-8"), "To")
    return getaddresses([value]), list(parsed["To"].addresses)


def compat_addresses(data: bytes, name: str) -> list[str]:
    """The addresses of header *name* the way Python's documentation reads them:
    the default (compat32) parser, then getaddresses(get_all(...))."""
    values = message_from_bytes(data).get_all(name)
    assert values is not None and len(values) == 1, values
    return [spec for _, spec in getaddresses(values)]


def _unfolded(head: str, name: str) -> str:
    lines = head.split("\r\n")
    for number, line in enumerate(lines):
        if line.lower().startswith(name.lower() + ":"):
            value = line.split(":", 1)[1]
            for more in lines[number + 1 :]:
                if not more.startswith((" ", "\t")):
                    break
                value += more
            return value
    raise AssertionError(f"no {name} header")


@pytest.mark.slow
@pytest.mark.parametrize("ascii_only", [True, False], ids=["ascii", "unicode"])
def test_to_header_parses_back_to_one_address(tree: Path, ascii_only: bool) -> None:
    from invite_mailer.core import german
    from invite_mailer.mail.fastwire import WireComposer

    composer = composer_of(tree)
    wires = WireComposer(composer)
    for length in range(1, 301):
        contact = Contact(
            email="max@example.org",
            anrede="Herr",
            titel="Prof. Dr.",
            vorname="Max",
            nachname=hostile_name(length, ascii_only),
        )
        shown = german.full_name(contact.titel, contact.vorname, contact.nachname)
        message = composer.compose(Kind.INVITATION, contact, event=None, now=INVITATION_NOW)
        data = message.as_bytes(policy=policy.SMTP)
        wire = wires.wire(Kind.INVITATION, contact, event=None, now=INVITATION_NOW)
        assert wire.data == data, length
        assert all(len(line) <= 998 for line in data.split(b"\r\n"))
        found, parsed = to_addresses(data)
        assert [spec for _, spec in found] == ["max@example.org"], (length, found)
        assert [a.addr_spec for a in parsed] == ["max@example.org"], (length, parsed)
        assert compat_addresses(data, "To") == ["max@example.org"], length
        if ascii_only and "=?" not in shown:
            assert found[0][0] == shown, length
        assert parsed[0].display_name.replace(" ", "") == shown.replace(" ", ""), length


def test_the_reported_name_stays_quoted(tree: Path) -> None:
    contact = Contact(
        email="max@example.org",
        anrede="Herr",
        titel="Prof. Dr.",
        vorname="Max",
        nachname="Mustermann-Schmidt, victim@evil.example, Wittgenstein von Hohenberg",
    )
    message = composer_of(tree).compose(Kind.INVITATION, contact, event=None, now=INVITATION_NOW)
    data = message.as_bytes(policy=policy.SMTP)
    found, parsed = to_addresses(data)
    assert found == [
        (
            "Prof. Dr. Max Mustermann-Schmidt, victim@evil.example, Wittgenstein von Hohenberg",
            "max@example.org",
        )
    ]
    assert [a.addr_spec for a in parsed] == ["max@example.org"]
    assert b"victim@evil.example" not in data.split(b"<max@example.org>")[1].split(b"\r\n\r\n")[0]


# --- international addresses ---------------------------------------------------------


def test_international_domain_in_ascii_form(tree: Path) -> None:
    from invite_mailer.mail.fastwire import WireComposer

    composer = composer_of(tree)
    contact = Contact(email="info@bücher.de", anrede="Frau", vorname="Jana", nachname="Weiß")
    message = composer.compose(Kind.INVITATION, contact, event=None, now=INVITATION_NOW)
    data = message.as_bytes(policy=policy.SMTP)
    assert (
        WireComposer(composer).wire(Kind.INVITATION, contact, event=None, now=INVITATION_NOW).data
        == data
    )
    assert data.isascii()
    to = _unfolded(data.split(b"\r\n\r\n")[0].decode("ascii"), "To")
    assert "<info@xn--bcher-kva.de>" in to
    assert "=?" not in to.split("<", 1)[1]  # no encoded word inside the address
    found, parsed = to_addresses(data)
    assert [spec for _, spec in found] == ["info@xn--bcher-kva.de"]
    assert [(a.display_name, a.addr_spec) for a in parsed] == [
        ("Jana Weiß", "info@xn--bcher-kva.de")
    ]


def test_international_local_part_is_written_as_utf8(tree: Path) -> None:
    """RFC 6532: the one way to write such an address; only SMTPUTF8 relays take it."""
    from invite_mailer.mail.fastwire import WireComposer

    composer = composer_of(tree)
    contact = Contact(email="jürgen@bücher.de", anrede="Herr", vorname="Jürgen", nachname="Groß")
    message = composer.compose(Kind.INVITATION, contact, event=None, now=INVITATION_NOW)
    data = message.as_bytes(policy=policy.SMTP)
    assert (
        WireComposer(composer).wire(Kind.INVITATION, contact, event=None, now=INVITATION_NOW).data
        == data
    )
    head = data.split(b"\r\n\r\n")[0].decode("utf-8")
    to = _unfolded(head, "To")
    assert "<jürgen@xn--bcher-kva.de>" in to
    assert "=?" not in to.split("<", 1)[1]
    assert getaddresses([to])[0][1] == "jürgen@xn--bcher-kva.de"
    # Every other header stays ASCII.
    assert all(line.isascii() for line in head.split("\r\n") if not line.startswith("To:"))


# --- values from the config files never break a header ------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("title", "Online-\nTransferreihe"),
        ("title", "Online-Transferreihe\r\nBcc: victim@evil.example"),
        ("title", "Online\u2028Transferreihe"),
        ("title", "Online\x00Transferreihe"),
        ("id", "reihe\nBcc: x"),
    ],
)
def test_line_breaks_in_series_values(tree: Path, field: str, value: str) -> None:
    series = load_series(tree).model_copy(update={field: value})
    with pytest.raises(ConfigError) as caught:
        Composer.load(settings_of(tree), series, templates_dir=templates_of(tree), config_dir=tree)
    (problem,) = caught.value.problems
    assert problem.path == tree / "series.yaml"
    assert f"series {field}" in problem.message and "header" in problem.message
    assert problem.hint


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("unsubscribe_url", "https://example.org/abmelden\r\nBcc: victim@evil.example"),
        ("unsubscribe_mailto", "abmeldung@example.org\nBcc: victim@evil.example"),
        ("reply_to", "antwort@example.org\r\n"),
        ("address", "KomKomIn\n <transferreihe@example.org>"),
    ],
)
def test_line_breaks_in_sender_settings(tree: Path, field: str, value: str) -> None:
    settings = settings_of(tree)
    settings = settings.model_copy(
        update={"sender": settings.sender.model_copy(update={field: value})}
    )
    with pytest.raises(ConfigError) as caught:
        composer_of(tree, settings)
    (problem,) = caught.value.problems
    assert problem.path == tree / "settings.toml"
    assert f"[sender] {field}" in problem.message
    assert "line break" in problem.message


def test_validate_reports_a_broken_unsubscribe_url(
    tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tree.parent)
    monkeypatch.setenv(
        "INVITE_MAILER_SENDER__UNSUBSCRIBE_URL", "https://example.org/ab\r\nBcc: x@evil.example"
    )
    monkeypatch.setenv("INVITE_MAILER_UNSUBSCRIBE__SECRET", "0123456789abcdef0123456789abcdef")
    result = CliRunner().invoke(cli, ["validate", "--config", "config"])
    assert result.exit_code == 1, result.output
    assert "unsubscribe_url" in result.output
    assert "Traceback" not in result.output and "ValueError" not in result.output


def test_the_organisers_summary_keeps_its_headers_whole(tree: Path) -> None:
    from dataclasses import replace

    from invite_mailer.core.plan import Mailing, MailingState
    from invite_mailer.inputs.config import load_config
    from invite_mailer.mail.summary import compose_summary

    path = tree / "series.yaml"
    text = path.read_text(encoding="utf-8")
    name = "KomKomIn – Wissenschaftliches Begleitvorhaben"
    assert name in text
    hostile = "Begleitvorhaben Mustermann-Schmidt, victim@evil.example, Wittgenstein von Hohenberg"
    path.write_text(text.replace(name, hostile), encoding="utf-8")
    config = load_config(tree, templates_of(tree), env_file=None)
    events = [
        e.model_copy(update={"title": "Verwaltung\ntransformieren"}) if e.id == "verwaltung" else e
        for e in config.series.events
    ]
    config = replace(config, series=config.series.model_copy(update={"events": events}))
    mailing = Mailing(
        kind=Kind.REMINDER,
        event="verwaltung",
        due=FOLLOWUP_NOW,
        deadline=FOLLOWUP_NOW,
        state=MailingState.DONE,
        audience=(),
        outstanding=(),
        sent=3,
    )
    data = compose_summary(config, mailing, now=FOLLOWUP_NOW).as_bytes(policy=policy.SMTP)
    found, parsed = to_addresses(data)
    assert found == [(hostile, "transferreihe@example.org")]
    assert [a.addr_spec for a in parsed] == ["transferreihe@example.org"]
    assert b"Verwaltung transformieren" in data.split(b"\r\n\r\n")[0].replace(b"\r\n", b"")


# --- the size of a mail is bounded ------------------------------------------------------


@pytest.mark.slow
def test_a_huge_description_is_refused(tree: Path) -> None:
    """Under the render limit (2 million characters), but rich in umlauts, which
    quoted-printable writes as six octets each: the mail would be about 20 MB."""
    from invite_mailer.mail.fastwire import WireComposer

    description = "Größe übergroß äöüß ÄÖÜ. " * 72_000
    series = load_series(tree).model_copy(update={"description": description})
    composer = Composer.load(
        settings_of(tree), series, templates_dir=templates_of(tree), config_dir=tree
    )
    for make in (
        lambda: composer.compose(Kind.INVITATION, JANA, event=None, now=INVITATION_NOW),
        lambda: WireComposer(composer).wire(Kind.INVITATION, JANA, event=None, now=INVITATION_NOW),
    ):
        with pytest.raises(ConfigError) as caught:
            make()
        text = single_problem(caught)
        assert "series.yaml" in text and "invitation mail of the series" in text
        assert "more than the limit of 10,0 MB" in text


def test_a_twenty_megabyte_description_is_refused(tree: Path) -> None:
    series = load_series(tree).model_copy(update={"description": "Text " * 4_000_000})
    composer = Composer.load(
        settings_of(tree), series, templates_dir=templates_of(tree), config_dir=tree
    )
    with pytest.raises(ConfigError) as caught:
        composer.compose(Kind.INVITATION, JANA, event=None, now=INVITATION_NOW)
    text = single_problem(caught)
    assert "too large" in text and "invitation" in text


def test_a_mail_just_under_the_limit_goes_out(tree: Path) -> None:
    description = "Städte, Gemeinden und Regionen im Übergang. " * 2_000
    series = load_series(tree).model_copy(update={"description": description})
    composer = Composer.load(
        settings_of(tree), series, templates_dir=templates_of(tree), config_dir=tree
    )
    message = composer.compose(Kind.INVITATION, JANA, event=None, now=INVITATION_NOW)
    assert len(message.as_bytes(policy=policy.SMTP)) > 100_000


def test_the_mail_size_limit_is_a_setting(tree: Path) -> None:
    description = "Städte, Gemeinden und Regionen im Übergang. " * 2_000
    series = load_series(tree).model_copy(update={"description": description})
    settings = settings_of(tree)
    settings = settings.model_copy(
        update={"limits": settings.limits.model_copy(update={"max_message_bytes": 100_000})}
    )
    composer = Composer.load(settings, series, templates_dir=templates_of(tree), config_dir=tree)
    with pytest.raises(ConfigError) as caught:
        composer.compose(Kind.INVITATION, JANA, event=None, now=INVITATION_NOW)
    assert "limits.max_message_bytes" in single_problem(caught)


def test_many_material_files_are_refused(tree: Path) -> None:
    entries = []
    for n in range(30):
        (tree / "materials" / f"teil{n}.pdf").write_bytes(b"%PDF-1.4\n")
        entries.append(f"      - {{title: Teil {n}, file: materials/teil{n}.pdf}}\n")
    set_materials(tree, FIRST_DATE, "".join(entries))
    with pytest.raises(ConfigError) as caught:
        composer_of(tree)
    text = single_problem(caught)
    assert "30 material files" in text and "url:" in text


# --- a test mail has a Message-ID of its own -----------------------------------------------


def test_a_sample_gets_its_own_message_id(tree: Path) -> None:
    composer = composer_of(tree)
    series = load_series(tree)
    event = series.event("verwaltung")
    real = composer.compose(Kind.REMINDER, JANA, event=event, now=FOLLOWUP_NOW)
    delivery_id = composer.message_id(Kind.REMINDER, JANA, event)
    assert real["Message-ID"] == delivery_id

    first = composer.fresh_message_id()
    second = composer.fresh_message_id()
    assert first != second and delivery_id not in (first, second)
    sample = composer.compose(Kind.REMINDER, JANA, event=event, now=FOLLOWUP_NOW, message_id=first)
    assert sample["Message-ID"] == first
    data = sample.as_bytes(policy=policy.SMTP)
    assert delivery_id.encode() not in data
    # Boundaries follow the Message-ID too, so nothing of the delivery is reused.
    assert real.get_boundary() != sample.get_boundary()
    parsed = message_from_bytes(data, policy=policy.default)
    assert parsed["Message-ID"] == first
    assert first.endswith("@example.org>")


def test_control_characters_of_contact_data_stay_out_of_headers(tree: Path) -> None:
    composer = composer_of(tree)
    contact = Contact(
        email="a@example.org", anrede="Frau", vorname="Jana\x9b31m", nachname="Müller\x85\x07"
    )
    message = composer.compose(Kind.INVITATION, contact, event=None, now=INVITATION_NOW)
    data = message.as_bytes(policy=policy.SMTP)
    _, parsed = to_addresses(data)
    assert [a.display_name for a in parsed] == ["Jana31m Müller"]
    text = message.get_body(preferencelist=("plain",))
    assert text is not None
    assert not any(0x80 <= ord(c) <= 0x9F or ord(c) < 0x09 for c in text.get_content())


def test_ordinary_template_expressions_still_work(tree: Path) -> None:
    """The bounds refuse only what is huge: numbers, formats, joins and loops of
    an ordinary template render as before."""
    line = (
        '{{ "Tel: 0301234567 %s" % "x" }}|{{ "{:.2f}".format(2.5) }}|{{ "ab" * 3 }}|'
        "{{ 2 ** 10 }}|{{ range(3)|join(',') }}|{{ [1, 2, 3]|batch(2)|list|length }}|"
        '{{ "x"|center(5) }}|{% for i in range(3) %}{{ loop.index }}{% endfor %}|'
        "{{ (events|first).title[:10] }}|{{ lipsum(1, false)|length > 0 }}"
    )
    put_line(tree, "invitation.txt.j2", line)
    message = composer_of(tree).compose(Kind.INVITATION, JANA, event=None, now=INVITATION_NOW)
    text = message.get_body(preferencelist=("plain",))
    assert text is not None
    assert (
        "Tel: 0301234567 x|2.50|ababab|1024|0,1,2|2|  x  |123|Verwaltung|True" in text.get_content()
    )


@pytest.mark.slow
@pytest.mark.parametrize("kind", [Kind.INVITATION, Kind.REMINDER, Kind.FOLLOWUP])
def test_both_paths_agree_on_hostile_recipients(tree: Path, kind: Kind) -> None:
    from invite_mailer.mail.fastwire import WireComposer

    (tree / "materials" / "protokoll.pdf").write_bytes(b"%PDF-1.4\n" * 100)
    with_material(tree, "materials/protokoll.pdf")
    composer = composer_of(tree)
    wires = WireComposer(composer)
    event = None if kind == Kind.INVITATION else load_series(tree).event("verwaltung")
    contacts = [
        Contact(email="info@bücher.de", vorname="Jana", nachname="Weiß", registered_all=True),
        Contact(email="jürgen@bücher.de", vorname="Jürgen", nachname="Groß", registered_all=True),
        *(
            Contact(
                email=f"kontakt{n}@example.org",
                titel="Prof. Dr.",
                vorname="Max",
                nachname=hostile_name(n, ascii_only=n % 2 == 0),
                registered_all=True,
            )
            for n in range(40, 200, 7)
        ),
    ]
    for contact in contacts:
        expected = composer.compose(kind, contact, event=event, now=FOLLOWUP_NOW)
        wire = wires.wire(kind, contact, event=event, now=FOLLOWUP_NOW)
        assert wire.data == expected.as_bytes(policy=policy.SMTP), contact
    assert not wires.notes


def test_a_broken_link_among_the_templates(tree: Path) -> None:
    (templates_of(tree) / "alt.txt.j2").symlink_to(tree.parent / "gibt-es-nicht.j2")
    with pytest.raises(ConfigError) as caught:
        composer_of(tree)
    assert any(
        p.path == templates_of(tree) / "alt.txt.j2" and "cannot be read" in p.message
        for p in caught.value.problems
    ), caught.value


def test_a_fifo_among_the_templates(tree: Path) -> None:
    import threading

    os.mkfifo(templates_of(tree) / "leitung.txt.j2")
    outcome: list[BaseException | None] = []

    def load() -> None:
        try:
            composer_of(tree)
            outcome.append(None)
        except BaseException as exc:  # the test reports what happened
            outcome.append(exc)

    worker = threading.Thread(target=load, daemon=True)
    worker.start()
    worker.join(timeout=30)
    if worker.is_alive():
        os.close(os.open(templates_of(tree) / "leitung.txt.j2", os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("loading the templates blocked on a FIFO")
    (error,) = outcome
    assert isinstance(error, ConfigError)
    assert any("not a regular file" in p.message for p in error.problems), error


@pytest.mark.slow
@pytest.mark.parametrize("length", [76, 77, 78, 500, 899, 900, 1200, 3000])
def test_a_name_of_one_long_word(tree: Path, length: int) -> None:
    from invite_mailer.mail.fastwire import WireComposer

    composer = composer_of(tree)
    contact = Contact(email="max@example.org", vorname="X,", nachname="a" * length)
    data = composer.compose(Kind.INVITATION, contact, event=None, now=INVITATION_NOW).as_bytes(
        policy=policy.SMTP
    )
    assert (
        WireComposer(composer).wire(Kind.INVITATION, contact, event=None, now=INVITATION_NOW).data
        == data
    )
    assert all(len(line) <= 998 for line in data.split(b"\r\n"))
    found, parsed = to_addresses(data)
    assert [spec for _, spec in found] == ["max@example.org"]
    assert [a.addr_spec for a in parsed] == ["max@example.org"]
    assert compat_addresses(data, "To") == ["max@example.org"]
    assert parsed[0].display_name.replace(" ", "") == "X," + "a" * length


# --- the materials folder itself, hard links ----------------------------------------------


@pytest.mark.slow
def test_a_materials_folder_that_is_a_link_outside_the_config(
    tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # /proc/self/environ holds the SMTP password; its stat size is 0.
    monkeypatch.setenv("INVITE_MAILER_SMTP__PASSWORD", "geheim-5678")
    (tree / "materials").rmdir()
    (tree / "materials").symlink_to("/proc/self")
    with_material(tree, "materials/environ")
    with pytest.raises(ConfigError) as caught:
        composer_of(tree)
    text = single_problem(caught)
    assert "series.yaml" in text and "materials/environ" in text
    assert "outside" in text and "geheim-5678" not in text
    monkeypatch.chdir(tree.parent)
    result = CliRunner().invoke(cli, ["validate", "--config", "config"])
    assert result.exit_code == 1, result.output
    assert "materials/environ" in result.output and "Traceback" not in result.output


@pytest.mark.slow
def test_a_materials_folder_linked_to_a_folder_outside(tree: Path) -> None:
    outside = tree.parent / "anderswo"
    outside.mkdir()
    (outside / "folien.pdf").write_bytes(b"%PDF-1.4 fremd\n")
    (tree / "materials").rmdir()
    (tree / "materials").symlink_to(outside)
    with_material(tree, "materials/folien.pdf")
    with pytest.raises(ConfigError) as caught:
        composer_of(tree)
    assert "outside" in single_problem(caught)


@pytest.mark.slow
def test_a_hard_link_is_not_attached(tree: Path) -> None:
    secret = tree.parent / "passwd"
    secret.write_text("root:x:0:0:root:/root:/bin/bash\n", encoding="utf-8")
    os.link(secret, tree / "materials" / "passwd.pdf")
    with_material(tree, "materials/passwd.pdf")
    with pytest.raises(ConfigError) as caught:
        composer_of(tree)
    text = single_problem(caught)
    assert "passwd.pdf" in text and "is a hard link to another file" in text
    assert "copy the file into materials/ instead" in text


@pytest.mark.slow
def test_ordinary_and_linked_materials_inside_the_folder_still_work(tree: Path) -> None:
    (tree / "materials" / "folien.pdf").write_bytes(b"%PDF-1.4 folien\n")
    (tree / "materials" / "echt.pdf").write_bytes(b"%PDF-1.4 echt\n")
    (tree / "materials" / "protokoll.pdf").symlink_to("echt.pdf")
    set_materials(
        tree,
        FIRST_DATE,
        "      - {title: Folien, file: materials/folien.pdf}\n"
        "      - {title: Protokoll, file: materials/protokoll.pdf}\n",
    )
    series = load_series(tree)
    message = composer_of(tree).compose(
        Kind.FOLLOWUP, JANA, event=series.event("verwaltung"), now=FOLLOWUP_NOW
    )
    attached = {p.get_filename(): p.get_payload(decode=True) for p in message.iter_attachments()}
    assert attached == {"folien.pdf": b"%PDF-1.4 folien\n", "protokoll.pdf": b"%PDF-1.4 echt\n"}


# --- templates that would take the machine: bounded before the work is done ----------------

CHILD_MEMORY = 1024 * 1024 * 1024


def validate_in_child(config: Path) -> tuple[subprocess.CompletedProcess[str], float]:
    """``invite-mailer validate`` as its own process, its memory capped at 1 GB."""
    import resource

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (CHILD_MEMORY, CHILD_MEMORY))

    env = {k: v for k, v in os.environ.items() if not k.startswith("INVITE_MAILER_")}
    started = time.monotonic()
    try:
        result = subprocess.run(
            [
                str(Path(sys.executable).with_name("invite-mailer")),
                "validate",
                "--config",
                "config",
            ],
            cwd=config.parent,
            env=env,
            preexec_fn=cap,
            capture_output=True,
            text=True,
            timeout=60,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("validate did not end within 60 seconds")
    return result, time.monotonic() - started


@pytest.mark.slow
@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(
            "{% set ns = namespace(x=10) %}{% for i in range(40) %}{% set ns.x = ns.x * ns.x %}"
            "{% endfor %}{{ ns.x > 5 }}",
            id="squaring",
        ),
        pytest.param(
            "{% set ns = namespace(x=3) %}{% for i in range(40) %}{% set ns.x = ns.x * ns.x * 7 %}"
            "{% endfor %}{{ ns.x > 5 }}",
            id="squaring-times",
        ),
        pytest.param(
            '{{ range(5000)|map("string")|map("center", 2000000)|list|length }}', id="map-center"
        ),
        pytest.param('{{ "{x:>{w}}".format_map({"x": 1, "w": 3000000000}) }}', id="format-map"),
        pytest.param('{{ "{x:.{w}f}".format_map({"x": 1, "w": 3000000000}) }}', id="format-prec"),
        pytest.param(
            '{{ range(100000)|map("string")|join("x" * 30000)|length }}', id="join-generator"
        ),
        pytest.param(
            '{{ ("\\n" * 50000) | indent("y" * 50000, true, true) | length }}', id="indent-lines"
        ),
        pytest.param(
            '{{ range(5000)|map("string")|map("indent", "y" * 1000000, true)|list|length }}',
            id="map-indent",
        ),
        pytest.param('{{ ("a " * 500000)|wordwrap(1, true, "y" * 100000)|length }}', id="wordwrap"),
        pytest.param("{{ ([[0] * 1000000] * 2000)|sum(start=[])|length }}", id="sum-lists"),
        pytest.param('{{ ("a.de " * 400000)|urlize(target="x" * 100000)|length }}', id="urlize"),
        pytest.param(
            '{{ range(5000)|map("string")|map("replace", "", "y" * 1000000)|list|length }}',
            id="map-replace",
        ),
        pytest.param('{{ "%*s"|format(3000000000, "x") }}', id="format-star"),
        pytest.param(
            '{{ ("%(a)s" * 100000) % {"a": "x" * 2000000} }}', id="percent-mapping-repeated"
        ),
        pytest.param('{{ ("{0}" * 100000).format("x" * 2000000) }}', id="format-repeated"),
        pytest.param('{{ [("x" * 2000000)] * 2000000 }}', id="list-of-long-texts"),
        pytest.param('{{ [1]|batch(100000, "x" * 1000000)|list }}', id="batch-fill"),
        pytest.param('{{ ("x" * 1000)|heading("y" * 1000000) }}', id="heading-mark"),
    ],
)
def test_bombs_end_in_a_template_error_within_a_memory_cap(tree: Path, payload: str) -> None:
    line = put_line(tree, "invitation.txt.j2", payload)
    result, took = validate_in_child(tree)
    out = result.stdout + result.stderr
    assert result.returncode == 1, out
    assert "invitation.txt.j2" in out and f"line {line}" in out, out
    assert "too large" in out, out
    assert "Traceback" not in out and "MemoryError" not in out, out
    assert took < 30, took


@pytest.mark.parametrize(
    "payload",
    [
        "{{ (10 ** 900) * (10 ** 900) > 5 }}",
        '{{ "ab"|center(30) }}|{{ ("a\\nb")|indent(4, true) }}|{{ [1, 2, 3]|join(", ") }}',
        '{{ "{x:>{w}}".format_map({"x": 1, "w": 8}) }}|{{ "%5s"|format("x") }}',
        '{{ range(3)|map("string")|join("-") }}|{{ [[1], [2]]|sum(start=[]) }}',
        '{{ "eins zwei drei"|wordwrap(5) }}|{{ "https://example.org"|urlize }}',
        '{{ "abc"|replace("b", "xx") }}|{{ "lang"|truncate(9) }}|{{ 12345|filesizeformat }}',
        "{{ [1, 2, 3, 4]|batch(2)|list }}|{{ [1, 2, 3, 4]|slice(2)|list }}|{{ 2 ** 10 }}",
    ],
)
def test_bounded_filters_and_numbers_still_work(tree: Path, payload: str) -> None:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    from invite_mailer.inputs.templates import environment

    expected = ImmutableSandboxedEnvironment().from_string(payload).render()
    assert environment(templates_of(tree)).from_string(payload).render() == expected


# --- a quoted name is never folded inside its quotes -----------------------------------

SPECIALS = '",<>()@;:\\'


def special_names(length: int) -> list[str]:
    """Names of *length* characters full of specials, with and without spaces."""
    dense = ("a" + " ".join(SPECIALS) + " b") * (length // 10 + 1)
    words = ("Wort" + SPECIALS + " x@evil.example, ") * (length // 20 + 1)
    tail = "a " + "b" * max(0, length - 20) + '">,c@evil.example'
    return [dense[:length].strip() or "a", words[:length].strip() or "a", tail[-length:]]


@pytest.mark.slow
def test_from_to_and_reply_to_with_specials_parse_back_to_one_address() -> None:
    from email.message import EmailMessage

    from invite_mailer.mail.mime import POLICY

    for length in range(1, 301):
        for name in special_names(length):
            message = EmailMessage(policy=POLICY)
            for header in ("From", "To", "Reply-To"):
                message[header] = Address(display_name=name, addr_spec="h14@example.org")
            data = message.as_bytes(policy=policy.SMTP) + b"\r\n"
            assert all(len(line) <= 998 for line in data.split(b"\r\n"))
            parsed = message_from_bytes(data, policy=policy.default)
            for header in ("From", "To", "Reply-To"):
                assert compat_addresses(data, header) == ["h14@example.org"], (header, name)
                (address,) = parsed[header].addresses
                assert address.addr_spec == "h14@example.org", (header, name)
                assert address.display_name == name, (header, name)


@pytest.mark.slow
def test_a_contact_row_that_would_smuggle_addresses(
    tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The loader refuses < and > in names; a comma is ordinary.
    monkeypatch.chdir(tree.parent)
    row = "h14@example.org;;;a;" + "b" * 150 + ",c@evil.example;Org;alle"
    with (tree / "contacts.csv").open("a", encoding="utf-8") as file:
        file.write(row + "\n")
    result = CliRunner().invoke(
        cli, ["send-due", "--config", "config", "--now", "2024-10-24T10:05"]
    )
    assert result.exit_code == 0, result.output
    found = []
    for path in (tree.parent / "outbox").rglob("*.eml"):
        data = path.read_bytes()
        if b"h14@example.org" in data:
            found.append(data)
    (data,) = found
    assert compat_addresses(data, "To") == ["h14@example.org"]
    (address,) = message_from_bytes(data, policy=policy.default)["To"].addresses
    assert address.addr_spec == "h14@example.org"
    assert address.display_name == "a " + "b" * 150 + ",c@evil.example"


@pytest.mark.system
def test_the_daemon_stays_responsive_when_a_template_squares_a_number(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The edit is rejected in time; the endpoint answers and SIGTERM stops the daemon."""
    import signal

    import httpx

    from support.cli import start_process, wait_for
    from support.project import copy_project
    from support.smtp import free_port

    copy_project(tmp_path)
    monkeypatch.chdir(tmp_path)
    port = free_port()
    log = tmp_path / "daemon.log"
    env = {
        "INVITE_MAILER_UNSUBSCRIBE__SERVE": "true",
        "INVITE_MAILER_UNSUBSCRIBE__SECRET": "s" * 32,
        "INVITE_MAILER_UNSUBSCRIBE__BIND_PORT": str(port),
    }
    daemon = start_process(["run"], env, tmp_path, stderr=log)
    try:
        wait_for(lambda: "scheduled" in log.read_text(encoding="utf-8"), 20, "the start")
        offset = len(log.read_text(encoding="utf-8"))
        template = templates_of(tmp_path / "config") / "invitation.txt.j2"
        payload = (
            "{% set ns = namespace(x=10) %}{% for i in range(40) %}"
            "{% set ns.x = ns.x * ns.x %}{% endfor %}{{ ns.x > 5 }}\n"
        )
        edited = payload + template.read_text(encoding="utf-8")
        started = written = time.monotonic()
        template.write_text(edited, encoding="utf-8")
        slowest = 0.0
        while "keeps running" not in log.read_text(encoding="utf-8")[offset:]:
            assert daemon.poll() is None, log.read_text(encoding="utf-8")
            assert time.monotonic() - started < 30, log.read_text(encoding="utf-8")[offset:]
            if time.monotonic() - written > 3:  # the first write may beat the watch
                written = time.monotonic()
                template.write_text(edited, encoding="utf-8")
            asked = time.monotonic()
            try:
                httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
            except httpx.TransportError as exc:
                pytest.fail(f"the endpoint did not answer: {exc!r}")
            slowest = max(slowest, time.monotonic() - asked)
        rejected = log.read_text(encoding="utf-8")[offset:]
        assert "invitation.txt.j2" in rejected and "too large" in rejected, rejected
        assert slowest < 2, slowest
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=15) == 0, log.read_text(encoding="utf-8")
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        if daemon.stdout is not None:
            daemon.stdout.close()
