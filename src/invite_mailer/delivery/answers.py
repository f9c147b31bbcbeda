"""What a relay's answers mean, and how they are shown.

A relay's words end up in the ledger, the log and the terminal, so they are
cut down to one bounded line of printable text, whatever arrived.
"""

from __future__ import annotations

import re

from aiosmtplib import SMTPException, SMTPResponseException

from invite_mailer.errors import PermanentFailure, TemporaryFailure, TransportError

__all__ = ["cause_of", "failure_from_response", "plain", "response_text"]


def failure_from_response(exc: SMTPResponseException) -> TransportError:
    """A refusal by the relay: permanent for 5xx, temporary otherwise."""
    text = response_text(exc)
    if 500 <= exc.code <= 599:
        return PermanentFailure(text, code=exc.code)
    # 4xx, and anything malformed: nothing says the message is undeliverable.
    return TemporaryFailure(text, code=exc.code if exc.code > 0 else None)


def response_text(exc: BaseException) -> str:
    """What *exc* says, as one printable line: the relay's answer if it has one."""
    if isinstance(exc, SMTPResponseException):
        return plain(f"{exc.code} {exc.message}")
    if isinstance(exc, SMTPException):
        return plain(exc.message)
    return plain(str(exc) or type(exc).__name__)


# The longest answer kept, in characters.
_MAX_ANSWER = 500
# Control characters, bidi and zero-width marks, and the surrogates that stand
# for bytes that were no UTF-8 (aiosmtplib decodes with "surrogateescape").
_UNPRINTABLE = re.compile(
    r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2066-\u2069\ud800-\udfff]"
)
_ESCAPE_SEQUENCE = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)?|.)?")


def plain(text: str) -> str:
    """*text* from a relay as one bounded line of printable characters."""
    text = _ESCAPE_SEQUENCE.sub("", text[: _MAX_ANSWER * 4])
    text = " ".join(_UNPRINTABLE.sub(" ", text).split())
    if len(text) > _MAX_ANSWER:
        text = text[: _MAX_ANSWER - 1] + "…"
    return text


def cause_of(exc: BaseException, kind: type[BaseException]) -> BaseException | None:
    """The first exception of *kind* in the chain of *exc*."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, kind):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None
