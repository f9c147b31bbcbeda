"""What the test SMTP server received, reduced to what the end-to-end tests judge.

The tests drive invite-mailer the way an operator does (a copied ``config/``
and ``templates/``, environment overrides, the command line) against the
in-process server of :mod:`support.smtp`, and judge what it received.
"""

from __future__ import annotations

import email
import email.parser
import email.policy
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from support.smtp import Received

# The shipped settings' organiser: where the summaries go.
ORGANISER = "transferreihe@example.org"


@dataclass(frozen=True)
class Mail:
    """One message as the server received it, reduced to what the tests judge."""

    kind: str  # invitation, reminder, followup, or "summary" for the organiser's report
    event: str  # '' for the invitation
    to: str  # the envelope recipient, lower case
    subject: str
    message_id: str
    data: bytes = field(repr=False)

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.kind, self.event, self.to)

    @property
    def body(self) -> str:
        """The plain-text part, decoded."""
        message = email.message_from_bytes(self.data, policy=email.policy.default)
        text = message.get_body(("plain",))  # type: ignore[attr-defined]
        return "" if text is None else str(text.get_content())


_HEADERS = email.parser.BytesHeaderParser(policy=email.policy.default)
SUMMARY_LABELS = {"Einladung": "invitation", "Erinnerung": "reminder", "Nachbereitung": "followup"}


def parse(received: Received, event_dates: Mapping[str, str] | None = None) -> Mail:
    """Turn one received message into a :class:`Mail`.

    The organiser's summary carries no invite-mailer headers; its subject names
    the kind and, for a date, ``(DD.MM.YYYY)``, which *event_dates* (event id
    → ``DD.MM.YYYY``) maps back to the event.
    """
    assert len(received.rcpt_tos) == 1, received.rcpt_tos
    # Headers only: the tests read thousands of messages.
    message = _HEADERS.parsebytes(received.data)
    subject = str(message["Subject"])
    kind = str(message.get("X-Invite-Mailer-Kind", ""))
    event = str(message.get("X-Invite-Mailer-Event", ""))
    if not kind:
        assert subject.startswith("Versandbericht: "), subject
        label = subject.removeprefix("Versandbericht: ").split(" ", 1)[0]
        kind = "summary:" + SUMMARY_LABELS[label]
        for event_id, day in (event_dates or {}).items():
            if f"({day})" in subject:
                event = event_id
    return Mail(
        kind=kind,
        event=event,
        to=received.rcpt_tos[0].lower(),
        subject=subject,
        message_id=str(message["Message-ID"]),
        data=received.data,
    )


def mails(received: Iterable[Received], event_dates: Mapping[str, str] | None = None) -> list[Mail]:
    return [parse(r, event_dates) for r in received]


def split(all_mails: Iterable[Mail]) -> tuple[list[Mail], list[Mail]]:
    """(mails to contacts, summaries to the organiser)."""
    to_contacts, summaries = [], []
    for mail in all_mails:
        (summaries if mail.kind.startswith("summary:") else to_contacts).append(mail)
    return to_contacts, summaries


def duplicates(keys: Iterable[Any]) -> dict[Any, int]:
    return {key: n for key, n in Counter(keys).items() if n > 1}
