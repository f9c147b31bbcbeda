"""The wire bytes of a mail, without the standard library's MIME machinery.

:meth:`Composer.compose <invite_mailer.mail.compose.Composer.compose>` builds an
:class:`email.message.EmailMessage` and the transports send its
``as_bytes(policy=email.policy.SMTP)``. For a mailing to thousands that is
where the time goes: every header is parsed into objects and folded again,
quoted-printable is encoded character by character in Python; about 5 ms a
mail, of which rendering the templates is less than a tenth.

Almost all of a mail is the same for every recipient of a mailing, so
:class:`WireComposer`

1. renders the templates for each recipient exactly as the composer does;
2. builds one real message per *shape* (kind, date, attachments) with the
   standard library and cuts its bytes into a skeleton: literal bytes, and
   slots for what differs between recipients (``To``, ``Subject``, ``Date``,
   ``Message-ID``, ``List-Unsubscribe``, the multipart boundaries, the text
   and the HTML part);
3. fills the slots: headers folded by shortcuts that are exact for ordinary
   values (anything else goes through the standard library), and
   quoted-printable encoded line by line with a cache, because the same lines
   recur in every mail of a mailing.

The result is byte for byte ``Composer.compose(...).as_bytes(policy=SMTP)``.
``tests/test_fastpath.py`` proves that for every kind over many contacts,
hostile ones included, and every skeleton checks itself against the standard
library for the first recipients it serves: on any difference that shape
falls back to the standard library with a warning, so a change in
``compose.py`` can cost speed, never correctness.

:class:`WirePipeline` runs a :class:`WireComposer` in a second process, ahead
of the senders, so that composing and sending use both cores of a small VM.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import logging
import multiprocessing
import os
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from datetime import datetime
from email import policy as email_policy
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import format_datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any

from invite_mailer.core.plan import MailRequest
from invite_mailer.inputs.config import Config
from invite_mailer.inputs.contacts import Contact
from invite_mailer.inputs.series import Event, Kind, Series
from invite_mailer.inputs.settings import Settings
from invite_mailer.mail import mime
from invite_mailer.mail.compose import Composer
from invite_mailer.mail.mime import (
    PLAIN_ADDRESS,
    POLICY,
    Recipient,
    RenderedMail,
    Wire,
    crlf_checked,
    mime_boundary,
)

log = logging.getLogger(__name__)

__all__ = [
    "FAST_KINDS",
    "Job",
    "WireComposer",
    "WirePipeline",
    "pipeline",
    "qp_wire",
]

#: The kinds that go to a whole audience at once. Updates and cancellations
#: carry a calendar file per recipient, summaries go to one person: for them
#: the standard library is fast enough.
FAST_KINDS: frozenset[str] = frozenset({Kind.INVITATION, Kind.REMINDER, Kind.FOLLOWUP})

_SMTP = email_policy.SMTP
_MAX_LINE: int = _SMTP.max_line_length or 78  # what as_bytes(policy=SMTP) folds headers to
_QP_LINE: int = POLICY.max_line_length or 76  # what set_content() wraps quoted-printable at
# The slots of a skeleton's top-level header block.
_PER_RECIPIENT = frozenset({"to", "subject", "date", "message-id", "list-unsubscribe"})
# How many recipients of each shape are checked against the standard library.
_VERIFY = 2


# --- quoted-printable -----------------------------------------------------------------

# quoprimime's body map: printable ASCII except "=", plus space and tab, stay;
# CR and LF stay (they separate lines); every other octet becomes "=XX".
_SAFE = frozenset(
    b" !\"#$%&'()*+,-./0123456789:;<>?@ABCDEFGHIJKLMNOPQRSTUVWXYZ[\\]^_`"
    b"abcdefghijklmnopqrstuvwxyz{|}~\t\r\n"
)
QP_BODY_MAP: dict[int, str] = {c: chr(c) if c in _SAFE else f"={c:02X}" for c in range(256)}
_LINE_BREAK = re.compile(r"\r\n|\r|\n")


def _qp_line(line: str) -> str:
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


def _split_lines(text: str) -> list[str]:
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
    for line in _split_lines(text):
        encoded = cache.get(line)
        if encoded is None:
            encoded = cache[line] = _qp_line(line)
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


class _HeaderCache:
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


# --- CSS inlining ---------------------------------------------------------------------

# Tags, comments and the text between them; enough to tell where text is.
_TAG = re.compile(r"(<!--.*?-->|<[^>]*>)", re.DOTALL)
_HTML_SPACE = " \t\n\f\r"
# Elements whose content is not ordinary text (CSS, scripts, raw text).
_RAW = re.compile(
    r"<(style|script|xmp|iframe|noembed|noframes|noscript|plaintext|textarea|title)\b", re.I
)
# Text that the HTML parser and serialiser pass through unchanged.
_PLAIN_TEXT = re.compile(r"[^&<>\r\x00\xa0]+")
_MARK = re.compile("\ue000([0-9]+)\ue001")


@dataclass
class _Frame:
    """One HTML structure (its tags), inlined once with markers for the text that varies."""

    texts: list[str]  # the text between the tags, as first seen
    raw: set[int]  # texts inside <style>, <script> and the like
    slots: list[int] = field(default_factory=list)  # texts that vary, in output order
    pieces: list[str] = field(default_factory=list)  # output around the slots
    edges: dict[int, tuple[str, str]] = field(default_factory=dict)  # whitespace kept
    checked: int = 0
    broken: bool = False


class _InlineCache:
    """``inliner.inline(html)`` for many mails that differ only in some text.

    CSS selectors see elements and attributes, never text, and the HTML parser
    treats every run of ordinary characters alike. So two documents with the
    same tags, whose differing texts are plain (no ``&``, ``<``, ``>``, CR, NUL
    or no-break space; not inside ``<style>`` or the like) and keep their
    surrounding whitespace, come out of the inliner with the same markup
    around those texts. The inliner runs once per structure on the document
    with markers in place of the texts that vary; after that a mail's output is
    the marked output with its texts put back. Each new structure and each
    change of the varying texts is checked against the inliner for the next
    mails, and anything unusual goes to the inliner itself.
    """

    MAX_FRAMES = 16

    def __init__(self, inline: Callable[[str], str]) -> None:
        self._inline = inline
        self._frames: dict[str, _Frame] = {}
        self._misses = 0

    def __call__(self, html: str) -> str:
        if self._misses > 4 * self.MAX_FRAMES:
            return self._inline(html)  # every mail looks different: no use
        tokens = _TAG.split(html)
        texts = tokens[0::2]
        key = "\x00".join(tokens[1::2])
        frame = self._frames.get(key)
        if frame is None:
            self._misses += 1
            if len(self._frames) < self.MAX_FRAMES:
                self._frames[key] = _Frame(texts, _raw_texts(tokens))
            return self._inline(html)
        if frame.broken:
            return self._inline(html)
        varying = {i for i, (a, b) in enumerate(zip(texts, frame.texts, strict=True)) if a != b}
        if not frame.pieces or not varying.issubset(frame.slots):
            if not self._remark(frame, tokens, varying | set(frame.slots)):
                return self._inline(html)
        cores = {}
        for i in frame.slots:
            lead, trail = frame.edges[i]
            text = texts[i]
            core = text[len(lead) : len(text) - len(trail)]
            if (
                not text.startswith(lead)
                or not text.endswith(trail)
                or len(text) < len(lead) + len(trail)
                or not _PLAIN_TEXT.fullmatch(core)
                or core.strip(_HTML_SPACE) != core
            ):
                return self._inline(html)
            cores[i] = core
        out = [frame.pieces[0]]
        for number, i in enumerate(frame.slots):
            out += (cores[i], frame.pieces[number + 1])
        result = "".join(out)
        if frame.checked < _VERIFY:
            frame.checked += 1
            expected = self._inline(html)
            if expected != result:
                frame.broken = True
                return expected
        return result

    def _remark(self, frame: _Frame, tokens: list[str], slots: set[int]) -> bool:
        """Inline *tokens* with markers in the texts *slots*; False if not possible."""
        if len(slots) > 32 or slots & frame.raw:
            frame.broken = True
            return False
        marked = list(tokens)
        edges = {}
        for i in slots:
            text = tokens[2 * i]
            core = text.strip(_HTML_SPACE)
            if not core:
                frame.broken = True
                return False
            start = text.index(core)
            edges[i] = (text[:start], text[start + len(core) :])
            marked[2 * i] = f"{edges[i][0]}\ue000{i}\ue001{edges[i][1]}"
        parts = _MARK.split(self._inline("".join(marked)))
        order = [int(n) for n in parts[1::2]]
        if sorted(order) != sorted(slots):
            frame.broken = True
            return False
        frame.slots, frame.pieces, frame.edges = order, parts[0::2], edges
        frame.texts = tokens[0::2]
        frame.checked = 0
        return True


def _raw_texts(tokens: list[str]) -> set[int]:
    raw: set[int] = set()
    inside: str | None = None
    for n in range(1, len(tokens), 2):
        tag = tokens[n]
        if inside is not None:
            if tag.lower().startswith(f"</{inside}"):
                inside = None
            else:
                raw.add(n // 2 + 1)
        else:
            found = _RAW.match(tag)
            if found:
                inside = found.group(1).lower()
                raw.add(n // 2 + 1)
    return raw


# --- skeletons ------------------------------------------------------------------------


def _shape(mail: RenderedMail) -> tuple[object, ...]:
    """What mails share one skeleton: kind, date, one-click header, attachments."""
    event = mail.request.event
    return (
        mail.request.kind,
        event.id if event is not None else "",
        mail.one_click,
        mail.attachments,
    )


_Slot = bytes | str  # literal bytes, or the name of what goes there


@dataclass
class _Skeleton:
    """One standard-library message cut at what differs between recipients."""

    head: list[tuple[str, _Slot | tuple[bytes, bytes]]]  # (header name, literal/slot)
    body: list[_Slot]
    checked: int = 0
    broken: bool = False


def _cut(pieces: list[_Slot], token: bytes, slot: str) -> list[_Slot]:
    out: list[_Slot] = []
    for piece in pieces:
        if isinstance(piece, str):
            out.append(piece)
            continue
        parts = piece.split(token)
        for number, part in enumerate(parts):
            if number:
                out.append(slot)
            if part:
                out.append(part)
    return out


# --- the composer ---------------------------------------------------------------------


@dataclass
class WireComposer:
    """Exact wire bytes for the mails of one :class:`Composer`, fast.

    Use :meth:`wire`; kinds outside :data:`FAST_KINDS`, and anything the fast
    path is not sure about, go through the composer and the standard library.
    """

    composer: Composer
    notes: list[str] = field(default_factory=list)
    #: How many mails went which way ("fast", "standard"), for tests and benchmarks.
    counts: Counter[str] = field(default_factory=Counter)
    _skeletons: dict[tuple[object, ...], _Skeleton | None] = field(default_factory=dict)
    _qp: dict[str, str] = field(default_factory=dict)
    _headers: _HeaderCache = field(default_factory=_HeaderCache)
    _inline: _InlineCache = field(init=False)

    def __post_init__(self) -> None:
        self._inline = _InlineCache(self.composer.inline_css)

    def wire(
        self,
        kind: Kind | str,
        contact: Contact,
        *,
        event: Event | None,
        now: datetime,
        attended: bool | None = None,
        sequences: Mapping[str, int] | None = None,
        previous: Mapping[str, str] | None = None,
    ) -> Wire:
        """The mail as :meth:`Composer.compose` would build it, as transmitted."""
        request = MailRequest(str(kind), contact, event, now, attended, sequences or {}, previous)
        return self.wire_for(request)

    def wire_for(self, request: MailRequest) -> Wire:
        """The wire form of the mail *request* describes."""
        if request.kind not in FAST_KINDS or request.previous is not None:
            return self.standard(request)
        rendered = self.composer.render(request, inline=self._inline)
        shape = _shape(rendered)
        if shape not in self._skeletons:
            if len(self._skeletons) > 64:  # e.g. a calendar file per minute, for days
                self._skeletons.clear()
            self._skeletons[shape] = self._skeleton(rendered, mime.build(rendered))
        skeleton = self._skeletons[shape]
        if skeleton is None or skeleton.broken:
            return self.standard(request)
        data = self._fill(skeleton, rendered)
        if skeleton.checked < _VERIFY:
            expected = self.reference(request)
            skeleton.checked += 1
            if expected != Wire(rendered.message_id, data):
                skeleton.broken = True
                event = request.event
                self._note(
                    f"fast path differs from the standard library for {request.kind} "
                    f"{event.id if event else '(series)'}; "
                    "composing this mailing the standard way"
                )
                self.counts["standard"] += 1
                return expected
        self.counts["fast"] += 1
        return Wire(rendered.message_id, data)

    def standard(self, request: MailRequest) -> Wire:
        """The slow, reference way, counted as such."""
        self.counts["standard"] += 1
        return self.reference(request)

    def reference(self, request: MailRequest) -> Wire:
        """The standard library's bytes: rendered afresh, built by :func:`mime.build`."""
        return mime.wire(mime.build(self.composer.render(request)))

    def _note(self, text: str) -> None:
        log.warning("%s", text)
        self.notes.append(text)

    # -- skeletons --

    def _skeleton(self, rendered: RenderedMail, message: EmailMessage) -> _Skeleton | None:
        """Cut the standard library's bytes for the first recipient of a shape."""
        data: bytes = message.as_bytes(policy=_SMTP)
        found = [p.get_boundary() for p in message.walk() if p.is_multipart()]
        mid = str(message["Message-ID"])
        boundaries = [mime_boundary(mid, i) for i in range(len(found))]
        if mid != rendered.message_id or found != boundaries:
            self._note(f"no fast path for {rendered.request.kind}: unexpected message structure")
            return None
        head: list[tuple[str, _Slot | tuple[bytes, bytes]]] = []
        written = b""
        for name, value in message.raw_items():
            folded = _SMTP.fold_binary(name, value)
            written += folded
            lname = name.lower()
            if lname in _PER_RECIPIENT:
                head.append((name, lname))
            elif lname == "content-type" and boundaries:
                pieces = folded.split(boundaries[0].encode("ascii"))
                if len(pieces) != 2:
                    return None
                head.append((name, (pieces[0], pieces[1])))
            else:
                head.append((name, folded))
        if not data.startswith(written + b"\r\n"):
            self._note(f"no fast path for {rendered.request.kind}: headers differ")
            return None
        body: list[_Slot] = [data[len(written) + 2 :]]
        for slot, token in (
            ("html", qp_wire(rendered.html, self._qp)),
            ("text", qp_wire(rendered.text, self._qp)),
        ):
            body = _cut(body, token, slot)
            if body.count(slot) != 1:
                self._note(
                    f"no fast path for {rendered.request.kind}: the {slot} part was not found"
                )
                return None
        for index, boundary in enumerate(boundaries):
            body = _cut(body, boundary.encode("ascii"), f"boundary{index}")
        return _Skeleton(head, body)

    def _fill(self, skeleton: _Skeleton, r: RenderedMail) -> bytes:
        h = self._headers
        boundaries = {}
        out: list[bytes] = []
        for name, slot in skeleton.head:
            if isinstance(slot, bytes):
                out.append(slot)
            elif isinstance(slot, tuple):
                boundaries["boundary0"] = mime_boundary(r.message_id, 0).encode("ascii")
                out += (slot[0], boundaries["boundary0"], slot[1])
            elif slot == "to":
                out.append(h.address(name, r.to))
            elif slot == "subject":
                out.append(h.cached(name, r.subject))
            elif slot == "date":
                out.append(h.date(name, r.request.now))
            elif slot == "message-id":
                out.append(h.message_id(name, r.message_id))
            else:
                out.append(h.url_list(name, r.unsubscribe))
        out.append(b"\r\n")
        for piece in skeleton.body:
            if isinstance(piece, bytes):
                out.append(piece)
            elif piece == "text":
                out.append(qp_wire(r.text, self._qp))
            elif piece == "html":
                out.append(qp_wire(r.html, self._qp))
            else:
                found = boundaries.get(piece)
                if found is None:
                    index = int(piece.removeprefix("boundary"))
                    found = boundaries[piece] = mime_boundary(r.message_id, index).encode("ascii")
                out.append(found)
        if len(self._qp) > 20_000:  # per-recipient lines would pile up
            self._qp.clear()
        return b"".join(out)


# --- a second process -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Job:
    """One mail a pass is going to send, in the order the senders take them."""

    kind: str
    event: str  # "" for mails about the whole series
    contact: Contact
    attended: bool | None = None


def _pack(contact: Contact) -> tuple[Any, ...]:
    # Contacts hold a read-only mapping, which pickle refuses; a dict travels.
    return tuple(
        dict(value) if isinstance(value, MappingProxyType) else value
        for value in (getattr(contact, f.name) for f in fields(Contact) if f.init)
    )


def _unpack(values: tuple[Any, ...]) -> Contact:
    contact = Contact(*values)
    if isinstance(contact.extra, dict):
        contact = replace(contact, extra=MappingProxyType(contact.extra))
    return contact


_worker: WireComposer | None = None


def _start_worker(
    settings: Settings, series: Series, templates_dir: Path, config_dir: Path
) -> None:
    """Initialiser of a worker process: the same composer as the parent's."""
    import signal

    # Ctrl-C and SIGTERM are for the parent, which finishes and then ends us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _follow_parent(os.getppid())
    global _worker
    composer = Composer.load(settings, series, templates_dir=templates_dir, config_dir=config_dir)
    _worker = WireComposer(composer)


def _follow_parent(parent: int, interval: float = 1.0) -> None:
    """End this worker once *parent* is gone.

    A parent killed outright (SIGKILL, the out-of-memory killer) cannot shut
    its pool down, and a worker blocked on its queue would wait forever. The
    worker is re-parented when its parent dies, so a changed parent id tells.
    """

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval)
        os._exit(0)

    threading.Thread(target=watch, name="follow-parent", daemon=True).start()


def _ready() -> bool:
    return _worker is not None


def _compose_chunk(
    jobs: list[tuple[str, str, tuple[Any, ...], bool | None]],
    now: datetime,
    sequences: dict[str, int],
) -> tuple[list[Wire | None], list[str]]:
    """Runs in the worker: the wires of *jobs*, None where composing failed."""
    assert _worker is not None
    series = _worker.composer.series
    wires: list[Wire | None] = []
    for kind, event_id, packed, attended in jobs:
        try:
            event = series.event(event_id) if event_id else None
            wire = _worker.wire(
                kind,
                _unpack(packed),
                event=event,
                now=now,
                attended=attended,
                sequences=sequences,
            )
            # Checked here, in the less busy process (see mime.CrlfBytes).
            wires.append(Wire(wire.message_id, crlf_checked(wire.data)))
        except Exception:  # the parent composes it again and reports the error
            wires.append(None)
    notes, _worker.notes[:] = list(_worker.notes), []
    return wires, notes


class WirePipeline:
    """Composes the mails of a pass in worker processes, ahead of the senders.

    The dispatcher's senders take the mails in the order of *jobs*; the pipeline
    hands chunks of the upcoming ones to the workers and keeps a few chunks
    ahead, so that a sender finds its mail composed. Until the workers are up,
    and for anything not prepared (a retry, a mail skipped ahead to), the mail
    is composed in this process, the same fast way. The first prepared mail of
    each kind and date is compared with this process's own result before any
    is used: a worker that composes differently (a template edited on disk
    since the config was loaded) switches the pipeline off.

    With ``processes=0`` everything is composed in this process.
    """

    CHUNK = 32
    AHEAD = 6  # chunks

    def __init__(
        self,
        composer: Composer,
        jobs: Sequence[Job],
        *,
        sequences: Mapping[str, int],
        clock: Callable[[], datetime],
        settings: Settings,
        config_dir: Path,
        templates_dir: Path,
        processes: int = 1,
    ) -> None:
        self.local = WireComposer(composer)
        self._jobs = list(jobs)
        # Per (kind, date), then per contact key: no tuple per mail to keep.
        self._index: dict[tuple[str, str], dict[str, int]] = {}
        for n, job in enumerate(self._jobs):
            self._index.setdefault((job.kind, job.event), {})[job.contact.key] = n
        self._sequences = dict(sequences)
        self._clock = clock
        self._cursor = -1
        self._moved = asyncio.Event()
        self._chunks: dict[int, asyncio.Future[tuple[datetime, list[Wire | None]]]] = {}
        self._checked: set[tuple[str, str]] = set()
        self._disabled = processes < 1
        self.prepared = 0  # mails taken from the workers
        self.started = asyncio.Event()  # set once the workers take chunks
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None
        self._feeder: asyncio.Task[None] | None = None
        if processes >= 1:
            self._pool = concurrent.futures.ProcessPoolExecutor(
                max_workers=processes,
                # Not fork: this process has threads (the ledger's), and a
                # forked copy of a thread's lock can deadlock.
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_start_worker,
                initargs=(settings, composer.series, templates_dir, config_dir),
            )
            self._feeder = asyncio.create_task(self._feed())

    async def wire(
        self,
        kind: Kind | str,
        contact: Contact,
        *,
        event: Event | None,
        now: datetime,
        attended: bool | None = None,
        sequences: Mapping[str, int] | None = None,
        previous: Mapping[str, str] | None = None,
    ) -> Wire:
        """Like :meth:`WireComposer.wire`, from the workers when they have it."""
        request = MailRequest(str(kind), contact, event, now, attended, sequences or {}, previous)
        return await self.wire_for(request)

    async def wire_for(self, request: MailRequest) -> Wire:
        """Like :meth:`WireComposer.wire_for`, from the workers when they have it."""
        found = None
        if not self._disabled and request.previous is None:
            found = await self._prepared(request)
        if found is None:
            return self.local.wire_for(request)
        self.prepared += 1
        return found

    async def _prepared(self, request: MailRequest) -> Wire | None:
        kind, contact, event = request.kind, request.contact, request.event
        index = self._index.get((kind, event.id if event else ""), {}).get(contact.key)
        if index is None:
            return None
        job = self._jobs[index]
        if (
            job.contact != contact
            or job.attended != request.attended
            or dict(request.sequences) != self._sequences
        ):
            return None  # not the mail that was prepared (e.g. the config changed)
        if index > self._cursor:
            self._cursor = index
            self._moved.set()
        future = self._chunks.get(index // self.CHUNK)
        if future is None:
            return None
        try:
            stamp, wires = await future
        except Exception as exc:  # a worker died: carry on here
            self._switch_off(f"composing in a second process failed ({exc!r})")
            return None
        found = wires[index % self.CHUNK]
        shape = (kind, job.event)
        if found is not None and shape not in self._checked:
            # Same files, same bytes? Checked once per kind and date.
            self._checked.add(shape)
            if found != self.local.reference(replace(request, now=stamp)):
                self._switch_off("the second process composes differently")
                return None
        return found

    def _switch_off(self, reason: str) -> None:
        if not self._disabled:
            log.warning("%s; composing in this process", reason)
        self._disabled = True

    async def _feed(self) -> None:
        assert self._pool is not None
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._pool, _ready)
        except Exception as exc:
            self._switch_off(f"the second process did not start ({exc!r})")
            return
        self.started.set()
        chunk = self._cursor // self.CHUNK + 1
        count = -(-len(self._jobs) // self.CHUNK)
        while chunk < count and not self._disabled:
            while chunk > self._cursor // self.CHUNK + self.AHEAD:
                self._moved.clear()
                await self._moved.wait()
            for old in [k for k in self._chunks if k < self._cursor // self.CHUNK - 1]:
                del self._chunks[old]  # every sender has moved past these
            if (chunk + 1) * self.CHUNK > self._cursor + 1:
                future = asyncio.ensure_future(self._submit(chunk))
                future.add_done_callback(_retrieve)
                self._chunks[chunk] = future
            chunk += 1

    async def _submit(self, chunk: int) -> tuple[datetime, list[Wire | None]]:
        assert self._pool is not None
        jobs = self._jobs[chunk * self.CHUNK : (chunk + 1) * self.CHUNK]
        packed = [(j.kind, j.event, _pack(j.contact), j.attended) for j in jobs]
        now = self._clock()
        loop = asyncio.get_running_loop()
        wires, notes = await loop.run_in_executor(
            self._pool, _compose_chunk, packed, now, self._sequences
        )
        for note in notes:
            log.warning("%s", note)
        return now, wires

    async def aclose(self) -> None:
        """Stop the workers; mails still being composed are dropped."""
        if self._feeder is not None:
            self._feeder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._feeder
        for future in self._chunks.values():
            future.cancel()
        self._chunks.clear()
        if self._pool is not None:
            # The workers exit once their queue is closed; nothing to wait for.
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


def _retrieve(future: asyncio.Future[Any]) -> None:
    # A chunk nobody waited for (its mails were skipped) must not log
    # "exception was never retrieved"; its mails are composed here if needed.
    if not future.cancelled():
        future.exception()


#: Below this many mails in a pass a second process is not worth starting.
MIN_PIPELINE = 300


def pipeline(
    config: Config,
    mails: Sequence[tuple[str, str, str]],
    *,
    sequences: Mapping[str, int],
    clock: Callable[[], datetime],
) -> WirePipeline:
    """The pipeline for a delivery pass of *mails* (kind, event id, contact key)."""
    jobs = []
    names: dict[str, str] = {}  # one string per kind, not one per mail
    for kind, event_id, key in mails:
        contact = config.contacts.by_key(key)
        name = names.setdefault(kind, str(kind))
        if contact is None or name not in FAST_KINDS:
            continue
        attended = None
        if event_id and event_id in config.attendance:
            attended = contact.key in config.attendance[event_id]
        jobs.append(Job(name, event_id, contact, attended))
    processes = config.settings.limits.compose_workers
    if processes is None:
        processes = min(4, (os.cpu_count() or 1) - 1)
    if len(jobs) < MIN_PIPELINE:
        processes = 0
    return WirePipeline(
        Composer.from_config(config),
        jobs,
        sequences=sequences,
        clock=clock,
        settings=config.settings,
        config_dir=config.config_dir,
        templates_dir=config.templates_dir,
        processes=processes,
    )
