"""Unsubscribe tokens for the one-click link.

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


def unsubscribe_url(base_url: str, token: str) -> str:
    """The one-click link: ``<base_url>/<token>`` (the token is URL-safe)."""
    return f"{base_url.rstrip('/')}/{token}"


def mailto_url(address: str, subject: str) -> str:
    """``mailto:address?subject=...`` with the subject percent-encoded (RFC 6068)."""
    return f"mailto:{address}?subject={quote(subject, safe='')}"
