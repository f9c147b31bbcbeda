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
import logging
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import TypeVar

from invite_mailer.core.plan import Mailing, MailRequest, plan, request_for, sequences_of
from invite_mailer.delivery.ledger import (
    DeliveryKey,
    DeliveryState,
    Ledger,
    LedgerError,
    LedgerView,
    format_version,
)
from invite_mailer.delivery.transport import Handover, Transport, UncertainFailure, track_handover
from invite_mailer.errors import (
    ConfigError,
    InviteMailerError,
    PermanentFailure,
    SenderRefused,
    SetupFailure,
    TemporaryFailure,
)
from invite_mailer.inputs.config import Config
from invite_mailer.mail import mime
from invite_mailer.mail.mime import Wire
from invite_mailer.mail.summary import compose_summary
from invite_mailer.mail.workers import WirePipeline, pipeline

log = logging.getLogger("invite_mailer.delivery.dispatch")

_T = TypeVar("_T")

SUMMARY_KIND = "summary"


class Outcome(StrEnum):
    SENT = "sent"
    FAILED = "failed"
    RETRY = "retry"
    SKIPPED = "skipped"


@dataclass
class MailingResult:
    mailing: Mailing
    counts: Counter[Outcome] = field(default_factory=Counter)


@dataclass
class PassResult:
    """What one pass did."""

    now: datetime
    mailings: dict[str, MailingResult] = field(default_factory=dict)
    failures: list[tuple[str, str, str]] = field(default_factory=list)  # mailing id, email, answer
    stopped: bool = False
    sender_refused: str | None = None  # the relay's answer when it refused our sender
    reports_sent: int = 0  # summaries to the organiser

    def total(self, outcome: Outcome) -> int:
        return sum(r.counts[outcome] for r in self.mailings.values())


ProgressCallback = Callable[[Mailing, str, Outcome], None]


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
class _Item:
    mailing: Mailing
    key: str
    attempt: int = 1


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
    ) -> None:
        self.config = config
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

    async def plan(self, now: datetime) -> list[Mailing]:
        """The plan at *now*, with opt-outs from the file and the ledger merged."""
        series_id = self.config.series.id
        optouts = await self.ledger.optouts(series_id)
        view = await self.ledger.view(series_id)
        return plan(self.config.plan_input(optouts), view, now)

    async def run_pass(self, now: datetime) -> PassResult:
        """Send everything that is due and open at *now*; return what happened."""
        series_id = self.config.series.id
        series = self.config.series
        # Remember what each date looks like now: a change starts the grace
        # period of its update mail.
        await self.ledger.observe_dates(
            series_id, {e.id: (e.version, e.fingerprint()) for e in series.events}, now
        )
        view = await self.ledger.view(series_id)
        self._view = view
        self._sequences = sequences_of(series, view)
        self._issued = set()
        self._halted = None
        share = getattr(self.transport, "share_rate_limit", None)
        if share is not None:
            # Sends of earlier processes in the last minute count too.
            await share(self.ledger)
        mailings = await self.plan(now)
        result = PassResult(now=now)
        items: list[_Item] = []
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
                items.append(_Item(mailing, key, attempt=tried + 1))
        if not items:
            await self._send_summaries(result, now)
            return result
        started = self.clock()

        now_utc, zone = now.astimezone(UTC), now.tzinfo

        def virtual_now() -> datetime:
            # Elapsed time is added in UTC (same-zone aware arithmetic is wall-clock).
            return (now_utc + timedelta(seconds=self.clock() - started)).astimezone(zone)

        # Mails are composed ahead of the senders (in a second process for a
        # big pass) straight into wire bytes; see mail.workers.
        self._wires = pipeline(
            self.config,
            [(i.mailing.kind, i.mailing.event, i.key) for i in items],
            sequences=self._sequences,
            clock=virtual_now,
        )
        for mailing_id in result.mailings:
            todo = sum(1 for i in items if i.mailing.id == mailing_id)
            if todo:
                log.info(
                    "mailing %s: sending to %d recipient(s)",
                    mailing_id,
                    todo,
                    extra={"mailing": mailing_id, "recipients": todo},
                )
        queue: asyncio.Queue[_Item] = asyncio.Queue()
        for item in items:
            queue.put_nowait(item)
        remaining = len(items)
        finished = asyncio.Event()
        delayed: set[asyncio.Task[object]] = set()
        busy: set[asyncio.Task[object]] = set()  # workers with a mail in hand

        def done_one() -> None:
            nonlocal remaining
            remaining -= 1
            if remaining == 0:
                finished.set()

        async def requeue_later(item: _Item, delay: float) -> None:
            await asyncio.sleep(delay)
            if self.stop.is_set():
                done_one()
            else:
                queue.put_nowait(item)

        async def worker() -> None:
            while not self.stop.is_set():
                item = await queue.get()
                if self.stop.is_set():
                    done_one()
                    return
                me = asyncio.current_task()
                assert me is not None
                busy.add(me)
                try:
                    outcome, delay = await self._deliver(item, virtual_now(), result, started)
                except LedgerError as exc:
                    # Nothing can be recorded: no further mail may go out.
                    self._halt(exc)
                    outcome, delay = Outcome.RETRY, None
                except Exception:
                    # A bug must not hang the pass: the other mails go on,
                    # this one is left to a later pass.
                    log.exception("mailing %s: unexpected error", item.mailing.id)
                    outcome, delay = Outcome.RETRY, None
                finally:
                    busy.discard(me)
                counts = result.mailings[item.mailing.id].counts
                counts[outcome] += 1 if outcome is not Outcome.RETRY or delay is None else 0
                if self.on_progress is not None and (outcome is not Outcome.RETRY or delay is None):
                    self.on_progress(item.mailing, item.key, outcome)
                if outcome is Outcome.RETRY and delay is not None:
                    task = asyncio.create_task(
                        requeue_later(_Item(item.mailing, item.key, item.attempt + 1), delay)
                    )
                    delayed.add(task)
                    task.add_done_callback(delayed.discard)
                else:
                    done_one()

        tasks: list[asyncio.Task[object]] = [
            asyncio.create_task(worker()) for _ in range(min(self.workers, len(items)))
        ]
        stop_wait: asyncio.Task[object] = asyncio.create_task(self.stop.wait())
        finish_wait: asyncio.Task[object] = asyncio.create_task(finished.wait())
        try:
            await asyncio.wait({stop_wait, finish_wait}, return_when=asyncio.FIRST_COMPLETED)
            if self.stop.is_set():
                # Let sends whose data is out finish and be recorded; the others
                # (waiting for a connection or a rate-limit slot, connecting)
                # stop at once and give their mail back. Take nothing new.
                result.stopped = True
                for task in delayed:
                    task.cancel()
                for task in busy:
                    handover = self._handovers.get(task)
                    if handover is None or not handover.started:
                        task.cancel()
                # Idle workers wait on the queue for ever: wait for the busy ones only.
                if busy:
                    await asyncio.wait(set(busy), timeout=self.config.settings.smtp.timeout + 5)
        finally:
            pending: list[asyncio.Task[object]] = [*tasks, stop_wait, finish_wait, *delayed]
            for waiter in pending:
                waiter.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            if self._wires is not None:
                await self._wires.aclose()
                self._wires = None

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
        if self._halted is not None:
            # The reason is the error itself, reported once by whoever runs the pass.
            log.warning("delivery pass stopped after %d sent", result.total(Outcome.SENT))
            raise self._halted
        if not result.stopped:
            await self._send_summaries(result, virtual_now())
        return result

    def _halt(self, exc: InviteMailerError) -> None:
        """Stop the pass for a reason no single mail is at fault for; reported once."""
        if self._halted is None:
            self._halted = exc
        self.stop.set()

    async def _deliver(
        self, item: _Item, now: datetime, result: PassResult, started: float
    ) -> tuple[Outcome, float | None]:
        """Compose, claim, send and record one mail.

        Returns the outcome and, for a temporary failure that is retried within
        this pass, the delay before the next attempt.
        """
        mailing = item.mailing
        if now >= mailing.deadline:
            return Outcome.SKIPPED, None
        config = self.config
        contact = config.contacts.by_key(item.key)
        if contact is None:  # removed by a reload since the plan was made
            return Outcome.SKIPPED, None
        # A one-click opt-out can arrive while a long, rate-limited pass runs.
        if await self.ledger.is_opted_out(config.series.id, contact.key):
            return Outcome.SKIPPED, None
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
            return Outcome.SKIPPED, None
        for date in described:
            # The first mail about a new version fixes its calendar SEQUENCE.
            if date.id not in self._issued:
                self._issued.add(date.id)
                await self.ledger.issue_sequence(config.series.id, date.id, date.version)
        version = format_version({date.id: date.version for date in described})
        me = asyncio.current_task()
        assert me is not None
        with track_handover() as handover:
            self._handovers[me] = handover
            try:
                return await self._send(
                    item, key, contact.email, message, version, now, result, started
                )
            except asyncio.CancelledError:
                # Stopped (SIGTERM, a cancelled pass): a mail that never left is
                # given back at once; only one whose data was out may have arrived.
                await _settle(self._stopped_during(key, handover, now))
                raise
            except InviteMailerError:
                raise
            except Exception as exc:
                await _settle(self._failed_locally(item, key, handover, exc, now))
                return Outcome.RETRY, None
            finally:
                del self._handovers[me]

    async def _send(
        self,
        item: _Item,
        key: DeliveryKey,
        contact_email: str,
        message: Wire,
        version: str,
        now: datetime,
        result: PassResult,
        started: float,
    ) -> tuple[Outcome, float | None]:
        """Claim, send and record one composed mail."""
        mailing, config = item.mailing, self.config
        if not await _settle(self.ledger.claim(key, message.message_id, now, version=version)):
            return Outcome.SKIPPED, None
        sender = config.settings.sender.from_address.addr_spec
        try:
            answer = await self.transport.send(message, sender=sender, recipients=[contact_email])
        except SetupFailure as exc:
            # TLS, login or the outbox folder: nothing left, no mail is at fault.
            await _settle(self.ledger.release(key, now))
            self._halt(exc)
            return Outcome.SKIPPED, None
        except SenderRefused as exc:
            # Not this recipient's fault: undo the claim and stop the pass.
            await _settle(self.ledger.release(key, now))
            if result.sender_refused is None:
                result.sender_refused = exc.response
                log.error(
                    "the relay refuses the sender address %s: %s; stopping this pass "
                    "(check [sender] address and the relay's permissions)",
                    sender,
                    exc.response,
                )
            self.stop.set()
            return Outcome.SKIPPED, None
        except PermanentFailure as exc:
            await _settle(self.ledger.mark_failed(key, exc.response, now))
            result.failures.append((mailing.id, contact_email, exc.response))
            log.warning(
                "mailing %s: %s refused permanently: %s",
                mailing.id,
                contact_email,
                exc.response,
                extra={"mailing": mailing.id, "recipient": contact_email},
            )
            return Outcome.FAILED, None
        except TemporaryFailure as exc:
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
                contact_email,
                item.attempt,
                delay,
                exc.response,
                extra={"mailing": mailing.id, "recipient": contact_email},
            )
            return (
                Outcome.RETRY,
                delay if in_pass and in_window and not self.stop.is_set() else None,
            )
        await _settle(self.ledger.mark_sent(key, answer, now))
        return Outcome.SENT, None

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
        self, item: _Item, key: DeliveryKey, handover: Handover, exc: Exception, now: datetime
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
        return mime.wire(mime.build(self.config.composer.render(request)))

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
