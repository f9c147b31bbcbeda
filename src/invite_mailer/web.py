"""The one-click unsubscribe endpoint (RFC 8058, RFC 2369).

Every mail carries ``List-Unsubscribe: <mailto:...>, <https://.../<token>>`` and
``List-Unsubscribe-Post: List-Unsubscribe=One-Click`` when an unsubscribe URL
and secret are configured. Mail programs that support one-click unsubscribe
(Gmail, Apple Mail, Outlook.com) POST ``List-Unsubscribe=One-Click`` to that
URL; a person who opens the link in a browser gets a confirmation page whose
button POSTs to the same URL. Only POST changes anything: link scanners and
previews fetch with GET, and must never unsubscribe anyone.

The token says whom to opt out (see :mod:`invite_mailer.unsubscribe`); the
opt-out is written to the ledger, which every delivery pass reads, so it is
honoured from the next pass on without touching ``config/``.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import logging
import re
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parseaddr
from pathlib import Path
from urllib.parse import parse_qs

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, Response
from starlette.routing import Route

from invite_mailer.config import OPTOUT_FILE, Config
from invite_mailer.contacts import load_address_list
from invite_mailer.errors import ConfigError, InviteMailerError
from invite_mailer.ledger import Ledger
from invite_mailer.unsubscribe import verify_token

__all__ = ["RunningServer", "create_app", "mask_address", "start_server", "start_unsubscribe"]

log = logging.getLogger("invite_mailer.web")

MAX_BODY_BYTES = 64 * 1024
"""A one-click body is 26 bytes; anything this large is not a mail program."""

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
        if optout_file is not None:
            try:
                if address in await asyncio.to_thread(load_address_list, optout_file):
                    return True
            except (ConfigError, OSError) as exc:
                log.warning("cannot read %s: %s", optout_file, exc)
        if not ledger_path.exists():
            return False
        async with Ledger.open(ledger_path) as ledger:
            return address in await ledger.optouts(series_id)

    async def unsubscribe(request: Request) -> Response:
        token = request.path_params["token"]
        address = verify_token(secret, series_id, token)
        if address is None:
            if request.method == "POST":
                log.warning("unsubscribe: rejected an invalid token (%d characters)", len(token))
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
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY_BYTES:
                return PlainTextResponse("request body too large", status_code=413)
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

    return Starlette(
        routes=[
            Route("/healthz", healthz, methods=["GET"]),
            Route("/{token}", unsubscribe, methods=["GET", "POST"]),
        ]
    )


# --- serving ---------------------------------------------------------------------------


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: the daemon owns SIGTERM/SIGINT."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


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


async def start_server(app: Starlette, host: str, port: int) -> RunningServer:
    """Serve *app* on *host*:*port* (0 = any free port) until :meth:`RunningServer.stop`.

    Returns once the socket listens. The socket is bound here rather than by
    uvicorn, which would exit the whole process when the port is taken.
    """
    sock = _bind(host, port)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        lifespan="off",
        log_level="warning",
        # uvicorn's own logging set-up would replace the application's format.
        log_config=None,
        server_header=False,
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
