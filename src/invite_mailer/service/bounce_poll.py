"""The daemon's poll of the ``[imap]`` bounce mailbox, every ``imap.poll_seconds``."""

from __future__ import annotations

import logging
from datetime import datetime

from invite_mailer.delivery.bounce_intake import Intake
from invite_mailer.delivery.imap_poll import poll
from invite_mailer.delivery.ledger import Ledger
from invite_mailer.delivery.return_path import ReturnPaths
from invite_mailer.errors import InviteMailerError
from invite_mailer.inputs.config import Config

__all__ = ["poll_mailbox"]

log = logging.getLogger("invite_mailer.service.daemon")


async def poll_mailbox(config: Config, ledger: Ledger, now: datetime) -> Intake | None:
    """Read what is new in the mailbox into *ledger*; a failure is logged, and the
    next poll tries again (the messages stay unread)."""
    settings = config.settings
    paths_back = ReturnPaths(settings, config.series.id)
    intake = Intake(ledger, config.series.id, settings.bounces.soft_limit, paths_back)
    try:
        await poll(settings.imap, intake, now)
    except InviteMailerError as exc:
        log.error("bounce mailbox: %s; trying again at the next poll", exc)
        return None
    for record in intake.recorded:
        if record.new:
            log.info(
                "bounce mailbox: %s %s %s%s",
                record.email,
                record.bounce.kind,
                record.bounce.status or "",
                ", suppressed" if record.suppressed else "",
            )
    if intake.read:
        log.info(
            "bounce mailbox: %d message(s) read, %d address(es) suppressed",
            intake.read,
            len(intake.suppressed),
        )
    return intake
