"""The template language's own text filters: plain-text typesetting, number words.

They are pure and mostly see the same series texts for every recipient, so
the heavier ones are cached.
"""

from __future__ import annotations

import re
import textwrap
from functools import lru_cache

from markupsafe import Markup, escape

#: The width plain-text mails are written for.
TEXT_WIDTH = 72

_NUMBER_WORDS = (
    "null",
    "ein",
    "zwei",
    "drei",
    "vier",
    "fünf",
    "sechs",
    "sieben",
    "acht",
    "neun",
    "zehn",
    "elf",
    "zwölf",
)


@lru_cache(maxsize=4096)
def paragraphs(text: str) -> tuple[str, ...]:
    """Paragraphs of *text* (split at blank lines), each on one line."""
    blocks = re.split(r"\n\s*\n", str(text).strip())
    return tuple(" ".join(block.split()) for block in blocks if block.strip())


@lru_cache(maxsize=4096)
def typeset(text: str) -> Markup:
    """HTML-escaped text where no line starts with a dash: "und -verwaltung"
    stays together and "–" sticks to the word before it.

    Both with a no-break space, not ``white-space: nowrap``, which Outlook
    for Windows ignores (browsers do not break after a hyphen that follows a
    no-break space)."""
    escaped = str(escape(" ".join(str(text).split())))
    escaped = re.sub(r"(\S) (-\w)", "\\1&nbsp;\\2", escaped)
    return Markup(escaped.replace(" –", "&nbsp;–"))


@lru_cache(maxsize=4096)
def nobreak(text: str) -> Markup:
    """HTML-escaped text kept on one line where it can be ("14. November 2024",
    "14:00–16:00 Uhr"): its spaces become no-break spaces. Unlike
    ``white-space: nowrap`` this works in Outlook for Windows too."""
    return Markup(str(escape(" ".join(str(text).split()))).replace(" ", "&nbsp;"))


# Where a long title may be cut: before a dash that starts its second half.
_TITLE_PARTS = re.compile(r" [–—-] ")


@lru_cache(maxsize=4096)
def shorten(text: str, width: int = 40) -> str:
    """*text* in at most *width* characters, for subjects.

    A title that fits stays whole. A longer one loses the part after its
    first dash ("Verwaltung transformieren – Effizienz steigern" →
    "Verwaltung transformieren"); if that is still too long, it is cut at a
    word and ends with "…".
    """
    text = " ".join(str(text).split())
    width = max(int(width), 8)
    if len(text) <= width:
        return text
    head = _TITLE_PARTS.split(text, maxsplit=1)[0]
    if len(head) <= width:
        return head
    cut = head[: width - 1]
    if " " in cut:
        cut = cut.rsplit(" ", 1)[0]
    return cut.rstrip(" ,;:–-") + "…"


@lru_cache(maxsize=4096)
def wrap(text: str, width: int = TEXT_WIDTH, indent: str = "") -> str:
    """Plain text wrapped for reading: paragraphs kept, lines ≤ *width*.

    Long words such as URLs are never broken.
    """
    return "\n\n".join(fill(block, width, indent, indent) for block in paragraphs(text))


# Glues a dash to the word before it while wrapping, so no line starts with
# "-verwaltung" or "– " (looks like a list item); a private-use character
# that cannot occur in real text.
_GLUE = "\ue000"


@lru_cache(maxsize=4096)
def fill(text: str, width: int, indent: str, hang: str) -> str:
    """One paragraph wrapped at *width*: first line *indent*, the others *hang*."""
    glued = re.sub(r" (?=[-–])", _GLUE, text)
    lines = textwrap.wrap(
        glued,
        width=width,
        initial_indent=indent,
        subsequent_indent=hang,
        break_long_words=False,
        break_on_hyphens=False,
    )
    return "\n".join(lines).replace(_GLUE, " ")


def heading(text: str, mark: str = "=") -> str:
    """A plain-text heading: the text, underlined, and a blank line."""
    title = " ".join(str(text).split())
    return f"{title}\n{mark * len(title)}\n"


def tidy_text(text: str, width: int = TEXT_WIDTH) -> str:
    """Forgiving layout for organiser-edited text templates.

    Trailing blanks and runs of blank lines go; lines longer than *width* are
    wrapped (never inside a word or URL), "- " items with a hanging indent; a
    lone "--" becomes the signature separator "-- ".
    """
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return tidy_join([tidy_line(line, width) for line in lines])


def tidy_line(raw: str, width: int = TEXT_WIDTH) -> str:
    """One line (no line break in it) as :func:`tidy_text` writes it.

    :func:`tidy_text` works line by line and only then joins the lines
    (:func:`tidy_join`), so a line can be tidied again on its own.
    """
    line = raw.rstrip()
    if line == "--":
        return "-- "
    if len(line) <= width:
        return line
    indent = line[: len(line) - len(line.lstrip())]
    return fill(line.strip(), width, indent, line_hang(line))


def line_hang(line: str) -> str:
    """The indent of the continuation lines when *line* is wrapped."""
    indent = line[: len(line) - len(line.lstrip())]
    return indent + ("  " if line.lstrip().startswith("- ") else "")


def tidy_join(lines: list[str]) -> str:
    """Tidied lines joined: runs of blank lines become one, none at the ends."""
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip("\n") + "\n"


def number_word(number: int) -> str:
    """German number word for counting things up to twelve ("vier"), digits above.

    1 gives "ein" ("ein Termin"); use the template to pick singular or plural.
    """
    if 0 <= number < len(_NUMBER_WORDS):
        return _NUMBER_WORDS[number]
    return str(number)
