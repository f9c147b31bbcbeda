"""The relay's quotas of the settings and the forecast they give from the ledger's sends.

Shared by ``plan``/``validate`` and the organiser's summary, so that both
tell the same finish times.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import datetime, timedelta

from invite_mailer.core.forecast import Finish, Quota, forecast
from invite_mailer.core.plan import Mailing
from invite_mailer.delivery.ledger import Ledger
from invite_mailer.inputs.config import Config
from invite_mailer.inputs.settings import TransportKind

__all__ = ["finishes_now", "quotas_of"]


def quotas_of(config: Config) -> list[Quota]:
    """The relay's quotas, when mail goes to a relay."""
    if config.settings.transport.kind is not TransportKind.SMTP:
        return []
    return config.settings.smtp.quotas


async def finishes_now(
    config: Config, ledger: Ledger, mailings: Sequence[Mailing], now: datetime
) -> dict[str, Finish]:
    """:func:`~invite_mailer.core.forecast.forecast` of *mailings* from *now*, counting
    the sends of the last day as the ledger recorded them; {} without quotas."""
    quotas = quotas_of(config)
    if not quotas:
        return {}
    # The record of sends is in wall-clock time; a replayed --now sees it
    # as the same time before *now*.
    wall = time.time()
    sent = [now + timedelta(seconds=at - wall) for at in await ledger.recent_sends(wall - 86400)]
    return forecast(mailings, quotas, sent, now)
