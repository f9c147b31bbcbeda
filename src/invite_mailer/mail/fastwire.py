"""The wire bytes of a mail, without the standard library's MIME machinery.

:func:`mime.build <invite_mailer.mail.mime.build>` turns a
:class:`RenderedMail` into an :class:`email.message.EmailMessage`, and its
``as_bytes(policy=email.policy.SMTP)`` is what the transports send. For a
mailing to thousands that is where the time goes: every header is parsed into
objects and folded again, quoted-printable is encoded character by character
in Python; about 5 ms a mail, of which rendering the templates is less than a
tenth.

Almost all of a mail is the same for every recipient of a mailing, so
:class:`WireComposer`

1. renders each *shape* of mail once and fills in each recipient's values
   (:mod:`invite_mailer.mail.shapes`); mails it cannot vouch for are
   rendered per recipient exactly as the composer does (the CSS inliner's
   results cached by :class:`InlineCache`);
2. builds one real message per skeleton (kind, date, attachments) with the
   standard library and cuts its bytes into a skeleton: literal bytes, and
   slots for what differs between recipients (``To``, ``Subject``, ``Date``,
   ``Message-ID``, ``List-Unsubscribe``, the multipart boundaries, the text
   and the HTML part);
3. fills the slots from the :class:`RenderedMail`: headers folded by
   shortcuts that are exact for ordinary values (anything else goes through
   the standard library), and the quoted-printable bodies as the shape has
   them encoded (only the lines with values are encoded per mail), else
   line by line with a cache.

The result is byte for byte ``mime.build(rendered).as_bytes(policy=SMTP)``.
``tests/test_fastpath.py`` proves that for every kind over many contacts,
hostile ones included, and every skeleton checks itself against the standard
library for the first recipients it serves: on any difference that shape
falls back to the standard library with a warning, so a change in the
renderer or in ``mime.py`` can cost speed, never correctness.

:mod:`invite_mailer.mail.workers` runs a :class:`WireComposer` in further
processes, ahead of the senders.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from email import policy as email_policy
from email.message import EmailMessage

from invite_mailer.core.plan import MailRequest
from invite_mailer.inputs.contacts import Contact
from invite_mailer.inputs.series import Event, Kind
from invite_mailer.mail import mime
from invite_mailer.mail.compose import Composer
from invite_mailer.mail.filling import Filled, Shape
from invite_mailer.mail.htmlcache import InlineCache
from invite_mailer.mail.mime import CrlfBytes, RenderedMail, Wire, crlf_lines, mime_boundary
from invite_mailer.mail.shapes import VERIFY_FIRST, Shapes
from invite_mailer.mail.wireformat import HeaderCache, qp_wire

log = logging.getLogger(__name__)

__all__ = ["FAST_KINDS", "WireComposer"]

#: The kinds that go to a whole audience at once (and the confirmation,
#: whose shapes are few: its dates and the person's). Updates and cancellations
#: carry a calendar file per recipient, summaries go to one person: for them
#: the standard library is fast enough.
FAST_KINDS: frozenset[str] = frozenset(
    {Kind.INVITATION, Kind.REMINDER, Kind.FOLLOWUP, Kind.CONFIRMATION}
)

_SMTP = email_policy.SMTP
# The slots of a skeleton's top-level header block.
_PER_RECIPIENT = frozenset({"to", "subject", "date", "message-id", "list-unsubscribe"})
# How many recipients of each shape are checked against the standard library.
_VERIFY = 2


def _sampled(served: int) -> bool:
    """Whether the *served*-th mail of a shape is compared with the reference:
    the first few, then the 4**n-th from the 16th, so a long mailing is
    checked now and then. A check renders the mail the standard way (~7 ms,
    twenty mails' worth of filling in); the tests prove the bytes equal for
    every shape, this only catches what they could not foresee."""
    if served < VERIFY_FIRST:
        return True
    return served >= 16 and served & (served - 1) == 0 and served.bit_length() % 2 == 1


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
    # Whether the standard library's bytes end every line in CRLF: then so does
    # every mail filled in, as long as its header lines do (the bodies and
    # boundaries put in are written with CRLF only).
    canonical: bool = False
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
    _headers: HeaderCache = field(default_factory=HeaderCache)
    _inline: InlineCache = field(init=False)
    #: The compiled shapes of the composer's mails.
    shapes: Shapes = field(init=False)

    def __post_init__(self) -> None:
        self._inline = InlineCache(self.composer.inline_css)
        self.shapes = Shapes(self.composer, self.notes)

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
        compiled = self.shapes.render(request)
        shape: Shape | None = None
        filled: Filled | None = None
        if compiled is None:
            rendered = self.composer.render(request, inline=self._inline)
        else:
            rendered, shape, filled = compiled
        key = _shape(rendered)
        if key not in self._skeletons:
            if len(self._skeletons) > 64:  # e.g. a calendar file per minute, for days
                self._skeletons.clear()
            self._skeletons[key] = self._skeleton(rendered, mime.build(rendered))
        skeleton = self._skeletons[key]
        if skeleton is None or skeleton.broken:
            return self.standard(request)
        wire = Wire(rendered.message_id, self._fill(skeleton, rendered, filled))
        due = skeleton.checked < _VERIFY
        if shape is not None:
            due = due or _sampled(shape.served)
            shape.served += 1
        if due:
            skeleton.checked += 1
            expected = self._check(request, rendered, wire, skeleton, shape)
            if expected is not None:
                return expected
        self.counts["fast"] += 1
        if shape is not None:
            self.counts["shape"] += 1
        return wire

    def _check(
        self,
        request: MailRequest,
        rendered: RenderedMail,
        wire: Wire,
        skeleton: _Skeleton,
        shape: Shape | None,
    ) -> Wire | None:
        """Compare *wire* with the standard library's; its bytes when they differ."""
        reference = self.composer.render(request)
        expected = mime.wire(mime.build(reference))
        if expected == wire:
            return None
        event = request.event
        about = f"{request.kind} {event.id if event else '(series)'}"
        if shape is not None and reference != rendered:
            shape.broken = True
            self._note(
                f"the compiled shape differs from rendering per recipient for {about}; "
                "rendering this shape per recipient"
            )
        else:
            skeleton.broken = True
            self._note(
                f"fast path differs from the standard library for {about}; "
                "composing this mailing the standard way"
            )
        self.counts["standard"] += 1
        return expected

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
        return _Skeleton(head, body, canonical=crlf_lines(data))

    def _fill(self, skeleton: _Skeleton, r: RenderedMail, filled: Filled | None = None) -> bytes:
        """The mail's wire bytes: the slots of *skeleton* filled from *r*
        (the bodies from *filled*, when its shape has them encoded)."""
        boundaries: dict[str, bytes] = {}
        out = self._head(skeleton, r, boundaries)
        canonical = skeleton.canonical and crlf_lines(b"".join(out))
        out.append(b"\r\n")
        for piece in skeleton.body:
            if isinstance(piece, bytes):
                out.append(piece)
            elif piece == "text":
                out.append(filled.text_wire if filled else qp_wire(r.text, self._qp))
            elif piece == "html":
                out.append(filled.html_wire if filled else qp_wire(r.html, self._qp))
            else:
                found = boundaries.get(piece)
                if found is None:
                    index = int(piece.removeprefix("boundary"))
                    found = boundaries[piece] = mime_boundary(r.message_id, index).encode("ascii")
                out.append(found)
        if len(self._qp) > 20_000:  # per-recipient lines would pile up
            self._qp.clear()
        data = b"".join(out)
        # Marked as checked, so the transport need not scan the bytes again.
        return CrlfBytes(data) if canonical else data

    def _head(
        self, skeleton: _Skeleton, r: RenderedMail, boundaries: dict[str, bytes]
    ) -> list[bytes]:
        """The header block of the mail; the first boundary, if any, into *boundaries*."""
        h = self._headers
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
        return out
