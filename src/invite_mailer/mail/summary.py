"""The short German report the organiser gets after each mailing."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import format_datetime
from zoneinfo import ZoneInfo

from invite_mailer.core import german
from invite_mailer.core.forecast import Finish, Quota
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


#: How many suppressed addresses the summary names; ``bounces list`` has them all.
SUPPRESSED_SHOWN = 20
#: A diagnostic is cut to this many characters: the server's first words say it.
DIAGNOSTIC_SHOWN = 100
#: A mailing the quota spreads over this long or longer is named in the summary.
HELD_BACK = timedelta(hours=1)

_SETTINGS = {
    60.0: "smtp.rate_per_minute",
    3600.0: "smtp.rate_per_hour",
    86400.0: "smtp.rate_per_day",
}
_PER = {60.0: "pro Minute", 3600.0: "pro Stunde", 86400.0: "pro Tag"}
_BOUNCE_KINDS = {
    "hard": "dauerhaft unzustellbar",
    "soft": "wiederholt vorübergehend unzustellbar",
    "complaint": "als Spam gemeldet",
}


@dataclass(frozen=True)
class QuotaOutlook:
    """The relay's quotas and when the series' unfinished mailings finish under them."""

    quotas: Sequence[Quota]
    finishes: Sequence[tuple[Mailing, Finish]]  # in plan order


@dataclass(frozen=True)
class SuppressedAddress:
    email: str
    kind: str  # hard, soft or complaint
    status: str  # e.g. 5.1.1, may be ''
    diagnostic: str  # the server's words, untrusted


@dataclass(frozen=True)
class BounceNotes:
    """The series' bounces and complaints so far, counted by the ledger."""

    hard: int
    soft: int
    complaints: int
    suppressed: int  # addresses suppressed by them
    first: Sequence[SuppressedAddress]  # the first few of those


def kind_label(kind: Kind | str) -> str:
    return KIND_LABELS.get(str(kind), str(kind))


def mailing_title(config: Config, mailing: Mailing) -> tuple[str, str]:
    """The mailing's kind and what it is about, e.g. ("Einladung", "Titel (14.11.2024)")."""
    series = config.series
    # Titles come from series.yaml and end up in the subject: one line.
    about = german.clean(series.title)
    if mailing.event:
        event = series.event(mailing.event)
        about = f"{german.clean(event.title)} ({event.date:%d.%m.%Y})"
    return kind_label(mailing.kind), about


def compose_summary(
    config: Config,
    mailing: Mailing,
    *,
    now: datetime,
    outlook: QuotaOutlook | None = None,
    bounces: BounceNotes | None = None,
) -> EmailMessage:
    """A plain-text summary: what went out, what failed, who had opted out; what
    the relay's quota means for the mailings still to send (*outlook*) and the
    series' bounces (*bounces*)."""
    series = config.series
    label, about = mailing_title(config, mailing)
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
    if outlook is not None:
        body += quota_lines(config, outlook, now)
    if bounces is not None:
        body += bounce_lines(bounces)
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


def _moment(moment: datetime, zone: ZoneInfo) -> str:
    """ "Mittwoch, 20.11.2024, um 15:00 Uhr" in the series' time zone."""
    local = moment.astimezone(zone)
    day = local.date()
    return f"{german.weekday(day)}, {german.date_numeric(day)}, um {german.clock(local.time())} Uhr"


def _number(count: int) -> str:
    return f"{count:,}".replace(",", ".")


def quota_text(quotas: Sequence[Quota]) -> str:
    """ "30 E-Mails pro Minute und 10.000 pro Tag"."""
    parts = [
        f"{_number(limit)} {_PER.get(window, f'je {window:g} Sekunden')}"
        for limit, window in quotas
    ]
    first = quotas[0][0] if quotas else 0
    parts[0] = parts[0].replace(" ", " E-Mail " if first == 1 else " E-Mails ", 1)
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " und " + parts[-1]


def quota_lines(config: Config, outlook: QuotaOutlook, now: datetime) -> list[str]:
    """What the quota means for the unfinished mailings it holds back; [] for none."""
    zone = config.series.zone
    settings = " bzw. ".join(
        _SETTINGS.get(window, "smtp.rate_per_day") for _, window in outlook.quotas
    )
    lines: list[str] = []
    for mailing, finish in outlook.finishes:
        label, about = mailing_title(config, mailing)
        name = f"„{label}“ für „{about}“"
        waiting = len(mailing.outstanding)
        if finish.unreached:
            lines += [f"ACHTUNG – {name}:", *_warning(mailing, finish, zone, settings), ""]
        elif finish.last_send is not None and finish.last_send - max(mailing.due, now) >= HELD_BACK:
            what = "Die noch offene E-Mail geht"
            if waiting > 1:
                what = f"Die letzte der {waiting} noch offenen E-Mails geht"
            lines += [
                f"{name}:",
                f"  {what} voraussichtlich am",
                f"  {_moment(finish.last_send, zone)} hinaus.",
                "",
            ]
    if not lines:
        return []
    head = (
        f"Ihr Mailserver nimmt höchstens {quota_text(outlook.quotas)} an. "
        "Für die noch offenen Versände heißt das:"
    )
    return [head, "", *lines]


def _warning(mailing: Mailing, finish: Finish, zone: ZoneInfo, settings: str) -> list[str]:
    """The window closes before the quota lets everyone have the mailing: how many
    it misses, and what the organiser can do."""
    waiting = len(mailing.outstanding)
    reached = waiting - finish.unreached
    allowed = f"nur {reached} der {waiting}" if reached else f"keine der {waiting}"
    missed = (
        "1 Person wird diese E-Mail nicht erhalten."
        if finish.unreached == 1
        else f"{finish.unreached} Personen werden diese E-Mail nicht erhalten."
    )
    return [
        f"  Das Versandfenster schließt am {_moment(mailing.deadline, zone)}.",
        f"  Bis dahin lässt das Kontingent {allowed} noch offenen E-Mails zu:",
        f"  {missed}",
        f"  Erhöhen Sie das Kontingent in settings.toml ({settings}),",
        "  sofern Ihr Mailserver mehr zulässt, oder lassen Sie den Versand früher",
        "  beginnen (series.yaml).",
    ]


def bounce_lines(notes: BounceNotes) -> list[str]:
    """The series' bounces and complaints, and a bounded list of the suppressed; [] for none."""
    if not (notes.hard or notes.soft or notes.complaints):
        return []
    lines = [
        "Unzustellbare E-Mails und Beschwerden der Reihe (bisher):",
        f"  Dauerhaft unzustellbar:     {notes.hard}",
        f"  Vorübergehend unzustellbar: {notes.soft}",
        f"  Als Spam gemeldet:          {notes.complaints}",
        "",
    ]
    if notes.suppressed:
        lines.append("Gesperrt (erhalten keine E-Mails dieser Reihe mehr):")
        for entry in notes.first:
            # Addresses and the server's words come from outside: one clean line each.
            why = _BOUNCE_KINDS.get(entry.kind, entry.kind)
            if entry.status:
                why += f" ({german.clean(entry.status)})"
            lines.append(f"  {german.clean(entry.email)} – {why}")
            diagnostic = german.clean(entry.diagnostic)
            if len(diagnostic) > DIAGNOSTIC_SHOWN:
                # Cut at a word: "User unknown in…", not "User unkn…".
                cut = diagnostic[: DIAGNOSTIC_SHOWN - 1]
                diagnostic = (cut.rsplit(" ", 1)[0] if " " in cut else cut).rstrip() + "…"
            if diagnostic:
                lines.append(f"    {diagnostic}")
        more = notes.suppressed - len(notes.first)
        if more > 0:
            lines.append(f"  … und {more} weitere")
        lines.append("")
    lines += [
        "Die vollständige Liste mit den Antworten der Mailserver zeigt",
        "  invite-mailer bounces list",
        "",
    ]
    return lines
