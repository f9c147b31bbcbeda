"""Quoted-printable bodies and folded headers, written exactly as the standard library does.

``EmailMessage.as_bytes(policy=SMTP)`` folds every header through its header
objects and encodes quoted-printable character by character. The functions
here produce the same bytes by shortcuts that are exact for the ordinary
values of a mailing (plain addresses, one-line subjects, names of any
script) and hand everything else to the standard library.
``tests/test_fastpath.py`` compares them with it octet by octet.
"""

from __future__ import annotations

import base64
import re
from datetime import datetime
from email import policy as email_policy
from email.headerregistry import Address
from email.utils import format_datetime
from typing import Any

from invite_mailer.mail.mime import PLAIN_ADDRESS, POLICY, Recipient

__all__ = [
    "QP_BODY_MAP",
    "HeaderCache",
    "display_name",
    "encoded_word",
    "fold",
    "qp_line",
    "qp_wire",
    "split_lines",
]

_SMTP = email_policy.SMTP
_MAX_LINE: int = _SMTP.max_line_length or 78  # what as_bytes(policy=SMTP) folds headers to
_QP_LINE: int = POLICY.max_line_length or 76  # what set_content() wraps quoted-printable at

# --- quoted-printable -----------------------------------------------------------------

# quoprimime's body map: printable ASCII except "=", plus space and tab, stay;
# CR and LF stay (they separate lines); every other octet becomes "=XX".
_SAFE = frozenset(
    b" !\"#$%&'()*+,-./0123456789:;<>?@ABCDEFGHIJKLMNOPQRSTUVWXYZ[\\]^_`"
    b"abcdefghijklmnopqrstuvwxyz{|}~\t\r\n"
)
QP_BODY_MAP: dict[int, str] = {c: chr(c) if c in _SAFE else f"={c:02X}" for c in range(256)}
_LINE_BREAK = re.compile(r"\r\n|\r|\n")


def qp_line(line: str) -> str:
    """One line (no line break in it) encoded the way ``quoprimime.body_encode``
    does it at 76 characters, soft breaks written as ``=\\r\\n``."""
    encoded = line.encode("utf-8").decode("latin-1").translate(QP_BODY_MAP)
    pieces = []
    start = 0
    last_start = len(encoded) - 1 - _QP_LINE
    while start <= last_start:
        stop = start + _QP_LINE - 1
        # Never split an "=XX" escape.
        if encoded[stop - 2] == "=":
            pieces.append(encoded[start : stop - 1])
            start = stop - 2
        elif encoded[stop - 1] == "=":
            pieces.append(encoded[start:stop])
            start = stop - 1
        else:
            pieces.append(encoded[start:stop] + "=")
            start = stop
    if encoded and encoded[-1] in " \t":
        # Whitespace at the end of a line must be protected.
        room = start - last_start
        quoted = "=20" if encoded[-1] == " " else "=09"
        if room >= 3:
            tail = quoted
        elif room == 2:
            tail = encoded[-1] + "=\r\n"
        else:
            tail = "=\r\n" + quoted
        pieces.append(encoded[start:-1] + tail)
    else:
        pieces.append(encoded[start:])
    return "\r\n".join(pieces)


def split_lines(text: str) -> list[str]:
    """``text.encode().splitlines()``, on the str: CRLF, CR and LF only."""
    lines = text.split("\n") if "\r" not in text else _LINE_BREAK.split(text)
    if lines[-1] == "":
        lines.pop()
    return lines or [""]


def qp_wire(text: str, cache: dict[str, str] | None = None) -> bytes:
    """*text* as a quoted-printable UTF-8 body, exactly as serialised on the wire.

    Equals what ``set_content(text, charset="utf-8", cte="quoted-printable")``
    stores and ``as_bytes(policy=SMTP)`` writes (CRLF line ends). Quoted-
    printable works line by line, so lines are looked up in *cache* first.
    """
    if cache is None:
        cache = {}
    out = []
    for line in split_lines(text):
        encoded = cache.get(line)
        if encoded is None:
            encoded = cache[line] = qp_line(line)
        out.append(encoded)
    out.append("")
    return "\r\n".join(out).encode("ascii")


# --- headers ------------------------------------------------------------------------


def fold(name: str, value: Any) -> bytes:
    """One header exactly as ``as_bytes(policy=SMTP)`` writes it for ``msg[name] = value``."""
    header = POLICY.header_factory(name, value)
    folded: str = header.fold(policy=_SMTP)
    return folded.encode("ascii", "surrogateescape")


_PLAIN_MESSAGE_ID = re.compile(r"<[A-Za-z0-9]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*>")
# RFC 5322 specials; a display name with one of them is written as a quoted string.
_SPECIALS = frozenset('()<>@,:;."[]\\')
# What the shortcut for display names covers: letters of any script, single
# spaces and these marks (no quotes or backslashes, which get escaped).
_NAME_MARKS = frozenset(" -'.,()")


# RFC 2047 "Q" encoding as the header folder does it: these octets stay, a
# space becomes "_", every other octet "=XX".
_Q_SAFE = frozenset(b"-!*+/ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789")
_Q_MAP: dict[int, str] = {
    c: "_" if c == 0x20 else chr(c) if c in _Q_SAFE else f"={c:02X}" for c in range(256)
}


def encoded_word(text: str) -> str:
    """*text* as one UTF-8 RFC 2047 encoded word, as the header folder writes it.

    The folder takes "q" unless "b" is at least five characters shorter; the
    tests compare the folded headers, so a change there fails them loudly.
    """
    data = text.encode("utf-8")
    q = "".join(_Q_MAP[c] for c in data)
    b_length = (len(data) + 2) // 3 * 4
    if len(q) - b_length < 5:
        return f"=?utf-8?q?{q}?="
    return f"=?utf-8?b?{base64.b64encode(data).decode('ascii')}?="


def display_name(name: str) -> str | None:
    """The display name as the header folder writes it on one line, or None
    when the name is not one the shortcut covers.

    The folder keeps ASCII words as they are (quoted when a special is in the
    name) and encodes the rest as one RFC 2047 encoded word, from the first
    word that needs encoding to the last: words in between are merged into it.
    """
    if not name or name != name.strip() or "  " in name:
        return None
    if not all(c.isalpha() or c in _NAME_MARKS for c in name):
        return None
    quoted = not _SPECIALS.isdisjoint(name)
    if name.isascii():
        return f'"{name}"' if quoted else name
    words = name.split(" ")
    flagged = [
        i
        for i, word in enumerate(words)
        if not word.isascii() or (quoted and not _SPECIALS.isdisjoint(word))
    ]
    first, last = flagged[0], flagged[-1]
    encoded = encoded_word(" ".join(words[first : last + 1]))
    return " ".join([*words[:first], encoded, *words[last + 1 :]])


def _address_lines(name: str, phrase: str, spec: str) -> str | None:
    """``name: phrase <spec>`` folded the way the header folder does it.

    The address as a whole goes on the first line if it fits, else on a line
    of its own; if it fits on no line, the ``<spec>`` moves to the next one.
    An encoded address may use the whole second line, a plain one must leave
    room for the leading space. Close calls are left to the folder.
    """
    whole = f"{phrase} <{spec}>" if phrase else spec
    if len(name) + 2 + len(whole) <= _MAX_LINE:
        return f"{name}: {whole}\r\n"
    if not phrase:
        return None
    if len(whole) <= (_MAX_LINE - 1 if "=?" not in phrase else _MAX_LINE):
        return f"{name}:\r\n {whole}\r\n"
    if len(name) + 2 + len(phrase) <= _MAX_LINE - 2 and len(spec) + 3 <= _MAX_LINE:
        return f"{name}: {phrase}\r\n <{spec}>\r\n"
    return None


class HeaderCache:
    """Folded headers: shortcuts for the ordinary cases, the standard library otherwise.

    The shortcuts rely on how the folder treats a header that fits on one line
    (78 characters): it is written as it is, with the display name of an
    address written by :func:`display_name`.
    """

    def __init__(self) -> None:
        self._folded: dict[tuple[str, str], bytes] = {}
        self._dates: dict[tuple[str, datetime], bytes] = {}

    def cached(self, name: str, value: str) -> bytes:
        key = (name, value)
        folded = self._folded.get(key)
        if folded is None:
            if len(self._folded) > 4096:
                self._folded.clear()
            folded = self._folded[key] = fold(name, value)
        return folded

    def address(self, name: str, address: Recipient) -> bytes:
        """*address*: an :class:`Address`, (display name, plain address), or the
        header value of an address the standard library has no Address for."""
        if isinstance(address, str):
            return fold(name, address)
        shown, spec = (
            address if isinstance(address, tuple) else (address.display_name, address.addr_spec)
        )
        if PLAIN_ADDRESS.fullmatch(spec):
            phrase = display_name(shown) if shown else ""
            if phrase is not None:
                folded = _address_lines(name, phrase, spec)
                if folded is not None:
                    return folded.encode("ascii")
        if isinstance(address, tuple):
            address = Address(display_name=shown, addr_spec=spec)
        return fold(name, address)

    def date(self, name: str, moment: datetime) -> bytes:
        folded = self._dates.get((name, moment))
        if folded is None:
            if len(self._dates) > 4096:
                self._dates.clear()
            folded = self._dates[(name, moment)] = self.cached(name, format_datetime(moment))
        return folded

    def message_id(self, name: str, value: str) -> bytes:
        line = f"{name}: {value}\r\n"
        if len(line) - 2 <= _MAX_LINE and _PLAIN_MESSAGE_ID.fullmatch(value):
            return line.encode("ascii")
        return fold(name, value)

    def url_list(self, name: str, value: str) -> bytes:
        # compose._UrlListHeader: the <...> items, one per line.
        if value.isascii() and "=?" not in value:
            urls = re.findall(r"<[^<>]*>", value)
            return (f"{name}: " + ",\r\n ".join(urls) + "\r\n").encode("ascii")
        return self.cached(name, value)
