"""Mails compiled once per shape are byte for byte the standard library's.

``mail.shapes`` renders each shape of mail once with markers in place of the
recipient's values and fills them in per recipient; ``mail.slots`` decides
from the templates' syntax trees whether that is possible at all. Every test
here compares with the reference, ``mime.wire(mime.build(composer.render(r)))``,
over contacts chosen to break it: quotes, ``<>&"'``, umlauts, names long
enough to move the text's line breaks and fold headers, right-to-left
scripts, emoji, ``=`` and ``?``, ampersands, extra columns.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from types import MappingProxyType
from zoneinfo import ZoneInfo

import css_inline
import jinja2
import pytest

from invite_mailer.core.plan import MailRequest
from invite_mailer.core.tokens import REGISTER, make_link_token
from invite_mailer.inputs.config import Config, load_config
from invite_mailer.inputs.contacts import Contact
from invite_mailer.inputs.series import Kind
from invite_mailer.inputs.typeset import tidy_join, tidy_line, tidy_text
from invite_mailer.mail import mime
from invite_mailer.mail.compose import Composer
from invite_mailer.mail.fastwire import WireComposer
from invite_mailer.mail.filling import html_attribute, html_text
from invite_mailer.mail.mime import CrlfBytes, Wire
from invite_mailer.mail.shapes import Shapes, safe_value
from invite_mailer.mail.slots import analyse
from support.project import shipped_environment
from test_fastpath import HOSTILE_EMAILS, HOSTILE_NAMES, make_project

ROOT = Path(__file__).resolve().parents[1]
BERLIN = ZoneInfo("Europe/Berlin")
EVENTS = ("verwaltung", "kreislaufwirtschaft", "allianzen", "forschung")

NOW = {
    Kind.INVITATION: datetime(2024, 10, 24, 10, 5, 17, tzinfo=BERLIN),
    Kind.REMINDER: datetime(2024, 11, 13, 14, 0, 3, tzinfo=BERLIN),
    Kind.FOLLOWUP: datetime(2024, 11, 15, 10, 0, 59, tzinfo=BERLIN),
}

FIRST = ["Jana", "Jürgen", "Zoë", "Hans-Peter", "Łukasz", 'Jana "JJ"', "O'Neil", "עברית"]
LAST = ["Müller", "Weiß & Söhne", "von Bülow", "<b>Fett</b>", "العربية", "Emoji 😀", "a=?b?c"]
ORGS = [
    "",
    "Stadt Musterhausen, Amt für Digitalisierung",
    "Landkreis Süd & Ost",
    "Uni <Test> \"Zitat\" 'einfach'",
    "Amt – für -Verwaltung und Ressourcen – mit sehr langem Namen, der umbrochen werden muss",
    "Verein\u00a0mit geschütztem Leerzeichen",
    "x" * 80,
    "&amp; &lt;b&gt; &#39; schon maskiert",
    "Ministerium für Umwelt, Klima und Energiewirtschaft des Landes Nordrhein-Westfalen (MUNV)",
]
# Names that the header folder, the HTML escaper or the text wrapper treat
# specially (those of the fast path's tests, and where a dash starts a line).
ODD_NAMES = [*HOSTILE_NAMES, ("", "–", "- Strich"), ("", "Private\ue000Use", "Glue")]
EMAILS = [*HOSTILE_EMAILS, "a&b@example.org"]


def contacts(count: int, seed: int = 11, extra: tuple[str, ...] = ()) -> list[Contact]:
    """Varied contacts (every registration pattern), then every odd name and address."""
    rng = random.Random(seed)
    out = []
    for n in range(count):
        share = rng.random()
        values = {name: rng.choice(["", "Leiterin & Co", '"Referent"', "x" * 70]) for name in extra}
        out.append(
            Contact(
                email=rng.choice([f"kontakt{n:04d}@example.org", *EMAILS]),
                anrede=rng.choice(["Frau", "Herr", ""]),
                titel=rng.choice(["", "Dr.", "Prof. Dr."]),
                vorname=rng.choice(FIRST),
                nachname=rng.choice(LAST),
                organisation=rng.choice(ORGS),
                registered_all=share < 0.2,
                registrations=frozenset(rng.sample(EVENTS, 2) if share < 0.7 else []),
                extra=MappingProxyType(values),
            )
        )
    for n, (titel, vorname, nachname) in enumerate(ODD_NAMES):
        out.append(
            Contact(
                email=EMAILS[n % len(EMAILS)],
                anrede=["Frau", "Herr", ""][n % 3],
                titel=titel,
                vorname=vorname,
                nachname=nachname,
                organisation=ORGS[n % len(ORGS)],
                registered_all=n % 2 == 0,
                extra=MappingProxyType(dict.fromkeys(extra, vorname)),
            )
        )
    return out


def replace_in(path: Path, old: str, new: str) -> None:
    """Edit a template as an organiser would: *old* becomes *new*."""
    text = path.read_text(encoding="utf-8")
    assert old in text
    path.write_text(text.replace(old, new), encoding="utf-8")


def load(config: Path, *, link: bool = False) -> Config:
    with shipped_environment(), pytest.MonkeyPatch.context() as mp:
        if link:
            mp.setenv("INVITE_MAILER_SENDER__UNSUBSCRIBE_URL", "https://example.org/abmelden?x=1&y")
            mp.setenv("INVITE_MAILER_UNSUBSCRIBE__SECRET", "s3cr3t-s3cr3t-s3cr3t-s3cr3t")
        return load_config(config, config.parent / "templates", env_file=None)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_project(tmp_path_factory.mktemp("shapes"))


@pytest.fixture(scope="module", params=[False, True], ids=["mailto-only", "one-click"])
def config(project: Path, request: pytest.FixtureRequest) -> Iterator[Config]:
    yield load(project, link=request.param)


def outcome(make: Callable[[], Wire]) -> Wire | tuple[str, str]:
    """The wire, or the error (type and message) composing raised."""
    try:
        return make()
    except Exception as exc:
        return (type(exc).__name__, str(exc))


def reference(composer: Composer, request: MailRequest) -> Wire:
    return mime.wire(mime.build(composer.render(request)))


ALL_CASES: list[tuple[Kind, str | None, bool | None]] = [
    (Kind.INVITATION, None, None),
    *[(Kind.REMINDER, e, None) for e in EVENTS],
    *[(Kind.FOLLOWUP, e, a) for e in EVENTS[:2] for a in (True, False, None)],
]
SOME_CASES = [ALL_CASES[0], ALL_CASES[-3]]


def assert_identical(
    config: Config,
    people: list[Contact],
    *,
    shaped: bool = True,
    cases: list[tuple[Kind, str | None, bool | None]] = ALL_CASES,
) -> WireComposer:
    """Every mailing of *cases* (default: the shipped series, every attendance
    variant) for *people*: what the composer writes is the reference."""
    composer = Composer.from_config(config)
    wires = WireComposer(composer)
    series = config.series
    for kind, event_id, attended in cases:
        event = series.event(event_id) if event_id else None
        for person in people:
            request = MailRequest(str(kind), person, event, NOW[kind], attended, {}, None)
            got = outcome(lambda r=request: wires.wire_for(r))  # type: ignore[misc]
            assert got == outcome(lambda r=request: reference(composer, r)), (kind, person)
    if shaped:
        # Only values that cannot be filled in (tabs, private use, ...) are rendered alone.
        assert wires.counts["shape"] >= len(cases) * (len(people) - len(ODD_NAMES))
    return wires


# --- whole mails ---------------------------------------------------------------------


@pytest.mark.slow
def test_every_kind_and_shape_is_identical(config: Config) -> None:
    wires = assert_identical(config, contacts(120))
    assert not [n for n in wires.notes if "differs" in n]
    assert wires.shapes.compilable


def test_a_few_mails_of_every_kind_are_identical(project: Path) -> None:
    """The fast tier's share of the test above."""
    people = contacts(6, seed=3)
    wires = assert_identical(load(project, link=True), people, shaped=False)
    assert wires.counts["shape"] > len(people)


def test_compiled_mails_are_marked_as_crlf_checked(project: Path) -> None:
    """The transport need not scan them again: every line ends in CRLF by construction."""
    wires = WireComposer(Composer.from_config(load(project)))
    for person in contacts(5):
        wire = wires.wire_for(MailRequest(str(Kind.INVITATION), person, None, NOW[Kind.INVITATION]))
        assert type(wire.data) is CrlfBytes
        data = bytes(wire.data)
        assert data.count(b"\r\n") == data.count(b"\n") == data.count(b"\r")


def test_long_names_move_the_line_breaks(project: Path) -> None:
    """Lengths that wrap the footer and the salutation differently per recipient."""
    config = load(project)
    people = [
        Contact(
            email=f"k{n}@example.org",
            anrede="Frau",
            titel="Prof. Dr.",
            vorname="Anna-" + "Lena " * (n % 5),
            nachname="Müller" + "-Lüdenscheidt" * (n % 4),
            organisation=" ".join(["Amt"] * n) + (" –Ressourcen" if n % 2 else " - Referat"),
        )
        for n in range(1, 30)
    ]
    composer = Composer.from_config(config)
    wires = WireComposer(composer)
    texts = set()
    for person in people:
        request = MailRequest(str(Kind.INVITATION), person, None, NOW[Kind.INVITATION])
        wire = wires.wire_for(request)
        assert wire == reference(composer, request)
        texts.add(composer.render(request).text.count("\n"))
    assert wires.counts["shape"] == len(people)
    assert len(texts) >= 3  # the wrap really differed


@pytest.mark.slow
def test_extra_columns_in_the_templates(tmp_path: Path) -> None:
    def edit(folder: Path) -> None:
        replace_in(
            folder / "layout.html.j2",
            "<p>{{ salutation }}</p>",
            "<p>{{ salutation }}</p>\n{% if contact.extra['Funktion'] %}"
            '<p>Funktion: {{ contact.extra["Funktion"] }}</p>{% endif %}',
        )
        replace_in(
            folder / "layout.txt.j2",
            "{{ salutation }}\n",
            "{{ salutation }}\n{% if contact.extra.Funktion %}(als {{ contact.extra.Funktion }})"
            "{% endif %}\n",
        )

    config = load(make_project(tmp_path, edit=edit))
    wires = assert_identical(config, contacts(25, extra=("Funktion",)))
    assert wires.shapes.analysis.slots >= {"contact.extra[Funktion]"}


def test_a_missing_extra_column_fails_as_it_did(tmp_path: Path) -> None:
    def edit(folder: Path) -> None:
        replace_in(folder / "layout.txt.j2", "{{ salutation }}", "{{ contact.extra['Nope'] }}")

    config = load(make_project(tmp_path, edit=edit))
    composer = Composer.from_config(config)
    wires = WireComposer(composer)
    request = MailRequest(str(Kind.INVITATION), contacts(1)[0], None, NOW[Kind.INVITATION])
    got = outcome(lambda: wires.wire_for(request))
    assert got == outcome(lambda: reference(composer, request))
    assert isinstance(got, tuple) and "Nope" in got[1]


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("{{ contact.email }}", "{{ contact.email | upper }}"),
        ("{{ salutation }}", "{{ salutation ~ '!' }}"),
        ("{% if contact.organisation %}", "{% if contact.organisation | length > 3 %}"),
        ("{{ contact.email }}", "{{ contact }}"),
        ("{{ contact.email }}", "{% filter upper %}{{ contact.email }}{% endfilter %}"),
    ],
    ids=["filter", "concatenation", "comparison", "whole-contact", "filter-block"],
)
def test_other_uses_render_per_recipient(tmp_path: Path, old: str, new: str) -> None:
    """Templates the analysis cannot vouch for: same bytes, rendered per recipient."""

    def edit(folder: Path) -> None:
        for name in ("layout.txt.j2", "layout.html.j2"):
            replace_in(folder / name, old, new)

    config = load(make_project(tmp_path, edit=edit))
    wires = assert_identical(config, contacts(2), shaped=False, cases=SOME_CASES)
    assert not wires.shapes.compilable
    assert wires.counts["shape"] == 0
    assert any("per recipient" in note for note in wires.notes)


@pytest.mark.parametrize(
    "markup",
    [
        '<p class="{{ contact.organisation }}">x</p>',
        "<!-- {{ contact.organisation }} -->",
        '<p style="color: red" title="{{ contact.organisation }}">x</p>',
    ],
    ids=["class-attribute", "comment", "title-attribute"],
)
def test_html_contexts(tmp_path: Path, markup: str) -> None:
    """Values where the inliner writes them differently still come out right."""

    def edit(folder: Path) -> None:
        old = "<p>{{ salutation }}</p>"
        replace_in(folder / "layout.html.j2", old, old + markup)

    config = load(make_project(tmp_path, edit=edit))
    assert_identical(config, contacts(4), shaped=False, cases=SOME_CASES)


def test_a_shape_that_differs_is_not_used(project: Path) -> None:
    """The check against the reference catches a shape that is wrong (here: sabotaged)."""
    config = load(project)
    composer = Composer.from_config(config)
    wires = WireComposer(composer)
    people = contacts(6)
    first = MailRequest(str(Kind.INVITATION), people[0], None, NOW[Kind.INVITATION])
    assert wires.wire_for(first) == reference(composer, first)
    for shape in wires.shapes._shapes.values():
        assert shape is not None
        shape.served = 0
        shape.html_pieces[-1] += "sabotage"
        shape.html_wire.append(b"sabotage\r\n")
    for person in people[1:]:
        request = MailRequest(str(Kind.INVITATION), person, None, NOW[Kind.INVITATION])
        assert wires.wire_for(request) == reference(composer, request)
    assert any("compiled shape differs" in note for note in wires.notes)


# --- the pieces ----------------------------------------------------------------------


def parse(source: str) -> jinja2.nodes.Template:
    return jinja2.Environment().parse(source)


@pytest.mark.parametrize(
    ("source", "slots"),
    [
        ("{{ contact.email }}", {"contact.email"}),
        ("{{ contact['nachname'] }}", {"contact.nachname"}),
        (
            "{{ contact.extra['Funktion'] }} {{ contact.extra.Ort }}",
            {"contact.extra[Funktion]", "contact.extra[Ort]"},
        ),
        (
            "{% if contact.organisation %}({{ contact.organisation }}){% endif %}",
            {"contact.organisation"},
        ),
        (
            "{% if not unsubscribe_url and registered %}x{% elif salutation or y %}{% endif %}",
            {"unsubscribe_url", "salutation"},
        ),
        ("{{ series.title | upper }}{% for e in events %}{{ e.title }}{% endfor %}", set()),
        ("{% block b %}{{ salutation }}{% endblock %}{{ super() }}", {"salutation"}),
    ],
)
def test_slot_safe_uses(source: str, slots: set[str]) -> None:
    analysis = analyse({"t.j2": parse(source)})
    assert analysis.reason is None
    assert analysis.slots == slots


@pytest.mark.parametrize(
    "source",
    [
        "{{ contact.email | lower }}",
        "{{ contact.email ~ 'x' }}",
        "{{ 'Hallo ' + salutation }}",
        "{% if contact.organisation == 'x' %}{% endif %}",
        "{% if contact.organisation | length %}{% endif %}",
        "{% set x = contact.email %}",
        "{% set x %}{{ contact.email }}{% endset %}{{ x | upper }}",
        "{% macro m() %}{{ salutation }}{% endmacro %}{{ m() | upper }}",
        "{% import 'm.j2' as m %}{{ m.box(contact.email) }}",
        "{{ contact }}",
        "{{ contact.key }}",
        "{{ contact.registrations }}",
        "{% for k in contact.extra %}{{ k }}{% endfor %}",
        "{{ contact.extra[name] }}",
        "{{ contact.email if registered else '' }}",
        "{% filter upper %}{{ salutation }}{% endfilter %}",
        "{% filter upper %}{% include 'x.j2' %}{% endfilter %}",
        "{% autoescape false %}{{ contact.email }}{% endautoescape %}",
        "{{ self.footer() | upper }}",
        "{{ super() | upper }}",
        "{% call m.box() %}{{ contact.email }}{% endcall %}",
        "{% if contact.email is defined %}{% endif %}",
        "{% include 'unknown.j2' %}",
        "{% include name %}",
        "{% extends kind ~ '.j2' %}",
        "{{ unsubscribe_url[:10] }}",
    ],
)
def test_uses_that_are_not_slot_safe(source: str) -> None:
    analysis = analyse({"ok.j2": parse("{{ salutation }}"), "t.j2": parse(source)})
    assert analysis.reason is not None and analysis.reason.startswith("t.j2: line 1")


def test_the_shipped_templates_are_compilable(project: Path) -> None:
    shapes = Shapes(Composer.from_config(load(project)))
    assert shapes.compilable, shapes.analysis.reason
    assert shapes.analysis.slots == {
        "contact.email",
        "contact.organisation",
        "register_links",
        "salutation",
        "unsubscribe_url",
        "withdraw_links",
    }


VALUES = [
    "a&b<c>d\"e'f\u00a0g",
    "&amp;&lt;&#39;&quot;",
    "=?utf-8?q?x?= = ? ;",
    "😀 עברית العربية \u200f",
    "https://example.org/abmelden?token=a&b=c",
    "<!-- -->",
    "]]> <![CDATA[",
]


def test_html_escaping_is_the_inliners() -> None:
    """What html_text and html_attribute write is what css_inline writes."""
    inliner = css_inline.CSSInliner(keep_style_tags=False, load_remote_stylesheets=False)
    for value in VALUES:
        escaped = str(jinja2.utils.markupsafe.escape(value))
        html = f'<html><head></head><body><p>{escaped}</p><a href="{escaped}">x</a></body></html>'
        expected = f'<p>{html_text(value)}</p><a href="{html_attribute(value)}">x</a>'
        assert expected in inliner.inline(html), value


def test_values_that_are_not_filled_in() -> None:
    assert all(safe_value(v) for v in [*VALUES, "", "Zoë", "a b"])
    for value in [
        " lead",
        "trail ",
        "tab\tin",
        "line\nbreak",
        "cr\r",
        "nul\x00",
        "\ue000",
        None,
        3,
    ]:
        assert not safe_value(value), value


def test_tidy_line_is_tidy_text_line_by_line() -> None:
    """The text part is tidied per line, so one line can be tidied again alone."""
    rng = random.Random(7)
    words = ["Wort", "Müller-Lüdenscheidt", "-Strich", "–", "https://example.org/" + "x" * 80, "a"]
    for _ in range(300):
        lines = []
        for _ in range(rng.randint(1, 8)):
            indent = rng.choice(["", "  ", "- ", "  - "])
            body = " ".join(rng.choice(words) for _ in range(rng.randint(0, 30)))
            lines.append(indent + body + rng.choice(["", " ", "  "]))
        text = "\n".join(lines)
        assert tidy_text(text) == tidy_join([tidy_line(line) for line in lines]), text


# --- registration links and confirmations ----------------------------------------------

LINKS_SECRET = "links-s3cr3t-s3cr3t-s3cr3t"
NOW_CONFIRMATION = datetime(2024, 10, 28, 9, 30, 41, tzinfo=BERLIN)
LINK_CASES: list[tuple[Kind, str | None, tuple[str, ...]]] = [
    (Kind.INVITATION, None, ()),
    (Kind.REMINDER, "allianzen", ()),
    (Kind.CONFIRMATION, "verwaltung", ("verwaltung",)),
    (Kind.CONFIRMATION, "kreislaufwirtschaft", ("kreislaufwirtschaft", "allianzen", "forschung")),
]


@pytest.fixture(scope="module")
def links_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = make_project(tmp_path_factory.mktemp("links"))
    replace_in(
        config / "series.yaml",
        "privacy_url:",
        "registration:\n  mode: links\nprivacy_url:",
    )
    return config


def load_links(config: Path, *, link: bool) -> Config:
    with shipped_environment(), pytest.MonkeyPatch.context() as mp:
        mp.setenv("INVITE_MAILER_SENDER__WEB_URL", "https://example.org/reihe?a=1&b")
        mp.setenv("INVITE_MAILER_UNSUBSCRIBE__SECRET", LINKS_SECRET)
        if link:
            mp.setenv("INVITE_MAILER_SENDER__UNSUBSCRIBE_URL", "https://example.org/abmelden")
        return load_config(config, config.parent / "templates", env_file=None)


def assert_links_identical(config: Config, people: list[Contact]) -> WireComposer:
    """Invitation, reminder and confirmations (one date, several) with per-date links."""
    composer = Composer.from_config(config)
    wires = WireComposer(composer)
    for kind, event_id, dates in LINK_CASES:
        event = config.series.event(event_id) if event_id else None
        now = NOW_CONFIRMATION if kind is Kind.CONFIRMATION else NOW[kind]
        for person in people:
            request = MailRequest(str(kind), person, event, now, dates=dates)
            got = outcome(lambda r=request: wires.wire_for(r))  # type: ignore[misc]
            assert got == outcome(lambda r=request: reference(composer, r)), (kind, person)
    return wires


@pytest.mark.parametrize("link", [False, True], ids=["mailto-only", "one-click"])
def test_registration_links_and_confirmations_are_identical(
    links_project: Path, link: bool
) -> None:
    people = contacts(8, seed=5)
    wires = assert_links_identical(load_links(links_project, link=link), people)
    assert not [n for n in wires.notes if "differs" in n]
    # The per-date links are slots: the shapes serve (nearly) everyone.
    assert wires.counts["shape"] >= len(LINK_CASES) * (len(people) - len(ODD_NAMES))


@pytest.mark.slow
def test_registration_links_and_confirmations_for_many_are_identical(links_project: Path) -> None:
    people = contacts(120, seed=7)
    wires = assert_links_identical(load_links(links_project, link=True), people)
    assert not [n for n in wires.notes if "differs" in n]
    assert wires.counts["shape"] >= len(LINK_CASES) * (len(people) - len(ODD_NAMES))


def test_confirmations_without_links_are_identical(project: Path) -> None:
    people = contacts(6, seed=9)
    composer = Composer.from_config(load(project))
    wires = WireComposer(composer)
    for _kind, event_id, dates in LINK_CASES[2:]:
        event = composer.series.event(str(event_id))
        for person in people:
            request = MailRequest(
                str(Kind.CONFIRMATION), person, event, NOW_CONFIRMATION, dates=dates
            )
            assert outcome(lambda r=request: wires.wire_for(r)) == outcome(  # type: ignore[misc]
                lambda r=request: reference(composer, r)  # type: ignore[misc]
            )
    assert wires.counts["shape"] >= 2 * (len(people) - len(ODD_NAMES))


def test_each_recipient_gets_their_own_signed_links(links_project: Path) -> None:
    config = load_links(links_project, link=False)
    wires = WireComposer(Composer.from_config(config))
    people = [
        Contact(email=f"person{n}@example.org", vorname="Eva", nachname=f"Probe{n}")
        for n in range(4)
    ]
    for person in people:
        request = MailRequest(str(Kind.INVITATION), person, None, NOW[Kind.INVITATION])
        text = mime.parse(wires.wire_for(request)).get_body(("plain",))
        assert text is not None
        body = text.get_content()
        for event_id in EVENTS:
            token = make_link_token(
                LINKS_SECRET, REGISTER, config.series.id, person.email, event_id
            )
            assert f"/anmeldung/{token}" in body
    assert wires.counts["shape"] >= 3  # all but the first from one compiled shape
