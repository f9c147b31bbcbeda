"""``invite-mailer rehearse``: the whole series in virtual time, into a folder.

The rehearsal walks the timeline from the first due time to the last and, at
each due moment, runs a real delivery pass (the same :class:`Dispatcher` as
``send-due`` and ``run``) with the outbox transport into ``<out>/mails/``,
against a throw-away ledger inside ``<out>``. Nothing reaches a relay and the
real ledger is only read (for its opt-outs). The contact list's
registrations are taken as new ones, so every registered contact's
confirmation is in the rehearsal too. A follow-up is sent only if its
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
from invite_mailer.delivery.ledger import Delivery, Ledger
from invite_mailer.delivery.ledger_open import ledger_exists
from invite_mailer.delivery.transport import OutboxTransport, outbox_name
from invite_mailer.errors import ConfigError
from invite_mailer.inputs.config import Config
from invite_mailer.inputs.contacts import Contact
from invite_mailer.inputs.series import Kind
from invite_mailer.inputs.settings import TransportKind, TransportSettings
from invite_mailer.inputs.state_settings import StateSettings
from invite_mailer.mail import mime
from invite_mailer.mail.compose import Composer
from invite_mailer.mail.fastwire import WireComposer
from invite_mailer.mail.signing import DkimSigner
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

    def __init__(self, directory: Path, signer: DkimSigner | None) -> None:
        self.outbox = OutboxTransport(directory, signer=signer)
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
    return _ENV.get_template("plain.html.j2").render(subject=str(message["Subject"]), text=content)


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
    optouts = await _all_optouts(config)
    async with (
        Ledger.open(virtual.settings.state.path) as ledger,
        _Recorder(mails_dir, DkimSigner.from_settings(config.settings)) as recorder,
    ):
        start = min((due for _, _, due, _ in mailing_times(series)), default=series.first_start)
        for email_key in sorted(optouts - config.optouts):
            await ledger.add_optout(series.id, email_key, source="rehearsal", now=start)
        # An empty first reading: the contact list's registrations count as new,
        # so the rehearsal shows their confirmations (as for registrations by link).
        await ledger.observe_registrations(series.id, {}, start)
        final, waited = await _walk(virtual, ledger, recorder, start)
        deliveries = await ledger.deliveries(series.id)

    reports = {m.id: MailingReport(m, waited=m.id in waited) for m in final}
    for delivery in deliveries:
        written = recorder.written.get(delivery.message_id)
        if written is not None:
            _file_mail(config, out, reports, delivery, written)
    builder: WireComposer | None = None  # the send builder, built once if a sample is due
    for report in reports.values():
        order = {key: n for n, key in enumerate(report.mailing.audience)}
        report.mails.sort(key=lambda r: order.get(r.email, len(order)))
        if report.waited and not report.mails:
            builder = builder or WireComposer(Composer.from_config(virtual))
            report.preview = _write_preview(builder, virtual, report.mailing, out)
    ordered = sorted(reports.values(), key=lambda r: (r.mailing.due, r.mailing.event))
    return ordered, len(optouts)


async def _all_optouts(config: Config) -> set[str]:
    """``optout.txt`` and the opt-outs in the real ledger (one-click, optout add)."""
    optouts = set(config.optouts)
    real = config.settings.state.target
    if ledger_exists(real):
        async with Ledger.open(real) as ledger:
            optouts |= await ledger.optouts(config.series.id)
    return optouts


async def _walk(
    virtual: Config, ledger: Ledger, recorder: _Recorder, start: datetime
) -> tuple[list[Mailing], set[str]]:
    """A pass at every due moment, in order; the plan after the last deadline, and who waited."""
    dispatcher = Dispatcher(virtual, ledger, recorder)
    moments = sorted({due for _, _, due, _ in mailing_times(virtual.series)})
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
    return await dispatcher.plan(end), waited


def _file_mail(
    config: Config,
    out: Path,
    reports: dict[str, MailingReport],
    delivery: Delivery,
    written: tuple[email.message.EmailMessage, datetime, Path],
) -> None:
    """Write the HTML beside a mail's ``.eml`` and list the mail under its mailing."""
    message, moment, eml = written
    html_path = eml.with_suffix(".html")
    with writing(out):
        html_path.write_text(_html_of(message), encoding="utf-8")
    summary = delivery.kind == SUMMARY_KIND
    # A summary's "event" is the id of the mailing it reports on.
    mailing_id = delivery.event if summary else f"{delivery.kind}:{delivery.event or 'series'}"
    report = reports.get(mailing_id)
    if report is None:
        return
    record = _record(config, delivery.kind, mailing_id, delivery.email, message, moment)
    record = replace(record, eml=eml.relative_to(out), html=html_path.relative_to(out))
    if summary:
        report.summary = record
    else:
        report.mails.append(record)


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


def _write_preview(
    builder: WireComposer, config: Config, mailing: Mailing, out: Path
) -> Path | None:
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
        wire = builder.wire_for(request)
    except (ConfigError, ValueError) as exc:
        log.warning("no preview of %s: %s", mailing.id, exc)
        return None
    folder = out / PREVIEWS_DIR
    stem = safe_name(mailing.id.replace(":", "-"))
    path = folder / f"{stem}.html"
    with writing(out):
        folder.mkdir(exist_ok=True)
        (folder / f"{stem}.eml").write_bytes(wire.data)
        path.write_text(_html_of(mime.parse(wire)), encoding="utf-8")
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
    return _ENV.get_template("index.html.j2").render(
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


# The overview's pages are package data (cli/pages/), kept apart from the code.
_ENV = jinja2.Environment(
    loader=jinja2.PackageLoader("invite_mailer.cli", "pages"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
