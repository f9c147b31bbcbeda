"""Checks that render mails without sending them (on start-up and reload)."""

from __future__ import annotations

from datetime import datetime

from invite_mailer.core.plan import MailRequest, audience_of, mailing_times, request_for
from invite_mailer.inputs.config import Config
from invite_mailer.inputs.series import Kind
from invite_mailer.mail import mime
from invite_mailer.mail.compose import Composer

__all__ = ["validate_change_kinds", "validate_sample"]


def validate_sample(config: Config, composer: Composer | None = None) -> None:
    """Render each mailing for one recipient: the cheap check used on reload.

    Pass the *composer* that will send, so that a pass builds only one.
    """
    now = config.series.first_start
    composer = composer or Composer.from_config(config)
    for kind, event, _due, _deadline in mailing_times(config.series):
        if event is not None and event.cancelled:
            continue
        members = audience_of(
            kind, event, config.series, config.contacts.contacts, config.attendance
        )
        for contact in members[:1]:
            request = request_for(kind, event, contact, now, attendance=config.attendance)
            mime.build(composer.render(request))
    validate_change_kinds(config, now, composer)


def validate_change_kinds(config: Config, now: datetime, composer: Composer | None = None) -> None:
    """Updates, cancellations and confirmations have templates too: render them
    once per date (a confirmation of all dates at once as well)."""
    composer = composer or Composer.from_config(config)
    contact = config.contacts.contacts[0]
    for event in config.series.events:
        previous = {**event.fingerprint(), "start": "2000-01-01T00:00:00+00:00"}
        composer.compose(
            Kind.UPDATE, contact, event=event, now=now, sequences={event.id: 1}, previous=previous
        )
        composer.compose(Kind.CANCELLATION, contact, event=event, now=now, sequences={event.id: 1})
        if not event.cancelled:
            composer.compose(Kind.CONFIRMATION, contact, event=event, now=now)
    active = config.series.active_events
    if len(active) > 1:
        dates = tuple(e.id for e in active)
        composer.render(MailRequest(Kind.CONFIRMATION, contact, active[0], now, dates=dates))
