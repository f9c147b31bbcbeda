"""Signed tokens: the one-click unsubscribe link, and registration links per date.

A token is ``base64url(email) + "." + base64url(mac)``, where *mac* is the
first 18 bytes of HMAC-SHA256(secret, "<series id>\\n<email>") and *email* is
lower-cased. The address is readable from the token on purpose: the endpoint
needs no database to know whom to opt out, and the MAC makes sure nobody can
unsubscribe someone else or reuse a token of another series.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Iterable
from urllib.parse import quote

MAC_BYTES = 18


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(secret: str, series_id: str, email: str) -> bytes:
    message = f"{series_id}\n{email}".encode()
    return hmac.new(secret.encode(), message, hashlib.sha256).digest()[:MAC_BYTES]


def make_token(secret: str, series_id: str, email: str) -> str:
    """The token for *email* in *series_id*; the address is lower-cased first."""
    if not secret:
        raise ValueError("an unsubscribe token needs a secret")
    address = email.strip().lower()
    return _b64encode(address.encode()) + "." + _b64encode(_mac(secret, series_id, address))


def verify_token(secret: str, series_id: str, token: str) -> str | None:
    """The lower-cased address a valid token stands for, else ``None``.

    ``None`` for forged, truncated or altered tokens and for tokens of another
    series; the MAC is compared in constant time.
    """
    if not secret or token.count(".") != 1:
        return None
    email_part, mac_part = token.split(".")
    try:
        address = _b64decode(email_part).decode("utf-8")
        mac = _b64decode(mac_part)
    except (binascii.Error, ValueError):
        return None
    # Only the canonical spelling is accepted (the decoder skips stray characters).
    if not address or address != address.lower():
        return None
    if _b64encode(address.encode()) != email_part or _b64encode(mac) != mac_part:
        return None
    if not hmac.compare_digest(mac, _mac(secret, series_id, address)):
        return None
    return address


# --- registration links ------------------------------------------------------------------

REGISTER = "anmeldung"
WITHDRAW = "absage"
LINK_ACTIONS = (REGISTER, WITHDRAW)


def _link_mac(secret: str, action: str, series_id: str, email: str, event_id: str) -> bytes:
    # Four lines, where an unsubscribe MAC signs two: no token of one kind
    # verifies as the other, nor as another action, date or series.
    message = f"{action}\n{series_id}\n{email}\n{event_id}".encode()
    return hmac.new(secret.encode(), message, hashlib.sha256).digest()[:MAC_BYTES]


def make_link_token(secret: str, action: str, series_id: str, email: str, event_id: str) -> str:
    """The token of a registration (or withdrawal) link: bound to series, contact and date.

    ``base64url(email) + "." + base64url(event id) + "." + base64url(mac)``.
    """
    if not secret:
        raise ValueError("a registration link needs a secret")
    if action not in LINK_ACTIONS:
        raise ValueError(f"unknown link action {action!r}")
    address = email.strip().lower()
    mac = _link_mac(secret, action, series_id, address, event_id)
    return ".".join(_b64encode(part) for part in (address.encode(), event_id.encode(), mac))


def verify_link_token(
    secret: str, action: str, series_id: str, token: str
) -> tuple[str, str] | None:
    """(address, event id) of a valid link token, else ``None`` (forged, truncated,
    altered, another action or another series); compared in constant time."""
    if not secret or action not in LINK_ACTIONS or token.count(".") != 2:
        return None
    parts = token.split(".")
    try:
        address = _b64decode(parts[0]).decode("utf-8")
        event_id = _b64decode(parts[1]).decode("utf-8")
        mac = _b64decode(parts[2])
    except (binascii.Error, ValueError):
        return None
    if not address or address != address.lower() or not event_id:
        return None
    canonical = [_b64encode(address.encode()), _b64encode(event_id.encode()), _b64encode(mac)]
    if canonical != parts:
        return None
    if not hmac.compare_digest(mac, _link_mac(secret, action, series_id, address, event_id)):
        return None
    return address, event_id


def link_url(base_url: str, action: str, token: str) -> str:
    """``<base_url>/anmeldung/<token>`` or ``<base_url>/absage/<token>``."""
    return f"{base_url.rstrip('/')}/{action}/{token}"


def unsubscribe_url(base_url: str, token: str) -> str:
    """The one-click link: ``<base_url>/<token>`` (the token is URL-safe)."""
    return f"{base_url.rstrip('/')}/{token}"


def mailto_url(address: str, subject: str) -> str:
    """``mailto:address?subject=...`` with the subject percent-encoded (RFC 6068)."""
    return f"mailto:{address}?subject={quote(subject, safe='')}"


# --- return paths (VERP) ------------------------------------------------------------

BOUNCE_TOKEN_BYTES = 10  # 16 base32 characters: fits any local part


def bounce_token(secret: str, series_id: str, email: str) -> str:
    """The token in a recipient's return path: lower-case base32 of a MAC, no address.

    Bounces come back to it, so it must survive relays that fold the local
    part's case; it names nobody to a reader, and only this series' secret
    maps it back (:func:`bounce_tokens`).
    """
    if not secret:
        raise ValueError("a return path token needs a secret")
    message = f"bounce\n{series_id}\n{email.strip().lower()}".encode()
    mac = hmac.new(secret.encode(), message, hashlib.sha256).digest()[:BOUNCE_TOKEN_BYTES]
    return base64.b32encode(mac).decode("ascii").lower()


def bounce_tokens(secret: str, series_id: str, emails: Iterable[str]) -> dict[str, str]:
    """token -> address, for telling from a return path whose bounce it is."""
    return {bounce_token(secret, series_id, email): email for email in emails}
