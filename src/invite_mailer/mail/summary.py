"""The short German report the organiser gets after each mailing."""

from __future__ import annotations

import hashlib
from datetime import datetime
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import format_datetime

from invite_mailer.core import german
from invite_mailer.core.plan import Mailing
from invite_mailer.inputs.config import Config
from invite_mailer.inputs.series import Kind
from invite_mailer.mail.mime import POLICY, header_address

KIND_LABELS: dict[str, str] = {
    Kind.INVITATION: "Einladung",
    Kind.REMINDER: "Erinnerung",
    Kind.FOLLOWUP: "Nachbereitung",
    Kind.UPDATE: "Änderung",
    Kind.CANCELLATION: "Absage",
    Kind.CONFIRMATION: "Anmeldebestätigung",
}


def kind_label(kind: Kind | str) -> str:
    return KIND_LABELS.get(str(kind), str(kind))


def compose_summary(config: Config, mailing: Mailing, *, now: datetime) -> EmailMessage:
    """A plain-text summary: what went out, what failed, who had opted out."""
    series = config.series
    label = kind_label(mailing.kind)
    # Titles come from series.yaml and end up in the subject: one line.
    about = german.clean(series.title)
    if mailing.event:
        event = series.event(mailing.event)
        about = f"{german.clean(event.title)} ({event.date:%d.%m.%Y})"
    body = [
        "Guten Tag,",
        "",
        f"der Versand „{label}“ für „{about}“ ist abgeschlossen.",
        "",
        f"  Versendet:            {mailing.sent}",
        f"  Fehlgeschlagen:       {mailing.failed}",
        f"  Abgemeldet (gesperrt): {mailing.opted_out}",
        "",
        *_registered(config, mailing),
    ]
    if mailing.failed:
        body += [
            "Die fehlgeschlagenen Adressen und die Antworten des Mailservers zeigt",
            "  invite-mailer status --failed",
            "",
        ]
    body += ["Diese Nachricht wurde automatisch von invite-mailer erstellt."]
    # The composer's policy: its address headers keep long quoted names whole.
    message = EmailMessage(policy=POLICY)
    sender = config.settings.sender
    message["From"] = sender.from_address
    message["To"] = Address(
        display_name=german.clean(series.organiser.name),
        addr_spec=header_address(str(series.organiser.email)),
    )
    message["Subject"] = f"Versandbericht: {label} – {about}"
    message["Date"] = format_datetime(now)
    digest = hashlib.sha256(f"{series.id}\n{mailing.id}\nsummary".encode()).hexdigest()[:24]
    message["Message-ID"] = f"<summary.{digest}@{sender.domain}>"
    message["Auto-Submitted"] = "auto-generated"
    message.set_content("\n".join(body) + "\n")
    return message


def _registered(config: Config, mailing: Mailing) -> list[str]:
    """How many are registered: for the mailing's date, or per date of the series."""
    series = config.series
    dates = [series.event(mailing.event)] if mailing.event else series.active_events
    lines = ["Anmeldungen (Stand jetzt):"]
    for event in dates:
        count = sum(1 for c in config.contacts.contacts if c.is_registered(event.id))
        lines.append(f"  {event.date:%d.%m.%Y} {german.clean(event.title)}: {count}")
    return [*lines, ""]
