"""Rendering once per shape of mail, filling in each recipient's values.

The mails of one mailing differ per recipient in a few strings, the *slots*
(:mod:`invite_mailer.mail.slots`): the salutation, contact fields, the
unsubscribe link. Everything else a template sees depends on the *shape*:
kind, date, the sending day, the calendar files, the sequences, which dates
the recipient is registered for, attendance, and which slots are empty.

:class:`Shapes` renders each shape once, exactly as
:meth:`Composer.render <invite_mailer.mail.compose.Composer.render>` does, but
with private-use marker strings in place of the slot values (and "" for
empty ones); inlines the CSS once and tidies the text once. A recipient's
mail is then the shape with the real values put in:

* raw into the text, whose lines holding a value are tidied again on their
  own (:func:`~invite_mailer.inputs.typeset.tidy_line`; the text is tidied
  line by line, so this equals tidying the whole);
* into the HTML escaped as the CSS inliner writes it: it parses the HTML
  and serialises it again, so a value reads ``&amp; &lt; &gt; &nbsp;`` in
  text and ``&amp; &quot; &nbsp;`` in attribute values, whatever Jinja's
  escaping was. Markers in comments, ``<style>``/``<script>``, or attributes
  CSS can select on are not filled in: that shape is rendered per recipient.

Values that the parsers could treat differently from a marker (control
characters, leading or trailing white space, private-use characters) and
anything the analysis or a check does not vouch for return None from
:meth:`Shapes.render`: the caller renders that mail per recipient.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

from invite_mailer.core.plan import MailRequest
from invite_mailer.inputs.contacts import Contact
from invite_mailer.inputs.materials import File
from invite_mailer.inputs.typeset import tidy_join, tidy_line
from invite_mailer.mail import mime
from invite_mailer.mail.compose import Composer
from invite_mailer.mail.filling import Filled, Shape, qp_lines
from invite_mailer.mail.mime import PLAIN_ADDRESS, RenderedMail
from invite_mailer.mail.slots import SLOT_FAMILIES, Analysis, analyse
from invite_mailer.mail.wireformat import split_lines

log = logging.getLogger(__name__)

__all__ = ["VERIFY_FIRST", "Shapes", "safe_value"]

# Supplementary private-use characters: no template, parser or text wrapper
# gives them a meaning. The "&" tells an autoescaped marker ("&amp;") from a
# raw one, so a value written into HTML unescaped is noticed.
_OPEN, _CLOSE = "\U000f0000", "\U000f0001"
_LINE_OPEN, _LINE_CLOSE = "\U000f0002", "\U000f0003"
_RAW_MARK = re.compile(f"{_OPEN}([0-9]+)&{_CLOSE}")
_HTML_MARK = re.compile(f"{_OPEN}([0-9]+)&amp;{_CLOSE}")
_LINE_MARK = re.compile(f"{_LINE_OPEN}([0-9]+){_LINE_CLOSE}")
_ANY_MARK = re.compile("[\U000f0000-\U000f0003]")

# What a value may not contain to be filled in: control characters (the HTML
# parser and the text tidying treat some specially), surrogates and
# private-use characters (markers, the text wrapper's glue).
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff\ue000-\uf8ff\U000f0000-\U0010ffff]")
# Where the inliner writes text unescaped (raw text elements) or as it was
# (comments): a value there keeps Jinja's escaping, not the serialiser's.
_VERBATIM = re.compile(
    r"<!--.*?-->|<(style|script|xmp|iframe|noembed|noframes|noscript|plaintext)\b.*?</\1\s*>",
    re.DOTALL | re.IGNORECASE,
)
# The attribute a marker inside a tag belongs to (the inliner quotes with ").
_ATTRIBUTE = re.compile(r'\s([^\s"\'=<>/]+)="[^"]*\Z')
# Attributes CSS selectors commonly match on, and the one the inliner writes.
_SELECTED = frozenset({"style", "class", "id"})

# How many recipients of each shape are compared with the reference first;
# after that, the 2**n-th ones are.
VERIFY_FIRST = 2

_Key = tuple[object, ...]


def safe_value(value: object) -> bool:
    """Whether *value* can be filled into a shape: a string the HTML parser,
    the serialiser and the text tidying treat like any other word."""
    if type(value) is not str:
        return False
    return value == "" or (value.strip() == value and _UNSAFE.search(value) is None)


@dataclass
class Shapes:
    """Compiled shapes of one :class:`Composer`'s mails (kinds without a
    previous version: updates and cancellations are rendered per recipient)."""

    composer: Composer
    notes: list[str] = field(default_factory=list)
    analysis: Analysis = field(init=False)
    _slots: tuple[str, ...] = field(init=False)
    _sources: list[tuple[str, str]] = field(init=False)
    _shapes: dict[_Key, Shape | None] = field(default_factory=dict)

    MAX_SHAPES = 256

    def __post_init__(self) -> None:
        templates = self.composer.templates
        missing = sorted(set(templates.compiled) - set(templates.trees))
        self.analysis = (
            Analysis(frozenset(), f"{missing[0]}: its syntax tree is not at hand")
            if missing
            else analyse(templates.trees)
        )
        # A family of slots (register_links) is one slot per date of the series.
        dates = [e.id for e in self.composer.series.events]
        self._slots = tuple(
            item
            for slot in sorted(self.analysis.slots)
            for item in ([f"{slot}[{d}]" for d in dates] if slot in SLOT_FAMILIES else [slot])
        )
        self._sources = [_source(slot) for slot in self._slots]
        if self.analysis.reason is not None:
            self._note(
                f"templates rendered per recipient (slower): {self.analysis.reason}; "
                "recipient data is compiled into shapes only when every use is "
                "{{ value }} without a filter or an {% if value %} test"
            )

    @property
    def compilable(self) -> bool:
        """Whether the templates can be compiled into shapes at all."""
        return self.analysis.reason is None

    def render(self, request: MailRequest) -> tuple[RenderedMail, Shape, Filled] | None:
        """The rendered mail of *request* from its shape, or None when the caller
        must render it per recipient (see the module's documentation)."""
        if not self.compilable or request.previous is not None:
            return None
        composer = self.composer
        request, attachments, context = composer.prepare(request)
        values = self.values(request.contact, context)
        if values is None:
            return None
        key = self.key(request, attachments, context, values)
        if key in self._shapes:
            shape = self._shapes[key]
        else:
            if len(self._shapes) >= self.MAX_SHAPES:
                self._shapes.clear()  # e.g. a calendar stamp per minute, for days
            shape = self._shapes[key] = self._compile(request, context, values)
        if shape is None or shape.broken:
            return None
        filled = shape.fill(values)
        if shape.quick_bound(values, attachments) > composer.max_message_bytes:
            # Only near the limit is it worth counting the octets of the parts.
            composer.check_size(request.kind, request.event, filled.text, filled.html, attachments)
        rendered = composer.assemble(
            request, context, shape.subject, filled.text, filled.html, attachments
        )
        return rendered, shape, filled

    def vouch(self, request: MailRequest) -> bool:
        """Whether the mail of *request* is known to build, without building it.

        True when its shape has been built and checked for earlier recipients,
        its values can be filled in, its address is valid and the size bound
        is within ``limits.max_message_bytes``; a :class:`ConfigError` for an
        invalid address. False: build the mail to know.
        """
        if not self.compilable or request.previous is not None:
            return False
        request, attachments, context = self.composer.prepare(request)
        values = self.values(request.contact, context)
        if values is None:
            return False
        shape = self._shapes.get(self.key(request, attachments, context, values))
        if shape is None or shape.broken or shape.served < VERIFY_FIRST:
            return False
        if not PLAIN_ADDRESS.fullmatch(request.contact.email):
            mime.recipient(request.contact)  # a plain address is always valid
        limit = self.composer.max_message_bytes
        if shape.quick_bound(values, attachments) <= limit:
            return True
        return shape.size_bound(values, attachments) <= limit

    def values(self, contact: Contact, context: Mapping[str, Any]) -> tuple[str, ...] | None:
        """The recipient's slot values, in slot order; None if one is not safe to fill in."""
        values = []
        for where, name in self._sources:
            if where == "extra":
                value: object = contact.extra.get(name)
            elif where == "contact":
                value = getattr(contact, name)
            elif where == "family":
                family, _, date = name.partition("[")
                value = context[family].get(date[:-1], "")
            else:
                value = context[name]
            if not safe_value(value):
                return None
            values.append(value)
        return tuple(values)  # type: ignore[arg-type]

    def key(
        self,
        request: MailRequest,
        attachments: list[File],
        context: Mapping[str, Any],
        values: tuple[str, ...],
    ) -> _Key:
        """What mails of one shape share (all their template context but the slots)."""
        event = request.event
        return (
            request.kind,
            event.id if event is not None else "",
            context["relative_day"],
            tuple(attachments),
            tuple(sorted(request.sequences.items())),
            request.dates,
            tuple(e.id for e in context["registered_events"]),
            context["registered"],
            request.attended,
            tuple(bool(v) for v in values),
        )

    def _note(self, text: str) -> None:
        log.warning("%s", text)
        self.notes.append(text)

    # -- compiling --

    def _compile(
        self, request: MailRequest, context: dict[str, Any], values: tuple[str, ...]
    ) -> Shape | None:
        """Render the shape of *request* with markers; None if it cannot be filled in."""
        marks = [f"{_OPEN}{n}&{_CLOSE}" if v else "" for n, v in enumerate(values)]
        marked = dict(context)
        marked["contact"] = self._marked_contact(request.contact, marks)
        families: dict[str, dict[str, str]] = {name: {} for name in SLOT_FAMILIES}
        for n, slot in enumerate(self._slots):
            where, name = self._sources[n]
            if where == "family":
                family, _, date = name.partition("[")
                if marks[n]:  # only the dates with a link, as in the real mapping
                    families[family][date[:-1]] = marks[n]
            elif not slot.startswith("contact."):
                marked[slot] = marks[n]
        for family, links in families.items():
            if family in marked:
                marked[family] = MappingProxyType(links)
        composer = self.composer
        subject, text, html = composer.render_templates(request.kind, marked)
        shape = _cut_text(text) if _ANY_MARK.search(subject) is None else None
        cut = _cut_html(_inline_source(composer, request.kind, marked), html)
        if shape is None or cut is None:
            event = request.event
            self._note(
                f"the {request.kind} mail of {event.id if event else 'the series'} is "
                "rendered per recipient: its recipient data is not in plain text or links"
            )
            return None
        text_pieces, text_lines, joined = shape
        return Shape(
            subject,
            text_pieces,
            text_lines,
            cut[0],
            cut[1],
            _text_wire(joined),
            _html_wire(html),
        )

    def _marked_contact(self, contact: Contact, marks: list[str]) -> Contact:
        fields: dict[str, Any] = {}
        extra: dict[str, str] = {}
        for n, slot in enumerate(self._slots):
            if slot.startswith("contact.extra["):
                extra[slot[len("contact.extra[") : -1]] = marks[n]
            elif slot.startswith("contact."):
                fields[slot[len("contact.") :]] = marks[n]
        return replace(contact, **fields, extra=MappingProxyType(extra))


def _source(slot: str) -> tuple[str, str]:
    """Where a slot's value comes from: ("extra", column), ("contact", field), ("context", name)."""
    if slot.startswith("contact.extra["):
        return "extra", slot[len("contact.extra[") : -1]
    if slot.startswith("contact."):
        return "contact", slot[len("contact.") :]
    if slot.split("[", 1)[0] in SLOT_FAMILIES:
        return "family", slot
    return "context", slot


def _inline_source(composer: Composer, kind: str, marked: dict[str, Any]) -> str:
    """The HTML before the CSS is inlined: checked for markers written unescaped."""
    source = composer.templates.render(f"{kind}.html.j2", marked)
    if _RAW_MARK.search(source) is not None:
        return ""  # a value written into HTML as it is: no shape
    return source


def _cut_text(text: str) -> tuple[list[str], list[list[str | int]], str] | None:
    """The text around its lines with markers, tidied as :func:`tidy_text` does."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    held: list[list[str | int]] = []
    tidied = []
    for line in lines:
        if _OPEN not in line:
            tidied.append(tidy_line(line))
            continue
        parts = _RAW_MARK.split(line)
        pieces: list[str | int] = [
            int(p) if i % 2 else p for i, p in enumerate(parts) if i % 2 or p
        ]
        tidied.append(f"{_LINE_OPEN}{len(held)}{_LINE_CLOSE}")
        held.append(pieces)
    # A line with a value is never blank, so the blank lines tidy_join
    # merges are the same with the values in.
    joined = tidy_join(tidied)
    parts = _LINE_MARK.split(joined)
    literals = parts[0::2]
    order = [int(n) for n in parts[1::2]]
    if order != list(range(len(held))) or any(_ANY_MARK.search(p) for p in literals):
        return None
    if any(_ANY_MARK.search(p) for line in held for p in line if isinstance(p, str)):
        return None
    return literals, held, joined


def _text_wire(joined: str) -> list[bytes | int]:
    """The text's quoted-printable lines, where each line with values is a number."""
    out: list[bytes | int] = []
    for line in split_lines(joined):
        found = _LINE_MARK.fullmatch(line)
        if found is not None:
            out.append(int(found.group(1)))
        elif out and isinstance(out[-1], bytes):
            out[-1] += qp_lines([line])
        else:
            out.append(qp_lines([line]))
    return out


def _html_wire(html: str) -> list[bytes | list[str | int]]:
    """The HTML's quoted-printable lines; a line with values is its literals
    and the numbers of its values (in the order of ``Shape.html_slots``)."""
    out: list[bytes | list[str | int]] = []
    occurrence = 0
    for line in split_lines(html):
        parts = _HTML_MARK.split(line)
        if len(parts) == 1:
            if out and isinstance(out[-1], bytes):
                out[-1] += qp_lines([line])
            else:
                out.append(qp_lines([line]))
            continue
        pieces: list[str | int] = []
        for n, part in enumerate(parts):
            if n % 2 == 0:
                pieces.append(part)
            else:
                pieces.append(occurrence)
                occurrence += 1
        out.append(pieces)
    return out


def _cut_html(source: str, html: str) -> tuple[list[str], list[tuple[int, bool]]] | None:
    """The inlined HTML around its markers, each known to be text or an attribute value."""
    if not source:
        return None
    verbatim = [m.span() for m in _VERBATIM.finditer(html)]
    selectable = "[" in "".join(
        m.group(0) for m in _VERBATIM.finditer(source) if m.group(1) is not None
    )
    slots: list[tuple[int, bool]] = []
    for found in _HTML_MARK.finditer(html):
        start = found.start()
        if any(a <= start < b for a, b in verbatim):
            return None
        tag = html.rfind("<", 0, start)
        attribute = tag > html.rfind(">", 0, start)
        if attribute:
            name = _ATTRIBUTE.search(html, tag, start)
            # A value CSS may select on would change what the stylesheet applies.
            if name is None or name.group(1).lower() in _SELECTED or selectable:
                return None
        slots.append((int(found.group(1)), attribute))
    pieces = _HTML_MARK.split(html)[0::2]
    if any(_ANY_MARK.search(p) for p in pieces):
        return None
    return pieces, slots
