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
import contextlib
import html
import logging
import os
import re
import resource
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parseaddr
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import uvicorn
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from invite_mailer.core.tokens import verify_token
from invite_mailer.delivery.ledger import Ledger
from invite_mailer.errors import ConfigError, InviteMailerError
from invite_mailer.inputs.addresses import load_address_list
from invite_mailer.inputs.config import OPTOUT_FILE, Config

__all__ = ["RunningServer", "create_app", "mask_address", "start_server", "start_unsubscribe"]

log = logging.getLogger("invite_mailer.service.web")

MAX_BODY_BYTES = 64 * 1024
"""A one-click body is 26 bytes; anything this large is not a mail program."""

MAX_TOKEN_CHARS = 512
"""A token for the longest possible address (254 characters) has 365."""

MAX_TARGET_BYTES = 2048
"""Longest request line target (path and query) that is looked at."""

MAX_HEADER_BYTES = 8 * 1024
"""Request line and headers together; a client sending more is cut off (h11)."""

MAX_CONNECTIONS = 100
"""Open connections at once; more are closed as soon as they are accepted."""

REQUEST_SECONDS = 10.0
"""A connection must send a complete request within this time (slow clients)."""

KEEP_ALIVE_SECONDS = 5
"""An idle connection between two requests is closed after this time."""

STOP_SECONDS = 10.0
"""How long :meth:`RunningServer.stop` waits for requests in progress."""

SOURCE_ONE_CLICK = "one-click"
SOURCE_WEB_FORM = "web form"

# Every page is self-contained: no scripts, no external resources, no framing.
_SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "X-Robots-Tag": "noindex, nofollow",
}

_STYLE = """
body { margin: 0; padding: 2rem 1rem; background: #f3f4f6; color: #1f2937;
  font: 16px/1.5 Arial, Helvetica, sans-serif; }
main { max-width: 34rem; margin: 0 auto; padding: 2rem; background: #fff;
  border-radius: 6px; border-top: 4px solid #005a87; }
h1 { margin: 0 0 1rem; font-size: 1.4rem; color: #005a87; }
p { margin: 0 0 1rem; }
.address { font-weight: bold; }
button { padding: .7rem 1.4rem; border: 0; border-radius: 4px; background: #005a87;
  color: #fff; font: inherit; font-weight: bold; cursor: pointer; }
button:hover, button:focus { background: #00476b; }
.small { font-size: .875rem; color: #4b5563; }
"""


def mask_address(address: str) -> str:
    """``jana.mueller@example.org`` -> ``j***@example.org``: recognisable, not readable."""
    local, _, domain = address.rpartition("@")
    if not local:
        return "***"
    return f"{local[0]}***@{domain}"


def _page(title: str, body: str, status_code: int = 200) -> HTMLResponse:
    document = (
        '<!DOCTYPE html>\n<html lang="de">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        '<meta name="robots" content="noindex, nofollow">\n'
        f"<title>{html.escape(title)}</title>\n<style>{_STYLE}</style>\n</head>\n"
        f"<body>\n<main>\n<h1>{html.escape(title)}</h1>\n{body}\n</main>\n</body>\n</html>\n"
    )
    return HTMLResponse(document, status_code=status_code, headers=_SECURITY_HEADERS)


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


def create_app(
    series_id: str,
    secret: str,
    ledger_path: Path | str,
    *,
    optout_file: Path | None = None,
    series_title: str = "",
    contact_address: str = "",
) -> Starlette:
    """The unsubscribe web app for one series.

    Routes: ``GET /healthz``; ``GET /{token}`` (a confirmation page, changes
    nothing); ``POST /{token}`` (opts the address out; idempotent). Invalid
    tokens (forged, truncated, another series) get 400 and change nothing.
    *optout_file* (``config/optout.txt``) only lets the page say that an
    address is already blocked there. *series_title* and *contact_address*
    make the pages friendlier; both are optional.
    """
    ledger_path = Path(ledger_path)
    about = f"„{series_title}“" if series_title else "dieser Veranstaltungsreihe"
    listed = _AddressListCache(optout_file) if optout_file is not None else None

    async def healthz(request: Request) -> Response:
        return PlainTextResponse("ok", headers={"Cache-Control": "no-store"})

    def invalid() -> HTMLResponse:
        hint = ""
        if contact_address:
            mail = html.escape(contact_address)
            hint = (
                f'<p>Schreiben Sie uns gern an <a href="mailto:{mail}">{mail}</a>; '
                "wir tragen Sie dann von Hand aus.</p>"
            )
        return _page(
            "Abmeldelink ungültig",
            "<p>Dieser Abmeldelink ist ungültig oder unvollständig. Bitte öffnen Sie den "
            "Link direkt aus der E-Mail; manche Programme kürzen lange Links beim "
            "Kopieren.</p>" + hint,
            status_code=400,
        )

    async def already_opted_out(address: str) -> bool:
        if listed is not None:
            try:
                if address in await listed.get():
                    return True
            except (ConfigError, OSError) as exc:
                log.warning("cannot read %s: %s", optout_file, exc)
        if not ledger_path.exists():
            return False
        async with Ledger.open(ledger_path) as ledger:
            return address in await ledger.optouts(series_id)

    async def unsubscribe(request: Request) -> Response:
        token = request.path_params["token"]
        if token == "healthz":  # another method than GET: not a token either
            return PlainTextResponse(
                "Method Not Allowed", status_code=405, headers={"Allow": "GET, HEAD"}
            )
        address = verify_token(secret, series_id, token) if len(token) <= MAX_TOKEN_CHARS else None
        if address is None:
            if request.method == "POST":
                # The length tells a truncated link from a forged one; the token
                # itself would show the address it claims.
                length = str(len(token)) if len(token) <= MAX_TOKEN_CHARS else "too many"
                log.warning("unsubscribe: rejected an invalid token (%s characters)", length)
            return invalid()
        shown = html.escape(mask_address(address))
        if request.method != "POST":  # GET and HEAD only look
            if await already_opted_out(address):
                return _page(
                    "Bereits abgemeldet",
                    f'<p>Die Adresse <span class="address">{shown}</span> ist bereits '
                    f"abgemeldet und erhält keine E-Mails mehr zu {html.escape(about)}.</p>",
                )
            return _page(
                "Abmelden",
                f'<p>Möchten Sie die Adresse <span class="address">{shown}</span> von allen '
                f"weiteren E-Mails zu {html.escape(about)} abmelden?</p>\n"
                # No action attribute: the form posts to this very URL, also
                # behind a reverse proxy that serves it under a path prefix.
                '<form method="post">\n'
                '<input type="hidden" name="bestaetigt" value="ja">\n'
                '<p><button type="submit">Ja, abmelden</button></p>\n</form>\n'
                '<p class="small">Sie erhalten danach keine Einladungen, Erinnerungen oder '
                "Nachbereitungen zu dieser Reihe mehr.</p>",
            )
        body = bytearray()
        try:
            async for chunk in request.stream():
                body += chunk
                if len(body) > MAX_BODY_BYTES:
                    return PlainTextResponse("request body too large", status_code=413)
        except ClientDisconnect:
            # Gone before its body was complete (a closed tab, a scanner, a flood):
            # nobody asked for anything and nobody reads an answer.
            log.debug("unsubscribe: the client left before sending its whole request")
            return Response(status_code=400)
        content_type = request.headers.get("content-type", "")
        source = SOURCE_ONE_CLICK if _is_one_click(content_type, bytes(body)) else SOURCE_WEB_FORM
        try:
            async with Ledger.open(ledger_path) as ledger:
                added = await ledger.add_optout(
                    series_id, address, source=source, now=datetime.now(UTC)
                )
        except (InviteMailerError, OSError) as exc:
            log.error(
                "unsubscribe: cannot record the opt-out of %s: %s", mask_address(address), exc
            )
            return _page(
                "Abmeldung nicht möglich",
                "<p>Ihre Abmeldung konnte gerade nicht gespeichert werden. Bitte versuchen "
                "Sie es in einigen Minuten noch einmal.</p>",
                status_code=503,
            )
        if added:
            log.info(
                "unsubscribe: %s opted out (%s)",
                mask_address(address),
                source,
                extra={"series": series_id, "source": source},
            )
        return _page(
            "Sie wurden abgemeldet",
            f'<p>Die Adresse <span class="address">{shown}</span> erhält keine weiteren '
            f"E-Mails zu {html.escape(about)}.</p>\n"
            "<p>Falls das ein Versehen war, antworten Sie einfach auf eine unserer E-Mails.</p>",
        )

    app = Starlette(
        routes=[
            Route("/healthz", healthz, methods=["GET"]),
            Route("/{token}", unsubscribe, methods=["GET", "POST"]),
        ]
    )
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


# --- serving ---------------------------------------------------------------------------


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: the daemon owns SIGTERM/SIGINT."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def connection_limit() -> int:
    """:data:`MAX_CONNECTIONS`, or a quarter of the descriptors still free.

    The listen backlog is as large, so at most half the free descriptors go
    to HTTP clients; the rest are for the ledger, the file watcher, SMTP
    connections and config files, which idle clients must never use up.
    Counted from what is free, not from the limit: the process already holds
    its libraries, the ledger and the watcher when the server starts.
    """
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return MAX_CONNECTIONS
    return max(4, min(MAX_CONNECTIONS, (soft - _open_descriptors()) // 4))


def _open_descriptors() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:  # no /proc: assume a modest start-up use
        return 64


class _BoundedProtocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with a bound on connections and on request time.

    uvicorn times out idle keep-alive connections only after a first
    response: a client that connects and sends nothing, or drips a request
    byte by byte (slowloris), would hold its descriptor for ever. Here every
    request must be complete within :data:`REQUEST_SECONDS`, and connections
    beyond the limit are closed at once instead of waiting for descriptors
    to run out.
    """

    limit = MAX_CONNECTIONS
    request_seconds = REQUEST_SECONDS
    _deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limit:
            log.warning(
                "unsubscribe endpoint: more than %d connections at once; closing new ones",
                self.limit,
            )
            transport.abort()
            return
        self._arm()

    def _arm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline = self.loop.call_later(self.request_seconds, self._too_slow)

    def _too_slow(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete and not self.cycle.more_body:
            # The request is complete and the app is answering: not the client's fault.
            self._arm()
            return
        self.transport.close()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm()  # the next request on this connection gets the same time

    def connection_lost(self, exc: Exception | None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        super().connection_lost(exc)


@dataclass
class RunningServer:
    """An HTTP server running as a task of the current event loop."""

    server: uvicorn.Server
    task: asyncio.Task[None]
    host: str
    port: int

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def stop(self) -> None:
        """Stop accepting, let running requests finish (up to 10 s), close."""
        self.server.should_exit = True
        try:
            async with asyncio.timeout(STOP_SECONDS):
                await asyncio.shield(self.task)
        except TimeoutError:
            self.server.force_exit = True
            await self.task


def _bind(host: str, port: int) -> socket.socket:
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
        except BaseException:
            sock.close()
            raise
    except OSError as exc:
        raise InviteMailerError(
            f"cannot listen on {host}:{port} for the unsubscribe endpoint: "
            f"{exc.strerror or exc}; set unsubscribe.bind_host / bind_port "
            "(INVITE_MAILER_UNSUBSCRIBE__BIND_PORT) to a free address"
        ) from None
    sock.set_inheritable(True)
    return sock


async def start_server(
    app: Starlette,
    host: str,
    port: int,
    *,
    max_connections: int | None = None,
    request_seconds: float = REQUEST_SECONDS,
) -> RunningServer:
    """Serve *app* on *host*:*port* (0 = any free port) until :meth:`RunningServer.stop`.

    Returns once the socket listens. The socket is bound here rather than by
    uvicorn, which would exit the whole process when the port is taken.
    *max_connections* (default: :func:`connection_limit`) and
    *request_seconds* bound what clients can hold, see :class:`_BoundedProtocol`.
    """
    sock = _bind(host, port)
    limit = max_connections or connection_limit()
    protocol: Any = type(
        "BoundedProtocol",
        (_BoundedProtocol,),
        {"limit": limit, "request_seconds": request_seconds},
    )
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        lifespan="off",
        log_level="warning",
        # uvicorn's own logging set-up would replace the application's format.
        log_config=None,
        # The path holds the token, and the token the address: never logged.
        access_log=False,
        server_header=False,
        http=protocol,
        limit_concurrency=limit,
        timeout_keep_alive=KEEP_ALIVE_SECONDS,
        h11_max_incomplete_event_size=MAX_HEADER_BYTES,
        # asyncio accepts up to a backlog's worth of connections in one go,
        # before any of them can be refused: this bounds that burst too.
        backlog=limit,
    )
    server = _Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]), name="unsubscribe-endpoint")
    while not server.started:
        if task.done():
            sock.close()
            task.result()  # raises what stopped it
            raise InviteMailerError("the unsubscribe endpoint stopped while starting")
        await asyncio.sleep(0.01)
    return RunningServer(server, task, host, int(sock.getsockname()[1]))


async def start_unsubscribe(config: Config) -> RunningServer | None:
    """Start the endpoint when ``unsubscribe.serve`` is set (``None`` otherwise)."""
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
        settings.state.path,
        optout_file=config.config_dir / OPTOUT_FILE,
        series_title=config.series.title,
        contact_address=contact,
    )
    bind = settings.unsubscribe
    running = await start_server(app, bind.bind_host, bind.bind_port)
    log.info("unsubscribe endpoint listening on %s", running.url)
    return running
