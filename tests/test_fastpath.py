"""The fast path writes exactly the bytes the standard library writes.

``fastwire.WireComposer`` builds the wire form of a mail without
``email.message``; ``smtp_wire`` dot-stuffs without aiosmtplib's regular
expressions. Both are only allowed to be faster, never different: every test
here compares with the reference, ``Composer.compose(...).as_bytes(policy=SMTP)``
(and aiosmtplib's own functions), over many contacts, hostile ones included.
"""

from __future__ import annotations

import asyncio
import pickle
import random
import re
import shutil
import string
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import datetime, timedelta
from email import message_from_bytes, policy
from email.headerregistry import Address
from email.message import EmailMessage
from email.quoprimime import body_encode
from email.utils import parsedate_to_datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from aiosmtplib.email import quote_address
from aiosmtplib.protocol import PERIOD_REGEX, normalize_message_line_endings

from invite_mailer.delivery.smtp_wire import DOT_ATOM, data_block, quote
from invite_mailer.inputs.config import Config, load_config
from invite_mailer.inputs.contacts import Contact
from invite_mailer.inputs.series import Kind
from invite_mailer.mail import mime
from invite_mailer.mail.compose import Composer
from invite_mailer.mail.fastwire import FAST_KINDS, WireComposer
from invite_mailer.mail.mime import CrlfBytes, Wire, crlf_checked, set_boundaries
from invite_mailer.mail.wireformat import QP_BODY_MAP, HeaderCache, display_name, fold, qp_wire
from invite_mailer.mail.workers import Job, WirePipeline, pipeline
from support.project import shipped_environment
from support.samples import FIRST_DATE, set_materials

ROOT = Path(__file__).resolve().parents[1]
BERLIN = ZoneInfo("Europe/Berlin")

NOW = {
    Kind.INVITATION: datetime(2024, 10, 24, 10, 5, 17, tzinfo=BERLIN),
    Kind.REMINDER: datetime(2024, 11, 13, 14, 0, 3, tzinfo=BERLIN),
    Kind.FOLLOWUP: datetime(2024, 11, 15, 10, 0, 59, tzinfo=BERLIN),
    Kind.UPDATE: datetime(2024, 11, 1, 9, 0, tzinfo=BERLIN),
    Kind.CANCELLATION: datetime(2024, 11, 1, 9, 0, tzinfo=BERLIN),
    Kind.CONFIRMATION: datetime(2024, 10, 28, 9, 30, 41, tzinfo=BERLIN),
}

FIRST = ["Jana", "Jürgen", "Sören", "Änne", "Özlem", "Zoë", "Hans-Peter", "Marie-Luise", "Łukasz"]
LAST = ["Müller", "Schmidt", "Weiß", "Groß-Köhler", "Öztürk", "von Bülow", "O'Neil", "Ĳssel"]
ORGS = ["Stadt Musterhausen, Amt für Digitalisierung", "Landkreis Süd & Ost", "Uni <Test>"]

# Names that the header folder, the HTML escaper or the text wrapper treat specially.
HOSTILE_NAMES = [
    ("Dr.", 'Jana "JJ", die Zweite', "Müller"),
    ("", "Jana,", "<script>alert(1)</script>"),
    ("Prof. Dr.", "Wolfeschlegelsteinhausenbergerdorff", "Graf-Dörnberg von und zu Bülow"),
    ("", "Anna (Büro)", "Weiß & Söhne"),
    ("", "=?utf-8?q?Evil?=", "Encoded"),
    ("", "Back\\slash", "Ünïcödé"),
    ("", "Emoji 😀", "Zeichen"),
    ("", "עברית", "العربية"),
    ("", "Tab\tName", "Line\u2028Sep"),
    ("", "Nbsp\u00a0Name", "Zero\u200bWidth"),
    ("", "A" * 90, "B" * 90),
    ("", "", ""),
    ("Dr.", "", "Ohnevorname"),
    ("", "Ümlaut", ""),
    ("", "x", "&amp; &lt;b&gt; &#39;"),
    ("", "Dot.", "..Start"),
]
HOSTILE_EMAILS = [
    "jana.mueller@example.org",
    "UPPER.Case@Example.ORG",
    "with+tag@example.org",
    "a@b.de",
    "very.long.address.with.many.parts." + "x" * 40 + "@sub.domain.example.org",
    "o'neil@example.org",
    "unicode-ünï@example.org",
    "user=?q@example.org",
]


def make_contacts(count: int, seed: int = 5) -> list[Contact]:
    """Ordinary contacts with umlauts, then every hostile name and address."""
    rng = random.Random(seed)
    contacts = []
    for n in range(count):
        registered = rng.random()
        contacts.append(
            Contact(
                email=f"kontakt{n:04d}@example.org",
                anrede=rng.choice(["Frau", "Herr", ""]),
                titel=rng.choice(["", "", "Dr.", "Prof. Dr."]),
                vorname=rng.choice(FIRST),
                nachname=rng.choice(LAST),
                organisation=rng.choice(ORGS),
                registered_all=registered < 0.2,
                registrations=frozenset(
                    rng.sample(["verwaltung", "kreislaufwirtschaft", "allianzen", "forschung"], 2)
                    if registered < 0.7
                    else []
                ),
            )
        )
    for n, (titel, vorname, nachname) in enumerate(HOSTILE_NAMES):
        contacts.append(
            Contact(
                email=HOSTILE_EMAILS[n % len(HOSTILE_EMAILS)],
                anrede=["Frau", "Herr", ""][n % 3],
                titel=titel,
                vorname=vorname,
                nachname=nachname,
                registered_all=True,
            )
        )
    return contacts


def make_project(root: Path, *, edit: Callable[[Path], None] | None = None) -> Path:
    """The shipped config under *root*, with materials (two links, one file) for
    the first date and its attendance list; *edit* changes the templates."""
    config = root / "config"
    shutil.copytree(ROOT / "config", config)
    shutil.copytree(ROOT / "templates" / "email", root / "templates")
    (config / "materials").mkdir()
    (config / "materials" / "protokoll.pdf").write_bytes(b"%PDF-1.4\n" + bytes(range(256)) * 40)
    set_materials(
        config,
        FIRST_DATE,
        "      - {title: Folien, url: https://example.org/transferreihe/folien.pdf}\n"
        "      - {title: Protokoll, file: materials/protokoll.pdf}\n",
    )
    (config / "attendance").mkdir(exist_ok=True)
    (config / "attendance" / "verwaltung.csv").write_text(
        "email\nkontakt0001@example.org\nkontakt0002@example.org\n", encoding="utf-8"
    )
    if edit is not None:
        edit(root / "templates")
    return config


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_project(tmp_path_factory.mktemp("fastpath"))


@pytest.fixture(scope="module")
def config(config_dir: Path) -> Iterator[Config]:
    with shipped_environment():
        yield load_config(config_dir, config_dir.parent / "templates", env_file=None)


@pytest.fixture(scope="module")
def composer(config: Config) -> Composer:
    return Composer.from_config(config)


def reference(composer: Composer, kind: Kind, contact: Contact, **args: object) -> Wire:
    message = composer.compose(kind, contact, **args)  # type: ignore[arg-type]
    return Wire(str(message["Message-ID"]), message.as_bytes(policy=policy.SMTP))


def outcome(make: Callable[[], Wire]) -> Wire | tuple[str, str]:
    """The wire, or the error (type and message) composing raised."""
    try:
        return make()
    except Exception as exc:
        return (type(exc).__name__, str(exc))


def assert_same(
    wires: WireComposer, composer: Composer, kind: Kind, contact: Contact, **args: object
) -> None:
    got = outcome(lambda: wires.wire(kind, contact, **args))  # type: ignore[arg-type]
    assert got == outcome(lambda: reference(composer, kind, contact, **args)), contact


# --- whole mails -------------------------------------------------------------------------


CASES = [
    pytest.param(Kind.INVITATION, None, None, id="invitation"),
    pytest.param(Kind.REMINDER, "allianzen", None, id="reminder"),
    pytest.param(Kind.FOLLOWUP, "verwaltung", None, id="followup-attachments"),
    pytest.param(Kind.FOLLOWUP, "verwaltung", True, id="followup-attended"),
    pytest.param(Kind.FOLLOWUP, "verwaltung", False, id="followup-missed"),
    pytest.param(Kind.FOLLOWUP, "allianzen", None, id="followup-no-attachments"),
    pytest.param(Kind.UPDATE, "verwaltung", None, id="update"),
    pytest.param(Kind.CANCELLATION, "verwaltung", None, id="cancellation"),
    pytest.param(Kind.CONFIRMATION, "allianzen", None, id="confirmation"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "event_id", "attended"), CASES)
def test_same_bytes_as_the_standard_library(
    config: Config, composer: Composer, kind: Kind, event_id: str | None, attended: bool | None
) -> None:
    event = config.series.event(event_id) if event_id else None
    wires = WireComposer(composer)
    contacts = make_contacts(150)
    for contact in contacts:
        assert_same(wires, composer, kind, contact, event=event, now=NOW[kind], attended=attended)
    assert not wires.notes
    if kind in FAST_KINDS:
        # Nearly all went the fast way: only odd names and addresses are left over.
        assert wires.counts["fast"] >= len(contacts) - len(HOSTILE_NAMES)
    else:
        assert wires.counts["fast"] == 0


def test_header_details_are_kept(composer: Composer) -> None:
    """Umlauts in the subject and names arrive intact, as RFC 2047 words."""
    wires = WireComposer(composer)
    contact = make_contacts(1)[0]
    contact = Contact(email="jana@example.org", anrede="Frau", vorname="Jürgen", nachname="Müller")
    wire = wires.wire(Kind.INVITATION, contact, event=None, now=NOW[Kind.INVITATION])
    parsed = message_from_bytes(wire.data, policy=policy.default)
    assert isinstance(parsed, EmailMessage)
    assert parsed["To"].addresses[0].display_name == "Jürgen Müller"
    assert "–" in str(parsed["Subject"])
    assert parsed["Message-ID"] == wire.message_id
    assert not any(part.defects for part in parsed.walk())


@pytest.mark.slow
def test_unsubscribe_link_per_recipient(config_dir: Path) -> None:
    """With a one-click link every mail differs in a header and in the HTML."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("INVITE_MAILER_SENDER__UNSUBSCRIBE_URL", "https://example.org/abmelden")
        mp.setenv("INVITE_MAILER_UNSUBSCRIBE__SECRET", "s3cr3t-s3cr3t-s3cr3t-s3cr3t")
        linked = load_config(config_dir, config_dir.parent / "templates", env_file=None)
    linked_composer = Composer.from_config(linked)
    wires = WireComposer(linked_composer)
    event, now = linked.series.events[0], NOW[Kind.REMINDER]
    for contact in make_contacts(60):
        assert_same(wires, linked_composer, Kind.REMINDER, contact, event=event, now=now)
    assert wires.counts["fast"] >= 60
    assert not wires.notes
    wire = wires.wire(Kind.REMINDER, make_contacts(1)[0], event=event, now=now)
    assert b"List-Unsubscribe-Post: List-Unsubscribe=One-Click" in wire.data


@pytest.mark.slow
def test_a_new_minute_new_skeleton(composer: Composer) -> None:
    """The calendar stamp changes with the minute: a new skeleton, same exactness."""
    wires = WireComposer(composer)
    contacts = make_contacts(10)
    for minute in range(3):
        now = NOW[Kind.INVITATION] + timedelta(minutes=minute, seconds=minute * 7)
        for contact in contacts:
            assert_same(wires, composer, Kind.INVITATION, contact, event=None, now=now)
    assert len(wires._skeletons) == 3


def test_differences_fall_back_to_the_standard_library(composer: Composer) -> None:
    """A skeleton that does not match (here: sabotaged) is never used."""
    wires = WireComposer(composer)
    contacts = make_contacts(5)[:5]
    now = NOW[Kind.INVITATION]
    wires.wire(Kind.INVITATION, contacts[0], event=None, now=now)
    (skeleton,) = [s for s in wires._skeletons.values() if s is not None]
    skeleton.checked = 0
    skeleton.body[0] = b"sabotage" + skeleton.body[0]  # type: ignore[operator]
    for contact in contacts[1:]:
        assert_same(wires, composer, Kind.INVITATION, contact, event=None, now=now)
    assert wires.notes and "differs" in wires.notes[0]


def test_boundaries_come_from_the_message_id(composer: Composer) -> None:
    contact = make_contacts(1)[0]
    message = composer.compose(Kind.INVITATION, contact, event=None, now=NOW[Kind.INVITATION])
    again = composer.compose(Kind.INVITATION, contact, event=None, now=NOW[Kind.INVITATION])
    assert message.as_bytes(policy=policy.SMTP) == again.as_bytes(policy=policy.SMTP)
    boundaries = [p.get_boundary() for p in message.walk() if p.is_multipart()]
    assert len(boundaries) == 2 and len(set(boundaries)) == 2
    assert all(b is not None and b.startswith("=_") for b in boundaries)
    set_boundaries(message)  # idempotent
    assert [p.get_boundary() for p in message.walk() if p.is_multipart()] == boundaries


# --- the pieces ------------------------------------------------------------------------------


def random_text(rng: random.Random) -> str:
    alphabet = "abc xyz=.\t -äöüß€😀\u00a0\u2028\x0b\x1c\x85"
    lines = []
    for _ in range(rng.randint(0, 8)):
        length = rng.choice([0, 1, 5, 70, 73, 74, 75, 76, 77, 78, 150, 400])
        line = "".join(rng.choice(alphabet) for _ in range(length))
        if rng.random() < 0.3:
            line += rng.choice([" ", "\t", "  ", "= "])
        lines.append(line)
    return rng.choice(["\n", "\r\n", "\r"]).join(lines) + rng.choice(["", "\n", "\n\n"])


@pytest.mark.slow
def test_quoted_printable_matches_the_standard_library() -> None:
    rng = random.Random(11)
    cache: dict[str, str] = {}
    for _ in range(3000):
        text = random_text(rng)
        lines = text.encode("utf-8").splitlines()
        expected = body_encode((b"\n".join(lines) + b"\n").decode("latin-1"), 76)
        assert qp_wire(text, cache) == expected.replace("\n", "\r\n").encode("ascii"), repr(text)


def test_quoted_printable_table_matches_the_standard_library() -> None:
    from email.quoprimime import _QUOPRI_BODY_ENCODE_MAP  # type: ignore[attr-defined]

    assert [QP_BODY_MAP[c] for c in range(256)] == _QUOPRI_BODY_ENCODE_MAP


@pytest.mark.slow
def test_address_headers_match_the_standard_library() -> None:
    rng = random.Random(3)
    words = [
        *FIRST,
        *LAST,
        "Dr.",
        "Prof.",
        "(Büro)",
        "Jörg,",
        "A.",
        "Mc.Donald",
        "Schröder-Lüdenscheidtmannshausen",
        "Mueller",
    ]
    cache = HeaderCache()
    shortcuts = 0
    for _ in range(4000):
        name = " ".join(rng.choice(words) for _ in range(rng.randint(1, 7)))
        spec = rng.choice(
            ["a@b.de", "jana.mueller@example.org", "x" * rng.randint(1, 70) + "@e.org"]
        )
        address = Address(display_name=name, addr_spec=spec)
        assert cache.address("To", (name, spec)) == fold("To", address), (name, spec)
        shortcuts += display_name(name) is not None
    assert shortcuts > 3000
    for titel, vorname, nachname in HOSTILE_NAMES:
        name = " ".join(p for p in (titel, vorname, nachname) if p)
        for spec in HOSTILE_EMAILS:
            try:
                address = Address(display_name=name, addr_spec=spec)
            except (ValueError, IndexError):
                continue
            assert cache.address("To", address) == fold("To", address), (name, spec)


@pytest.mark.slow
def test_encoded_names_match_the_standard_library() -> None:
    """Names that are mostly or wholly non-ASCII: the folder's choice of "q" or "b"."""
    rng = random.Random(11)
    alphabets = ["äöüß", "αβγδεζ", "абвгдеж", "אבגדה", "日本語", "ÄÖÜ", "abcdé"]
    cache = HeaderCache()
    chosen = set()
    for _ in range(2000):
        words = [
            "".join(rng.choice(rng.choice(alphabets)) for _ in range(rng.randint(1, 9)))
            for _ in range(rng.randint(1, 4))
        ]
        name = " ".join(words)
        address = Address(display_name=name, addr_spec="a@b.de")
        assert cache.address("To", (name, "a@b.de")) == fold("To", address), name
        phrase = display_name(name)
        if phrase is not None and "=?utf-8?" in phrase:
            chosen.add(phrase.split("?")[2])
    assert chosen == {"q", "b"}


def test_message_id_and_unsubscribe_headers_match_the_standard_library() -> None:
    cache = HeaderCache()
    for value in ["<0123abcd@example.org>", "<" + "a" * 70 + "@example.org>", "<x@ex-ample.de>"]:
        assert cache.message_id("Message-ID", value) == fold("Message-ID", value)
    for value in [
        "<mailto:abmeldung@example.org?subject=Abmeldung%20transferreihe-2024>",
        "<mailto:a@b.de>, <https://example.org/abmelden/" + "t" * 120 + ">",
    ]:
        expected = EmailMessage(policy=mime.POLICY)
        expected["List-Unsubscribe"] = value
        assert (
            cache.url_list("List-Unsubscribe", value)
            == expected.as_bytes(policy=policy.SMTP).split(b"\r\n\r\n")[0] + b"\r\n"
        )


def test_dot_stuffing_matches_aiosmtplib() -> None:
    rng = random.Random(7)
    pieces = [b".", b"..", b"a", b"\r\n", b"\n", b"\r", b". ", b"x" * 10]
    canonical = 0
    for _ in range(5000):
        data = b"".join(rng.choice(pieces) for _ in range(rng.randint(0, 12)))
        block = data_block(data)
        expected = PERIOD_REGEX.sub(b"..", normalize_message_line_endings(data)) + b".\r\n"
        if block is not None:
            canonical += 1
            assert block == expected, data
    assert canonical > 200


def test_crlf_checked_marks_only_canonical_bytes() -> None:
    """Bytes the worker marked as CRLF-clean are sent exactly as unmarked ones."""
    rng = random.Random(9)
    pieces = [b".", b"a", b"\r\n", b"\n", b"\r", b"x" * 10]
    marked = 0
    for _ in range(2000):
        data = b"".join(rng.choice(pieces) for _ in range(rng.randint(1, 12)))
        checked = crlf_checked(data)
        assert checked == data
        if type(checked) is CrlfBytes:
            marked += 1
            assert b"\n" not in checked.replace(b"\r\n", b"") and b"\r" not in checked.replace(
                b"\r\n", b""
            )
            # Across the process boundary the mark survives, and nothing else changes.
            travelled = pickle.loads(pickle.dumps(checked))
            assert type(travelled) is CrlfBytes and travelled == data
            assert data_block(travelled) == data_block(data)
        else:
            assert data_block(checked) is None
    assert marked > 100


def test_envelope_addresses_match_aiosmtplib() -> None:
    """MAIL FROM and RCPT TO carry what aiosmtplib's quote_address would write."""
    rng = random.Random(11)
    atext = string.ascii_letters + string.digits + "!#$%&'*+/=?^_`{|}~-"
    pieces = [*atext, ".", "..", "@", " ", '"', "<", ">", "(", ")", ",", ";", "ü", "\\"]
    addresses = [*HOSTILE_EMAILS, "a@b", "a.b.c@d-e.f", ".a@b", "a.@b", "a@b.", "a@.b", "@b", "a@"]
    for _ in range(5000):
        local = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 8)))
        domain = "".join(rng.choice([*"abc-.", "ü", "1"]) for _ in range(rng.randint(1, 8)))
        addresses.append(f"{local}@{domain}")
    plain = 0

    def quoted(quote: Callable[[str], str], address: str) -> str | tuple[str, str]:
        try:
            return quote(address)
        except ValueError as exc:  # aiosmtplib refuses to put it on a command line
            return ("ValueError", str(exc))

    for address in addresses:
        assert quoted(quote, address) == quoted(quote_address, address), address
        plain += DOT_ATOM.fullmatch(address) is not None
    assert plain > 500  # the fast way was taken often enough to be tested


# --- the second process -------------------------------------------------------------------


@pytest.mark.slow
async def test_pipeline_in_a_second_process(config: Config, composer: Composer) -> None:
    """Mails composed in a worker process are the reference bytes too."""
    contacts = make_contacts(150)
    event = config.series.event("allianzen")
    jobs = [Job(str(Kind.REMINDER), "allianzen", c) for c in contacts]
    clock = iter([NOW[Kind.REMINDER] + timedelta(seconds=n) for n in range(10_000)])
    pipeline = WirePipeline(
        composer,
        jobs,
        sequences={},
        clock=lambda: next(clock),
        settings=config.settings,
        config_dir=config.config_dir,
        templates_dir=config.templates_dir,
        processes=1,
    )
    try:
        await asyncio.wait_for(pipeline.started.wait(), timeout=60)
        for contact in contacts:
            try:
                wire = await pipeline.wire(
                    Kind.REMINDER, contact, event=event, now=NOW[Kind.REMINDER], sequences={}
                )
            except Exception as exc:
                error = (type(exc).__name__, str(exc))
                with pytest.raises(type(exc)) as raised:
                    reference(composer, Kind.REMINDER, contact, event=event, now=NOW[Kind.REMINDER])
                assert error == (type(raised.value).__name__, str(raised.value))
                continue
            # Prepared mails carry the moment their chunk was composed.
            found = re.search(rb"\r\nDate: ([^\r]*)\r\n", wire.data)
            assert found is not None
            stamp = parsedate_to_datetime(found.group(1).decode())
            expected = reference(
                composer, Kind.REMINDER, contact, event=event, now=stamp, sequences={}
            )
            assert wire == expected
    finally:
        await pipeline.aclose()
    assert pipeline.prepared > 100


@pytest.mark.parametrize(("workers", "pooled"), [(0, False), (1, True)])
async def test_compose_workers_setting(
    config: Config, composer: Composer, workers: int, pooled: bool
) -> None:
    """limits.compose_workers = 0 keeps large passes in one process (less memory)."""
    limits = config.settings.limits.model_copy(update={"compose_workers": workers})
    settings = config.settings.model_copy(update={"limits": limits})
    changed = replace(config, settings=settings)
    mails = [("invitation", "", f"kontakt{n:04d}@example.org") for n in range(400)]
    contacts = replace(
        config.contacts,
        contacts=tuple(
            Contact(email=f"kontakt{n:04d}@example.org", vorname="Jana", nachname="Müller")
            for n in range(400)
        ),
    )
    changed = replace(changed, contacts=contacts)
    wires = pipeline(
        changed,
        Composer.from_config(changed),
        mails,
        sequences={},
        clock=lambda: NOW[Kind.INVITATION],
    )
    assert wires is not None
    try:
        assert (wires._pool is not None) is pooled
        wire = await wires.wire(
            Kind.INVITATION, contacts.contacts[0], event=None, now=NOW[Kind.INVITATION]
        )
        assert wire == reference(
            composer,
            Kind.INVITATION,
            contacts.contacts[0],
            event=None,
            now=NOW[Kind.INVITATION],
        )
    finally:
        await wires.aclose()


def test_a_worker_whose_parent_died_during_its_start_ends(config_dir: Path) -> None:
    """The parent's pid comes from the parent: a worker started after it died ends.

    A worker that read ``os.getppid()`` in its initialiser, while its parent was
    killed during the start of the pool, would take init for its parent and
    live on for good.
    """
    import subprocess
    import sys

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid that is not the worker's parent
    code = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from invite_mailer.inputs.config import load_config\n"
        "from invite_mailer.mail import workers\n"
        "workers._follow_parent.__defaults__ = (0.01,)\n"
        "config_dir = Path(sys.argv[1])\n"
        "config = load_config(config_dir, config_dir.parent / 'templates', env_file=None)\n"
        "workers._start_worker(int(sys.argv[2]), config.settings, config.series,\n"
        "                      config.templates_dir, config.config_dir)\n"
        "time.sleep(60)\n"
        "raise SystemExit(3)\n"
    )
    worker = subprocess.Popen([sys.executable, "-c", code, str(config_dir), str(gone.pid)])
    try:
        assert worker.wait(timeout=60) == 0
    finally:
        worker.kill()
