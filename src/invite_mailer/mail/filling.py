"""A compiled shape of mail and how a recipient's values are filled in.

:class:`Shape` holds the literal pieces of one shape's text and HTML around
the slots (see :mod:`invite_mailer.mail.shapes`, which compiles them), and
their quoted-printable form, so that a mail's parts and wire bodies are put
together from pieces: only the text lines that hold values are tidied and
encoded again, and a value goes into the HTML escaped as the CSS inliner
writes it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

from invite_mailer.inputs.materials import File
from invite_mailer.inputs.typeset import tidy_line
from invite_mailer.mail.sizes import message_size, octet_counts
from invite_mailer.mail.wireformat import qp_line

__all__ = ["Filled", "Shape", "html_attribute", "html_text", "qp_lines"]


def html_text(value: str) -> str:
    """*value* as the inliner writes it in a text node."""
    return (
        value.replace("&", "&amp;")
        .replace("\xa0", "&nbsp;")
        .replace("<", "&lt;")
        .replace(">", "&gt;")
    )


def html_attribute(value: str) -> str:
    """*value* as the inliner writes it in a (double-quoted) attribute value."""
    return value.replace("&", "&amp;").replace("\xa0", "&nbsp;").replace('"', "&quot;")


class Filled(NamedTuple):
    """A shape's parts with one recipient's values in them."""

    text: str
    html: str
    text_wire: bytes  # the quoted-printable bodies, as mime.build writes them
    html_wire: bytes


def qp_lines(lines: list[str]) -> bytes:
    return "".join(qp_line(line) + "\r\n" for line in lines).encode("ascii")


@dataclass
class Shape:
    """One shape, rendered with markers: literal pieces around the slots."""

    subject: str
    text_pieces: list[str]  # around the lines that hold values
    text_lines: list[list[str | int]]  # each such line: literals and slot numbers
    html_pieces: list[str]  # around the values
    html_slots: list[tuple[int, bool]]  # (slot number, in an attribute value)
    # The quoted-printable bodies: encoded lines, and lines with values (by number).
    text_wire: list[bytes | int]
    html_wire: list[bytes | list[str | int]]
    served: int = 0
    broken: bool = False
    _sizes: _Sizes = field(init=False)

    def __post_init__(self) -> None:
        self._sizes = _Sizes.of(self)

    def fill(self, values: tuple[str, ...]) -> Filled:
        """The text and HTML parts with *values* in them, and their wire form."""
        lines = [
            tidy_line("".join(p if isinstance(p, str) else values[p] for p in line))
            for line in self.text_lines
        ]
        text = _interleave(self.text_pieces, lines)
        escaped = [
            html_attribute(values[slot]) if attribute else html_text(values[slot])
            for slot, attribute in self.html_slots
        ]
        html = _interleave(self.html_pieces, escaped)
        text_wire = b"".join(
            p if isinstance(p, bytes) else qp_lines(lines[p].split("\n")) for p in self.text_wire
        )
        html_wire = b"".join(
            p
            if isinstance(p, bytes)
            else qp_lines(["".join(x if isinstance(x, str) else escaped[x] for x in p)])
            for p in self.html_wire
        )
        return Filled(text, html, text_wire, html_wire)

    def quick_bound(self, values: tuple[str, ...], attachments: Iterable[File]) -> int:
        """A coarser bound than :meth:`size_bound`, from the values' lengths only.

        A character is at most four UTF-8 octets, twelve quoted-printable
        characters; escaped for HTML at most six ("&nbsp;"); in the text a
        blank may become a break and the hanging indent.
        """
        sizes = self._sizes
        encoded = sizes.base + sum(len(values[n]) * w for n, w in sizes.weights.items())
        return message_size((encoded + 1, 0), (0, 0), attachments)

    def size_bound(self, values: tuple[str, ...], attachments: Iterable[File]) -> int:
        """At least :func:`message_size` of the mail with *values*, without writing it.

        Octets add up, except where a line holding values is wrapped: each
        break turns a run of blanks into a line break and the hanging indent.
        """
        counts = [octet_counts(v) for v in values]
        sizes = self._sizes
        ascii_chars, others = sizes.text
        for line_ascii, line_others, blanks, hang, slots in sizes.lines:
            ascii_chars += line_ascii + hang * (blanks + sum(values[n].count(" ") for n in slots))
            others += line_others
            for n in slots:
                ascii_chars += counts[n][0]
                others += counts[n][1]
        html_ascii, html_others = sizes.html
        for slot, attribute in self.html_slots:
            value = values[slot]
            found = octet_counts(html_attribute(value) if attribute else html_text(value))
            html_ascii += found[0]
            html_others += found[1]
        return message_size((ascii_chars, others), (html_ascii, html_others), attachments)


@dataclass(frozen=True)
class _Sizes:
    """A shape's octet counts without its values, for :meth:`Shape.size_bound`."""

    text: tuple[int, int]
    # Per line with values: its literals' counts, blanks, hanging indent, slots.
    lines: list[tuple[int, int, int, int, list[int]]]
    html: tuple[int, int]
    # For quick_bound: the encoded length without values, and what each
    # character of a slot's value can add at most (over all its uses).
    base: int = 0
    weights: dict[int, int] = field(default_factory=dict)

    @classmethod
    def of(cls, shape: Shape) -> _Sizes:
        lines = []
        for line in shape.text_lines:
            literal = "".join(p for p in line if isinstance(p, str))
            ascii_chars, others = octet_counts(literal)
            # Wrapping expands a tab to up to eight blanks; any blank may become a break.
            tabs = literal.count("\t")
            ascii_chars += 7 * tabs
            blanks = literal.count(" ") + tabs
            first = line[0] if line and isinstance(line[0], str) else ""
            hang = len(first) - len(first.lstrip()) + 2
            lines.append(
                (ascii_chars, others, blanks, hang, [p for p in line if isinstance(p, int)])
            )
        text, html = _total(shape.text_pieces), _total(shape.html_pieces)
        base = text[0] + 3 * text[1] + html[0] + 3 * html[1]
        weights: dict[int, int] = {}
        for line_ascii, line_others, blanks, hang, slots in lines:
            base += line_ascii + 3 * line_others + hang * blanks
            for n in slots:
                weights[n] = weights.get(n, 0) + 12 + hang
        for n, _attribute in shape.html_slots:
            weights[n] = weights.get(n, 0) + 12
        return cls(text, lines, html, base, weights)


def _interleave(pieces: list[str], between: list[str]) -> str:
    """pieces[0] + between[0] + pieces[1] + ... + pieces[-1]."""
    joined = [""] * (len(pieces) + len(between))
    joined[0::2] = pieces
    joined[1::2] = between
    return "".join(joined)


def _total(pieces: list[str]) -> tuple[int, int]:
    counts = [octet_counts(p) for p in pieces]
    return sum(c[0] for c in counts), sum(c[1] for c in counts)
