"""Taking bounce and complaint reports in: from files (``bounces import``) or an
IMAP mailbox (the daemon, ``bounces fetch``), each message the same way.

:class:`Intake` reads one raw message, records what it reports in the ledger
and keeps the tally the commands print; a report read twice counts once (its
fingerprint is the SHA-256 of its bytes).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from datetime import datetime

from invite_mailer.delivery.bounce_sql import Recorded
from invite_mailer.delivery.bounces import read_report
from invite_mailer.delivery.ledger import Ledger
from invite_mailer.delivery.return_path import ReturnPaths

__all__ = ["Intake"]


@dataclass
class Intake:
    """Reports of one run, recorded for *series* in *ledger*."""

    ledger: Ledger
    series: str
    soft_limit: int
    return_paths: ReturnPaths | None = None  # with bounces.return_path set
    read: int = 0  # messages read
    recorded: list[Recorded] = field(default_factory=list)
    ignored: list[tuple[str, str]] = field(default_factory=list)  # (where, why)

    @property
    def suppressed(self) -> list[str]:
        return sorted({r.email for r in self.recorded if r.new and r.suppressed})

    async def take(self, where: str, data: bytes, now: datetime) -> None:
        """Record the bounces and complaints of the message *data* found at *where*."""
        self.read += 1
        report = read_report(data)
        token = self.return_paths.token_in(report.delivered_to) if self.return_paths else None
        if token is not None and self.return_paths is not None:
            if not self.return_paths.learned:  # one read of the recipients per intake
                self.return_paths.learn(await self.ledger.recipients(self.series))
            report = replace(report, returned_to=self.return_paths.recipient(token) or "")
        if not report.bounces:
            self.ignored.append((where, report.ignored))
            return
        recorded = await self.ledger.record_report(
            self.series,
            report,
            fingerprint=hashlib.sha256(data).hexdigest(),
            source=where,
            now=now,
            soft_limit=self.soft_limit,
        )
        self.recorded.extend(r for r in recorded if r.email)
        strangers = [r.bounce.email for r in recorded if not r.email]
        if strangers:
            self.ignored.append((where, f"not a recipient of this series: {', '.join(strangers)}"))
