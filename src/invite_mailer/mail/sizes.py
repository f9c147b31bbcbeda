"""About how large a mail is on the wire, from the octets of its parts.

``limits.max_message_bytes`` is checked before a mail is built: the text
and HTML parts are quoted-printable (three octets for each non-ASCII one,
plus soft line breaks), attachments base64. The size depends on each part
only through :func:`octet_counts`, so it can also be bounded from a shape's
octets plus a recipient's values (``mail.shapes``).
"""

from __future__ import annotations

from collections.abc import Iterable

from invite_mailer.inputs.materials import File

__all__ = ["message_size", "octet_counts"]


def octet_counts(text: str) -> tuple[int, int]:
    """(ASCII characters, octets of the others) of *text* in UTF-8: what its
    quoted-printable size depends on."""
    if text.isascii():
        return len(text), 0
    ascii_chars = len(text.encode("ascii", "ignore"))
    return ascii_chars, len(text.encode("utf-8")) - ascii_chars


def message_size(text: tuple[int, int], html: tuple[int, int], attachments: Iterable[File]) -> int:
    """About the wire size of a mail whose parts have these :func:`octet_counts`."""
    return _qp_size(text) + _qp_size(html) + sum(_file_size(f) for f in attachments)


def _file_size(file: File) -> int:
    """An attachment; an iTIP calendar file goes out twice (inline and attached)."""
    itip = (file.maintype, file.subtype) == ("text", "calendar") and file.method != "PUBLISH"
    return _base64_size(len(file.data)) * (2 if itip else 1)


def _qp_size(counts: tuple[int, int]) -> int:
    """About the quoted-printable size: three octets for each non-ASCII one,
    plus the soft line breaks."""
    ascii_chars, others = counts
    encoded = ascii_chars + 3 * others
    return encoded + encoded // 25  # "=\r\n" every 75 characters


def _base64_size(octets: int) -> int:
    return (octets + 2) // 3 * 4 * 78 // 76
