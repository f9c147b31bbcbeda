"""``invite-mailer registrations``: who is registered for which date, and changing it.

Registrations are the contact list's ``anmeldungen`` merged with the
ledger's (links, ``registrations add``), withdrawals winning (see
:mod:`invite_mailer.core.registrations`). ``list`` exports them as a table,
JSON, CSV or an Excel workbook; ``add`` and ``remove`` write to the ledger,
so ``config/`` stays as the organiser exported it.
"""

from __future__ import annotations

import csv
import io
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, tzinfo
from pathlib import Path
from typing import Any

from invite_mailer.core.registrations import (
    SOURCE_CLI,
    SOURCE_CSV,
    Registration,
    with_registrations,
)
from invite_mailer.delivery.ledger import Ledger
from invite_mailer.delivery.ledger_open import ledger_exists
from invite_mailer.errors import ConfigError
from invite_mailer.inputs.config import Config
from invite_mailer.inputs.contacts import Contact
from invite_mailer.inputs.series import Event

__all__ = ["Entry", "add", "as_csv", "counts", "entries", "remove", "write_xlsx"]

COLUMNS = ("email", "event", "date", "source", "registered_at", "name", "organisation")


@dataclass(frozen=True, slots=True)
class Entry:
    """One person registered for one date."""

    email: str
    event: str
    date: str  # YYYY-MM-DD
    source: str  # link, csv, cli
    registered_at: datetime | None  # None: in the contact list, not yet seen by a pass
    name: str
    organisation: str

    def row(self) -> tuple[str, ...]:
        stamp = self.registered_at.isoformat() if self.registered_at else ""
        values = (self.email, self.event, self.date, self.source, stamp, self.name)
        return (*values, self.organisation)

    def json(self) -> dict[str, Any]:
        data: dict[str, Any] = dict(zip(COLUMNS, self.row(), strict=True))
        data["registered_at"] = self.registered_at.isoformat() if self.registered_at else None
        return data


async def _rows(config: Config) -> dict[str, dict[str, Registration]]:
    target = config.settings.state.target
    if not ledger_exists(target):
        return {}
    async with Ledger.open(target) as ledger:
        return await ledger.registrations(config.series.id)


async def entries(config: Config, event_id: str | None = None) -> list[Entry]:
    """Every registration, by date and then in contact-list order."""
    events = [pick(config, event_id)] if event_id else list(config.series.events)
    rows = await _rows(config)
    merged = with_registrations(config, rows)
    found = []
    for event in events:
        for contact in merged.contacts:
            if contact.is_registered(event.id):
                row = rows.get(contact.key, {}).get(event.id)
                found.append(_entry(contact, event, row, config.series.zone))
        # Registered by link or CLI, then taken off the contact list: still
        # registered (nobody mails them), listed so the organiser sees them.
        for email, by_date in rows.items():
            row = by_date.get(event.id)
            if row is None or not row.active or row.source == SOURCE_CSV:
                continue
            if config.contacts.by_key(email) is None:
                gone = Contact(email=email, organisation="(nicht mehr in der Kontaktliste)")
                found.append(_entry(gone, event, row, config.series.zone))
    return found


def _entry(contact: Contact, event: Event, row: Registration | None, zone: tzinfo) -> Entry:
    name = " ".join(p for p in (contact.titel, contact.vorname, contact.nachname) if p)
    return Entry(
        email=contact.email,
        event=event.id,
        date=event.date.isoformat(),
        source=row.source if row is not None else SOURCE_CSV,
        registered_at=row.registered_at.astimezone(zone) if row is not None else None,
        name=name,
        organisation=contact.organisation,
    )


def counts(found: list[Entry]) -> Counter[str]:
    """How many are registered per date."""
    return Counter(entry.event for entry in found)


def pick(config: Config, event_id: str) -> Event:
    try:
        return config.series.event(event_id)
    except KeyError as exc:
        raise ConfigError.single(
            None, str(exc.args[0]), hint="pass --event with one of those ids"
        ) from None


def _contact(config: Config, email: str) -> Contact:
    contact = config.contacts.by_key(email.strip().lower())
    if contact is None:
        raise ConfigError.single(
            config.contacts.source,
            f"no contact with the address {email!r}",
            hint="add the person to the contact list first (or check the spelling)",
        )
    return contact


async def add(config: Config, email: str, event_id: str, now: datetime) -> tuple[Contact, bool]:
    """Register a contact for a date; whether that changed anything."""
    event = pick(config, event_id)
    contact = _contact(config, email)
    if event.cancelled:
        raise ConfigError.single(
            None,
            f"the date {event.id!r} is cancelled: nobody can register for it",
            hint="pass --event with a date that takes place",
        )
    async with Ledger.open(config.settings.state.target) as ledger:
        changed = await ledger.register(
            config.series.id, event.id, contact.key, source=SOURCE_CLI, now=now
        )
    return contact, changed


async def remove(config: Config, email: str, event_id: str, now: datetime) -> tuple[Contact, bool]:
    """Withdraw a contact's registration for a date; whether that changed anything."""
    event = pick(config, event_id)
    contact = _contact(config, email)
    async with Ledger.open(config.settings.state.target) as ledger:
        changed = await ledger.withdraw(
            config.series.id, event.id, contact.key, by=SOURCE_CLI, now=now
        )
    return contact, changed


def as_csv(found: list[Entry]) -> str:
    """``;``-separated with a header, as German office software reads it."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter=";", lineterminator="\n")
    writer.writerow(COLUMNS)
    for entry in found:
        writer.writerow([_cell(value) for value in entry.row()])
    return buffer.getvalue()


def _cell(value: str) -> str:
    # A cell starting with = + - @ is a formula to a spreadsheet: never run one.
    return "'" + value if value[:1] in ("=", "+", "-", "@") else value


def write_xlsx(found: list[Entry], path: Path) -> None:
    """An Excel workbook with one sheet "Anmeldungen"."""
    from openpyxl import Workbook

    book = Workbook()
    sheet = book.active
    assert sheet is not None
    sheet.title = "Anmeldungen"
    sheet.append(list(COLUMNS))
    for entry in found:
        sheet.append([_cell(value) for value in entry.row()])
    book.save(path)
