"""What a bounce or complaint says: which recipient, how bad, in the server's words.

Three kinds of report come back to the sender:

- Delivery status notifications (RFC 3464, ``multipart/report;
  report-type=delivery-status``), which Postfix, Exchange/Microsoft 365,
  Gmail and most others send: one block per recipient with its ``Action``,
  ``Status`` (``5.1.1``) and ``Diagnostic-Code``, read here with the
  standard library.
- Complaint reports (ARF, RFC 5965, ``report-type=feedback-report``) from a
  mailbox provider's feedback loop: the recipient marked the mail as spam.
- Everything else (Exim's and qmail's plain-text bounces, old Exchange and
  Yahoo formats): GNU Mailman's detectors (``flufl.bounce``) find the failed
  addresses and whether they failed for good.

A failed delivery with a 5.x.x status is a hard bounce, except a full
mailbox (x.2.2), which like a 4.x.x failure is soft; a "delayed" warning is
no bounce (the relay still tries). Every text taken from a report is cut to
one line of printable characters: it ends up in the terminal, JSON and the
organiser's mail.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, replace
from email import message_from_bytes, policy
from email.message import EmailMessage, Message
from email.utils import getaddresses, parseaddr
from enum import StrEnum

from flufl.bounce import all_failures

__all__ = ["MAX_REPORT_BYTES", "Bounce", "BounceKind", "Report", "read_report"]

#: A bounce is a few kilobytes plus perhaps the original mail; larger is not one.
MAX_REPORT_BYTES = 20 * 1024 * 1024
_MAX_TEXT = 300

_STATUS = re.compile(r"\b([245])\.(\d{1,3})\.(\d{1,3})\b")
_SMTP_LINE = re.compile(r"^.*\b[45]\d\d[ -][^\n]*$", re.MULTILINE)
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]+")


class BounceKind(StrEnum):
    HARD = "hard"
    SOFT = "soft"
    COMPLAINT = "complaint"


@dataclass(frozen=True)
class Bounce:
    """One recipient a report is about."""

    email: str  # as the report names it, lower case
    kind: BounceKind
    status: str  # "5.1.1", or "" when the report gives none
    diagnostic: str  # the server's words, one line, at most 300 characters


@dataclass(frozen=True)
class Report:
    """What one message in the bounce mailbox says."""

    bounces: tuple[Bounce, ...]
    message_id: str | None  # of the original mail, when the report quotes it
    ignored: str = ""  # why nothing in it counts (a delay warning, not a report)
    # Where the report was delivered (To, Delivered-To, X-Original-To, Envelope-To):
    # with per-recipient return paths, that names whose mail came back.
    delivered_to: tuple[str, ...] = ()
    returned_to: str = ""  # the recipient the return path names, once resolved


def read_report(data: bytes) -> Report:
    """The bounces and complaints in one raw message (RFC 5322 bytes)."""
    if len(data) > MAX_REPORT_BYTES:
        return Report((), None, f"larger than {MAX_REPORT_BYTES // 2**20} MB")
    message = message_from_bytes(data, policy=policy.default)
    assert isinstance(message, EmailMessage)
    report = _read(message)
    return replace(report, delivered_to=_delivered_to(message))


_DELIVERY_HEADERS = ("delivered-to", "x-original-to", "envelope-to", "x-envelope-to", "to")


def _delivered_to(message: Message) -> tuple[str, ...]:
    values = [str(v) for name in _DELIVERY_HEADERS for v in message.get_all(name, [])]
    return tuple(dict.fromkeys(a.lower() for _, a in getaddresses(values) if "@" in a))


def _read(message: EmailMessage) -> Report:
    report_type = message.get_param("report-type", "", header="content-type")
    original = _original_message_id(message)
    if message.get_content_type() == "multipart/report":
        if str(report_type).lower() == "feedback-report":
            return Report(tuple(_complaints(message)), original)
        if str(report_type).lower() == "delivery-status":
            found = tuple(_dsn(message))
            if found:
                return Report(found, original)
            if _delayed_only(message):
                return Report((), original, "a delay warning: the relay is still trying")
    return _other(message, original)


# --- delivery status notifications ------------------------------------------------------


def _status_blocks(message: Message) -> Iterator[Message]:
    """The per-recipient blocks of every message/delivery-status part."""
    for part in message.walk():
        if part.get_content_type() != "message/delivery-status":
            continue
        payload = part.get_payload()
        if isinstance(payload, list):
            # The first block is about the message, the others one recipient each.
            yield from (block for block in payload[1:] if isinstance(block, Message))


def _dsn(message: Message) -> Iterator[Bounce]:
    for block in _status_blocks(message):
        action = str(block.get("action", "")).strip().lower()
        email = _recipient(block)
        if not action.startswith(("failed", "error")) or email is None:
            continue
        diagnostic = clean(str(block.get("diagnostic-code", "")))
        status = _status(str(block.get("status", ""))) or _status(diagnostic)
        yield Bounce(email, _kind(status), status, diagnostic)


def _delayed_only(message: Message) -> bool:
    actions = [str(block.get("action", "")).strip().lower() for block in _status_blocks(message)]
    return bool(actions) and all(a.startswith("delayed") for a in actions)


def _recipient(block: Message) -> str | None:
    for name in ("original-recipient", "final-recipient", "x-actual-recipient"):
        value = str(block.get(name, ""))
        kind, _, address = value.partition(";")
        if kind.strip().lower() == "rfc822" and "@" in address:
            return address.strip().strip("<>").lower()
    return None


def _status(text: str) -> str:
    found = _STATUS.search(text)
    return ".".join(found.groups()) if found else ""


def _kind(status: str) -> BounceKind:
    if status.startswith("5.") and not status.endswith(".2.2"):
        return BounceKind.HARD
    if status.startswith(("4.", "5.")):
        return BounceKind.SOFT
    # A failure without a status: the reporting server gave up on the address.
    return BounceKind.HARD


# --- complaints ----------------------------------------------------------------------


def _complaints(message: Message) -> Iterator[Bounce]:
    feedback = next(
        (p for p in message.walk() if p.get_content_type() == "message/feedback-report"), None
    )
    if feedback is None:
        return
    fields = _feedback_fields(feedback)
    kind = clean(fields.get("feedback-type", "abuse")) or "abuse"
    recipients = [
        address.lower() for _, address in getaddresses(fields.get_all("original-rcpt-to"))
    ]
    if not recipients:
        headers = _original_headers(message)
        if headers is not None:
            recipients = [a.lower() for _, a in getaddresses(headers.get_all("to", [])) if a]
    for email in dict.fromkeys(r for r in recipients if "@" in r):
        yield Bounce(email, BounceKind.COMPLAINT, "", f"feedback report: {kind}")


class _Fields(dict[str, str]):
    """The fields of a feedback report; repeated ones kept in order."""

    def __init__(self) -> None:
        super().__init__()
        self.repeated: dict[str, list[str]] = {}

    def get_all(self, name: str) -> list[str]:
        return self.repeated.get(name, [])


def _feedback_fields(part: Message) -> _Fields:
    # message/feedback-report is a block of header fields; the email package
    # keeps it either as parsed blocks or as text, depending on its parser.
    payload = part.get_payload()
    if isinstance(payload, list):
        text = "".join(str(block) for block in payload)
    else:
        raw = part.get_payload(decode=True)
        text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(payload)
    fields = _Fields()
    for line in text.splitlines():
        name, colon, value = line.partition(":")
        if colon and name and not name[0].isspace():
            key = name.strip().lower()
            fields.setdefault(key, value.strip())
            fields.repeated.setdefault(key, []).append(value.strip())
    return fields


# --- the rest ----------------------------------------------------------------------


def _other(message: Message, original: str | None) -> Report:
    temporary, permanent = all_failures(message)
    if not temporary and not permanent:
        return Report((), original, "no bounce or complaint found in it")
    if not permanent:
        return Report((), original, "a delay warning: the relay is still trying")
    diagnostic = _diagnostic_line(message)
    status = _status(diagnostic)
    bounces = []
    for raw in sorted(permanent):
        email = raw.decode("ascii", "replace").strip("<>").lower()
        if "@" in email:
            kind = _kind(status) if status else BounceKind.HARD
            bounces.append(Bounce(email, kind, status, diagnostic))
    return Report(tuple(bounces), original)


def _diagnostic_line(message: Message) -> str:
    """The first line of the plain text that reads like an SMTP reply (550 ...)."""
    for part in message.walk():
        if part.get_content_type() != "text/plain":
            continue
        raw = part.get_payload(decode=True)
        if not isinstance(raw, bytes):
            continue
        found = _SMTP_LINE.search(raw[:65536].decode("utf-8", "replace"))
        if found:
            return clean(found.group(0))
    return ""


def _original_headers(message: Message) -> Message | None:
    for part in message.walk():
        content_type = part.get_content_type()
        if content_type in ("message/rfc822", "message/global"):
            payload = part.get_payload()
            if isinstance(payload, list) and payload and isinstance(payload[0], Message):
                return payload[0]
        if content_type in ("text/rfc822-headers", "text/global-headers"):
            raw = part.get_payload(decode=True)
            if isinstance(raw, bytes):
                return message_from_bytes(raw, policy=policy.compat32)
    return None


def _original_message_id(message: Message) -> str | None:
    headers = _original_headers(message)
    if headers is None:
        return None
    value = parseaddr(str(headers.get("message-id", "")))[1]
    return f"<{value}>" if value else None


def clean(text: str) -> str:
    """*text* as one line of printable characters, at most 300 of them."""
    line = " ".join(_UNPRINTABLE.sub(" ", text).split())
    return line if len(line) <= _MAX_TEXT else line[: _MAX_TEXT - 1] + "…"
