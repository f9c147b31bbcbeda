"""One delivery pass: everything due and open at ``now`` goes out, once.

The order of writes is what makes "never twice" hold: a delivery is claimed
(``sending``, committed) before its message is handed to the transport, and
its outcome is committed after the relay answered. Claims and outcomes are
written in batches through the pass's :class:`LedgerWindow`, which holds at
most ``limits.max_in_flight`` mails claimed without a committed outcome. A
crash leaves those ``sending``; the next start turns them into ``uncertain``
and sends them again. So at most that many mails can arrive twice, and none
is lost.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TypeVar

from invite_mailer.core.plan import (
    Mailing,
    MailRequest,
    PlanInput,
    calendar_dates,
    plan,
    request_for,
    sequences_of,
)
from invite_mailer.core.registrations import csv_registrations, with_registrations
from invite_mailer.delivery.handover import Handover, track_handover
from invite_mailer.delivery.ledger import (
    Claim,
    DeliveryKey,
    DeliveryState,
    Finish,
    Ledger,
    LedgerView,
    format_version,
    release,
)
from invite_mailer.delivery.results import MailingResult, Outcome, PassResult, ProgressCallback
from invite_mailer.delivery.return_path import envelope_sender
from invite_mailer.delivery.senders import Item, SenderPool, by_priority, log_counts, log_start
from invite_mailer.delivery.summaries import send_summaries
from invite_mailer.delivery.transport import Transport
from invite_mailer.delivery.window import LedgerWindow, default_size
from invite_mailer.errors import (
    ConfigError,
    InviteMailerError,
    LedgerError,
    PermanentFailure,
    QuotaReached,
    SenderRefused,
    SetupFailure,
    TemporaryFailure,
    UncertainFailure,
)
from invite_mailer.inputs.config import Config
from invite_mailer.mail import mime
from invite_mailer.mail.compose import Composer
from invite_mailer.mail.mime import Wire
from invite_mailer.mail.workers import WirePipeline, pipeline

__all__ = ["Dispatcher", "MailingResult", "Outcome", "PassResult", "ProgressCallback"]

log = logging.getLogger("invite_mailer.delivery.dispatch")

_T = TypeVar("_T")


async def _settle(step: Awaitable[_T]) -> _T:
    """Await *step* to its end even when cancelled meanwhile (then re-raise).

    For ledger writes: a record cut off half-way would leave a mail claimed
    that never left, or lose the relay's answer for one that did.
    """
    task = asyncio.ensure_future(step)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await asyncio.wait([task])
        raise


@dataclass(frozen=True, slots=True)
class _Composed:
    """One mail ready to claim and send."""

    key: DeliveryKey
    email: str
    wire: Wire
    version: str  # what it describes, see format_version


class Dispatcher:
    """Runs delivery passes for one loaded :class:`Config`."""

    def __init__(
        self,
        config: Config,
        ledger: Ledger,
        transport: Transport,
        *,
        workers: int | None = None,
        retry_in_pass_seconds: float | None = None,
        on_progress: ProgressCallback | None = None,
        clock: Callable[[], float] = time.monotonic,
        composer: Composer | None = None,
    ) -> None:
        self.config = config
        if composer is not None:
            self.composer = composer  # else built on first use (see below)
        self.ledger = ledger
        self.transport = transport
        limits = config.settings.limits
        self.workers = workers or config.settings.smtp.max_connections
        # Bounds how many mails a crash can leave in doubt (see delivery.window).
        self.max_in_flight = limits.max_in_flight or default_size(self.workers)
        self.retry_in_pass_seconds = (
            limits.retry_in_pass_seconds if retry_in_pass_seconds is None else retry_in_pass_seconds
        )
        self.on_progress = on_progress
        self.clock = clock
        self.stop = asyncio.Event()
        self._view: LedgerView = LedgerView.empty(config.series.id)
        self._sequences: dict[str, int] = {}
        self._issued: set[str] = set()
        self._wires: WirePipeline | None = None
        self._window: LedgerWindow | None = None
        self._senders: SenderPool | None = None  # of the pass running
        # What a worker's current send has handed over (see Handover).
        self._handovers: dict[asyncio.Task[object], Handover] = {}
        # An error that stops the whole pass (the setup or the ledger).
        self._halted: InviteMailerError | None = None

    @functools.cached_property
    def composer(self) -> Composer:
        """The composer of the config, built on first use: planning needs none."""
        return Composer.from_config(self.config)

    async def plan(self, now: datetime) -> list[Mailing]:
        """The plan at *now*, with opt-outs from the file and the ledger merged."""
        series_id = self.config.series.id
        optouts = await self.ledger.optouts(series_id)
        view = await self.ledger.view(series_id)
        return plan(PlanInput.of(self.config, optouts), view, now)

    async def run_pass(self, now: datetime) -> PassResult:
        """Send everything that is due and open at *now*; return what happened."""
        await self._begin_pass(now)
        # The view taken for the pass serves its plan too: read once per pass.
        optouts = await self.ledger.optouts(self.config.series.id)
        mailings = plan(PlanInput.of(self.config, optouts), self._view, now)
        result, items = self._collect(mailings, now)
        if not items:
            await send_summaries(self.config, self.ledger, self.transport, result, mailings, now)
            return result
        senders = SenderPool(
            items,
            result,
            now,
            deliver=self._deliver,
            halt=self._halt,
            stop=self.stop,
            workers=self.workers,
            clock=self.clock,
            on_progress=self.on_progress,
            handovers=self._handovers,
            drain_timeout=self.config.settings.smtp.timeout + 5,
        )
        # Mails are composed ahead of the senders (in a second process for a
        # big pass) straight into wire bytes; see mail.workers.
        self._wires = pipeline(
            self.config,
            self.composer,
            [(i.mailing.kind, i.mailing.event, i.key) for i in items],
            sequences=self._sequences,
            clock=senders.now,
        )
        log_start(result, items)
        self._window = window = LedgerWindow(self.ledger, self.max_in_flight)
        self._senders = senders
        try:
            await senders.run()
        finally:
            self._senders = None
            if self._wires is not None:
                await self._wires.aclose()
                self._wires = None
            await self._close_window(window)
        log_counts(result)
        if self._halted is not None:
            # The reason is the error itself, reported once by whoever runs the pass.
            log.warning("delivery pass stopped after %d sent", result.total(Outcome.SENT))
            raise self._halted
        if not result.stopped:
            await send_summaries(
                self.config, self.ledger, self.transport, result, mailings, senders.now()
            )
        return result

    async def _close_window(self, window: LedgerWindow) -> None:
        """Commit the pass's last outcomes (on a stop too); a failure halts the pass."""
        self._window = None
        try:
            await _settle(window.aclose())
        except LedgerError as exc:
            if self._halted is not None and str(exc) != str(self._halted):
                log.error("could not record the last outcomes of the pass: %s", exc)
            self._halt(exc)
        log.debug(
            "ledger: %d batch(es), at most %d of %d mails in flight",
            window.batches,
            window.peak,
            window.size,
        )

    async def _begin_pass(self, now: datetime) -> None:
        """Record the dates as they are now and take the ledger's view of the series."""
        series = self.config.series
        # Remember what each date looks like now: a change starts the grace
        # period of its update mail.
        await self.ledger.observe_dates(
            series.id, {e.id: (e.version, e.fingerprint()) for e in series.events}, now
        )
        # Registrations new in the contact list are recorded with this pass's
        # time, and everyone's registrations (link, CLI) merged in for the pass.
        listed = csv_registrations(self.config.contacts, series)
        await self.ledger.observe_registrations(series.id, listed, now)
        view = await self.ledger.view(series.id)
        self._view = view
        self.config = with_registrations(self.config, view.registrations())
        self._sequences = sequences_of(series, view)
        self._issued = set()
        self._halted = None
        share = getattr(self.transport, "share_rate_limit", None)
        if share is not None:
            # Sends of earlier processes in the last minute count too.
            await share(self.ledger)

    def _collect(self, mailings: list[Mailing], now: datetime) -> tuple[PassResult, list[Item]]:
        """The pass's result so far and the mails to send now, in plan order."""
        view = self._view
        result = PassResult(now=now)
        items: list[Item] = []
        for mailing in mailings:
            if not mailing.sendable:
                continue
            result.mailings[mailing.id] = MailingResult(mailing)
            for key in mailing.outstanding:
                retry_at = view.next_attempt(mailing.ledger_kind, mailing.event, key)
                if retry_at is not None and retry_at > now:
                    # Still backing off from a temporary failure: "to retry later".
                    result.mailings[mailing.id].counts[Outcome.RETRY] += 1
                    continue
                # Backoff keeps growing across passes while a relay stays down.
                tried = view.attempts(mailing.ledger_kind, mailing.event, key)
                items.append(Item(mailing, key, attempt=tried + 1))
        return result, by_priority(items)

    def _quota_reached(self, result: PassResult, exc: QuotaReached) -> None:
        """Stop the pass cleanly: the relay's quota takes no more mail until it reopens."""
        if result.quota is None:
            result.quota = exc
            log.info(
                "%s: no more mail until %s; the rest waits",
                exc,
                datetime.fromtimestamp(exc.reopens_at, UTC).isoformat(timespec="seconds"),
            )
        if self._senders is not None:
            self._senders.drain()

    def _halt(self, exc: InviteMailerError) -> None:
        """Stop the pass for a reason no single mail is at fault for; reported once."""
        if self._halted is None:
            self._halted = exc
        self.stop.set()

    async def _deliver(
        self, item: Item, now: datetime, result: PassResult, started: float
    ) -> tuple[Outcome, float | None]:
        """Compose, claim, send and record one mail.

        Returns the outcome and, for a temporary failure that is retried within
        this pass, the delay before the next attempt.
        """
        mail = await self._prepare(item, now)
        if mail is None:
            return Outcome.SKIPPED, None
        me = asyncio.current_task()
        assert me is not None
        with track_handover(fence=self.ledger.check_lease) as handover:
            self._handovers[me] = handover
            try:
                return await self._send(item, mail, now, result, started)
            except asyncio.CancelledError:
                # Stopped (SIGTERM, a cancelled pass): a mail that never left is
                # given back at once; only one whose data was out may have arrived.
                self._stopped_during(mail.key, handover, now)
                raise
            except InviteMailerError:
                raise
            except Exception as exc:
                self._failed_locally(item, mail.key, handover, exc, now)
                return Outcome.RETRY, None
            finally:
                del self._handovers[me]

    async def _prepare(self, item: Item, now: datetime) -> _Composed | None:
        """The composed mail for *item*, or None when it is not to be sent now."""
        mailing = item.mailing
        if now >= mailing.deadline:
            return None
        config = self.config
        contact = config.contacts.by_key(item.key)
        if contact is None:  # removed by a reload since the plan was made
            return None
        event = config.series.event(mailing.event) if mailing.event else None
        key = DeliveryKey(config.series.id, mailing.ledger_kind, mailing.event, contact.key)
        request = request_for(
            mailing.kind,
            event,
            contact,
            now,
            attendance=config.attendance,
            ledger=self._view,
            sequences=self._sequences,
            series=config.series,
        )
        described = calendar_dates(request, config.series)
        try:
            message = await self._compose(request)
        except ConfigError as exc:
            # validate renders everything up front, so this means a file changed
            # under us; record nothing and leave the mail for the next pass.
            log.error("cannot compose %s for %s: %s", mailing.id, contact.email, exc)
            return None
        for date in described:
            # The first mail about a new version fixes its calendar SEQUENCE.
            if date.id not in self._issued:
                self._issued.add(date.id)
                await self.ledger.issue_sequence(config.series.id, date.id, date.version)
        version = format_version({date.id: date.version for date in described})
        return _Composed(key, contact.email, message, version)

    async def _send(
        self, item: Item, mail: _Composed, now: datetime, result: PassResult, started: float
    ) -> tuple[Outcome, float | None]:
        """Claim, send and record one composed mail."""
        key, message, window = mail.key, mail.wire, self._ledger_window()
        check_quota = getattr(self.transport, "check_quota", None)
        try:
            if check_quota is not None:
                check_quota()  # a full hour or day: no claim, nothing to give back
        except QuotaReached as exc:
            self._quota_reached(result, exc)
            return Outcome.DEFERRED, None
        # A one-click opt-out can arrive while a long, rate-limited pass runs:
        # the claim checks it in the same transaction, just before the send.
        claim = Claim(key, message.message_id, now, mail.version, unless_opted_out=True)
        if not await window.claim(claim):
            return Outcome.SKIPPED, None
        sender = envelope_sender(self.config.settings, self.config.series.id, mail.email)
        try:
            self.ledger.check_lease()  # several nodes: is this mail still ours?
            answer = await self.transport.send(message, sender=sender, recipients=[mail.email])
        except QuotaReached as exc:
            # Another sender took the last place: nothing left, the mail waits.
            window.finish(release(key, now))
            self._quota_reached(result, exc)
            return Outcome.DEFERRED, None
        except (SetupFailure, LedgerError) as exc:
            # TLS, login, the outbox, a lost lease: nothing left, no mail at fault.
            window.finish(release(key, now))
            self._halt(exc)
            return Outcome.SKIPPED, None
        except SenderRefused as exc:
            # Not this recipient's fault: undo the claim and stop the pass.
            window.finish(release(key, now))
            self._sender_refused(result, sender, exc)
            return Outcome.SKIPPED, None
        except PermanentFailure as exc:
            window.finish(Finish(key, DeliveryState.FAILED, exc.response, now))
            self._refused_permanently(item, mail, result, exc)
            return Outcome.FAILED, None
        except TemporaryFailure as exc:
            return self._failed_temporarily(item, mail, exc, now, started)
        # Queued: committed with the next batch, before the window can overflow.
        window.finish(Finish(key, DeliveryState.SENT, answer, now))
        return Outcome.SENT, None

    def _ledger_window(self) -> LedgerWindow:
        if self._window is None:
            raise LedgerError("no delivery pass is running: nothing can be claimed")
        return self._window

    def _sender_refused(self, result: PassResult, sender: str, exc: SenderRefused) -> None:
        """Report the relay's refusal of our sender once, and stop the pass."""
        if result.sender_refused is None:
            result.sender_refused = exc.response
            log.error(
                "the relay refuses the sender address %s: %s; stopping this pass "
                "(check [sender] address and the relay's permissions)",
                sender,
                exc.response,
            )
        self.stop.set()

    def _refused_permanently(
        self, item: Item, mail: _Composed, result: PassResult, exc: PermanentFailure
    ) -> None:
        mailing_id = item.mailing.id
        result.failures.append((mailing_id, mail.email, exc.response))
        log.warning(
            "mailing %s: %s refused permanently: %s",
            mailing_id,
            mail.email,
            exc.response,
            extra={"mailing": mailing_id, "recipient": mail.email},
        )

    def _failed_temporarily(
        self, item: Item, mail: _Composed, exc: TemporaryFailure, now: datetime, started: float
    ) -> tuple[Outcome, float | None]:
        """Record a temporary failure; the delay when it is retried within this pass."""
        mailing, key = item.mailing, mail.key
        delay = self._backoff(item.attempt)
        next_at = (now.astimezone(UTC) + timedelta(seconds=delay)).astimezone(now.tzinfo)
        if isinstance(exc, UncertainFailure):
            # The data went out but no answer came back: it may have been
            # delivered. Retried like a temporary failure (at least once
            # beats never), and shown as uncertain by status meanwhile.
            state = DeliveryState.UNCERTAIN
        else:
            state = DeliveryState.PENDING
        self._ledger_window().finish(Finish(key, state, exc.response, now, next_at))
        in_pass = (self.clock() - started) + delay <= self.retry_in_pass_seconds
        in_window = next_at < mailing.deadline
        log.warning(
            "mailing %s: %s temporary failure (attempt %d), retry in %.1fs: %s",
            mailing.id,
            mail.email,
            item.attempt,
            delay,
            exc.response,
            extra={"mailing": mailing.id, "recipient": mail.email},
        )
        return (
            Outcome.RETRY,
            delay if in_pass and in_window and not self.stop.is_set() else None,
        )

    def _stopped_during(self, key: DeliveryKey, handover: Handover, now: datetime) -> None:
        """After a cancellation: give a claimed mail back, unless its data was out."""
        window = self._window
        if window is None or not window.holds(key):
            return  # not claimed yet, or its outcome is recorded already
        if handover.started:
            response = "stopped while the message data was being sent; it may have arrived"
            window.finish(Finish(key, DeliveryState.UNCERTAIN, response, now))
        else:
            window.finish(release(key, now))

    def _failed_locally(
        self, item: Item, key: DeliveryKey, handover: Handover, exc: Exception, now: datetime
    ) -> None:
        """An error of this machine (a file, a bug) while sending one mail."""
        reason = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, OSError):
            log.error("mailing %s: %s not sent: %s", item.mailing.id, key.email, reason)
        else:
            log.exception("mailing %s: unexpected error", item.mailing.id)
        window = self._window
        if window is None or not window.holds(key):
            return  # not claimed: nothing to record
        if handover.started:
            # The bytes had begun to leave: it may have arrived.
            window.finish(Finish(key, DeliveryState.UNCERTAIN, f"unexpected error: {reason}", now))
            return
        # Nothing left this machine: pending again, for a later pass.
        delay = self._backoff(item.attempt)
        next_at = (now.astimezone(UTC) + timedelta(seconds=delay)).astimezone(now.tzinfo)
        window.finish(Finish(key, DeliveryState.PENDING, f"not sent: {reason}", now, next_at))

    async def _compose(self, request: MailRequest) -> Wire:
        """The mail's wire bytes, from the pass's pipeline (or the reference build)."""
        if self._wires is not None:
            return await self._wires.wire_for(request)
        return mime.wire(mime.build(self.composer.render(request)))

    def _backoff(self, attempt: int) -> float:
        limits = self.config.settings.limits
        base = min(limits.retry_initial_seconds * 2.0 ** (attempt - 1), limits.retry_max_seconds)
        # Full jitter in the upper half keeps parallel workers from retrying in lockstep.
        return base * random.uniform(0.5, 1.0)
