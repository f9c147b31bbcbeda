"""What an organiser previews is what send-due sends: the same bytes.

``preview`` and ``send-due`` share one builder (the fast path, with the
standard library as its reference), so a preview made at the moment a mail is
due equals the file the outbox transport writes for that contact, byte for
byte. The series is the shipped one, replayed with ``--now``.
"""

from __future__ import annotations

import email
import email.policy
import re
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from invite_mailer.cli import cli

CONTACT = "thomas.schmidt@example.org"  # registered for verwaltung and allianzen


def invoke(*args: str) -> Result:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def sent_to(outbox: Path, kind: str, contact: str) -> bytes:
    """The one mail of *kind* the outbox holds for *contact*."""
    found = []
    for path in outbox.glob("*.eml"):
        message = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
        if message["X-Invite-Mailer-Kind"] == kind and contact in str(message["To"]):
            found.append(path.read_bytes())
    assert len(found) == 1, (kind, contact, len(found))
    return found[0]


def previewed(project: Path, kind: str, now: str, *, event: str | None = None) -> bytes:
    out = project / f"preview-{kind}"
    args = ["preview", kind, "--contact", CONTACT, "--now", now, "--out", str(out)]
    invoke(*args, *(["--event", event] if event else []))
    (eml,) = out.glob("*.eml")
    return eml.read_bytes()


def same_mail(preview: bytes, sent: bytes) -> None:
    # The Date header is the sending moment: a pass's virtual clock may have
    # moved on by a second. Everything else (Message-ID, boundaries, every
    # header and part) must be identical.
    date = re.compile(rb"^Date: [^\r\n]*\r\n", re.M)
    assert len(date.findall(preview)) == len(date.findall(sent)) == 1
    assert date.sub(b"", preview) == date.sub(b"", sent)
    assert len(sent) > 2000  # a whole mail, not an empty match


@pytest.mark.parametrize(
    ("kind", "event", "now"),
    [
        ("invitation", None, "2024-10-24 10:00"),
        ("reminder", "verwaltung", "2024-11-13 14:00"),
    ],
)
def test_preview_is_what_send_due_sends(
    project: Path, kind: str, event: str | None, now: str
) -> None:
    if kind != "invitation":
        invoke("send-due", "--now", "2024-10-24 10:00")  # the invitations first
        for old in (project / "outbox").glob("*.eml"):
            old.unlink()
    preview = previewed(project, kind, now, event=event)
    invoke("send-due", "--now", now)
    same_mail(preview, sent_to(project / "outbox", kind, CONTACT))


@pytest.mark.slow
def test_an_update_preview_is_what_send_due_sends(project: Path) -> None:
    """With the ledger's history: the calendar SEQUENCE and the changed time agree."""
    invoke("send-due", "--now", "2024-10-24 10:00")
    series = project / "config" / "series.yaml"
    text = series.read_text(encoding="utf-8")
    moved = text.replace('start: "14:00"', 'start: "15:00"', 1).replace(
        'end: "16:00"', 'end: "17:00"', 1
    )
    assert moved != text
    series.write_text(moved, encoding="utf-8")
    invoke("send-due", "--now", "2024-10-30 09:00")  # the change is seen; its grace begins
    preview = previewed(project, "update", "2024-10-30 09:20", event="verwaltung")
    parsed = email.message_from_bytes(preview, policy=email.policy.default)
    calendars = [p for p in parsed.walk() if p.get_content_type() == "text/calendar"]
    assert calendars and all("SEQUENCE:1" in str(p.get_content()) for p in calendars)
    invoke("send-due", "--now", "2024-10-30 09:20")
    same_mail(preview, sent_to(project / "outbox", "update", CONTACT))
