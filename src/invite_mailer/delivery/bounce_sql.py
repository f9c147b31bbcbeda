"""The ledger's statements for bounces and complaints, run on its thread.

One report is recorded in one transaction: its rows, and the suppression it
causes. A hard bounce and a complaint suppress the address for the series at
once; soft bounces do when their count reaches the limit. Suppression is an
opt-out with the reason as its source, so every pass, ``status`` and
``optout list`` already honour it, and ``optout remove`` undoes it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from invite_mailer.delivery.bounces import Bounce, BounceKind, Report
from invite_mailer.delivery.database import Database, transaction
from invite_mailer.delivery.ledger_pg import advisory_lock
from invite_mailer.delivery.ledger_sql import iso

__all__ = [
    "BounceOverview",
    "BounceRecord",
    "Recorded",
    "bounce_overview",
    "bounce_rows",
    "record_report",
]


@dataclass(frozen=True)
class Recorded:
    """What one bounce of a report did."""

    bounce: Bounce
    email: str  # the recipient it was attributed to ('' when it is none of ours)
    new: bool  # False: this report was recorded before
    suppressed: bool  # the address is suppressed now (by this or an earlier report)
    soft_count: int = 0


@dataclass(frozen=True)
class BounceRecord:
    """One recorded bounce, for ``bounces list`` and ``status``."""

    email: str
    kind: BounceKind
    status: str
    diagnostic: str
    message_id: str
    source: str
    received_at: datetime

    def to_json(self) -> dict[str, str | None]:
        return {
            "email": self.email,
            "kind": str(self.kind),
            "status": self.status,
            "diagnostic": self.diagnostic,
            "message_id": self.message_id or None,
            "source": self.source,
            "received_at": self.received_at.isoformat(),
        }


def _insert(db: Database, row: tuple[str | None, ...]) -> bool:
    """Insert one bounce row; False when this report was recorded for the address before."""
    return bool(
        db.execute(
            "INSERT INTO bounces (series, email, kind, status, diagnostic, message_id, "
            "source, fingerprint, received_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (series, fingerprint, email) DO NOTHING RETURNING id",
            row,
        ).fetchall()
    )


def _attributed(db: Database, series: str, bounce: Bounce, report: Report) -> str:
    """The recipient of ours *bounce* is about, or '' (not a mail of this series).

    The recipient whose return path the report came back to; else the address
    the report names, if it was mailed; else the recipient of the mail whose
    Message-ID the report quotes (a forwarded address bounced).
    """
    if report.returned_to:
        return report.returned_to
    message_id = report.message_id or ""
    known = db.execute(
        "SELECT 1 FROM deliveries WHERE series = ? AND email = ? LIMIT 1", (series, bounce.email)
    ).fetchone()
    if known:
        return bounce.email
    if message_id:
        row = db.execute(
            "SELECT email FROM deliveries WHERE message_id = ? AND series = ? LIMIT 1",
            (message_id, series),
        ).fetchone()
        if row:
            return str(row[0])
    return ""


def record_report(
    db: Database,
    series: str,
    report: Report,
    *,
    fingerprint: str,
    source: str,
    now: datetime,
    soft_limit: int,
) -> list[Recorded]:
    """Record every bounce of *report* and suppress what it calls for, in one transaction."""
    results = []
    stamp = iso(now)
    message_id = report.message_id or ""
    with transaction(db):
        # Two nodes reading one mailbox: the soft bounces are counted once each.
        advisory_lock(db, f"bounces:{series}")
        for bounce in report.bounces:
            email = _attributed(db, series, bounce, report)
            if not email:
                results.append(Recorded(bounce, "", new=False, suppressed=False))
                continue
            row = (series, email, bounce.kind.value, bounce.status, bounce.diagnostic)
            new = _insert(db, (*row, message_id, source, fingerprint, stamp))
            softs = db.execute(
                "SELECT count(*) FROM bounces WHERE series = ? AND email = ? AND kind = 'soft'",
                (series, email),
            ).fetchone()[0]
            reason = _reason(bounce, softs, soft_limit)
            if reason:
                db.execute(
                    "INSERT INTO optouts (series, email, source, created_at) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT (series, email) DO NOTHING",
                    (series, email, reason, stamp),
                )
            suppressed = db.execute(
                "SELECT 1 FROM optouts WHERE series = ? AND email = ?", (series, email)
            ).fetchone()
            results.append(Recorded(bounce, email, new, bool(suppressed), softs))
    return results


# The opt-outs _reason writes, as SQL on the optouts table aliased "o".
_BY_BOUNCE = (
    "(o.source LIKE 'bounce%' OR o.source LIKE 'complaint%' OR o.source LIKE '% soft bounces')"
)


def _reason(bounce: Bounce, softs: int, soft_limit: int) -> str:
    """The opt-out source that suppresses the address, or '' (not yet)."""
    if bounce.kind is BounceKind.COMPLAINT:
        return "complaint (spam report)"
    if bounce.kind is BounceKind.HARD:
        return f"bounce {bounce.status}".strip() if bounce.status else "bounce"
    if softs >= soft_limit:
        return f"{softs} soft bounces"
    return ""


def bounce_rows(db: Database, series: str) -> list[BounceRecord]:
    rows = db.execute(
        "SELECT email, kind, status, diagnostic, message_id, source, received_at "
        "FROM bounces WHERE series = ? ORDER BY received_at, id",
        (series,),
    ).fetchall()
    return [
        BounceRecord(r[0], BounceKind(r[1]), r[2], r[3], r[4], r[5], datetime.fromisoformat(r[6]))
        for r in rows
    ]


@dataclass(frozen=True)
class BounceOverview:
    """The series' bounces in brief, for the organiser's summary."""

    counts: dict[BounceKind, int]  # recorded reports per kind
    suppressed: int  # addresses a bounce or complaint suppressed
    first: list[BounceRecord]  # the first *limit* of them, with their latest report


def bounce_overview(db: Database, series: str, limit: int) -> BounceOverview:
    """Counted in SQL: however many bounces a series has, *limit* rows are read."""
    counts = {kind: 0 for kind in BounceKind}
    for kind, count in db.execute(
        "SELECT kind, count(*) FROM bounces WHERE series = ? GROUP BY kind", (series,)
    ):
        counts[BounceKind(kind)] = int(count)
    # Suppressed by a bounce or complaint: a bounce row and the opt-out that
    # _reason gave it (not one by link or reply, nor one removed again).
    suppressed = db.execute(
        "SELECT count(DISTINCT b.email) FROM bounces b JOIN optouts o "
        f"ON o.series = b.series AND o.email = b.email WHERE b.series = ? AND {_BY_BOUNCE}",
        (series,),
    ).fetchone()[0]
    rows = db.execute(
        "SELECT b.email, b.kind, b.status, b.diagnostic, b.message_id, b.source, b.received_at "
        "FROM bounces b JOIN optouts o ON o.series = b.series AND o.email = b.email "
        f"WHERE b.series = ? AND {_BY_BOUNCE} AND b.id = "
        "(SELECT max(id) FROM bounces WHERE series = b.series AND email = b.email) "
        "ORDER BY b.received_at, b.id LIMIT ?",
        (series, limit),
    ).fetchall()
    first = [
        BounceRecord(r[0], BounceKind(r[1]), r[2], r[3], r[4], r[5], datetime.fromisoformat(r[6]))
        for r in rows
    ]
    return BounceOverview(counts, int(suppressed), first)
