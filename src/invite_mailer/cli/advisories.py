"""Config that loads and renders but probably does not do what was meant.

Warnings only, printed by ``validate`` and ``rehearse``: nothing is sent wrong
because of them, so the exit code stays 0.
"""

from __future__ import annotations

from datetime import datetime
from email.utils import parseaddr
from pathlib import Path

from invite_mailer.core.plan import mailing_times
from invite_mailer.errors import ConfigError, Problem
from invite_mailer.inputs.config import Config
from invite_mailer.inputs.series import SERIES_FILE, Kind
from invite_mailer.inputs.settings import SETTINGS_FILE
from invite_mailer.inputs.yamlfile import load_yaml

__all__ = ["EXAMPLE_SENDER_ADDRESSES", "SHIPPED_SERIES_ID", "advisories"]

# The shipped example: a new series that still carries these addresses would
# send its mail, replies and unsubscribe requests to somebody else's domain.
SHIPPED_SERIES_ID = "transferreihe-2024"
EXAMPLE_SENDER_ADDRESSES = ("transferreihe@example.org", "abmeldung@example.org")


def advisories(config: Config) -> list[Problem]:
    """Config that loads and renders but probably does not do what was meant.

    Warnings only: nothing is sent wrong because of them, so the exit code
    stays 0. ``validate`` and ``rehearse`` print them.
    """
    return [*_example_sender(config), *_closed_windows(config), *_unserved_links(config)]


def _unserved_links(config: Config) -> list[Problem]:
    """Registration links in every invitation, but no web app here to answer them."""
    if not config.series.registration.links or config.settings.unsubscribe.serve:
        return []
    return [
        Problem(
            config.config_dir / SETTINGS_FILE,
            'registration.mode is "links", but unsubscribe.serve is false here: the '
            "daemon on this machine does not answer the registration links",
            hint="set serve = true in [unsubscribe] (INVITE_MAILER_UNSUBSCRIBE__SERVE=true) "
            "where invite-mailer run runs, behind the address in [sender] web_url",
        )
    ]


def _example_sender(config: Config) -> list[Problem]:
    series = config.series
    if series.id == SHIPPED_SERIES_ID:
        return []
    sender = config.settings.sender
    fields = {
        "address": sender.address,
        "reply_to": sender.reply_to,
        "unsubscribe_mailto": sender.unsubscribe_mailto.removeprefix("mailto:"),
    }
    kept = {
        key: address
        for key, value in fields.items()
        if (address := parseaddr(value)[1].lower()) in EXAMPLE_SENDER_ADDRESSES
    }
    warnings = []
    if kept:
        names = ", ".join(f"sender.{key} ({address})" for key, address in kept.items())
        warnings.append(
            Problem(
                config.config_dir / SETTINGS_FILE,
                f"{names} still use the example addresses of the shipped series, "
                f"but this series is {series.id!r}",
                hint="write your own addresses into [sender]: mail goes out from "
                "sender.address, replies go to sender.reply_to and unsubscribe requests "
                "to sender.unsubscribe_mailto",
            )
        )
    if series.organiser.email.lower() in EXAMPLE_SENDER_ADDRESSES:
        path = config.config_dir / SERIES_FILE
        warnings.append(
            Problem(
                path,
                f"organiser.email is still the example address {series.organiser.email} "
                f"of the shipped series, but this series is {series.id!r}",
                _line_of(path, ("organiser", "email")),
                "write your own address: the sending reports go there",
            )
        )
    return warnings


def _closed_windows(config: Config) -> list[Problem]:
    """Mailings whose window closes before (or as) it opens: they can never go out."""
    series = config.series
    path = config.config_dir / SERIES_FILE

    def at(moment: datetime) -> str:
        return f"{moment.astimezone(series.zone):%Y-%m-%d %H:%M}"

    warnings = []
    for kind, event, due, deadline in mailing_times(series):
        if due < deadline or (event is not None and event.cancelled):
            continue
        rule = str(kind)
        if kind is Kind.INVITATION:
            key = "send_at"
            if series.mailings.invitation is not None and series.mailings.invitation.until:
                why = f"send_at {at(due)} is not before its until {at(deadline)}"
            else:
                when = "is after" if due > deadline else "is when"
                why = f"send_at {at(due)} {when} the first date starts {at(deadline)}"
            message = f"the invitation can never go out: {why}"
            hint = "set mailings.invitation.send_at to a time before the first date"
        elif kind is Kind.REMINDER:
            key = "before"
            message = (
                f"the reminder for {event.id if event else ''} can never go out: it is due "
                f"{at(due)}, not before the date starts {at(deadline)}"
            )
            hint = "set mailings.reminder.before (and at:) so the reminder is due before the date"
        else:
            key = "wait_for_materials"
            message = (
                f"the follow-up for {event.id if event else ''} can never go out: it is due "
                f"{at(due)} and its window closes {at(deadline)}"
            )
            hint = "set mailings.followup.wait_for_materials to a span, e.g. 14 days"
        warnings.append(Problem(path, message, _line_of(path, ("mailings", rule, key)), hint))
    return warnings


def _line_of(path: Path, where: tuple[str, ...]) -> int | None:
    try:
        return load_yaml(path).line_of(where)
    except (ConfigError, OSError):
        return None
