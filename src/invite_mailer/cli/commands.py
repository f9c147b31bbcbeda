"""What the commands do, free of any command-line parsing.

Each function takes a loaded :class:`Config` and ``now`` and returns data; the
CLI prints it. Tests can call these directly or through the CLI.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
import signal
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from pathlib import Path

from invite_mailer.cli import registrations
from invite_mailer.cli.advisories import advisories
from invite_mailer.cli.forecasts import quota_warnings, quotas_of
from invite_mailer.core.forecast import Finish, forecast
from invite_mailer.core.plan import (
    EmptyLedger,
    Mailing,
    PlanInput,
    audience_of,
    mailing_times,
    plan,
    request_for,
    sequences_of,
)
from invite_mailer.core.registrations import with_registrations
from invite_mailer.delivery.bounce_sql import BounceRecord
from invite_mailer.delivery.dispatch import Dispatcher, Outcome, PassResult, ProgressCallback
from invite_mailer.delivery.ledger import (
    Delivery,
    DeliveryState,
    Ledger,
    LedgerView,
    NodeRow,
    open_sending,
    state_lock,
)
from invite_mailer.delivery.ledger_open import ledger_exists
from invite_mailer.delivery.transport import make_transport
from invite_mailer.errors import ConfigError, Problem
from invite_mailer.inputs.config import Config
from invite_mailer.inputs.contacts import Contact
from invite_mailer.inputs.series import Event, Kind
from invite_mailer.mail import mime
from invite_mailer.mail.checks import validate_change_kinds, validate_sample
from invite_mailer.mail.compose import Composer
from invite_mailer.mail.fastwire import WireComposer
from invite_mailer.mail.mime import header_address
from invite_mailer.mail.signing import DkimSigner, checked_signer

# What --now may be: far enough out for any real series, near enough that every
# due time and deadline derived from it stays computable.
NOW_YEARS = range(1970, 9001)


def parse_now(text: str | None, config: Config) -> datetime:
    """``--now``: ISO 8601; a naive time is read in the series' time zone."""
    zone = config.series.zone
    if text is None:
        return datetime.now(zone)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError.single(
            None,
            f"--now {text!r} is not an ISO 8601 time",
            hint="write e.g. --now 2024-10-24T10:05 (series time zone) or 2024-10-24T08:05Z",
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=zone)
    try:
        year = moment.astimezone(UTC).year
    except (OverflowError, ValueError):
        year = 0
    if year not in NOW_YEARS:
        raise ConfigError.single(
            None,
            f"--now {text!r} is outside the years {NOW_YEARS[0]} to {NOW_YEARS[-1]}",
            hint="pass a moment of the series, e.g. --now 2024-10-24T10:05",
        )
    return moment


def describe_os_error(exc: OSError) -> str:
    """``state/x.db: permission denied``: the file and the reason, in one line."""
    reason = _reason(exc)
    return f"{exc.filename}: {reason}" if exc.filename is not None else reason


def _reason(exc: OSError) -> str:
    if exc.strerror:
        return exc.strerror.lower()
    # OSError subclasses of libraries (jinja2.TemplateNotFound) carry only a message.
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


@contextlib.contextmanager
def writing(target: Path, option: str = "--out") -> Iterator[None]:
    """Output files that cannot be written are an input problem, not a traceback."""
    try:
        yield
    except OSError as exc:
        where = exc.filename if exc.filename is not None else target
        raise ConfigError.single(
            None,
            f"cannot write {where}: {_reason(exc)}",
            hint=f"pass {option} DIR with a folder you can write to",
        ) from None


# --- validate --------------------------------------------------------------------


@dataclass
class ValidationReport:
    mailings: int = 0
    rendered: int = 0
    contacts: int = 0
    warnings: list[Problem] = field(default_factory=list)
    advisories: list[Problem] = field(default_factory=list)  # see advisories()
    dkim: DkimSigner | None = None  # signs every mail; its sample verified


def validate(config: Config) -> ValidationReport:
    """Check every mail for every recipient, sending nothing.

    Mails are checked through their compiled shapes (see ``mail.shapes``):
    the first recipients of each shape are built and compared with the
    standard library; for the others what can differ per recipient is
    checked (the address, the values, the size) without writing the bytes.
    Raises :class:`ConfigError` with the distinct problems found (a broken
    template fails once per template, not once per recipient).
    """
    report = ValidationReport(
        contacts=len(config.contacts.contacts), warnings=list(config.warnings)
    )
    problems: dict[str, Problem] = {}
    series = config.series
    now = series.first_start
    wires = WireComposer(Composer.from_config(config))
    for kind, event, _due, _deadline in mailing_times(series):
        if event is not None and event.cancelled:
            continue
        report.mailings += 1
        for contact in audience_of(
            kind, event, series, config.contacts.contacts, config.attendance
        ):
            request = request_for(kind, event, contact, now, attendance=config.attendance)
            try:
                if not wires.shapes.vouch(request):
                    wires.wire_for(request)
            except ConfigError as exc:
                for problem in exc:
                    problems.setdefault(str(problem), problem)
                break
            report.rendered += 1
    try:
        validate_change_kinds(config, now, wires.composer)
    except ConfigError as exc:
        for problem in exc:
            problems.setdefault(str(problem), problem)
    if problems:
        raise ConfigError(problems.values())
    report.dkim = checked_signer(config, wires)
    report.advisories = [*advisories(config), *quota_warnings(config)]
    return report


# --- plan and status ---------------------------------------------------------------


@contextlib.asynccontextmanager
async def open_ledger(config: Config, *, create: bool = True) -> AsyncIterator[Ledger | None]:
    target = config.settings.state.target
    if not create and not ledger_exists(target):
        yield None
        return
    async with Ledger.open(target) as ledger:
        yield ledger


@dataclass(frozen=True)
class PlanReport:
    mailings: list[Mailing]
    finishes: dict[str, Finish]  # under the relay's quotas; {} without any


async def current_plan(config: Config, now: datetime) -> PlanReport:
    async with open_ledger(config, create=False) as ledger:
        if ledger is None:
            mailings = plan(PlanInput.of(config), EmptyLedger(), now)
            return PlanReport(mailings, forecast(mailings, quotas_of(config), [], now))
        optouts = await ledger.optouts(config.series.id)
        view = await ledger.view(config.series.id)
        merged = with_registrations(config, view.registrations())
        mailings = plan(PlanInput.of(merged, optouts), view, now)
        # The record of sends is in wall-clock time; a replayed --now sees it
        # as the same time before *now*.
        wall = time.time()
        sent = [
            now + timedelta(seconds=at - wall) for at in await ledger.recent_sends(wall - 86400)
        ]
        return PlanReport(mailings, forecast(mailings, quotas_of(config), sent, now))


@dataclass
class Status:
    mailings: list[Mailing]
    failed: list[Delivery]
    uncertain: list[Delivery]
    retrying: list[Delivery]
    registered: dict[str, int] = field(default_factory=dict)  # per date
    bounces: list[BounceRecord] = field(default_factory=list)
    nodes: list[NodeRow] = field(default_factory=list)  # PostgreSQL: who works on the ledger
    heartbeat_seconds: float = 10.0


def registered_per_date(config: Config) -> dict[str, int]:
    """How many contacts are registered for each date (with the ledger's merged in)."""
    return {
        e.id: sum(1 for c in config.contacts.contacts if c.is_registered(e.id))
        for e in config.series.events
    }


async def registered_counts(config: Config) -> dict[str, int]:
    """:func:`registered_per_date` with the ledger's registrations, if there is a ledger."""
    async with open_ledger(config, create=False) as ledger:
        if ledger is not None:
            config = with_registrations(config, await ledger.registrations(config.series.id))
    return registered_per_date(config)


async def status(config: Config, now: datetime) -> Status:
    async with open_ledger(config, create=False) as ledger:
        if ledger is None:
            mailings = plan(PlanInput.of(config), EmptyLedger(), now)
            return Status(mailings, [], [], [], registered_per_date(config))
        optouts = await ledger.optouts(config.series.id)
        view = await ledger.view(config.series.id)
        series_id = config.series.id
        merged = with_registrations(config, view.registrations())
        return Status(
            mailings=plan(PlanInput.of(merged, optouts), view, now),
            failed=await ledger.deliveries(series_id, states=[DeliveryState.FAILED]),
            uncertain=await ledger.deliveries(
                series_id, states=[DeliveryState.UNCERTAIN, DeliveryState.SENDING]
            ),
            retrying=await ledger.deliveries(series_id, states=[DeliveryState.PENDING], tried=True),
            registered=registered_per_date(merged),
            bounces=await ledger.bounces(series_id),
            nodes=await ledger.nodes() if ledger.shared else [],
            heartbeat_seconds=config.settings.state.heartbeat_seconds,
        )


# --- preview -----------------------------------------------------------------------


def pick_event(config: Config, kind: Kind, event_id: str | None) -> Event | None:
    if kind is Kind.INVITATION:
        return None
    if event_id is None:
        return config.series.events[0]
    return registrations.pick(config, event_id)


async def snapshot(config: Config) -> LedgerView | None:
    """The ledger's view of the series, or None when nothing was ever sent."""
    async with open_ledger(config, create=False) as ledger:
        return None if ledger is None else await ledger.view(config.series.id)


def pick_contacts(
    config: Config, kind: Kind, event: Event | None, email: str | None
) -> list[Contact]:
    if email is not None:
        contact = config.contacts.by_key(email.lower())
        if contact is None:
            raise ConfigError.single(
                config.contacts.source,
                f"no contact with the address {email!r}",
                hint="pass --contact with an address from the contact list",
            )
        return [contact]
    if kind in (Kind.UPDATE, Kind.CANCELLATION):
        members = list(config.contacts.contacts)
    else:
        members = audience_of(
            kind, event, config.series, config.contacts.contacts, config.attendance
        )
    if not members:
        members = list(config.contacts.contacts)
    return members[:1]


def preview(
    config: Config,
    kind: Kind,
    *,
    event_id: str | None,
    email: str | None,
    out: Path,
    now: datetime,
    view: LedgerView | None = None,
) -> list[Path]:
    """Write the exact message(s) as ``.eml`` plus the HTML part as ``.html``.

    With the ledger's *view*, calendar files carry the SEQUENCE the real mail
    would, and an update shows what changed since the contact's last mail.
    """
    event = pick_event(config, kind, event_id)
    written = []
    if view is not None:
        config = with_registrations(config, view.registrations())
    sequences = sequences_of(config.series, view)
    builder = WireComposer(Composer.from_config(config))  # the builder send-due uses
    signer = DkimSigner.from_settings(config.settings)  # and the transports' signature
    for contact in pick_contacts(config, kind, event, email):
        request = request_for(
            kind,
            event,
            contact,
            now,
            attendance=config.attendance,
            ledger=view,
            sequences=sequences,
            series=config.series,
        )
        wire = builder.wire_for(request)
        if signer is not None:
            wire = signer.sign(wire)
        stem = safe_name(str(kind), event.id if event else "", contact.key)
        html = mime.parse(wire).get_body(("html",))
        with writing(out):
            out.mkdir(parents=True, exist_ok=True)
            eml = out / f"{stem}.eml"
            write_file(eml, wire.data)
            written.append(eml)
            if html is not None:
                path = out / f"{stem}.html"
                write_file(path, html.get_content().encode("utf-8"))
                written.append(path)
    return written


def write_file(path: Path, data: bytes) -> None:
    """Replace *path*; a link standing there is replaced, never written through."""
    if path.is_symlink():
        path.unlink()
    path.write_bytes(data)


def safe_name(*parts: str, limit: int = 120) -> str:
    """A file name from data: no separators, no leading dot, short enough for any file system.

    A shortened name ends in a hash of the whole, so two long addresses still
    get two files.
    """
    text = "-".join(p for p in parts if p)
    name = re.sub(r"[^A-Za-z0-9._@-]+", "_", text).lstrip(".") or "mail"
    if len(name) > limit:
        digest = hashlib.sha256(text.encode()).hexdigest()[:12]
        name = f"{name[: limit - 13]}-{digest}"
    return name


# --- send-due and send-test ------------------------------------------------------------


@dataclass
class SendDueResult:
    result: PassResult
    recovered: list[Delivery]
    destination: str
    stopped_by: str | None = None  # the signal that ended the pass early

    @property
    def given_back(self) -> int:
        """Mails due in this pass that neither went out nor failed: the next run sends them."""
        result = self.result
        due = sum(len(r.mailing.outstanding) for r in result.mailings.values())
        done = sum(result.total(o) for o in (Outcome.SENT, Outcome.FAILED, Outcome.RETRY))
        return max(0, due - done)


def destination(config: Config) -> str:
    transport = config.settings.transport
    if transport.kind == "outbox":
        return f"outbox {transport.outbox_dir.resolve()}"
    smtp = config.settings.smtp
    return f"smtp {smtp.host}:{smtp.port} ({smtp.security})"


@contextlib.contextmanager
def locked(config: Config) -> Iterator[None]:
    """With SQLite, the lock that lets one process send; PostgreSQL needs none."""
    if config.settings.state.is_postgresql:
        yield
        return
    path = config.settings.state.path
    with contextlib.ExitStack() as stack:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            stack.enter_context(state_lock(path))
        except OSError as exc:
            raise ConfigError.single(
                Path(exc.filename) if exc.filename is not None else path.parent,
                f"cannot write the state folder: {_reason(exc)}",
                hint="run where the state folder may be written (as the user that owns it), "
                "or point [state] url at a writable place",
            ) from None
        yield


async def send_due(
    config: Config, now: datetime, *, on_progress: ProgressCallback | None = None
) -> SendDueResult:
    """One pass (the burst form of ``run``); the caller holds :func:`locked`.

    Every mailing is rendered once first, so a broken template stops the pass
    before anything is sent rather than halfway through.
    """
    composer = Composer.from_config(config)
    validate_sample(config, composer)
    async with open_sending(config.settings.state, "send-due") as ledger:
        recovered = await ledger.recover(now)
        async with make_transport(config.settings) as transport:
            dispatcher = Dispatcher(
                config, ledger, transport, on_progress=on_progress, composer=composer
            )
            # SIGTERM (systemd, docker stop, a cron timeout) ends the pass the
            # way the daemon does: waiting mails go back, in-flight ones finish.
            loop = asyncio.get_running_loop()
            stopped_by: list[str] = []

            def on_sigterm() -> None:
                stopped_by.append("SIGTERM")
                dispatcher.stop.set()

            loop.add_signal_handler(signal.SIGTERM, on_sigterm)
            try:
                result = await dispatcher.run_pass(now)
            finally:
                loop.remove_signal_handler(signal.SIGTERM)
    return SendDueResult(
        result, recovered, destination(config), stopped_by[0] if stopped_by else None
    )


async def send_test(
    config: Config, kind: Kind, *, to: str, event_id: str | None, email: str | None, now: datetime
) -> str:
    """Send one rendered sample to *to*; the ledger is not touched."""
    event = pick_event(config, kind, event_id)
    contact = pick_contacts(config, kind, event, email)[0]
    # Its own Message-ID: with the real one, the tester's client (or the relay)
    # would thread it with, or drop it as a duplicate of, the contact's real mail.
    request = request_for(kind, event, contact, now, attendance=config.attendance)
    composer = Composer.from_config(config)
    rendered = composer.render(request)
    message = mime.build(replace(rendered, message_id=composer.fresh_message_id()))
    test = _readdress(message, to)
    sender = config.settings.sender.from_address.addr_spec
    async with make_transport(config.settings) as transport:
        return await transport.send(mime.wire(test), sender=sender, recipients=[to])


def _readdress(message: EmailMessage, to: str) -> EmailMessage:
    copy = EmailMessage(policy=message.policy)
    for name, value in message.items():
        copy[name] = value
    copy.set_payload(message.get_payload())
    original_to = str(message["To"])
    del copy["To"]
    # An international domain in its ASCII form, as in every delivery's To header.
    copy["To"] = header_address(to)
    subject = str(message["Subject"])
    del copy["Subject"]
    copy["Subject"] = f"[Test] {subject}"
    copy["X-Invite-Mailer-Test-For"] = original_to
    return copy
