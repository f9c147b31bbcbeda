"""``invite-mailer rehearse``: the whole series in virtual time, into a folder.

The rehearsal walks the timeline from the first due time to the last and, at
each due moment, runs a real delivery pass (the same :class:`Dispatcher` as
``send-due`` and ``run``) with the outbox transport into ``<out>/mails/``,
against a throw-away ledger inside ``<out>``. Nothing reaches a relay and the
real ledger is only read (for its opt-outs). A follow-up is sent only if its
date lists materials, exactly as it would be; otherwise the overview shows it
as waiting, with a preview of its text.

The result is ``<out>/index.html``, an overview in German for organisers: the
timeline by day, per mailing its due time, window, counts and recipients, and
each mail's HTML one click away. It is self-contained (inline CSS, no script,
nothing loaded from the internet) so it can be zipped and mailed around.
"""

from __future__ import annotations

import contextlib
import email.message
import logging
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, tzinfo
from pathlib import Path
from types import TracebackType
from typing import Self
from urllib.parse import quote

import jinja2
from babel.dates import format_datetime as babel_datetime

from invite_mailer.cli.commands import safe_name, writing
from invite_mailer.core import german
from invite_mailer.core.plan import Mailing, MailingState, mailing_times, request_for
from invite_mailer.delivery.dispatch import Dispatcher
from invite_mailer.delivery.ledger import Ledger
from invite_mailer.delivery.transport import OutboxTransport, outbox_name
from invite_mailer.errors import ConfigError
from invite_mailer.inputs.config import Config
from invite_mailer.inputs.contacts import Contact
from invite_mailer.inputs.series import Kind
from invite_mailer.inputs.settings import StateSettings, TransportKind, TransportSettings
from invite_mailer.mail import mime
from invite_mailer.mail.compose import Composer
from invite_mailer.mail.summary import KIND_LABELS

__all__ = ["MailRecord", "MailingReport", "Rehearsal", "rehearse"]

log = logging.getLogger("invite_mailer.cli.rehearse")

MAILS_DIR = "mails"
PREVIEWS_DIR = "previews"
INDEX_FILE = "index.html"
MARKER_FILE = ".invite-mailer-rehearsal"
SUMMARY_KIND = "summary"

LABELS: dict[str, str] = {
    **KIND_LABELS,
    Kind.UPDATE: "Änderung",
    Kind.CANCELLATION: "Absage",
    SUMMARY_KIND: "Versandbericht",
}

STATE_LABELS: dict[MailingState, str] = {
    MailingState.SCHEDULED: "geplant",
    MailingState.OPEN: "offen",
    MailingState.WAITING: "wartet auf Unterlagen",
    MailingState.DONE: "erledigt",
    MailingState.CLOSED: "Versandfenster abgelaufen",
    MailingState.WITHDRAWN: "zurückgezogen (Termin abgesagt)",
}


@dataclass(frozen=True)
class MailRecord:
    """One mail the rehearsal wrote."""

    kind: str  # as in the ledger ("invitation", "update-1", "summary", ...)
    mailing_id: str
    email: str
    name: str
    organisation: str
    subject: str
    sent_at: datetime
    eml: Path  # relative to the output folder
    html: Path


@dataclass
class MailingReport:
    """A mailing as it ended up after the whole series."""

    mailing: Mailing
    mails: list[MailRecord] = field(default_factory=list)
    summary: MailRecord | None = None  # the organiser's report
    preview: Path | None = None  # a sample, when nothing was sent (waiting)
    waited: bool = False  # was waiting for materials at its due time

    @property
    def label(self) -> str:
        return LABELS.get(str(self.mailing.kind), str(self.mailing.kind))


@dataclass
class Rehearsal:
    out: Path
    index: Path
    mailings: list[MailingReport]
    optouts: int

    def count(self, kind: str) -> int:
        """Mails of *kind* written (``summary`` for the organiser's reports)."""
        if kind == SUMMARY_KIND:
            return sum(1 for m in self.mailings if m.summary is not None)
        return sum(len(m.mails) for m in self.mailings if str(m.mailing.kind) == kind)

    @property
    def counts(self) -> Counter[str]:
        counts: Counter[str] = Counter()
        for report in self.mailings:
            counts[str(report.mailing.kind)] += len(report.mails)
        return counts

    @property
    def waiting(self) -> list[MailingReport]:
        return [m for m in self.mailings if m.waited and not m.mails]


class _Recorder:
    """The outbox transport, remembering every message it wrote and when."""

    def __init__(self, directory: Path) -> None:
        self.outbox = OutboxTransport(directory)
        self.directory = directory
        self.moment: datetime | None = None
        self.written: dict[str, tuple[email.message.EmailMessage, datetime, Path]] = {}

    async def __aenter__(self) -> Self:
        await self.outbox.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.outbox.__aexit__(exc_type, exc, tb)

    async def send(self, wire: mime.Wire, *, sender: str, recipients: Sequence[str]) -> str:
        answer = await self.outbox.send(wire, sender=sender, recipients=recipients)
        assert self.moment is not None
        path = self.directory / f"{outbox_name(wire)}.eml"
        # Read back from the bytes that went out, as a mail client would.
        self.written[wire.message_id] = (mime.parse(wire), self.moment, path)
        return answer


@contextlib.contextmanager
def _quiet(name: str) -> Iterator[None]:
    """Passes log every mailing at real time; in a rehearsal that is noise."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def _prepare(out: Path) -> None:
    """Make *out* ready; only ever deletes what an earlier rehearsal wrote."""
    if out.exists() and not out.is_dir():
        raise ConfigError.single(out, "exists and is not a folder", hint="choose another --out")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER_FILE).exists():
        raise ConfigError.single(
            out,
            "the folder is not empty and was not written by invite-mailer rehearse",
            hint="choose an empty or new folder with --out (the default is rehearsal/)",
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER_FILE).write_text(
        "Written by invite-mailer rehearse; the whole folder is replaced on the next run.\n",
        encoding="utf-8",
    )
    leftovers = [out / MAILS_DIR, out / PREVIEWS_DIR, out / INDEX_FILE]
    leftovers += out.glob(".state-*")  # the ledger of a run that was interrupted
    for path in leftovers:
        # A link is removed, never followed: the mails must land inside *out*.
        if path.is_symlink() or not path.is_dir():
            path.unlink(missing_ok=True)
        else:
            shutil.rmtree(path)


def _html_of(message: email.message.EmailMessage) -> str:
    """The HTML part; a plain-text mail (the organiser's report) wrapped in <pre>."""
    part = message.get_body(("html",))
    if part is not None:
        return str(part.get_content())
    text = message.get_body(("plain",))
    content = str(text.get_content()) if text is not None else ""
    return _PLAIN_PAGE.render(subject=str(message["Subject"]), text=content)


async def rehearse(config: Config, out: Path) -> Rehearsal:
    """Play the whole series into *out*; see the module docstring."""
    with writing(out):
        _prepare(out)
    mails_dir = out / MAILS_DIR
    with tempfile.TemporaryDirectory(dir=out, prefix=".state-") as state_dir:
        settings = config.settings.model_copy(
            update={
                "transport": TransportSettings(kind=TransportKind.OUTBOX, outbox_dir=mails_dir),
                "state": StateSettings(url=f"sqlite:///{Path(state_dir) / 'ledger.db'}"),
            }
        )
        virtual = replace(config, settings=settings)
        with _quiet("invite_mailer.delivery.dispatch"):
            reports, optouts = await _play(config, virtual, out, mails_dir)
    index = out / INDEX_FILE
    with writing(out):
        index.write_text(_render_index(config, reports, optouts), encoding="utf-8")
    return Rehearsal(out, index, reports, optouts)


async def _play(
    config: Config, virtual: Config, out: Path, mails_dir: Path
) -> tuple[list[MailingReport], int]:
    series = config.series
    optouts = set(config.optouts)
    # Opt-outs recorded in the real ledger (one-click, optout add) hold here too.
    real = config.settings.state.path
    if real.exists():
        async with Ledger.open(real) as ledger:
            optouts |= await ledger.optouts(series.id)

    async with (
        Ledger.open(virtual.settings.state.path) as ledger,
        _Recorder(mails_dir) as recorder,
    ):
        start = min((due for _, _, due, _ in mailing_times(series)), default=series.first_start)
        for email_key in sorted(optouts - config.optouts):
            await ledger.add_optout(series.id, email_key, source="rehearsal", now=start)
        dispatcher = Dispatcher(virtual, ledger, recorder)
        moments = sorted({due for _, _, due, _ in mailing_times(series)})
        waited: set[str] = set()
        done: set[datetime] = set()
        while moments:
            moment = moments.pop(0)
            if moment in done:
                continue
            done.add(moment)
            recorder.moment = moment
            dispatcher = Dispatcher(virtual, ledger, recorder)
            await dispatcher.run_pass(moment)
            after = await dispatcher.plan(moment)
            waited |= {m.id for m in after if m.state is MailingState.WAITING and m.due == moment}
            # Mailings the rules do not name (updates) are due whenever the plan says.
            moments = sorted(
                set(moments) | {m.due for m in after if m.state is MailingState.SCHEDULED} - done
            )
        deadlines = [m.deadline for m in await dispatcher.plan(start)]
        end = max(deadlines, default=start) + timedelta(minutes=1)
        final = await dispatcher.plan(end)
        deliveries = await ledger.deliveries(series.id)

    reports = {m.id: MailingReport(m, waited=m.id in waited) for m in final}
    for delivery in deliveries:
        written = recorder.written.get(delivery.message_id)
        if written is None:
            continue
        message, moment, eml = written
        html_path = eml.with_suffix(".html")
        with writing(out):
            html_path.write_text(_html_of(message), encoding="utf-8")
        summary = delivery.kind == SUMMARY_KIND
        # A summary's "event" is the id of the mailing it reports on.
        mailing_id = delivery.event if summary else f"{delivery.kind}:{delivery.event or 'series'}"
        report = reports.get(mailing_id)
        if report is None:
            continue
        record = _record(config, delivery.kind, mailing_id, delivery.email, message, moment)
        record = replace(record, eml=eml.relative_to(out), html=html_path.relative_to(out))
        if summary:
            report.summary = record
        else:
            report.mails.append(record)
    for report in reports.values():
        order = {key: n for n, key in enumerate(report.mailing.audience)}
        report.mails.sort(key=lambda r: order.get(r.email, len(order)))
        if report.waited and not report.mails:
            report.preview = _write_preview(virtual, report.mailing, out)
    ordered = sorted(reports.values(), key=lambda r: (r.mailing.due, r.mailing.event))
    return ordered, len(optouts)


def _record(
    config: Config,
    kind: str,
    mailing_id: str,
    email_key: str,
    message: email.message.EmailMessage,
    sent_at: datetime,
) -> MailRecord:
    contact = config.contacts.by_key(email_key)
    name = ""
    organisation = ""
    if contact is not None:
        name = german.full_name(contact.titel, contact.vorname, contact.nachname)
        organisation = contact.organisation
    elif kind == SUMMARY_KIND:
        name = config.series.organiser.name
    return MailRecord(
        kind=kind,
        mailing_id=mailing_id,
        email=email_key,
        name=name,
        organisation=organisation,
        subject=str(message["Subject"]),
        sent_at=sent_at,
        eml=Path(),
        html=Path(),
    )


def _write_preview(config: Config, mailing: Mailing, out: Path) -> Path | None:
    """A sample of a mailing that sent nothing, so its text can still be checked."""
    contact: Contact | None = None
    for key in mailing.audience:
        contact = config.contacts.by_key(key)
        if contact is not None:
            break
    if contact is None or not mailing.event:
        return None
    event = config.series.event(mailing.event)
    request = request_for(mailing.kind, event, contact, mailing.due, attendance=config.attendance)
    try:
        message = mime.build(Composer.from_config(config).render(request))
    except (ConfigError, ValueError) as exc:
        log.warning("no preview of %s: %s", mailing.id, exc)
        return None
    folder = out / PREVIEWS_DIR
    stem = safe_name(mailing.id.replace(":", "-"))
    path = folder / f"{stem}.html"
    with writing(out):
        folder.mkdir(exist_ok=True)
        (folder / f"{stem}.eml").write_bytes(mime.wire(message).data)
        path.write_text(_html_of(message), encoding="utf-8")
    return path.relative_to(out)


# --- the overview ------------------------------------------------------------------------


def _when(moment: datetime, zone: tzinfo) -> str:
    return str(babel_datetime(moment.astimezone(zone), "EEEE, d. MMMM y, HH:mm", locale="de_DE"))


def _day(moment: datetime, zone: tzinfo) -> str:
    return str(babel_datetime(moment.astimezone(zone), "EEEE, d. MMMM y", locale="de_DE"))


def _clock(moment: datetime, zone: tzinfo) -> str:
    return str(babel_datetime(moment.astimezone(zone), "HH:mm", locale="de_DE"))


def _href(path: Path) -> str:
    return "/".join(quote(part) for part in path.parts)


def _render_index(config: Config, reports: list[MailingReport], optouts: int) -> str:
    series = config.series
    zone = series.zone
    days: dict[str, list[MailingReport]] = {}
    for report in reports:
        days.setdefault(_day(report.mailing.due, zone), []).append(report)
    totals: Counter[str] = Counter()
    for report in reports:
        totals[report.label] += len(report.mails)
    waiting: Counter[str] = Counter(r.label for r in reports if r.waited and not r.mails)
    events = {e.id: e for e in series.events}
    return _INDEX.render(
        series=series,
        days=days,
        reports=reports,
        totals=totals,
        waiting_by_label=waiting,
        optouts=optouts,
        contacts=len(config.contacts.contacts),
        people={c.key: c for c in config.contacts.contacts},
        name=lambda c: german.full_name(c.titel, c.vorname, c.nachname),
        events=events,
        zone=zone,
        when=lambda m: _when(m, zone),
        clock=lambda m: _clock(m, zone),
        href=_href,
        state_label=lambda s: STATE_LABELS.get(s, str(s)),
        german=german,
        WAITING=MailingState.WAITING,
        CLOSED=MailingState.CLOSED,
        WITHDRAWN=MailingState.WITHDRAWN,
    )


_ENV = jinja2.Environment(
    autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True
)

_PLAIN_PAGE = _ENV.from_string(
    """<!DOCTYPE html>
<html lang="de">
<head><meta charset="utf-8"><title>{{ subject }}</title>
<style>body { margin: 2rem; font: 15px/1.5 Arial, Helvetica, sans-serif; color: #1f2933; }
pre { white-space: pre-wrap; font: 14px/1.5 Consolas, "DejaVu Sans Mono", monospace; }</style>
</head>
<body><h1 style="font-size: 1.2rem;">{{ subject }}</h1><pre>{{ text }}</pre></body>
</html>
"""
)

_INDEX = _ENV.from_string(
    """<!DOCTYPE html>
<html lang="de">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Probelauf: {{ series.title }}</title>
<style>
  body { margin: 0; background: #eef1f4; color: #1f2933;
    font: 15px/1.5 Arial, Helvetica, sans-serif; }
  header, main { max-width: 64rem; margin: 0 auto; padding: 0 1.5rem; }
  header { padding-top: 2rem; }
  h1 { margin: 0 0 .25rem; font-size: 1.7rem; color: #1d4f7c; }
  h2 { margin: 2.5rem 0 .75rem; font-size: 1.25rem; color: #1d4f7c;
    border-bottom: 2px solid #1d4f7c; padding-bottom: .25rem; }
  h3 { margin: 0 0 .5rem; font-size: 1.1rem; }
  .lead { margin: 0 0 1rem; color: #52606d; }
  .note { background: #fff8e1; border-left: 4px solid #f0b429; padding: .75rem 1rem;
    margin: 1rem 0; }
  .ok { background: #e3f9e5; border-left: 4px solid #3f9142; padding: .75rem 1rem;
    margin: 1rem 0; }
  .mailing { background: #fff; border-radius: 6px; padding: 1rem 1.25rem; margin: 0 0 1rem;
    box-shadow: 0 1px 2px rgba(0,0,0,.08); }
  .kind { display: inline-block; min-width: 7.5rem; padding: .1rem .5rem; border-radius: 3px;
    background: #1d4f7c; color: #fff; font-size: .85rem; font-weight: bold; text-align: center; }
  .kind-reminder { background: #2f7d4f; }
  .kind-followup { background: #7b4f9d; }
  .kind-update, .kind-cancellation { background: #b44d12; }
  .state { font-weight: bold; }
  .state-waiting-for-materials, .state-closed { color: #b44d12; }
  .state-done { color: #2f7d4f; }
  dl { display: grid; grid-template-columns: max-content 1fr; gap: .15rem 1rem; margin: .5rem 0; }
  dt { color: #52606d; }
  dd { margin: 0; }
  table { border-collapse: collapse; width: 100%; margin: .5rem 0; font-size: .9rem; }
  th, td { text-align: left; padding: .3rem .5rem; border-bottom: 1px solid #d9e2ec;
    vertical-align: top; }
  th { background: #f5f7fa; }
  td.num, th.num { text-align: right; }
  summary { cursor: pointer; color: #1d4f7c; font-weight: bold; margin: .5rem 0; }
  a { color: #1d4f7c; }
  .small { font-size: .85rem; color: #52606d; }
  footer { max-width: 64rem; margin: 2rem auto; padding: 0 1.5rem; font-size: .85rem;
    color: #52606d; }
</style>
</head>
<body>
<header>
<h1>Probelauf: {{ series.title }}</h1>
<p class="lead">Die ganze Reihe im Zeitraffer – so würde invite-mailer mit der jetzigen
Konfiguration versenden. <strong>Es wurde nichts verschickt</strong>: Jede E-Mail liegt als
Datei im Ordner <code>mails/</code> und ist hier mit einem Klick zu öffnen.</p>
</header>
<main>
<h2 id="uebersicht">Übersicht</h2>
<table>
<thead><tr><th>Art</th><th class="num">E-Mails</th></tr></thead>
<tbody>
{% for label, count in totals.items() %}
{% set n = waiting_by_label[label] %}
<tr><td>{{ label }}{% if n == 1 %} <span class="small">(1 Versand wartet auf Unterlagen)</span>
{% elif n %} <span class="small">({{ n }} Versände warten auf Unterlagen)</span>{% endif %}</td>
<td class="num">{{ count }}</td></tr>
{% endfor %}
</tbody>
</table>
<p class="small">{{ contacts }} Kontakte in der Kontaktliste, {{ reports | length }} Versände,
{{ optouts }} abgemeldete Adressen (erhalten nichts).</p>
{% set waiting = reports | selectattr("waited") | rejectattr("mails") | list %}
{% set closed = reports | selectattr("mailing.state", "equalto", CLOSED)
   | rejectattr("waited") | list %}
{% if waiting or closed %}
{% for report in waiting %}
<p class="note"><strong>{{ report.label }} zu „{{ events[report.mailing.event].title }}“
wartet auf Unterlagen.</strong> In <code>series.yaml</code> sind für diesen Termin noch keine
<code>materials</code> eingetragen, deshalb wurde nichts verschickt. Sobald Sie sie eintragen,
geht die Nachbereitung raus; tragen Sie sie bis {{ when(report.mailing.deadline) }} Uhr ein,
danach wird sie nicht mehr verschickt.</p>
{% endfor %}
{% for report in closed %}
<p class="note"><strong>{{ report.label }}{% if report.mailing.event %} zu
„{{ events[report.mailing.event].title }}“{% endif %}:</strong>
{{ report.mailing.outstanding | length }} Empfänger bekämen nichts, weil das Versandfenster
abgelaufen ist.</p>
{% endfor %}
{% else %}
<p class="ok">Alle Versände laufen vollständig durch.</p>
{% endif %}

{% for day, items in days.items() %}
<h2>{{ day }}</h2>
{% for report in items %}
{% set m = report.mailing %}
<section class="mailing" id="{{ m.id | replace(':', '-') }}">
<h3><span class="kind kind-{{ m.kind }}">{{ report.label }}</span>
{{ clock(m.due) }} Uhr –
{% if m.event %}{{ events[m.event].title }}
({{ german.date_short(events[m.event].date) }}){% else %}die ganze Reihe{% endif %}</h3>
<dl>
<dt>Fällig</dt><dd>{{ when(m.due) }} Uhr</dd>
<dt>Versandfenster bis</dt><dd>{{ when(m.deadline) }} Uhr</dd>
<dt>Zustand am Ende</dt>
<dd><span class="state state-{{ m.state }}">{{ state_label(m.state) }}</span>
{% if report.waited and report.mails %}(wartete zunächst auf Unterlagen){% endif %}</dd>
<dt>Empfänger</dt><dd>{{ m.audience | length }}</dd>
<dt>Verschickt</dt><dd>{{ report.mails | length }}</dd>
{% if m.opted_out %}<dt>Abgemeldet</dt><dd>{{ m.opted_out }} (erhalten nichts)</dd>{% endif %}
{% if report.summary %}<dt>Versandbericht</dt><dd><a href="{{ href(report.summary.html) }}">an
{{ report.summary.name or report.summary.email }}</a></dd>{% endif %}
</dl>
{% if report.waited and not report.mails %}
<p class="note">Wartet auf Unterlagen: nichts verschickt.
{% if report.preview %}<a href="{{ href(report.preview) }}">Vorschau ansehen</a> (so sähe die
Nachbereitung jetzt aus; ohne Unterlagen wird sie nicht verschickt).{% endif %}</p>
{% endif %}
{% if report.mails %}
<details{% if report.mails | length <= 25 %} open{% endif %}>
<summary>{{ report.mails | length }} E-Mails</summary>
<table>
<thead><tr><th>Name</th><th>Adresse</th><th>Organisation</th><th>Betreff</th><th></th></tr></thead>
<tbody>
{% for mail in report.mails %}
<tr><td>{{ mail.name }}</td><td>{{ mail.email }}</td><td>{{ mail.organisation }}</td>
<td><a href="{{ href(mail.html) }}">{{ mail.subject }}</a></td>
<td><a class="small" href="{{ href(mail.eml) }}">.eml</a></td></tr>
{% endfor %}
</tbody>
</table>
</details>
{% elif m.audience %}
<details>
<summary>{{ m.audience | length }} vorgesehene Empfänger (nichts verschickt)</summary>
<table>
<thead><tr><th>Name</th><th>Adresse</th><th>Organisation</th></tr></thead>
<tbody>
{% for key in m.audience %}
{% set contact = people.get(key) %}
<tr><td>{{ name(contact) if contact else "" }}</td><td>{{ key }}</td>
<td>{{ contact.organisation if contact else "" }}</td></tr>
{% endfor %}
</tbody>
</table>
</details>
{% endif %}
</section>
{% endfor %}
{% endfor %}
</main>
<footer>Erstellt von invite-mailer rehearse für die Reihe <code>{{ series.id }}</code>
(Zeitzone {{ series.timezone }}). Die .eml-Dateien lassen sich in jedem E-Mail-Programm
öffnen.</footer>
</body>
</html>
"""
)
