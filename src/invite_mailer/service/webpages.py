"""What every page of the daemon's web app shares: the templates, the headers, the body."""

from __future__ import annotations

import html
import logging
from typing import Any

import jinja2
from markupsafe import Markup
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, PlainTextResponse, Response

__all__ = [
    "MAX_BODY_BYTES",
    "MAX_TOKEN_CHARS",
    "PAGES",
    "SECURITY_HEADERS",
    "mask_address",
    "page",
    "read_body",
]

log = logging.getLogger("invite_mailer.service.web")

MAX_BODY_BYTES = 64 * 1024
"""A one-click body is 26 bytes, a form's a few more; anything this large is no mail program."""

MAX_TOKEN_CHARS = 512
"""A token for the longest possible address (254 characters) has 365; a link token some more."""

# Every page is self-contained: no scripts, no external resources, no framing.
SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "X-Robots-Tag": "noindex, nofollow",
}


def _escape(value: Any) -> Any:
    """The standard library's escaping (``&quot;``, ``&#x27;``), as the pages always had.

    Autoescape stays on behind it: whatever this leaves as text is escaped anyway.
    """
    if isinstance(value, str) and not isinstance(value, Markup):
        return Markup(html.escape(value))
    return value


PAGES = jinja2.Environment(
    loader=jinja2.PackageLoader("invite_mailer.service", "pages"),
    autoescape=True,
    finalize=_escape,
    undefined=jinja2.StrictUndefined,
    keep_trailing_newline=True,
)


def mask_address(address: str) -> str:
    """``jana.mueller@example.org`` -> ``j***@example.org``: recognisable, not readable."""
    local, _, domain = address.rpartition("@")
    if not local:
        return "***"
    return f"{local[0]}***@{domain}"


def page(name: str, status_code: int = 200, **context: str) -> HTMLResponse:
    """The page *name* (``pages/<name>.html.j2``), autoescaped, with the security headers."""
    document = PAGES.get_template(f"{name}.html.j2").render(**context)
    return HTMLResponse(document, status_code=status_code, headers=SECURITY_HEADERS)


async def read_body(request: Request) -> bytes | Response:
    """The request body (at most ``MAX_BODY_BYTES``), or the answer to give when
    there is none worth reading."""
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY_BYTES:
                return PlainTextResponse("request body too large", status_code=413)
    except ClientDisconnect:
        # Gone before its body was complete (a closed tab, a scanner, a flood):
        # nobody asked for anything and nobody reads an answer.
        log.debug("web: the client left before sending its whole request")
        return Response(status_code=400)
    return bytes(body)
