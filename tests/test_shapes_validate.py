"""validate checks every recipient through the compiled shapes.

The first recipients of each shape are built and compared with the standard
library; the others are checked without writing their bytes: the values, the
address and the size (from the shape's octets plus the values'). These tests
show that what can fail for one recipient still fails, with today's message.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import pytest

from invite_mailer.cli.commands import validate
from invite_mailer.core.plan import MailRequest, audience_of, mailing_times, request_for
from invite_mailer.errors import ConfigError
from invite_mailer.inputs.config import Config, load_config
from invite_mailer.inputs.series import Kind
from invite_mailer.mail.compose import Composer
from invite_mailer.mail.fastwire import WireComposer
from invite_mailer.mail.sizes import message_size, octet_counts
from support.contacts import HEADER, contact_rows
from support.project import copy_project, strip_environment


def project(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    rows: list[str],
    *,
    header: str = HEADER,
    edit: Callable[[Path], None] | None = None,
    **env: str,
) -> Config:
    """The shipped project with *rows* (contacts.csv lines) as its contacts;
    *edit* changes its templates."""
    strip_environment(monkeypatch)
    for name, value in env.items():
        monkeypatch.setenv(f"INVITE_MAILER_{name}", value)
    root = copy_project(tmp_path)
    (root / "config" / "contacts.csv").write_text(header + "\n" + "".join(rows), encoding="utf-8")
    if edit is not None:
        edit(root / "templates" / "email")
    return load_config(root / "config", root / "templates" / "email", env_file=None)


def replace_in(path: Path, old: str, new: str) -> None:
    """Edit a template as an organiser would: *old* becomes *new*."""
    text = path.read_text(encoding="utf-8")
    assert old in text
    path.write_text(text.replace(old, new), encoding="utf-8")


def row(email: str, organisation: str, registrations: str = "alle", *, notiz: str = "") -> str:
    extra = f";{notiz}" if notiz else ""
    return f'{email};Frau;Dr.;Jana;Müller;"{organisation}";"{registrations}"{extra}\n'


@pytest.mark.slow
def test_every_recipient_is_counted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = project(tmp_path, monkeypatch, list(contact_rows(400, seed=4)))
    report = validate(config)
    series = config.series
    expected = sum(
        len(audience_of(kind, event, series, config.contacts.contacts, config.attendance))
        for kind, event, _due, _deadline in mailing_times(series)
    )
    assert report.mailings == 9
    assert report.rendered == expected


@pytest.mark.slow
def test_one_recipient_over_the_size_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A mail too large only because of one contact's data is found, however far down."""

    def edit(templates: Path) -> None:
        for name in ("layout.txt.j2", "layout.html.j2"):
            replace_in(
                templates / name,
                "{{ salutation }}",
                "{{ salutation }}{% for n in range(120) %} {{ contact.extra.Notiz }}{% endfor %}",
            )

    rows = [row(f"k{n}@example.org", "Stadt Musterhausen", notiz="kurz") for n in range(30)]
    rows.append(row("gross@example.org", "Stadt Musterhausen", notiz="Ä" * 300))
    header = HEADER + ";Notiz"
    limit = {"LIMITS__MAX_MESSAGE_BYTES": str(64 * 1024)}
    config = project(tmp_path, monkeypatch, rows, header=header, edit=edit, **limit)
    assert WireComposer(Composer.from_config(config)).shapes.compilable
    with pytest.raises(ConfigError) as raised:
        validate(config)
    assert "limits.max_message_bytes" in str(raised.value)
    # Without that contact every mail fits.
    fits = project(tmp_path / "fits", monkeypatch, rows[:-1], header=header, edit=edit, **limit)
    assert validate(fits).rendered > 0


def test_the_size_bound_is_never_below_the_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What validate compares with the limit is at least what composing computes."""
    rng = random.Random(9)
    organisations = ["", "Landkreis Süd & Ost", "A " * 60, "Ämter – und -Verbände " * 9, "x" * 300]
    rows = [
        row(f"k{n}@example.org", rng.choice(organisations), rng.choice(["", "alle", "allianzen"]))
        for n in range(60)
    ]
    config = project(
        tmp_path,
        monkeypatch,
        rows,
        SENDER__UNSUBSCRIBE_URL="https://example.org/abmelden",
        UNSUBSCRIBE__SECRET="s3cr3t-s3cr3t-s3cr3t-s3cr3t",
    )
    composer = Composer.from_config(config)
    wires = WireComposer(composer)
    shapes = wires.shapes
    now = config.series.first_start
    checked = 0
    for kind, event, _due, _deadline in mailing_times(config.series):
        for contact in config.contacts.contacts:
            request = request_for(kind, event, contact, now, attendance=config.attendance)
            found = shapes.render(request)
            assert found is not None
            rendered, shape, filled = found
            prepared, attachments, context = composer.prepare(request)
            values = shapes.values(contact, context)
            assert values is not None
            size = message_size(
                octet_counts(rendered.text), octet_counts(rendered.html), attachments
            )
            bound = shape.size_bound(values, attachments)
            assert size <= bound <= size * 1.02, (kind, contact)
            assert bound <= shape.quick_bound(values, attachments)
            checked += 1
    assert checked == 9 * 60


@pytest.mark.slow
def test_templates_that_are_not_compilable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """validate still checks every mail, rendered per recipient, and fails as before."""
    config = project(tmp_path, monkeypatch, list(contact_rows(20, seed=2)))
    replace_in(
        config.templates_dir / "layout.txt.j2", "{{ contact.email }}", "{{ contact.email | upper }}"
    )
    edited = load_config(config.config_dir, config.templates_dir, env_file=None)
    assert not WireComposer(Composer.from_config(edited)).shapes.compilable
    assert validate(edited).rendered == validate(config).rendered


def test_a_bad_extra_column_is_reported_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A template error that depends on the recipient is one problem, not one per mail."""
    config = project(tmp_path, monkeypatch, list(contact_rows(30, seed=3)))
    replace_in(
        config.templates_dir / "layout.txt.j2",
        "{{ salutation }}",
        "{{ salutation }} {{ contact.extra['Funktion'] }}",
    )
    edited = load_config(config.config_dir, config.templates_dir, env_file=None)
    with pytest.raises(ConfigError) as raised:
        validate(edited)
    problems = list(raised.value)
    assert len(problems) == 1 and "Funktion" in str(problems[0])
    request = MailRequest(
        str(Kind.INVITATION), edited.contacts.contacts[0], None, edited.series.first_start
    )
    with pytest.raises(ConfigError):
        Composer.from_config(edited).render(request)
