"""Bounce reports about the mails a test sent: the samples in ``tests/data/bounces``
turned into reports of the recipients and Message-IDs of a real ``send-due``."""

from __future__ import annotations

from email import message_from_bytes, policy
from pathlib import Path

from invite_mailer.delivery.bounces import read_report
from support.cli import invoke

DATA = Path(__file__).parent.parent / "data" / "bounces"
INVITATION = "2024-10-24T10:05"


def sent_invitations(project: Path) -> dict[str, str]:
    """send-due of the invitation on the outbox: recipient -> Message-ID."""
    result = invoke(["send-due", "--now", INVITATION])
    assert result.exit_code == 0, result.output
    sent = {}
    for eml in (project / "outbox").glob("*.eml"):
        message = message_from_bytes(eml.read_bytes(), policy=policy.default)
        if "Einladung" in str(message["Subject"]):
            sent[message["To"].addresses[0].addr_spec.lower()] = str(message["Message-ID"])
    assert len(sent) >= 8
    return sent


def bounce_of(name: str, reported: str, to: str, message_id: str) -> bytes:
    """The report *name*, about the mail *message_id* to *to*, naming *reported* as failed."""
    template = (DATA / name).read_bytes()
    report = read_report(template)
    data = template.replace(report.bounces[0].email.encode(), reported.encode())
    if report.message_id:
        data = data.replace(report.message_id.encode(), message_id.encode())
    return data.replace(b"To: Alt Adresse", b"To: " + to.encode(), 1)
