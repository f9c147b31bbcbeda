"""What a delivery pass reports: per mailing, how many mails went which way."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum

from invite_mailer.core.plan import Mailing
from invite_mailer.errors import QuotaReached

__all__ = ["MailingResult", "Outcome", "PassResult", "ProgressCallback"]


class Outcome(StrEnum):
    SENT = "sent"
    FAILED = "failed"
    RETRY = "retry"
    SKIPPED = "skipped"  # not this pass's to send: window closed, opted out, taken
    DEFERRED = "deferred"  # a full relay quota held it back until it reopens


@dataclass
class MailingResult:
    mailing: Mailing
    counts: Counter[Outcome] = field(default_factory=Counter)


@dataclass
class PassResult:
    """What one pass did."""

    now: datetime
    mailings: dict[str, MailingResult] = field(default_factory=dict)
    failures: list[tuple[str, str, str]] = field(default_factory=list)  # mailing id, email, answer
    stopped: bool = False
    sender_refused: str | None = None  # the relay's answer when it refused our sender
    reports_sent: int = 0  # summaries to the organiser
    quota: QuotaReached | None = None  # the relay's quota stopped the pass

    def total(self, outcome: Outcome) -> int:
        return sum(r.counts[outcome] for r in self.mailings.values())


ProgressCallback = Callable[[Mailing, str, Outcome], None]
