"""The CSS inliner's results, reused for mails that differ only in some text.

Inlining the stylesheet into ``style`` attributes (for Outlook) parses and
serialises the whole HTML of every mail; the mails of one mailing share their
markup and differ in a few texts (the name, the unsubscribe link), so
:class:`InlineCache` runs the inliner once per markup and puts each mail's
texts into its output, checked against the inliner for the first mails.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["InlineCache"]

# How many mails of each markup are compared with the inliner itself.
_VERIFY = 2

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


class InlineCache:
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
