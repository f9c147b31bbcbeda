"""Per-recipient return paths (VERP): who a bounce is about, from where it was sent.

With ``bounces.return_path = "bounces+{token}@example.org"`` every mail goes
out with ``MAIL FROM:<bounces+TOKEN@example.org>``, *TOKEN* a MAC of the
series and the recipient (:func:`~invite_mailer.core.tokens.bounce_token`).
A bounce comes back to that address, so even a report that names a
forwarded address, or none that can be read, is attributed to the recipient
whose mail it returns. The headers are untouched: the return path exists
only in the envelope (the receiving server writes it into ``Return-Path``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from invite_mailer.core.tokens import bounce_token, bounce_tokens
from invite_mailer.inputs.settings import Settings

__all__ = ["ReturnPaths", "envelope_sender"]


def envelope_sender(settings: Settings, series_id: str, email: str) -> str:
    """MAIL FROM for a mail to *email*: its own return path, or the sender's address."""
    template = settings.bounces.return_path
    secret = settings.unsubscribe.secret.get_secret_value()
    if not template or not secret:
        return settings.sender.from_address.addr_spec
    return template.replace("{token}", bounce_token(secret, series_id, email))


class ReturnPaths:
    """Maps the addresses a bounce was delivered to back to the recipient of the mail."""

    def __init__(self, settings: Settings, series_id: str) -> None:
        template = settings.bounces.return_path
        self.secret = settings.unsubscribe.secret.get_secret_value()
        self.series_id = series_id
        self.pattern: re.Pattern[str] | None = None
        if template and self.secret:
            before, _, after = template.partition("{token}")
            self.pattern = re.compile(
                f"{re.escape(before)}([a-z2-7]{{16}}){re.escape(after)}", re.IGNORECASE
            )
        self._tokens: dict[str, str] | None = None

    def token_in(self, addresses: Iterable[str]) -> str | None:
        """The token of the first of *addresses* that is one of our return paths."""
        if self.pattern is None:
            return None
        for address in addresses:
            found = self.pattern.fullmatch(address.strip())
            if found:
                return found.group(1).lower()
        return None

    @property
    def learned(self) -> bool:
        """Whether the recipients' tokens are known (see :meth:`learn`)."""
        return self._tokens is not None

    def learn(self, known: Iterable[str]) -> None:
        """The tokens of the *known* recipients of the series, computed once."""
        self._tokens = bounce_tokens(self.secret, self.series_id, known)

    def recipient(self, token: str) -> str | None:
        """Whose return path *token* is, among the recipients learned."""
        return (self._tokens or {}).get(token)
