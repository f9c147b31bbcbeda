"""Registration links (``registration.mode: links``): the pages behind them.

Every invitation carries, per date, a personal link
``<web_url>/anmeldung/<token>``; confirmations and reminders carry
``<web_url>/absage/<token>`` ("Ich kann doch nicht teilnehmen"). The token
is signed for the series, the address and the date
(:func:`~invite_mailer.core.tokens.make_link_token`).

As with one-click unsubscribe, only POST changes anything: ``GET`` shows a
German page that names the date with a button, whose form POSTs to the same
URL. Link scanners and previews fetch with GET and never register anyone.
A POST is idempotent: registering twice is one registration. Forged,
truncated or foreign tokens get 400 and change nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from starlette.requests import Request
from starlette.responses import Response

from invite_mailer.core import german
from invite_mailer.core.registrations import SOURCE_LINK
from invite_mailer.core.tokens import REGISTER, WITHDRAW, verify_link_token
from invite_mailer.delivery.ledger import Ledger
from invite_mailer.errors import InviteMailerError
from invite_mailer.inputs.series import Event, Series
from invite_mailer.service.webpages import MAX_TOKEN_CHARS, mask_address, page, read_body

__all__ = ["RegistrationPages"]

log = logging.getLogger("invite_mailer.service.web")

Clock = Callable[[], datetime]


@dataclass(frozen=True)
class RegistrationPages:
    """The routes ``/anmeldung/{token}`` and ``/absage/{token}`` for one series.

    *series* returns the series as currently loaded (the daemon reloads it);
    *on_change* is called after a registration or withdrawal was recorded,
    so the daemon can confirm it without waiting for its next sweep; *clock*
    is the time registrations are recorded at (the daemon's clock).
    """

    series_id: str
    secret: str
    ledger_path: Path | str
    series: Callable[[], Series]
    clock: Clock
    on_change: Callable[[], None] | None = None
    contact_address: str = ""

    async def register(self, request: Request) -> Response:
        """``GET /anmeldung/{token}`` asks, ``POST`` registers."""
        return await self._handle(request, REGISTER)

    async def withdraw(self, request: Request) -> Response:
        """``GET /absage/{token}`` asks, ``POST`` withdraws the registration."""
        return await self._handle(request, WITHDRAW)

    async def _handle(self, request: Request, action: str) -> Response:
        token = request.path_params["token"]
        posted = request.method == "POST"
        found = None
        if len(token) <= MAX_TOKEN_CHARS:
            found = verify_link_token(self.secret, action, self.series_id, token)
        series = self.series()
        event = _event(series, found[1]) if found is not None else None
        if found is None or event is None:
            if posted:
                length = "too many" if len(token) > MAX_TOKEN_CHARS else str(len(token))
                log.warning("%s: rejected an invalid link (%s characters)", action, length)
            return page("link_invalid", 400, contact_address=self.contact_address)
        address = found[0]
        context = _about(series, event)
        if action == REGISTER and (event.cancelled or self.clock() >= event.starts_at):
            return page("closed", 200, **context)
        if not posted:  # GET and HEAD only look
            return page("register" if action == REGISTER else "withdraw", 200, **context)
        body = await read_body(request)
        if isinstance(body, Response):
            return body
        return await self._record(action, address, event, context)

    async def _record(
        self, action: str, address: str, event: Event, context: dict[str, str]
    ) -> Response:
        now = self.clock()
        try:
            async with Ledger.open(self.ledger_path) as ledger:
                if action == REGISTER:
                    changed = await ledger.register(
                        self.series_id, event.id, address, source=SOURCE_LINK, now=now
                    )
                    # Opted out: registered all the same, but no mail will follow.
                    blocked = await ledger.is_opted_out(self.series_id, address)
                    context = {**context, "opted_out": "ja" if blocked else ""}
                else:
                    changed = await ledger.withdraw(
                        self.series_id, event.id, address, by=SOURCE_LINK, now=now
                    )
        except (InviteMailerError, OSError) as exc:
            log.error("%s: cannot record %s: %s", action, mask_address(address), exc)
            return page("link_unavailable", 503)
        if changed:
            log.info(
                "%s: %s for %s (link)",
                "registered" if action == REGISTER else "withdrawn",
                mask_address(address),
                event.id,
                extra={"series": self.series_id, "event": event.id, "source": SOURCE_LINK},
            )
            if self.on_change is not None:
                self.on_change()
        return page("registered" if action == REGISTER else "withdrawn", 200, **context)


def _event(series: Series, event_id: str) -> Event | None:
    for event in series.events:
        if event.id == event_id:
            return event
    return None


def _about(series: Series, event: Event) -> dict[str, str]:
    """What the pages say about the date."""
    return {
        "series_title": series.title,
        "title": event.title,
        "when": f"{german.date_long(event.date)}, {german.time_range(event.start, event.end)}",
    }
