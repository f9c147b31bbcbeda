"""The plan: which mailings exist, when they are due, who still needs them.

:func:`plan` is pure: no clock, no I/O. It is called with everything it needs
(the series, the contacts, a snapshot of the ledger, ``now``) and returns the
same answer for the same input, which is what lets ``plan --now`` replay any
moment of a series and lets the daemon rebuild its jobs after every edit.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from types import MappingProxyType
from typing import Protocol

from invite_mailer.core.registrations import (
    Registration,
    confirmation_dates,
    confirmation_groups,
)
from invite_mailer.inputs.config import Config
from invite_mailer.inputs.contacts import Contact
from invite_mailer.inputs.series import Audience, Event, Kind, Series
from invite_mailer.inputs.timeline import mailing_times as mailing_times
from invite_mailer.inputs.values import shift

SERIES_WIDE = ""
"""The event id stored for mailings about the whole series (the invitation)."""

DONE_STATES = frozenset({"sent", "failed"})
"""Ledger states after which a recipient is never mailed again for a mailing."""


class MailingState(StrEnum):
    SCHEDULED = "scheduled"
    OPEN = "open"
    WAITING = "waiting-for-materials"
    DONE = "done"
    CLOSED = "closed"
    WITHDRAWN = "withdrawn"


class DateVersions(Protocol):
    """What the ledger remembers about the versions of one date."""

    @property
    def current(self) -> str: ...
    @property
    def observed_since(self) -> datetime: ...
    @property
    def details(self) -> Mapping[str, Mapping[str, str]]: ...
    def sequence_for(self, version: str) -> int: ...


class LedgerSnapshot(Protocol):
    """What the plan needs to know from the ledger."""

    def states(self, kind: str, event: str) -> Mapping[str, str]:
        """Per mailing: email -> delivery state."""
        ...

    def seen(self, event: str) -> Mapping[str, str]:
        """Per date: email -> the version of it their latest mail described."""
        ...

    def date(self, event: str) -> DateVersions | None:
        """The versions of a date observed so far."""
        ...

    def registrations_of(self, email: str) -> Mapping[str, Registration]:
        """Per address: date -> the ledger's registration row."""
        ...

    def confirmed(self, email: str) -> frozenset[str]:
        """The dates a confirmation to *email* has covered."""
        ...


class EmptyLedger:
    """A ledger that holds nothing (before the first send, or for ``validate``)."""

    def states(self, kind: str, event: str) -> Mapping[str, str]:
        return {}

    def seen(self, event: str) -> Mapping[str, str]:
        return {}

    def date(self, event: str) -> DateVersions | None:
        return None

    def registrations_of(self, email: str) -> Mapping[str, Registration]:
        return {}

    def confirmed(self, email: str) -> frozenset[str]:
        return frozenset()


@dataclass(frozen=True, slots=True)
class Mailing:
    """One kind of mail for one date (or the series), at one moment."""

    kind: Kind
    event: str  # SERIES_WIDE for the invitation
    due: datetime
    deadline: datetime
    state: MailingState
    audience: tuple[str, ...]  # contact keys, opted-out removed, in contact order
    outstanding: tuple[str, ...]  # audience members the ledger has not settled
    sent: int = 0
    failed: int = 0
    uncertain: int = 0
    opted_out: int = 0
    note: str = ""
    sequence: int = 0  # calendar SEQUENCE of the date version an update describes

    @property
    def ledger_kind(self) -> str:
        """The kind recorded in the ledger: each update of a date is its own mail."""
        if self.kind is Kind.UPDATE:
            return f"{self.kind}-{self.sequence}"
        return str(self.kind)

    @property
    def id(self) -> str:
        """Stable identifier, also the scheduler job id."""
        return f"{self.ledger_kind}:{self.event or 'series'}"

    @property
    def sendable(self) -> bool:
        return self.state is MailingState.OPEN and bool(self.outstanding)


@dataclass(frozen=True)
class PlanInput:
    """Everything :func:`plan` reads, bundled so callers pass one thing around."""

    series: Series
    contacts: Sequence[Contact]
    optouts: frozenset[str] = frozenset()
    attendance: Mapping[str, frozenset[str]] = field(default_factory=dict)

    @classmethod
    def of(cls, config: Config, extra_optouts: frozenset[str] = frozenset()) -> PlanInput:
        """What *config* gives the plan, with *extra_optouts* (the ledger's) added."""
        return cls(
            series=config.series,
            contacts=config.contacts.contacts,
            optouts=config.optouts | extra_optouts,
            attendance=config.attendance,
        )


def audience_of(
    kind: Kind,
    event: Event | None,
    series: Series,
    contacts: Iterable[Contact],
    attendance: Mapping[str, frozenset[str]],
) -> list[Contact]:
    """The contacts a mailing is meant for, before opt-outs.

    An attendance list never changes who gets a mail before or about the
    date: reminders (and everything else) for ``registered`` go to the
    registered only, whatever a list says. After the date it matters: a
    follow-up for ``registered`` also goes to those who attended without
    registering (they were there and expect the slides and recording, and
    the follow-up's wording tells attendees and absentees apart), and one
    for ``attended`` goes to attendees only.
    """
    rules = series.mailings
    if kind is Kind.CONFIRMATION and event is not None:
        return [c for c in contacts if c.is_registered(event.id)]
    if kind is Kind.INVITATION:
        assert rules.invitation is not None
        audience = rules.invitation.audience
    elif kind is Kind.REMINDER:
        audience = rules.reminder.audience
    else:
        audience = rules.followup.audience
    if audience is Audience.ALL:
        return list(contacts)
    if event is None:  # series-wide mail to the registered: registered for any date
        active = [e.id for e in series.active_events]
        return [c for c in contacts if c.registered_all or any(c.is_registered(e) for e in active)]
    if kind is not Kind.FOLLOWUP:
        return [c for c in contacts if c.is_registered(event.id)]
    attended = attendance.get(event.id, frozenset())
    if audience is Audience.ATTENDED:
        return [c for c in contacts if c.key in attended]
    return [c for c in contacts if c.is_registered(event.id) or c.key in attended]


def plan(data: PlanInput, ledger: LedgerSnapshot, now: datetime) -> list[Mailing]:
    """Every mailing of the series, its state at *now* and who still needs it."""
    if now.tzinfo is None:
        raise ValueError("plan() needs an aware datetime")
    series = data.series
    mailings = []
    for kind, event, due, deadline in mailing_times(series):
        event_id = event.id if event else SERIES_WIDE
        members = audience_of(kind, event, series, data.contacts, data.attendance)
        audience = tuple(c.key for c in members if c.key not in data.optouts)
        sent, failed, uncertain, outstanding = _settled(
            audience, ledger.states(str(kind), event_id)
        )
        state, note = _state(kind, event, due, deadline, now, outstanding)
        if state is MailingState.WITHDRAWN:
            outstanding = []
        mailings.append(
            Mailing(
                kind=kind,
                event=event_id,
                due=due,
                deadline=deadline,
                state=state,
                audience=audience,
                outstanding=tuple(outstanding),
                sent=sent,
                failed=failed,
                uncertain=uncertain,
                opted_out=len(members) - len(audience),
                note=note,
            )
        )
    if series.mailings.updates.enabled:
        mailings.extend(_changes(data, ledger, now))
    if series.mailings.confirmation.enabled:
        mailings.extend(_confirmations(data, ledger, now))
    return mailings


def _confirmations(data: PlanInput, ledger: LedgerSnapshot, now: datetime) -> list[Mailing]:
    """Anmeldebestätigungen, filed under the first date of each person's batch
    (see :func:`~invite_mailer.core.registrations.confirmation_groups`)."""
    series = data.series
    groups = confirmation_groups(series, data.contacts, ledger, data.optouts, now)
    mailings = []
    for event in series.active_events:
        waiting = groups.get(event.id, [])
        states = ledger.states(str(Kind.CONFIRMATION), event.id)
        if not waiting and not states:
            continue
        waiting = [(key, ready) for key, ready in waiting if states.get(key) not in DONE_STATES]
        outstanding = tuple(key for key, ready in waiting if ready <= now)
        due = min((ready for _, ready in waiting), default=now)
        state = MailingState.OPEN if outstanding else MailingState.SCHEDULED
        if not waiting:
            state = MailingState.DONE
        mailings.append(
            Mailing(
                kind=Kind.CONFIRMATION,
                event=event.id,
                due=min(due, event.starts_at),
                deadline=event.starts_at,
                state=state,
                audience=tuple(dict.fromkeys([*states, *(key for key, _ in waiting)])),
                outstanding=outstanding,
                sent=sum(1 for value in states.values() if value == "sent"),
                failed=sum(1 for value in states.values() if value == "failed"),
                uncertain=sum(1 for k in outstanding if states.get(k) == "uncertain"),
                note=f"{len(waiting) - len(outstanding)} waiting" if waiting else "",
            )
        )
    return mailings


def _settled(audience: Iterable[str], states: Mapping[str, str]) -> tuple[int, int, int, list[str]]:
    """Sent, failed and uncertain counts of *audience*, and who is still outstanding."""
    sent = failed = uncertain = 0
    outstanding = []
    for key in audience:
        state = states.get(key)
        if state == "sent":
            sent += 1
        elif state == "failed":
            failed += 1
        else:
            if state == "uncertain":
                uncertain += 1
            outstanding.append(key)
    return sent, failed, uncertain, outstanding


def _state(
    kind: Kind,
    event: Event | None,
    due: datetime,
    deadline: datetime,
    now: datetime,
    outstanding: Sequence[str],
) -> tuple[MailingState, str]:
    """The state of a rule's mailing at *now*, and the note that explains it."""
    if event is not None and event.cancelled:
        return MailingState.WITHDRAWN, "date cancelled"
    note = ""
    if now < due:
        state = MailingState.SCHEDULED
    elif now >= deadline:
        state = MailingState.DONE if not outstanding else MailingState.CLOSED
        if outstanding:
            note = f"{len(outstanding)} never sent (window closed)"
    elif kind is Kind.FOLLOWUP and event is not None and not event.materials:
        state = MailingState.WAITING
        note = "no materials listed yet"
    else:
        state = MailingState.OPEN if outstanding else MailingState.DONE
    if due >= deadline:
        note = "due time is not before the deadline: nothing can be sent"
    return state, note


def _changes(data: PlanInput, ledger: LedgerSnapshot, now: datetime) -> list[Mailing]:
    """Updates and cancellations: a date changed after mail about it went out.

    Everyone whose latest mail about a date described another version of it
    than the config does now needs one mail: an "Änderung" with the new
    details, or an "Absage" when the date is cancelled. It goes out a grace
    period after the last edit, so a quickly fixed typo sends one update.
    """
    contacts = {c.key: c for c in data.contacts}
    mailings = []
    for event in data.series.events:
        seen = ledger.seen(event.id)
        if seen:
            mailing = _change(data, ledger, now, event, seen, contacts)
            if mailing is not None:
                mailings.append(mailing)
    return mailings


def _change(
    data: PlanInput,
    ledger: LedgerSnapshot,
    now: datetime,
    event: Event,
    seen: Mapping[str, str],
    contacts: Mapping[str, Contact],
) -> Mailing | None:
    """The update or cancellation of *event*, or None when nobody needs or got one."""
    series = data.series
    current = event.version
    history = ledger.date(event.id)
    if history is not None and history.current == current:
        since = history.observed_since.astimezone(series.zone)
    else:
        since = now  # not recorded yet: the next pass starts the grace period
    sequence = history.sequence_for(current) if history is not None else 0
    kind = Kind.CANCELLATION if event.cancelled else Kind.UPDATE
    ledger_kind = str(kind) if kind is Kind.CANCELLATION else f"{kind}-{sequence}"
    states = ledger.states(ledger_kind, event.id)
    members = [key for key in seen if key in contacts]
    audience = tuple(key for key in members if key not in data.optouts)
    stale = [key for key in audience if seen[key] != current]
    outstanding = tuple(key for key in stale if states.get(key) not in DONE_STATES)
    if not outstanding and not states:
        return None
    deadline = event.ends_at
    due = shift(since, series.mailings.updates.grace)
    if due >= deadline:
        due = since  # no time for a grace period: say it now
    if now < due:
        state = MailingState.SCHEDULED
    elif now >= deadline:
        state = MailingState.CLOSED if outstanding else MailingState.DONE
    else:
        state = MailingState.OPEN if outstanding else MailingState.DONE
    return Mailing(
        kind=kind,
        event=event.id,
        due=due,
        deadline=deadline,
        state=state,
        audience=audience,
        outstanding=outstanding,
        sent=sum(1 for value in states.values() if value == "sent"),
        failed=sum(1 for value in states.values() if value == "failed"),
        uncertain=sum(1 for k in outstanding if states.get(k) == "uncertain"),
        opted_out=len(members) - len(audience),
        note="date cancelled" if event.cancelled else f"calendar SEQUENCE {sequence}",
        sequence=sequence,
    )


# --- what to send ------------------------------------------------------------------------

_NO_SEQUENCES: Mapping[str, int] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class MailRequest:
    """What to send: one kind of mail, to one contact, at one moment.

    *sequences* gives each date's calendar SEQUENCE (default 0); after a
    change every mail about the date carries the raised one. *previous* is
    the fingerprint (:meth:`Event.fingerprint`) of the version the recipient
    saw last, for an update mail. *attended* is ``None`` without an
    attendance list for the date.
    """

    kind: str
    contact: Contact
    event: Event | None
    now: datetime
    attended: bool | None = None
    sequences: Mapping[str, int] = field(default_factory=lambda: _NO_SEQUENCES)
    previous: Mapping[str, str] | None = None
    dates: tuple[str, ...] = ()  # a confirmation: the dates it confirms


def request_for(
    kind: Kind | str,
    event: Event | None,
    contact: Contact,
    now: datetime,
    *,
    attendance: Mapping[str, frozenset[str]],
    ledger: LedgerSnapshot | None = None,
    sequences: Mapping[str, int] | None = None,
    series: Series | None = None,
) -> MailRequest:
    """The mail *contact* gets of *kind* about *event* at *now*.

    Attendance comes from the attendance lists; with the *ledger*, an
    update describes what changed since the version the contact saw last,
    and a confirmation (with the *series*) covers the person's batch of
    new registrations.
    """
    previous = None
    dates: tuple[str, ...] = ()
    if kind == Kind.UPDATE:
        previous = previous_version(ledger, event, contact)
    elif kind == Kind.CONFIRMATION and event is not None:
        dates = (event.id,)
        if series is not None:
            dates = confirmation_dates(series, contact, ledger, event, now)
    return MailRequest(
        kind=str(kind),
        contact=contact,
        event=event,
        now=now,
        attended=attended(attendance, event, contact),
        sequences=_NO_SEQUENCES if sequences is None else sequences,
        previous=previous,
        dates=dates,
    )


def calendar_dates(request: MailRequest, series: Series) -> list[Event]:
    """The dates whose calendar files the mail of *request* carries, and so
    the dates a recipient's calendar knows from it (updates go to them).

    The invitation carries every active date, or with registration links
    only those the contact is registered for (the others come with their
    confirmation); a confirmation its dates; a follow-up none; every other
    kind its date.
    """
    if request.kind == Kind.CONFIRMATION:
        return [series.event(d) for d in request.dates]
    if request.kind == Kind.FOLLOWUP:
        return []
    if request.event is not None:
        return [request.event]
    dates = series.active_events
    if series.registration.links:
        dates = [e for e in dates if request.contact.is_registered(e.id)]
    return dates


def attended(
    attendance: Mapping[str, frozenset[str]], event: Event | None, contact: Contact
) -> bool | None:
    """Whether *contact* took part in *event*; None without an attendance list."""
    if event is None or event.id not in attendance:
        return None
    return contact.key in attendance[event.id]


def sequences_of(series: Series, ledger: LedgerSnapshot | None) -> dict[str, int]:
    """Each date's calendar SEQUENCE as the next mail about it would carry it."""
    result = {}
    for event in series.events:
        history = ledger.date(event.id) if ledger is not None else None
        result[event.id] = history.sequence_for(event.version) if history is not None else 0
    return result


def previous_version(
    ledger: LedgerSnapshot | None, event: Event | None, contact: Contact
) -> Mapping[str, str] | None:
    """The version of *event* that *contact* was told about last."""
    if ledger is None or event is None:
        return None
    seen = ledger.seen(event.id).get(contact.key)
    history = ledger.date(event.id)
    if seen is None or history is None:
        return None
    return history.details.get(seen)
