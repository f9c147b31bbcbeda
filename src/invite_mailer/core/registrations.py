"""Registrations: who takes part in which date, from the contact list and the ledger.

A person registers in the contact list's ``anmeldungen`` column (an external
form, exported by the organiser), by a personal link (``registration.mode:
links``) or by ``invite-mailer registrations add``. The ledger holds one
:class:`Registration` per (date, address) with its source and time; the
contact list's registrations are recorded there too the first time a pass
sees them (that is their time). A CSV registration and a link registration
of the same person are one.

Who is registered: a withdrawal (the "Ich kann doch nicht teilnehmen" link,
``registrations remove``) wins over the contact list; otherwise a link or
CLI registration counts, and a CSV one while the list still has it.

Pure functions: no clock, no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Protocol

from invite_mailer.inputs.config import Config
from invite_mailer.inputs.contacts import Contact, ContactList
from invite_mailer.inputs.series import Event, Series
from invite_mailer.inputs.values import shift

__all__ = [
    "SOURCE_CLI",
    "SOURCE_CSV",
    "SOURCE_LINK",
    "Registration",
    "confirmation_dates",
    "confirmation_groups",
    "csv_registrations",
    "merged_contacts",
    "pending",
    "with_registrations",
]

SOURCE_LINK = "link"
SOURCE_CSV = "csv"
SOURCE_CLI = "cli"


@dataclass(frozen=True, slots=True)
class Registration:
    """One (date, address) the ledger knows about."""

    event: str
    email: str
    source: str  # link, csv, cli: who registered first
    registered_at: datetime
    withdrawn_at: datetime | None = None
    withdrawn_by: str = ""  # link or cli
    # False for what the contact list held when the ledger first read it:
    # those people registered before invite-mailer knew, nobody confirms them now.
    confirm: bool = True

    @property
    def active(self) -> bool:
        return self.withdrawn_at is None


Registrations = Mapping[str, Mapping[str, Registration]]
"""email -> event id -> registration."""


def csv_registrations(contacts: Iterable[Contact], series: Series) -> dict[str, frozenset[str]]:
    """email -> the dates the contact list registers them for (``alle`` spelled out)."""
    every = frozenset(e.id for e in series.events)
    found = {}
    for contact in contacts:
        dates = every if contact.registered_all else contact.registrations
        if dates and not dates <= every:  # validated against the dates: rare
            dates = dates & every
        if dates:
            found[contact.key] = dates  # the contact's own sets, not copies
    return found


def merged_contacts(
    contacts: Sequence[Contact], series: Series, registrations: Registrations
) -> tuple[Contact, ...]:
    """*contacts* with the ledger's registrations and withdrawals applied."""
    if not registrations:
        return tuple(contacts)
    every = frozenset(e.id for e in series.events)
    result = []
    for contact in contacts:
        rows = registrations.get(contact.key)
        if not rows:
            result.append(contact)
            continue
        own = every if contact.registered_all else contact.registrations
        dates = set(own)
        for event_id, row in rows.items():
            if not row.active:
                dates.discard(event_id)
            elif row.source != SOURCE_CSV:  # a CSV row counts while the list has it
                dates.add(event_id)
        if dates == own:
            result.append(contact)  # nothing changed: the same object, no copy
        else:
            result.append(replace(contact, registrations=frozenset(dates), registered_all=False))
    return tuple(result)


def with_registrations(config: Config, registrations: Registrations) -> Config:
    """*config* whose contacts carry the ledger's registrations (the same object
    when they change nobody's)."""
    if not registrations:
        return config
    original = config.contacts.contacts
    contacts = merged_contacts(original, config.series, registrations)
    if all(new is old for new, old in zip(contacts, original, strict=True)):
        return config
    listed = ContactList(contacts, config.contacts.warnings, config.contacts.source)
    return replace(config, contacts=listed)


def pending(
    series: Series,
    contact: Contact,
    rows: Mapping[str, Registration],
    confirmed: frozenset[str],
    now: datetime,
) -> tuple[list[Event], datetime | None]:
    """The dates *contact* registered for that still want a confirmation, in
    series order, and when the latest of those registrations was made.

    A date wants one while its registration is active and confirmable, the
    date is neither cancelled nor begun at *now*, and no confirmation
    covering it was sent (or refused for good) yet.
    """
    dates = []
    latest: datetime | None = None
    for event in sorted(series.active_events, key=lambda e: e.starts_at):
        row = rows.get(event.id)
        if row is None or not row.active or not row.confirm or event.id in confirmed:
            continue
        if now >= event.starts_at or not contact.is_registered(event.id):
            continue
        dates.append(event)
        if latest is None or row.registered_at > latest:
            latest = row.registered_at
    return dates, latest


class RegistrationSnapshot(Protocol):
    """What the confirmations need from the ledger."""

    def registrations_of(self, email: str) -> Mapping[str, Registration]: ...
    def confirmed(self, email: str) -> frozenset[str]: ...


def confirmation_groups(
    series: Series,
    contacts: Iterable[Contact],
    ledger: RegistrationSnapshot,
    optouts: frozenset[str],
    now: datetime,
) -> dict[str, list[tuple[str, datetime]]]:
    """Who wants a confirmation: first date of their batch -> [(contact key, ready at)].

    A person's batch is every date :func:`pending` gives; it goes out as one
    mail, filed under its first date, once ``mailings.confirmation.quiet``
    has passed since the latest registration in it.
    """
    quiet = series.mailings.confirmation.quiet
    groups: dict[str, list[tuple[str, datetime]]] = {}
    for contact in contacts:
        rows = ledger.registrations_of(contact.key)
        if not rows or contact.key in optouts:
            continue
        dates, latest = pending(series, contact, rows, ledger.confirmed(contact.key), now)
        if not dates or latest is None:
            continue
        ready = shift(latest.astimezone(series.zone), quiet)
        groups.setdefault(dates[0].id, []).append((contact.key, ready))
    return groups


def confirmation_dates(
    series: Series,
    contact: Contact,
    ledger: RegistrationSnapshot | None,
    event: Event,
    now: datetime,
) -> tuple[str, ...]:
    """The dates the confirmation of *event* to *contact* covers at *now*.

    Its batch when *event* heads it; else (a preview, a sample) *event* alone.
    """
    if ledger is not None:
        rows = ledger.registrations_of(contact.key)
        dates, _ = pending(series, contact, rows, ledger.confirmed(contact.key), now)
        if dates and dates[0].id == event.id:
            return tuple(e.id for e in dates)
    return (event.id,)
