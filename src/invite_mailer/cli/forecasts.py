"""What the relay's quotas mean for the series: warnings for ``validate``.

``plan`` shows when each mailing finishes (:func:`invite_mailer.core.forecast.forecast`
from the ledger's record of sends, as the organiser's summary does through
:mod:`invite_mailer.delivery.quota_forecast`); ``validate`` replays the series from
before its first mailing with nothing sent and names every mailing whose
window closes before the quotas let every recipient have it.
"""

from __future__ import annotations

from datetime import timedelta

from invite_mailer.core.forecast import forecast
from invite_mailer.core.plan import EmptyLedger, PlanInput, plan
from invite_mailer.delivery.quota_forecast import quotas_of
from invite_mailer.errors import Problem
from invite_mailer.inputs.config import Config
from invite_mailer.inputs.settings import SETTINGS_FILE
from invite_mailer.inputs.timeline import mailing_times

__all__ = ["quota_text", "quota_warnings", "quotas_of"]


def quota_warnings(config: Config) -> list[Problem]:
    """Mailings whose window closes before the quotas let every recipient have it."""
    quotas = quotas_of(config)
    if not quotas:
        return []
    series = config.series
    start = min((due for _, _, due, _ in mailing_times(series)), default=series.first_start)
    before = start - timedelta(seconds=1)
    mailings = plan(PlanInput.of(config), EmptyLedger(), before)
    finishes = forecast(mailings, quotas, [], before)
    problems = []
    for mailing in mailings:
        finish = finishes.get(mailing.id)
        if finish is not None and finish.unreached:
            problems.append(
                Problem(
                    config.config_dir / SETTINGS_FILE,
                    f"the {mailing.kind} mailing ({mailing.id}) reaches only "
                    f"{len(mailing.outstanding) - finish.unreached} of "
                    f"{len(mailing.outstanding)} recipients before its window closes "
                    f"({mailing.deadline:%d.%m.%Y %H:%M}) at the relay's quota "
                    f"({quota_text(quotas)})",
                    None,
                    "raise the quota if the relay allows it (smtp.rate_per_day), send "
                    "through a second mailbox, or start the mailing earlier in series.yaml",
                )
            )
    return problems


def quota_text(quotas: list[tuple[int, float]]) -> str:
    names = {60.0: "minute", 3600.0: "hour", 86400.0: "day"}
    return ", ".join(
        f"{limit:,} per {names.get(window, f'{window:g} s')}" for limit, window in quotas
    )
