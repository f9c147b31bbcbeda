"""The one-click unsubscribe endpoint (RFC 8058, RFC 2369).

Every mail carries ``List-Unsubscribe: <mailto:...>, <https://.../<token>>`` and
``List-Unsubscribe-Post: List-Unsubscribe=One-Click`` when an unsubscribe URL
and secret are configured. Mail programs that support one-click unsubscribe
(Gmail, Apple Mail, Outlook.com) POST ``List-Unsubscribe=One-Click`` to that
URL; a person who opens the link in a browser gets a confirmation page whose
button POSTs to the same URL. Only POST changes anything: link scanners and
previews fetch with GET, and must never unsubscribe anyone.

The token says whom to opt out (see :mod:`invite_mailer.core.tokens`); the
opt-out is written to the ledger, which every delivery pass reads, so it is
honoured from the next pass on without touching ``config/``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parseaddr
from pathlib import Path
from urllib.parse import parse_qs

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from invite_mailer.core.tokens import REGISTER, WITHDRAW, verify_token
from invite_mailer.delivery.ledger import Ledger
from invite_mailer.delivery.ledger_open import as_target, ledger_exists
from invite_mailer.errors import ConfigError, InviteMailerError
from invite_mailer.inputs.addresses import load_address_list
from invite_mailer.inputs.config import OPTOUT_FILE, Config
from invite_mailer.inputs.series import Series
from invite_mailer.service.registration_web import RegistrationPages
from invite_mailer.service.server import MAX_HEADER_BYTES, RunningServer, start_server
from invite_mailer.service.webpages import (
    MAX_TOKEN_CHARS,
    mask_address,
    page,
    read_body,
)

__all__ = ["UnsubscribePages", "create_app", "mask_address", "start_unsubscribe"]

log = logging.getLogger("invite_mailer.service.web")

MAX_TARGET_BYTES = 2048
"""Longest request line target (path and query) that is looked at."""

SOURCE_ONE_CLICK = "one-click"
SOURCE_WEB_FORM = "web form"


def _is_one_click(content_type: str, body: bytes) -> bool:
    """Whether *body* is RFC 8058's ``List-Unsubscribe=One-Click`` (either form encoding)."""
    if content_type.startswith("multipart/form-data"):
        pattern = rb'name="?List-Unsubscribe"?\r?\n(?:[^\r\n]+\r?\n)*\r?\nOne-Click\r?\n'
        return re.search(pattern, body) is not None
    try:
        fields = parse_qs(body.decode("utf-8"), keep_blank_values=True)
    except UnicodeDecodeError:
        return False
    return fields.get("List-Unsubscribe") == ["One-Click"]


@dataclass(frozen=True)
class UnsubscribePages:
    """The routes of the endpoint for one series; see :func:`create_app`."""

    series_id: str
    secret: str
    ledger_path: Path | str
    listed: _AddressListCache | None = None
    series_title: str = ""
    contact_address: str = ""

    @property
    def about(self) -> str:
        return f"„{self.series_title}“" if self.series_title else "dieser Veranstaltungsreihe"

    async def healthz(self, request: Request) -> Response:
        """``GET /healthz``: the endpoint answers."""
        return PlainTextResponse("ok", headers={"Cache-Control": "no-store"})

    async def unsubscribe(self, request: Request) -> Response:
        """``GET /{token}`` shows what a POST would do; ``POST /{token}`` opts out."""
        token = request.path_params["token"]
        if token == "healthz":  # another method than GET: not a token either
            return PlainTextResponse(
                "Method Not Allowed", status_code=405, headers={"Allow": "GET, HEAD"}
            )
        address = self._address_of(token, logged=request.method == "POST")
        if address is None:
            return page("invalid", 400, contact_address=self.contact_address)
        if request.method != "POST":  # GET and HEAD only look
            return await self._confirmation(address)
        body = await read_body(request)
        if isinstance(body, Response):
            return body
        content_type = request.headers.get("content-type", "")
        source = SOURCE_ONE_CLICK if _is_one_click(content_type, body) else SOURCE_WEB_FORM
        return await self._opt_out(address, source)

    def _address_of(self, token: str, *, logged: bool) -> str | None:
        too_long = len(token) > MAX_TOKEN_CHARS
        address = None if too_long else verify_token(self.secret, self.series_id, token)
        if address is None and logged:
            # The length tells a truncated link from a forged one; the token
            # itself would show the address it claims.
            length = "too many" if too_long else str(len(token))
            log.warning("unsubscribe: rejected an invalid token (%s characters)", length)
        return address

    async def _confirmation(self, address: str) -> Response:
        shown = mask_address(address)
        if await self._already_opted_out(address):
            return page("already", address=shown, about=self.about)
        return page("confirm", address=shown, about=self.about)

    async def _already_opted_out(self, address: str) -> bool:
        if self.listed is not None:
            try:
                if address in await self.listed.get():
                    return True
            except (ConfigError, OSError) as exc:
                log.warning("cannot read %s: %s", self.listed.path, exc)
        if not ledger_exists(self.ledger_path):
            return False
        async with Ledger.open(self.ledger_path) as ledger:
            return address in await ledger.optouts(self.series_id)

    async def _opt_out(self, address: str, source: str) -> Response:
        try:
            async with Ledger.open(self.ledger_path) as ledger:
                added = await ledger.add_optout(
                    self.series_id, address, source=source, now=datetime.now(UTC)
                )
        except (InviteMailerError, OSError) as exc:
            log.error(
                "unsubscribe: cannot record the opt-out of %s: %s", mask_address(address), exc
            )
            return page("unavailable", 503)
        if added:
            log.info(
                "unsubscribe: %s opted out (%s)",
                mask_address(address),
                source,
                extra={"series": self.series_id, "source": source},
            )
        return page("done", address=mask_address(address), about=self.about)


def create_app(
    series_id: str,
    secret: str,
    ledger_path: Path | str,
    *,
    optout_file: Path | None = None,
    series_title: str = "",
    contact_address: str = "",
    series: Callable[[], Series] | None = None,
    on_registration: Callable[[], None] | None = None,
    clock: Callable[[], datetime] | None = None,
) -> Starlette:
    """The unsubscribe web app for one series.

    Routes: ``GET /healthz``; ``GET /{token}`` (a confirmation page, changes
    nothing); ``POST /{token}`` (opts the address out; idempotent). Invalid
    tokens (forged, truncated, another series) get 400 and change nothing.
    *optout_file* (``config/optout.txt``) only lets the page say that an
    address is already blocked there. *series_title* and *contact_address*
    make the pages friendlier; both are optional. With *series* (the series
    as loaded now) the registration links are served too, see
    :mod:`~invite_mailer.service.registration_web`; *on_registration* is
    called after each change they record; *clock* gives their time
    (default: the system clock).
    """
    pages = UnsubscribePages(
        series_id,
        secret,
        as_target(ledger_path),
        listed=_AddressListCache(optout_file) if optout_file is not None else None,
        series_title=series_title,
        contact_address=contact_address,
    )
    routes = [Route("/healthz", pages.healthz, methods=["GET"])]
    if series is not None:
        links = RegistrationPages(
            series_id,
            secret,
            as_target(ledger_path),
            series,
            on_change=on_registration,
            contact_address=contact_address,
            clock=clock or (lambda: datetime.now(UTC)),
        )
        routes += [
            Route(f"/{REGISTER}/{{token}}", links.register, methods=["GET", "POST"]),
            Route(f"/{WITHDRAW}/{{token}}", links.withdraw, methods=["GET", "POST"]),
        ]
    routes.append(Route("/{token}", pages.unsubscribe, methods=["GET", "POST"]))
    app = Starlette(routes=routes)
    app.add_middleware(_RequestGuard)
    return app


class _AddressListCache:
    """``optout.txt`` read again only when it changed (by inode, size and mtime).

    Every confirmation page asks whether the address is listed there; a long
    list would otherwise be parsed for every click on a link.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._key: tuple[int, int, int, int] | None = None
        self._addresses: frozenset[str] = frozenset()
        # A broken list is remembered too: parsed again per request, a long
        # list with one bad line would make every click expensive.
        self._error: ConfigError | None = None
        self._lock = asyncio.Lock()

    def _stat(self) -> tuple[int, int, int, int] | None:
        try:
            info = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)

    async def get(self) -> frozenset[str]:
        async with self._lock:
            key = self._stat()
            if key is None:
                self._key, self._addresses, self._error = None, frozenset(), None
            elif key != self._key:
                self._key = key
                try:
                    self._addresses = await asyncio.to_thread(load_address_list, self.path)
                    self._error = None
                except ConfigError as exc:
                    self._addresses, self._error = frozenset(), exc
            if self._error is not None:
                raise self._error
            return self._addresses


class _RequestGuard:
    """Refuses requests that no mail program or browser sends, before any route sees them.

    ``Content-Length`` together with ``Transfer-Encoding`` is how requests are
    smuggled past a proxy that reads the other header: refused, and the
    connection closed, so nothing that follows on it is taken as a request.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        names = [name for name, _ in scope["headers"]]
        refusal = None
        if b"transfer-encoding" in names and b"content-length" in names:
            refusal = (400, "Content-Length and Transfer-Encoding together")
        elif names.count(b"content-length") > 1:
            refusal = (400, "more than one Content-Length")
        elif len(scope.get("raw_path", b"")) + len(scope.get("query_string", b"")) > (
            MAX_TARGET_BYTES
        ):
            refusal = (414, "URI too long")
        elif sum(len(name) + len(value) for name, value in scope["headers"]) > MAX_HEADER_BYTES:
            # h11 bounds only what it buffers; a large header in one packet passes it.
            refusal = (431, "request headers too large")
        if refusal is None:
            await self.app(scope, receive, send)
            return
        response = PlainTextResponse(
            refusal[1], status_code=refusal[0], headers={"Connection": "close"}
        )
        await response(scope, receive, send)


async def start_unsubscribe(
    config: Config,
    *,
    series: Callable[[], Series] | None = None,
    on_registration: Callable[[], None] | None = None,
    clock: Callable[[], datetime] | None = None,
) -> RunningServer | None:
    """Start the endpoint when ``unsubscribe.serve`` is set (``None`` otherwise).

    With ``registration.mode: links`` it serves the registration links too,
    for the series *series* returns (default: the one of *config*), at the
    time *clock* gives (the daemon's).
    """
    settings = config.settings
    if not settings.unsubscribe.serve:
        return None
    secret = settings.unsubscribe.secret.get_secret_value()
    if not secret:
        log.error(
            "unsubscribe.serve is true but no secret is set: the endpoint is not started; "
            "set INVITE_MAILER_UNSUBSCRIBE__SECRET"
        )
        return None
    sender = settings.sender
    contact = (
        sender.unsubscribe_mailto or parseaddr(sender.reply_to)[1] or sender.from_address.addr_spec
    )
    app = create_app(
        config.series.id,
        secret,
        settings.state.target,
        optout_file=config.config_dir / OPTOUT_FILE,
        series_title=config.series.title,
        contact_address=contact,
        series=(series or (lambda: config.series)) if config.series.registration.links else None,
        on_registration=on_registration,
        clock=clock,
    )
    bind = settings.unsubscribe
    running = await start_server(app, bind.bind_host, bind.bind_port)
    log.info("unsubscribe endpoint listening on %s", running.url)
    return running
