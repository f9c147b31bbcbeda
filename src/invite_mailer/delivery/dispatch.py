"""One delivery pass: everything due and open at ``now`` goes out, once.

The order of writes is what makes "never twice" hold: a delivery is claimed
(``sending``, committed) before its message is handed to the transport and
marked ``sent`` right after the relay accepted it. A crash between those two
writes leaves it ``sending``; the next start turns that into ``uncertain`` and
sends it again. So at most the mails in flight at the moment of a crash (one
per connection) can arrive twice, and none is lost.
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
    plan,
    request_for,
    sequences_of,
)
from invite_mailer.delivery.handover import Handover, track_handover
from invite_mailer.delivery.ledger import (
    DeliveryKey,
    DeliveryState,
    Ledger,
    LedgerView,
    format_version,
)
from invite_mailer.delivery.results import MailingResult, Outcome, PassResult, ProgressCallback
from invite_mailer.delivery.senders import Item, SenderPool
from invite_mailer.delivery.transport import Transport
from invite_mailer.errors import (
    ConfigError,
    InviteMailerError,
    LedgerError,
    PermanentFailure,
    SenderRefused,
    SetupFailure,
    TemporaryFailure,
    UncertainFailure,
)
from invite_mailer.inputs.config import Config
from invite_mailer.mail import mime
from invite_mailer.mail.compose import Composer
from invite_mailer.mail.mime import Wire
from invite_mailer.mail.summary import compose_summary
from invite_mailer.mail.workers import WirePipeline, pipeline

__all__ = ["Dispatcher", "MailingResult", "Outcome", "PassResult", "ProgressCallback"]

log = logging.getLogger("invite_mailer.delivery.dispatch")

_T = TypeVar("_T")

SUMMARY_KIND = "summary"


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
        result, items = self._collect(await self.plan(now), now)
        if not items:
            await self._send_summaries(result, now)
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
        _log_start(result, items)
        try:
            await senders.run()
        finally:
            if self._wires is not None:
                await self._wires.aclose()
                self._wires = None
        _log_counts(result)
        if self._halted is not None:
            # The reason is the error itself, reported once by whoever runs the pass.
            log.warning("delivery pass stopped after %d sent", result.total(Outcome.SENT))
            raise self._halted
        if not result.stopped:
            await self._send_summaries(result, senders.now())
        return result

    async def _begin_pass(self, now: datetime) -> None:
        """Record the dates as they are now and take the ledger's view of the series."""
        series = self.config.series
        # Remember what each date looks like now: a change starts the grace
        # period of its update mail.
        await self.ledger.observe_dates(
            series.id, {e.id: (e.version, e.fingerprint()) for e in series.events}, now
        )
        view = await self.ledger.view(series.id)
        self._view = view
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
        return result, items

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
        with track_handover() as handover:
            self._handovers[me] = handover
            try:
                return await self._send(item, mail, now, result, started)
            except asyncio.CancelledError:
                # Stopped (SIGTERM, a cancelled pass): a mail that never left is
                # given back at once; only one whose data was out may have arrived.
                await _settle(self._stopped_during(mail.key, handover, now))
                raise
            except InviteMailerError:
                raise
            except Exception as exc:
                await _settle(self._failed_locally(item, mail.key, handover, exc, now))
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
        # A one-click opt-out can arrive while a long, rate-limited pass runs.
        if await self.ledger.is_opted_out(config.series.id, contact.key):
            return None
        event = config.series.event(mailing.event) if mailing.event else None
        key = DeliveryKey(config.series.id, mailing.ledger_kind, mailing.event, contact.key)
        described = [event] if event is not None else config.series.active_events
        request = request_for(
            mailing.kind,
            event,
            contact,
            now,
            attendance=config.attendance,
            ledger=self._view,
            sequences=self._sequences,
        )
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
        key, message = mail.key, mail.wire
        if not await _settle(self.ledger.claim(key, message.message_id, now, version=mail.version)):
            return Outcome.SKIPPED, None
        sender = self.config.settings.sender.from_address.addr_spec
        try:
            answer = await self.transport.send(message, sender=sender, recipients=[mail.email])
        except SetupFailure as exc:
            # TLS, login or the outbox folder: nothing left, no mail is at fault.
            await _settle(self.ledger.release(key, now))
            self._halt(exc)
            return Outcome.SKIPPED, None
        except SenderRefused as exc:
            # Not this recipient's fault: undo the claim and stop the pass.
            await _settle(self.ledger.release(key, now))
            self._sender_refused(result, sender, exc)
            return Outcome.SKIPPED, None
        except PermanentFailure as exc:
            await _settle(self.ledger.mark_failed(key, exc.response, now))
            self._refused_permanently(item, mail, result, exc)
            return Outcome.FAILED, None
        except TemporaryFailure as exc:
            return await self._failed_temporarily(item, mail, exc, now, started)
        await _settle(self.ledger.mark_sent(key, answer, now))
        return Outcome.SENT, None

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

    async def _failed_temporarily(
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
            await _settle(self.ledger.mark_uncertain(key, exc.response, now, next_at))
        else:
            await _settle(self.ledger.mark_retry(key, exc.response, now, next_at))
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

    async def _stopped_during(self, key: DeliveryKey, handover: Handover, now: datetime) -> None:
        """After a cancellation: give a claimed mail back, unless its data was out."""
        try:
            current = await self.ledger.get(key)
            if current is None or current.state is not DeliveryState.SENDING:
                return  # not claimed yet, or already recorded
            if handover.started:
                await self.ledger.mark_uncertain(
                    key, "stopped while the message data was being sent; it may have arrived", now
                )
            else:
                await self.ledger.release(key, now)
        except LedgerError as exc:
            log.error("could not record that %s was stopped: %s", key, exc)

    async def _failed_locally(
        self, item: Item, key: DeliveryKey, handover: Handover, exc: Exception, now: datetime
    ) -> None:
        """An error of this machine (a file, a bug) while sending one mail."""
        reason = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, OSError):
            log.error("mailing %s: %s not sent: %s", item.mailing.id, key.email, reason)
        else:
            log.exception("mailing %s: unexpected error", item.mailing.id)
        current = await self.ledger.get(key)
        if current is None or current.state is not DeliveryState.SENDING:
            return
        if handover.started:
            # The bytes had begun to leave: it may have arrived.
            await self.ledger.mark_uncertain(key, f"unexpected error: {reason}", now)
            return
        # Nothing left this machine: pending again, for a later pass.
        delay = self._backoff(item.attempt)
        next_at = (now.astimezone(UTC) + timedelta(seconds=delay)).astimezone(now.tzinfo)
        await self.ledger.mark_retry(key, f"not sent: {reason}", now, next_at)

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

    async def _send_summaries(self, result: PassResult, now: datetime) -> None:
        """Tell the organiser once per mailing, when it has gone out to everyone."""
        config = self.config
        if not config.settings.notify.organiser_summary:
            return
        touched = {
            r.mailing.id
            for r in result.mailings.values()
            if r.counts[Outcome.SENT] or r.counts[Outcome.FAILED]
        }
        view = await self.ledger.view(config.series.id)
        organiser = str(config.series.organiser.email)
        for mailing in await self.plan(now):
            if mailing.outstanding or not (mailing.sent or mailing.failed):
                continue
            # Due when the mailing was completed in this pass, and while its
            # window is open also when an earlier try failed for a moment or
            # the pass that completed it was stopped before telling anyone.
            state = view.states(SUMMARY_KIND, mailing.id).get(organiser.lower())
            retry_at = view.next_attempt(SUMMARY_KIND, mailing.id, organiser)
            if mailing.id not in touched and (
                now >= mailing.deadline
                or state not in (None, "pending", "uncertain")
                or (retry_at is not None and retry_at > now)
            ):
                continue
            key = DeliveryKey(config.series.id, SUMMARY_KIND, mailing.id, organiser.lower())
            message = compose_summary(config, mailing, now=now)
            if not await self.ledger.claim(key, str(message["Message-ID"]), now):
                continue
            sender = config.settings.sender.from_address.addr_spec
            try:
                answer = await self.transport.send(
                    mime.wire(message), sender=sender, recipients=[organiser]
                )
            except PermanentFailure as exc:
                await self.ledger.mark_failed(key, exc.response, now)
            except (TemporaryFailure, OSError) as exc:
                response = exc.response if isinstance(exc, TemporaryFailure) else str(exc)
                await self.ledger.mark_retry(key, response, now, now + timedelta(minutes=5))
            else:
                await self.ledger.mark_sent(key, answer, now)
                result.reports_sent += 1


def _log_start(result: PassResult, items: list[Item]) -> None:
    for mailing_id in result.mailings:
        todo = sum(1 for i in items if i.mailing.id == mailing_id)
        if todo:
            log.info(
                "mailing %s: sending to %d recipient(s)",
                mailing_id,
                todo,
                extra={"mailing": mailing_id, "recipients": todo},
            )


def _log_counts(result: PassResult) -> None:
    for mailing_id, mailing_result in result.mailings.items():
        counts = mailing_result.counts
        if counts[Outcome.SENT] or counts[Outcome.FAILED] or counts[Outcome.RETRY]:
            log.info(
                "mailing %s: %d sent, %d failed, %d to retry",
                mailing_id,
                counts[Outcome.SENT],
                counts[Outcome.FAILED],
                counts[Outcome.RETRY],
                extra={"mailing": mailing_id, **{str(k): v for k, v in counts.items()}},
            )
