"""From (kind, contact, date) to a finished :class:`email.message.EmailMessage`.

A kind of mail is three templates in ``templates/email/``:
``<kind>.subject.j2`` (one line), ``<kind>.txt.j2`` (the plain-text part,
written for reading) and ``<kind>.html.j2`` (the HTML part; HTML-escaped
automatically). They usually extend the shared ``layout.txt.j2`` and
``layout.html.j2``, which hold the greeting, signature and footer (reason for
the mail, unsubscribe notice, imprint).

Variables every template can use
--------------------------------
``contact``
    The recipient: ``anrede``, ``titel``, ``vorname``, ``nachname``,
    ``organisation``, ``email``; further columns of the contact list as
    ``contact.extra["Spaltenname"]``.
``salutation``
    The complete first line with comma: "Sehr geehrte Frau Dr. Müller,",
    "Sehr geehrter Herr Schmidt,", "Guten Tag Alex Meyer,",
    "Sehr geehrte Damen und Herren,".
``series``
    ``title``, ``subtitle``, ``description``, ``audience``,
    ``registration_url``, ``privacy_url``, ``imprint``, ``id`` and
    ``organiser`` (``organiser.name``, ``organiser.email``).
``events``
    All dates that are not cancelled, in order. Each has ``id``, ``title``,
    ``description``, ``speakers``, ``date_long`` ("Donnerstag, 14. November
    2024"), ``date_short`` ("Do., 14.11.2024"), ``date_day_month``
    ("14. November 2024"), ``date_numeric`` ("14.11.2024"), ``weekday``,
    ``start`` / ``end`` ("14:00"), ``time_range`` ("14:00–16:00 Uhr"),
    ``join_url``, ``ics_filename`` and ``materials`` (each: ``title``,
    ``description``, ``url`` for links, ``filename`` and ``size`` for
    attached files).
``event``
    The date a reminder or follow-up is about (``None`` in the invitation).
``next_event``
    The next date after ``event`` (``None`` if it was the last one).
``relative_day``
    ``event``'s day seen from the sending day: "heute", "morgen",
    "übermorgen" or "am Donnerstag, 14. November 2024".
``registered_events``
    The dates this contact is registered for; ``registered`` is true when the
    contact is registered for ``event``.
``attended``
    Follow-up only: ``True`` (took part), ``False`` (registered, but not on
    the attendance list) or ``None`` (no attendance list).
``attachments``
    File names attached to this mail (calendar files and materials).
``unsubscribe_url``
    The one-click link, or "" when the operator has not set one up.
``unsubscribe_mailto`` / ``unsubscribe_address``
    ``mailto:`` link with subject, and the bare address, to unsubscribe by mail.
``subject``
    The rendered subject (in the text and HTML templates).
``kind``
    "invitation", "reminder", "followup", ...

Filters: ``paragraphs`` (text -> list of paragraphs, line breaks inside a
paragraph joined), ``wrap`` (plain text wrapped at 72 characters, paragraphs
kept), ``heading`` (plain-text heading, underlined), ``typeset`` (HTML:
escaped, no line break before a dash), ``zahlwort`` (4 -> "vier").

The plain-text part is tidied after rendering: lines longer than 72
characters are wrapped (URLs never broken), trailing blanks and repeated blank
lines removed, so organisers can write one paragraph per line.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import itertools
import math
import mimetypes
import os
import re
import stat
import textwrap
import threading
import time
import traceback
import types
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime
from email.message import EmailMessage
from email.utils import parseaddr
from functools import lru_cache
from pathlib import Path
from typing import Any

import css_inline
import jinja2
from jinja2 import filters, nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.exceptions import SecurityError
from jinja2.loaders import split_template_path
from jinja2.runtime import Context, LoopContext
from jinja2.sandbox import (
    ImmutableSandboxedEnvironment,
    SandboxedEscapeFormatter,
    SandboxedFormatter,
)
from jinja2.utils import generate_lorem_ipsum
from markupsafe import Markup, escape

from invite_mailer.core import german
from invite_mailer.core.calendar import METHOD as CALENDAR_METHOD
from invite_mailer.core.calendar import METHOD_CANCEL, METHOD_UPDATE, CalendarFiles
from invite_mailer.core.plan import MailRequest
from invite_mailer.core.tokens import mailto_url, make_token, unsubscribe_url
from invite_mailer.errors import ConfigError, ProblemCollector
from invite_mailer.inputs.contacts import Contact
from invite_mailer.inputs.series import SERIES_FILE, Event, Kind, Material, Series
from invite_mailer.inputs.settings import SETTINGS_FILE, Settings
from invite_mailer.mail import mime
from invite_mailer.mail.mime import UNSAFE_HEADER_TEXT, File, RenderedMail

PARTS = ("subject", "txt", "html")
TEXT_WIDTH = 72

#: The folder (inside the config folder) that material files are attached from.
MATERIALS_DIR = "materials"
#: The most material files one mail attaches.
MAX_MATERIAL_FILES = 20

# What each kind attaches. "series": one calendar file per active date;
# "event": the date's calendar file. Kinds not listed attach nothing; the
# update and cancellation kinds will add their entries (with their METHOD).
_CALENDARS: dict[str, str] = {
    Kind.INVITATION: "series",
    Kind.REMINDER: "event",
    Kind.UPDATE: "event",
    Kind.CANCELLATION: "event",
}
# The iTIP method of each kind's calendar files (default PUBLISH).
_METHODS: dict[str, str] = {Kind.UPDATE: METHOD_UPDATE, Kind.CANCELLATION: METHOD_CANCEL}
_MATERIALS: frozenset[str] = frozenset({Kind.FOLLOWUP})
#: Kinds about the whole series (event=None); every other kind is about one date.
SERIES_KINDS: frozenset[str] = frozenset({Kind.INVITATION})

_VARIABLES = (
    "contact, salutation, series, events, event, next_event, relative_day, registered_events, "
    "registered, attended, attachments, unsubscribe_url, unsubscribe_mailto, "
    "unsubscribe_address, subject, kind, sequence, changes"
)


# --- what templates see ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OrganiserView:
    name: str
    email: str


@dataclass(frozen=True, slots=True)
class SeriesView:
    id: str
    title: str
    subtitle: str
    description: str
    audience: str
    registration_url: str | None
    privacy_url: str | None
    imprint: str
    organiser: OrganiserView


@dataclass(frozen=True, slots=True)
class MaterialView:
    title: str
    description: str
    url: str | None
    filename: str | None
    size: str | None


@dataclass(frozen=True, slots=True)
class EventView:
    id: str
    title: str
    description: str
    speakers: tuple[str, ...]
    date_long: str
    date_short: str
    date_day_month: str
    date_numeric: str
    weekday: str
    start: str
    end: str
    time_range: str
    join_url: str | None
    ics_filename: str
    materials: tuple[MaterialView, ...]
    cancelled: bool
    cancel_reason: str = ""


@dataclass(frozen=True, slots=True)
class Change:
    """One detail of a date that changed, for the "Änderung" mail."""

    label: str
    old: str
    new: str


# What templates see, and may read every public attribute of.
_VIEWS: frozenset[type] = frozenset(
    {OrganiserView, SeriesView, MaterialView, EventView, Change, Contact, LoopContext}
)


# --- the template sandbox ------------------------------------------------------------

# Templates are organisers' files, so they are input, not code: they run in
# Jinja's sandbox (no Python internals, no changing shared objects), may only
# load files of the templates folder, and every render is bounded in output
# and time so that a runaway loop or "x" * 10**9 ends as a template error.

#: The most characters one template may write (or any one value may have).
MAX_RENDER_CHARS = 2 * 1024 * 1024
#: The most seconds rendering one template may take.
MAX_RENDER_SECONDS = 5.0
#: The largest template file that is read.
MAX_TEMPLATE_BYTES = 1024 * 1024
# The most bits an integer computed in a template may have (10**1000 is fine).
_MAX_INT_BITS = 64 * 1024


_CONFINED_HINT = (
    "templates run in a sandbox: they can use the documented variables and filters "
    "and include files of the templates folder, nothing of Python's internals "
    "(names with __) and no other files"
)


class TemplateLimitError(SecurityError):
    """A template went beyond the output size or time it may take."""


#: The most characters the filters and operators of one render may build in
#: all; each value is bounded on its own, this bounds many values together
#: (a filter applied to every item of a long list).
MAX_BUILT_CHARS = 16 * MAX_RENDER_CHARS


class _Budget(threading.local):
    deadline: float = math.inf
    ticks: int = 0
    built: int = 0


_BUDGET = _Budget()


def _reserve(size: int) -> None:
    """Count a value of *size* characters against the render, before it is built."""
    if size > MAX_RENDER_CHARS:
        raise TemplateLimitError(_too_long(size))
    if _BUDGET.deadline == math.inf:
        return  # not inside a render (a sample rendered by a test): no total to keep
    _BUDGET.built += size
    if _BUDGET.built > MAX_BUILT_CHARS:
        raise TemplateLimitError(
            f"the template builds texts of more than {MAX_BUILT_CHARS // 1024 // 1024} "
            "million characters in all (a filter applied to many items?)"
        )


class _BoundedCodeGenerator(CodeGenerator):
    """Jinja's code generator, with a time check at the start of every block
    body (so in every loop iteration) and a size check on every ``~``."""

    def blockvisit(self, nodes: Iterable[nodes.Node], frame: Frame) -> None:
        self.writeline("environment.tick()")
        super().blockvisit(nodes, frame)

    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        self.write("environment.bounded(")
        super().visit_Concat(node, frame)
        self.write(")")


class _Sandbox(ImmutableSandboxedEnvironment):
    code_generator_class = _BoundedCodeGenerator
    intercepted_binops = frozenset({"*", "**", "+", "-", "%", "<<"})

    @contextmanager
    def budget(self, seconds: float) -> Iterator[None]:
        """Bound the rendering done inside the block to *seconds* (and what it builds)."""
        budget = _BUDGET
        saved = budget.deadline, budget.built
        budget.deadline, budget.built = time.monotonic() + seconds, 0
        try:
            yield
        finally:
            budget.deadline, budget.built = saved

    def tick(self) -> None:
        budget = _BUDGET
        budget.ticks += 1
        if budget.ticks % 256 == 0:
            self.check_time()

    def check_time(self) -> None:
        if time.monotonic() > _BUDGET.deadline:
            raise TemplateLimitError(
                f"rendering took longer than {MAX_RENDER_SECONDS:g} seconds (a loop that "
                "runs too often?)"
            )

    def bounded(self, value: Any) -> Any:
        if isinstance(value, str | bytes | list | tuple) and len(value) > MAX_RENDER_CHARS:
            raise TemplateLimitError(_too_long(len(value)))
        return value

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        # Everything is checked before Python computes it: one multiplication
        # of huge numbers runs in C, holding the interpreter, so no time
        # check could stop it.
        if isinstance(left, int) and isinstance(right, int):
            _check_int(operator, left, right)
        elif operator == "*":
            _check_repeat(left, right)
            _check_repeat(right, left)
        elif operator == "+" and isinstance(left, str | bytes | list | tuple):
            if isinstance(right, str | bytes | list | tuple):
                size = _weight(left) + _weight(right)
                if size > MAX_RENDER_CHARS:
                    raise TemplateLimitError(_too_long(size))
        elif operator == "%" and isinstance(left, str):
            _reserve(_percent_size(left, right))
        return self.bounded(super().call_binop(context, operator, left, right))

    def call(__self, __context: Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        owner = getattr(__obj, "__self__", None)
        if isinstance(owner, str):
            _check_call(getattr(__obj, "__name__", ""), owner, args, kwargs)
        return __self.bounded(super().call(__context, __obj, *args, **kwargs))

    def getattr(self, obj: Any, attribute: str) -> Any:
        # The views handed to templates are frozen records of plain data whose
        # public attributes are all safe; skipping the generic checks for them
        # keeps the sandbox nearly free (a mail reads ~150 attributes).
        if type(obj) in _VIEWS and not attribute.startswith("_"):
            try:
                return getattr(obj, attribute)
            except AttributeError:
                return self.undefined(obj=obj, name=attribute)
        return super().getattr(obj, attribute)

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        """``str.format`` and ``format_map`` with every field's width and
        precision bounded (also "{x:{w}}", whose width is a value) and the
        text they write bounded, before it is built."""
        if not isinstance(value, types.MethodType | types.BuiltinMethodType) or (
            value.__name__ not in ("format", "format_map")
        ):
            return None
        text = value.__self__
        if not isinstance(text, str):
            return None
        _check_format(text)
        is_map = value.__name__ == "format_map"
        make: Callable[[], _BoundedFormatter] = (
            functools.partial(_BoundedEscapeFormatter, self, escape=text.escape)
            if isinstance(text, Markup)
            else functools.partial(_BoundedFormatter, self)
        )

        def wrapper(*args: Any, **kwargs: Any) -> str:
            if is_map:
                if kwargs or len(args) != 1:
                    raise TypeError("format_map() takes exactly one argument")
                return type(text)(make().vformat(text, (), args[0]))
            return type(text)(make().vformat(text, args, kwargs))

        return functools.update_wrapper(wrapper, value)


class _BoundedFormatter(SandboxedFormatter):
    """Jinja's sandboxed formatter, refusing huge fields and a huge result.

    ``format_field`` sees the format spec after nested fields are filled in,
    so "{x:>{w}}" is checked with the width it really gets.
    """

    def __init__(self, env: jinja2.Environment, **kwargs: Any) -> None:
        super().__init__(env, **kwargs)
        self._written = 0

    def format_field(self, value: Any, format_spec: str) -> Any:
        for number in _DIGITS.findall(format_spec):
            if len(number) > 7 or int(number) > MAX_RENDER_CHARS:
                raise TemplateLimitError(f"a field width of {number} in a format is too large")
        result = super().format_field(value, format_spec)
        self._written += len(result)
        if self._written > MAX_RENDER_CHARS:
            raise TemplateLimitError(_too_long(self._written))
        return result


class _BoundedEscapeFormatter(_BoundedFormatter, SandboxedEscapeFormatter):
    pass


_DIGITS = re.compile(r"[0-9]+")


def _too_long(length: int) -> str:
    return (
        f"a text of {length:,} characters is more than the limit of {MAX_RENDER_CHARS:,}"
    ).replace(",", ".")


def _weight(value: str | bytes | list[Any] | tuple[Any, ...]) -> int:
    """The characters *value* stands for: a list of long texts weighs their lengths."""
    if isinstance(value, str | bytes):
        return len(value)
    return sum(len(v) if isinstance(v, str | bytes | list | tuple) else 1 for v in value)


def _check_repeat(sequence: Any, count: Any) -> None:
    if isinstance(sequence, str | bytes | list | tuple) and isinstance(count, int):
        _reserve(_weight(sequence) * max(0, count))


def _check_int(operator: str, left: int, right: int) -> None:
    """Refuse an integer result of more than ``_MAX_INT_BITS`` bits before it is computed."""
    a, b = abs(left).bit_length(), abs(right).bit_length()
    bits = 0
    if operator == "*":
        bits = a + b
    elif operator == "**" and right > 0 and abs(left) > 1:
        bits = (a - 1) * right
    elif operator == "<<" and right > 0:
        bits = a + right
    elif operator in ("+", "-"):
        bits = max(a, b) + 1
    if bits > _MAX_INT_BITS:
        raise TemplateLimitError(
            f"the result of {operator} would be a number of more than "
            f"{_MAX_INT_BITS:,} binary digits, which is too large".replace(",", ".")
        )


# A width or precision of six digits or more in a %- or {}-format.
_HUGE_WIDTH = re.compile(
    r"%(?:\([^)]*\))?[-#0 +]*(?:\d{6,}|\d*\.\d{6,})"  # "%999999s", "%(x).999999f"
    r"|\{[^{}]*:[^{}]*?\d{6,}[^{}]*\}"  # "{:999999}"
)


# A replacement field whose format spec takes a value: "{0:{1}}".
_NESTED_WIDTH = re.compile(r"\{[^{}]*:[^{}]*\{")


def _check_numbers(args: Iterable[Any], kwargs: Mapping[str, Any]) -> None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, int) and value > MAX_RENDER_CHARS:
            raise TemplateLimitError(f"a width of {value:,} is too large")


def _bounded_lipsum(n: int = 5, html: bool = True, min: int = 20, max: int = 100) -> Any:  # noqa: A002
    if n > 100 or max > 1000:
        raise TemplateLimitError("lipsum() this long is too large")
    return generate_lorem_ipsum(n=n, html=html, min=min, max=max)


def _check_format(text: str) -> None:
    if _HUGE_WIDTH.search(text):
        raise TemplateLimitError("a field width in this format is too large")


def _check_call(name: str, text: str, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
    """Refuse string methods whose result would be huge, before they run (filters
    have their own checks, see _GROWING)."""
    numbers = [a for a in (*args, *kwargs.values()) if isinstance(a, int)]
    if name in {"center", "ljust", "rjust", "zfill", "indent", "expandtabs"} and any(
        n > MAX_RENDER_CHARS // max(1, text.count("\n") + (name == "expandtabs") * len(text))
        for n in numbers
    ):
        raise TemplateLimitError(f"{name}() with a width of {max(numbers):,} is too large")
    strings = [a for a in (*args, *kwargs.values()) if isinstance(a, str)]
    if name == "replace" and len(strings) >= 2:
        old, new = strings[0], strings[1]
        grows = (len(new) - len(old)) * (text.count(old) if old else len(text) + 1)
        if len(text) + grows > MAX_RENDER_CHARS:
            raise TemplateLimitError(_too_long(len(text) + grows))


# --- bounded filters --------------------------------------------------------------
#
# Every filter is wrapped, so it is bounded however it is called: directly, or
# through map(), select() and the like, which bypass the sandbox's call().
# Filters whose result can be far larger than their arguments have a check
# that estimates the result from the arguments before it is built; for all
# others the result (at most a small multiple of the input) is counted.


def _center_size(a: dict[str, Any]) -> int:
    return max(len(str(a["value"])), a["width"] if isinstance(a["width"], int) else 0)


def _indent_size(a: dict[str, Any]) -> int:
    text, width = str(a["s"]), a["width"]
    width = len(width) if isinstance(width, str) else max(0, width)
    return len(text) + (sum(map(text.count, _LINE_BREAKS)) + 1) * width


# What str.splitlines() breaks at.
_LINE_BREAKS = ("\n", "\r", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029")


def _replace_size(a: dict[str, Any]) -> int:
    text, old, new, count = str(a["s"]), a["old"], a["new"], a["count"]
    if not isinstance(old, str) or not isinstance(new, str):
        return len(text)
    times = text.count(old) if old else len(text) + 1
    if isinstance(count, int) and count >= 0:
        times = min(times, count)
    return len(text) + max(0, times * (len(new) - len(old)))


def _wordwrap_size(a: dict[str, Any]) -> int:
    text = str(a["s"])
    separator = a["wrapstring"] or a["environment"].newline_sequence
    width = a["width"] if isinstance(a["width"], int) else 1
    lines = len(text.split()) + len(text) // max(1, width) + text.count("\n") + 1
    return len(text) + lines * len(str(separator))


def _truncate_size(a: dict[str, Any]) -> int:
    length = a["length"] if isinstance(a["length"], int) else 0
    return min(len(str(a["s"])), max(0, length)) + len(str(a["end"]))


def _urlize_size(a: dict[str, Any]) -> int:
    text = str(a["value"])
    policies = a["eval_ctx"].environment.policies
    extra = sum(
        len(str(value or ""))
        for value in (
            a["target"],
            a["rel"],
            policies.get("urlize.target"),
            policies.get("urlize.rel"),
        )
    )
    # Each word may become <a href="word" rel=".." target="..">word</a>.
    return 2 * len(text) + len(text.split()) * (extra + 64)


def _format_size(a: dict[str, Any]) -> int:
    return _percent_size(str(a["value"]), a["kwargs"] or a["args"])


def _percent_size(text: str, values: Any) -> int:
    """About the length of ``text % values``, and huge widths refused."""
    _check_format(text)
    items = tuple(values) if isinstance(values, tuple) else (values,)
    if "*" in text:  # "%*s": the width is an argument
        _check_numbers(items, {})
    if isinstance(values, Mapping):  # "%(a)s%(a)s": a name may be used again and again
        lengths = [len(v) for v in values.values() if isinstance(v, str)]
        return len(text) + text.count("%") * max(lengths, default=0)
    return len(text) + sum(len(v) for v in items if isinstance(v, str))


def _filled_size(count_name: str) -> Callable[[dict[str, Any]], int]:
    def size(a: dict[str, Any]) -> int:
        count, fill = a[count_name], a["fill_with"]
        if not isinstance(count, int):
            return 0
        if count > MAX_RENDER_CHARS:
            raise TemplateLimitError(f"a {count_name} of {count:,} items is too large")
        weight = _weight(fill) if isinstance(fill, str | bytes | list | tuple) else 1
        return max(0, count) * weight

    return size


def _join_size(a: dict[str, Any]) -> int:
    """Materialises the items one by one (they may come from a generator that
    builds each), counting their lengths and the separators as it goes."""
    items: Iterable[Any] = a["value"]
    if a["attribute"] is not None:
        items = map(filters.make_attrgetter(a["eval_ctx"].environment, a["attribute"]), items)
        a["attribute"] = None
    separator = len(str(a["d"]))
    kept: list[Any] = []
    total = 0
    for item in items:
        if not isinstance(item, str) and not hasattr(item, "__html__"):
            item = str(item)
        total += len(item) + (separator if kept else 0)
        if total > MAX_RENDER_CHARS:
            raise TemplateLimitError(f"join() would write more than {_chars(MAX_RENDER_CHARS)}")
        kept.append(item)
    a["value"] = kept
    return total


def _sum_size(a: dict[str, Any]) -> int:
    items: Iterable[Any] = a["iterable"]
    if a["attribute"] is not None:
        items = map(filters.make_attrgetter(a["environment"], a["attribute"]), items)
        a["attribute"] = None
    kept = list(items)
    a["iterable"] = kept
    parts = [a["start"], *kept]
    if all(isinstance(p, int) for p in parts):
        return 0
    return sum(_weight(p) if isinstance(p, str | bytes | list | tuple) else 1 for p in parts)


def _heading_size(a: dict[str, Any]) -> int:
    return len(str(a["text"])) * (1 + len(str(a["mark"])))


def _wrap_size(a: dict[str, Any]) -> int:
    # A line break takes the place of a blank; each line (at most one per
    # word, a word and its blank take two characters) gets the indent.
    text = str(a["text"])
    return len(text) + (len(text) // 2 + 2) * len(str(a["indent"]))


# The filters whose result can be far larger than their arguments: the plain
# (not async) function and how large its result can be.
_GROWING: dict[str, tuple[Callable[..., Any], Callable[[dict[str, Any]], int]]] = {
    "center": (filters.do_center, _center_size),
    "indent": (filters.do_indent, _indent_size),
    "replace": (filters.do_replace, _replace_size),
    "wordwrap": (filters.do_wordwrap, _wordwrap_size),
    "truncate": (filters.do_truncate, _truncate_size),
    "urlize": (filters.do_urlize, _urlize_size),
    "format": (filters.do_format, _format_size),
    "batch": (filters.do_batch, _filled_size("linecount")),
    "slice": (filters.sync_do_slice, _filled_size("slices")),
    "join": (filters.sync_do_join, _join_size),
    "sum": (filters.sync_do_sum, _sum_size),
}
# The same for this module's own filters (registered by name, defined below).
_GROWING_HELPERS: dict[str, Callable[[dict[str, Any]], int]] = {
    "heading": _heading_size,
    "wrap": _wrap_size,
}
# Texts longer than this skip the caches of the text helpers.
_CACHED_CHARS = 64 * 1024


def _bounded_filter(func: Callable[..., Any], size: Callable[[dict[str, Any]], int] | None) -> Any:
    """*func*, with its result estimated by *size* before it runs and counted after."""
    signature = inspect.signature(func) if size is not None else None
    uncached = getattr(func, "__wrapped__", func) if hasattr(func, "cache_info") else func
    # Binding arguments the quick way where the signature allows (these
    # filters run for every recipient): names and defaults, no *args.
    names: list[str] = []
    defaults: dict[str, Any] = {}
    if signature is not None and all(
        p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in signature.parameters.values()
    ):
        names = list(signature.parameters)
        defaults = {
            n: p.default for n, p in signature.parameters.items() if p.default is not p.empty
        }

    @functools.wraps(func)
    def bounded(*args: Any, **kwargs: Any) -> Any:
        call = func
        arguments: dict[str, Any] = {}
        if names and len(args) <= len(names) and kwargs.keys() <= set(names[len(args) :]):
            arguments = {**defaults, **dict(zip(names, args, strict=False)), **kwargs}
        if names and size is not None and len(arguments) == len(names):
            _reserve(size(arguments))
            args, kwargs = (), arguments
        elif signature is not None and size is not None:
            # Also where the arguments do not fit: bind() says what is wrong.
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            _reserve(size(bound.arguments))
            args, kwargs = bound.args, bound.kwargs
        if any(isinstance(a, str) and len(a) > _CACHED_CHARS for a in (*args, *kwargs.values())):
            call = uncached
        result = call(*args, **kwargs)
        if isinstance(result, str | bytes | list | tuple):
            _reserve(len(result))
        return result

    return bounded


def _chars(count: int) -> str:
    return f"{count:,} characters".replace(",", ".")


class _UnreadableTemplate(jinja2.TemplateNotFound):
    """A template that exists but cannot be opened (its modes, a vanished target)."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(name)
        self.reason = reason


class _ConfinedLoader(jinja2.FileSystemLoader):
    """Loads regular files of the templates folder only: a name with "..", an
    absolute one or a symlink leading elsewhere is refused."""

    def __init__(self, folder: Path) -> None:
        super().__init__(folder, encoding="utf-8")
        self._folder = folder

    def get_source(
        self, environment: jinja2.Environment, template: str
    ) -> tuple[str, str, Callable[[], bool]]:
        path = self._folder.joinpath(*split_template_path(template))
        try:
            resolved = path.resolve(strict=True)
            root = self._folder.resolve(strict=True)
        except (OSError, RuntimeError):
            raise jinja2.TemplateNotFound(template) from None
        if not resolved.is_relative_to(root):
            raise SecurityError(
                f"the template {template!r} leads outside the templates folder ({resolved})"
            )
        try:
            # O_NONBLOCK: a FIFO put here must not block the open.
            fd = os.open(resolved, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
            with os.fdopen(fd, "rb") as file:
                info = os.fstat(file.fileno())
                if not stat.S_ISREG(info.st_mode):
                    raise SecurityError(f"the template {template!r} is not a regular file")
                data = file.read(MAX_TEMPLATE_BYTES + 1)
        except OSError as exc:
            reason = (exc.strerror or type(exc).__name__).lower()
            raise _UnreadableTemplate(template, reason) from None
        if len(data) > MAX_TEMPLATE_BYTES:
            raise SecurityError(
                f"the template {template!r} is larger than {MAX_TEMPLATE_BYTES // 1024} KB"
            )
        return data.decode("utf-8"), str(path), lambda: False


# --- the composer --------------------------------------------------------------------


class Composer:
    """Renders and assembles mails for one loaded configuration.

    Everything that does not depend on the recipient (compiled templates,
    calendar files, attachment bytes, the CSS inliner, formatted dates) is
    prepared once here; build a new composer when the configuration changes.
    """

    def __init__(
        self, settings: Settings, series: Series, *, templates_dir: Path, config_dir: Path
    ) -> None:
        self._settings = settings
        self._series = series
        self._templates_dir = templates_dir
        self._config_dir = config_dir
        self._env = _environment(templates_dir)
        problems = ProblemCollector()
        self._templates = self._load_templates(problems)
        self._files = self._load_materials(config_dir, problems)
        _check_header_values(settings, series, config_dir, problems)
        problems.raise_if_any()
        # Only now: parsing the sender address fails on the line break
        # reported above.
        self._domain = settings.sender.domain

        self._calendars = CalendarFiles(series, domain=self._domain)
        self._inliner = css_inline.CSSInliner(
            keep_style_tags=False,
            # @media rules cannot be inlined; they stay in a <style> block.
            keep_at_rules=True,
            load_remote_stylesheets=False,
            # width="600" attributes for Outlook, which ignores CSS widths on tables.
            apply_width_attributes=True,
        )
        self._series_view = _series_view(series)
        self._events = {e.id: self._event_view(e) for e in series.events}
        self._active = tuple(self._events[e.id] for e in series.active_events)
        self._unsubscribe_address = (
            settings.sender.unsubscribe_mailto
            or parseaddr(settings.sender.reply_to)[1]
            or settings.sender.from_address.addr_spec
        )
        self._unsubscribe_mailto = mailto_url(self._unsubscribe_address, f"Abmeldung {series.id}")
        self._secret = settings.unsubscribe.secret.get_secret_value()
        self._reply_to = mime.reply_to_address(settings.sender.reply_to)
        self._sender = settings.sender.from_address
        self._list_id = f"{series.title} <{series.id}.{self._domain}>"

    @property
    def kinds(self) -> tuple[str, ...]:
        """Every kind that has templates (the built-in ones and any added)."""
        return tuple(sorted({name.split(".", 1)[0] for name in self._templates if _part(name)}))

    # -- public API --

    def compose(
        self,
        kind: Kind | str,
        contact: Contact,
        *,
        event: Event | None,
        now: datetime,
        attended: bool | None = None,
        sequences: Mapping[str, int] | None = None,
        previous: Mapping[str, str] | None = None,
        message_id: str | None = None,
    ) -> EmailMessage:
        """The complete message, ready for the transport: ``mime.build(render(...))``.

        The arguments are those of :class:`MailRequest`. *message_id* replaces
        the delivery's own Message-ID, for a sample that is not the delivery
        (see :meth:`fresh_message_id`).
        """
        request = MailRequest(str(kind), contact, event, now, attended, sequences or {}, previous)
        rendered = self.render(request)
        if message_id is not None:
            rendered = replace(rendered, message_id=message_id)
        return mime.build(rendered)

    def render(
        self, request: MailRequest, *, inline: Callable[[str], str] | None = None
    ) -> RenderedMail:
        """Render the mail *request* describes: the only renderer of mails.

        *inline* replaces the CSS inliner (:meth:`inline_css`) with one that
        gives the same result, such as a cache of its results.
        """
        kind, contact, event = request.kind, request.contact, request.event
        if f"{kind}.subject.j2" not in self._templates:
            raise ValueError(f"no templates for the kind {kind!r} (known: {self.kinds})")
        if (event is None) != (kind in SERIES_KINDS):
            need = "event=None" if kind in SERIES_KINDS else "the event it is about"
            raise ValueError(f"composing a {kind!r} mail needs {need}")
        now = request.now
        if now.tzinfo is None:
            now = now.replace(tzinfo=self._series.zone)
        request = replace(request, now=now.astimezone(self._series.zone))

        attachments = self._attachments(request)
        context = self._context(request, attachments)
        subject = german.clean(self._render(f"{kind}.subject.j2", context))
        if not subject:
            raise ConfigError.single(
                self._templates_dir / f"{kind}.subject.j2",
                "the subject is empty",
                hint="write the subject line into this file",
            )
        context["subject"] = subject
        text = tidy_text(self._render(f"{kind}.txt.j2", context))
        html = (inline or self.inline_css)(self._render(f"{kind}.html.j2", context))
        self.check_size(kind, event, text, html, attachments)
        link = context["unsubscribe_url"]
        return RenderedMail(
            request=request,
            message_id=self.message_id(kind, contact, event, version=self._version(request)),
            subject=subject,
            text=text,
            html=html,
            to=mime.recipient(contact),
            sender=self._sender,
            reply_to=self._reply_to,
            list_id=self._list_id,
            unsubscribe=", ".join(f"<{u}>" for u in (self._unsubscribe_mailto, link) if u),
            one_click=bool(link),
            attachments=tuple(attachments),
        )

    def inline_css(self, html: str) -> str:
        """*html* with its CSS inlined into style attributes, for Outlook."""
        inlined: str = self._inliner.inline(html)
        return inlined

    @property
    def series(self) -> Series:
        """The series this composer renders mails of."""
        return self._series

    @staticmethod
    def _version(request: MailRequest) -> int:
        # The content version of an update or cancellation is its SEQUENCE:
        # each one is a mail of its own.
        if request.kind in (Kind.UPDATE, Kind.CANCELLATION) and request.event is not None:
            return request.sequences.get(request.event.id, 0)
        return 0

    def message_id(
        self, kind: Kind | str, contact: Contact, event: Event | None, *, version: int = 0
    ) -> str:
        """Deterministic, so a re-send after a crash carries the same Message-ID.

        *version* is the content version (the calendar SEQUENCE for updates).
        """
        key = "\n".join(
            (
                self._series.id,
                str(kind),
                event.id if event is not None else "",
                contact.email.strip().lower(),
                str(version),
            )
        )
        digest = hashlib.sha256(key.encode()).hexdigest()[:32]
        return f"<{digest}@{self._domain}>"

    def fresh_message_id(self) -> str:
        """A Message-ID of its own, for a test mail: never one of a delivery."""
        return f"<test.{uuid.uuid4().hex}@{self._domain}>"

    def check_size(
        self, kind: str, event: Event | None, text: str, html: str, attachments: Iterable[File]
    ) -> None:
        """Refuse a mail larger than ``limits.max_message_bytes`` on the wire (about)."""
        limit = self._settings.limits.max_message_bytes
        size = _qp_size(text) + _qp_size(html) + sum(_base64_size(len(f.data)) for f in attachments)
        if size > limit:
            about = f"of {event.id!r}" if event is not None else "of the series"
            raise ConfigError.single(
                self._config_dir / SERIES_FILE,
                f"the {kind} mail {about} would be about {_size(size)}, more than the "
                f"limit of {_size(limit)} for one mail (limits.max_message_bytes)",
                hint="shorten the descriptions in series.yaml (or the templates), and "
                "link large files with url: instead of file:",
            )

    # -- context --

    def _context(self, request: MailRequest, attachments: list[File]) -> dict[str, Any]:
        kind, contact, event, now = request.kind, request.contact, request.event, request.now
        view = None
        if event is not None:
            view = self._events.get(event.id) or self._event_view(event)
        next_event = None
        if event is not None:
            later = [e for e in self._series.active_events if e.starts_at > event.starts_at]
            if later:
                next_event = self._events[min(later, key=lambda e: e.starts_at).id]
        link = ""
        if self._settings.sender.unsubscribe_url and self._secret:
            token = make_token(self._secret, self._series.id, contact.email)
            link = unsubscribe_url(self._settings.sender.unsubscribe_url, token)
        return {
            "kind": kind,
            "contact": contact,
            "salutation": german.salutation(
                contact.anrede, contact.titel, contact.vorname, contact.nachname
            ),
            "series": self._series_view,
            "events": self._active,
            "event": view,
            "next_event": next_event,
            "relative_day": (
                german.relative_day(event.date, now.date()) if event is not None else ""
            ),
            "registered_events": tuple(e for e in self._active if contact.is_registered(e.id)),
            "registered": event is not None and contact.is_registered(event.id),
            "attended": request.attended,
            "attachments": tuple(f.filename for f in attachments),
            "unsubscribe_url": link,
            "unsubscribe_mailto": self._unsubscribe_mailto,
            "unsubscribe_address": self._unsubscribe_address,
            "subject": "",
            "sequence": request.sequences.get(event.id, 0) if event is not None else 0,
            "changes": (
                _changes(request.previous, event)
                if request.previous is not None and event is not None
                else ()
            ),
        }

    def _attachments(self, request: MailRequest) -> list[File]:
        kind, event, contact, sequences = (
            request.kind,
            request.event,
            request.contact,
            request.sequences,
        )
        files: list[File] = []
        calendars = _CALENDARS.get(kind)
        method = _METHODS.get(kind, CALENDAR_METHOD)
        attendee = None
        if method != CALENDAR_METHOD:
            name = german.full_name("", contact.vorname, contact.nachname)
            attendee = (name, contact.email)
        dates: list[Event] = []
        if calendars == "series":
            dates = self._series.active_events
        elif calendars == "event" and event is not None:
            dates = [event]
        for date in dates:
            files.append(
                File(
                    self._calendars.filename(date),
                    self._calendars.get(
                        date,
                        now=request.now,
                        sequence=sequences.get(date.id, 0),
                        method=method,
                        attendee=attendee,
                    ),
                    "text",
                    "calendar",
                    method,
                )
            )
        if kind in _MATERIALS and event is not None:
            files.extend(self._files.get(event.id, ()))
        return files

    def _event_view(self, event: Event) -> EventView:
        files = {f.filename: f for f in self._files.get(event.id, ())}
        return EventView(
            id=event.id,
            title=event.title,
            description=event.description,
            speakers=tuple(event.speakers),
            date_long=german.date_long(event.date),
            date_short=german.date_short(event.date),
            date_day_month=german.date_day_month(event.date),
            date_numeric=german.date_numeric(event.date),
            weekday=german.weekday(event.date),
            start=german.clock(event.start),
            end=german.clock(event.end),
            time_range=german.time_range(event.start, event.end),
            join_url=str(event.join_url) if event.join_url is not None else None,
            ics_filename=self._calendars.filename(event),
            materials=tuple(_material_view(m, files) for m in event.materials),
            cancelled=event.cancelled,
            cancel_reason=event.cancel_reason,
        )

    # -- templates --

    def _load_templates(self, problems: ProblemCollector) -> dict[str, jinja2.Template]:
        folder = self._templates_dir
        if not folder.is_dir():
            problems.add(
                folder,
                "the templates folder does not exist",
                hint="point to the folder with <kind>.subject.j2, <kind>.txt.j2, <kind>.html.j2",
            )
            return {}
        # Hidden files (editor swap files, macOS "._" copies) are not templates.
        names = sorted(
            name
            for name in self._env.list_templates(extensions=["j2"])
            if not any(piece.startswith(".") for piece in name.split("/"))
        )
        templates: dict[str, jinja2.Template] = {}
        for name in names:
            path = folder / name
            try:
                assert self._env.loader is not None
                source, _, _ = self._env.loader.get_source(self._env, name)
                tree = self._env.parse(source, name, str(path))
                templates[name] = self._env.get_template(name)
            except UnicodeDecodeError:
                problems.add(path, "the file is not UTF-8 text", hint="save it as UTF-8")
                continue
            except SecurityError as exc:
                problems.add(path, str(exc), hint=_CONFINED_HINT)
                continue
            except _UnreadableTemplate as exc:
                problems.add(
                    path,
                    f"the file cannot be read: {exc.reason}",
                    hint="make it readable for the user invite-mailer runs as (chmod a+r)",
                )
                continue
            except jinja2.TemplateNotFound:
                problems.add(
                    path,
                    "the file cannot be read (a broken link?)",
                    hint="replace it by an ordinary file, or delete it",
                )
                continue
            except jinja2.TemplateSyntaxError as exc:
                problems.add(
                    path,
                    f"template syntax error: {exc.message}",
                    line=exc.lineno,
                    hint=_syntax_hint(exc.message or ""),
                )
                continue
            for node in tree.find_all(
                (nodes.Extends, nodes.Include, nodes.Import, nodes.FromImport)
            ):
                target = getattr(node, "template", None)
                if getattr(node, "ignore_missing", False) or not isinstance(target, nodes.Const):
                    continue
                if isinstance(target.value, str) and target.value not in names:
                    problems.add(
                        path,
                        f"uses the template {target.value!r}, which does not exist in {folder}",
                        line=node.lineno,
                        hint="check the file name, or copy the file from the shipped templates",
                    )
        kinds = {str(k) for k in Kind} | {n.split(".", 1)[0] for n in names if _part(n)}
        for kind in sorted(kinds):
            for part in PARTS:
                name = f"{kind}.{part}.j2"
                if name not in names:
                    problems.add(
                        folder / name,
                        f"the template for the {part} of {kind!r} mails is missing",
                        hint=f"every kind needs {kind}.subject.j2, {kind}.txt.j2 and "
                        f"{kind}.html.j2; copy the shipped one and adapt it",
                    )
        return templates

    def _render(self, name: str, context: Mapping[str, Any]) -> str:
        env = self._env
        out: list[str] = []
        size = 0
        try:
            with env.budget(MAX_RENDER_SECONDS):
                # Chunk by chunk, so that a template writing without end is
                # stopped at the limit instead of filling the memory.
                chunks = self._templates[name].generate(context)
                while batch := list(itertools.islice(chunks, 256)):
                    size += sum(map(len, batch))
                    if size > MAX_RENDER_CHARS:
                        raise TemplateLimitError(
                            f"the template writes more than {MAX_RENDER_CHARS // 1024 // 1024} "
                            "million characters"
                        )
                    out += batch
                    env.check_time()
        except (Exception, MemoryError, RecursionError) as exc:
            raise self._render_error(name, exc) from exc
        return "".join(out)

    def _render_error(self, name: str, exc: Exception) -> ConfigError:
        path, line = self._templates_dir / name, None
        # Jinja rewrites tracebacks so template frames carry the template file
        # and line; the innermost one is where the problem is.
        for frame, lineno in traceback.walk_tb(exc.__traceback__):
            filename = frame.f_code.co_filename
            if filename.endswith(".j2"):
                path, line = Path(filename), lineno
        if isinstance(exc, TemplateLimitError | MemoryError | RecursionError | OverflowError):
            what = str(exc) if isinstance(exc, TemplateLimitError) else type(exc).__name__
            if isinstance(exc, OverflowError):
                what = f"a number or range is too large ({exc})"
            elif isinstance(exc, RecursionError):
                what = "a macro or loop calls itself without end"
            return ConfigError.single(
                path,
                f"the template is too large to render: {what}",
                line=line,
                hint="a mail is at most a few pages: check loops (range() is limited to "
                "100000 steps) and repeated text on this line",
            )
        if isinstance(exc, SecurityError):
            return ConfigError.single(
                path,
                f"the template uses something templates may not use: {exc}",
                line=line,
                hint=_CONFINED_HINT,
            )
        if isinstance(exc, jinja2.UndefinedError):
            return ConfigError.single(
                path,
                f"unknown variable or attribute: {exc.message}",
                line=line,
                hint=f"check the spelling; templates can use: {_VARIABLES}",
            )
        return ConfigError.single(
            path,
            f"the template failed while rendering: {type(exc).__name__}: {exc}",
            line=line,
            hint="check the expression on this line",
        )

    # -- materials --

    def _load_materials(
        self, config_dir: Path, problems: ProblemCollector
    ) -> dict[str, tuple[File, ...]]:
        limit = self._settings.limits.max_attachment_bytes
        loaded: dict[str, tuple[File, ...]] = {}
        series_path = config_dir / SERIES_FILE
        try:
            series_lines = series_path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError):
            series_lines = []
        folder = _materials_folder(config_dir)
        for event in self._series.events:
            files = []
            lines = []
            entries = [m.file for m in event.materials if m.file is not None]
            if len(entries) > MAX_MATERIAL_FILES:
                problems.add(
                    series_path,
                    f"{len(entries)} material files for {event.id!r}, more than "
                    f"{MAX_MATERIAL_FILES} can be attached to one mail",
                    line=_line_of(series_lines, str(entries[0])),
                    hint="attach a few files and link the rest with url:",
                )
                continue
            for entry in entries:
                line = _line_of(series_lines, str(entry))
                try:
                    data = _read_material(config_dir, entry, folder, limit)
                except _MaterialProblem as exc:
                    problems.add(
                        series_path,
                        f"material file {str(entry)!r} of {event.id!r} {exc.what}",
                        line=line,
                        hint=exc.hint,
                    )
                    continue
                name = entry.name
                if UNSAFE_HEADER_TEXT.search(name):
                    problems.add(
                        series_path,
                        f"the name of the material file {str(entry)!r} of {event.id!r} "
                        "contains a control character",
                        line=line,
                        hint="rename the file (letters, digits, - and _ are safe)",
                    )
                    continue
                guessed, _ = mimetypes.guess_type(name)
                maintype, subtype = (guessed or "application/octet-stream").split("/", 1)
                files.append(File(name, data, maintype, subtype))
                lines.append(line)
            total = sum(len(f.data) for f in files)
            if total > limit:
                listed = ", ".join(f"{f.filename} ({_size(len(f.data))})" for f in files)
                problems.add(
                    series_path,
                    f"the files attached to the follow-up of {event.id!r} are {_size(total)} "
                    f"together, more than the limit of {_size(limit)}: {listed}",
                    line=next((n for n in lines if n is not None), None),
                    hint=_TOO_BIG_HINT,
                )
            loaded[event.id] = tuple(files)
        return loaded


def _check_header_values(
    settings: Settings, series: Series, config_dir: Path, problems: ProblemCollector
) -> None:
    """Values of the config files that end up in headers hold no line break or
    control character: one would split the header (or make the standard
    library refuse the whole mail)."""
    sender = settings.sender
    values = [
        (config_dir / SETTINGS_FILE, "[sender] address", sender.address),
        (config_dir / SETTINGS_FILE, "[sender] reply_to", sender.reply_to),
        (config_dir / SETTINGS_FILE, "[sender] unsubscribe_mailto", sender.unsubscribe_mailto),
        (config_dir / SETTINGS_FILE, "[sender] unsubscribe_url", sender.unsubscribe_url),
        (config_dir / SERIES_FILE, "the series title", series.title),
        (config_dir / SERIES_FILE, "the series id", series.id),
        *((config_dir / SERIES_FILE, f"the id of the date {e.id!r}", e.id) for e in series.events),
    ]
    for path, what, value in values:
        found = UNSAFE_HEADER_TEXT.search(value)
        if found is not None:
            kind = (
                "a line break" if found.group() in "\r\n\u2028\u2029\x85" else "a control character"
            )
            problems.add(
                path,
                f"{what} contains {kind} ({found.group()!r}), which cannot go into a mail header: "
                f"{value!r}",
                hint="write it on one line"
                + (" (no | or > block in YAML)" if path.name == SERIES_FILE else ""),
            )


class _MaterialProblem(Exception):
    def __init__(self, what: str, hint: str) -> None:
        super().__init__(what)
        self.what = what
        self.hint = hint


_MATERIALS_HINT = (
    f"put the file into the folder {MATERIALS_DIR}/ beside series.yaml and write "
    f"file: {MATERIALS_DIR}/<name>; only files in that folder are attached"
)
_HARD_LINK = "is a hard link to another file"
_HARD_LINK_HINT = f"copy the file into {MATERIALS_DIR}/ instead"
_TOO_BIG_HINT = (
    "link large files with url: instead of file: (or raise "
    "[limits] max_attachment_bytes in settings.toml)"
)


def _materials_folder(config_dir: Path) -> Path | None:
    """The materials folder, resolved, if it is a folder inside the config folder.

    A materials folder that is itself a link leading elsewhere (``/proc/self``,
    a folder outside) would make every file there count as "inside" it.
    """
    try:
        root = config_dir.resolve(strict=True)
        folder = (config_dir / MATERIALS_DIR).resolve(strict=True)
    except (OSError, RuntimeError):
        return None
    if folder == root or not folder.is_relative_to(root) or not folder.is_dir():
        return None
    return folder


def _read_material(config_dir: Path, entry: Path, folder: Path | None, limit: int) -> bytes:
    """The bytes of a material file, which must be a regular file in *folder*.

    The path is resolved (symlinks followed) before anything is opened, so
    neither "../" nor an absolute path nor a link can reach the secrets of
    the machine; the size is known before a byte is read, and the file that
    is opened must be the one that was checked.
    """
    path = config_dir / entry
    try:
        resolved = path.resolve(strict=True)
    except FileNotFoundError:
        raise _MaterialProblem(f"does not exist (looked for {path})", _MATERIALS_HINT) from None
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop
        raise _MaterialProblem(f"cannot be read ({_reason(exc)})", _MATERIALS_HINT) from None
    if folder is None or not resolved.is_relative_to(folder):
        where = f" (it leads to {resolved})" if resolved != path.absolute() else ""
        if folder is None and (config_dir / MATERIALS_DIR).is_symlink():
            where = f" (the folder {MATERIALS_DIR}/ is a link leading outside the config folder)"
        raise _MaterialProblem(
            f"lies outside the folder {MATERIALS_DIR}/ of the config{where}", _MATERIALS_HINT
        )
    try:
        checked = os.stat(resolved)
        if not stat.S_ISREG(checked.st_mode):
            raise _MaterialProblem(
                "is not a regular file", f"only ordinary files can be attached; {_MATERIALS_HINT}"
            )
        # A hard link is the very file it links to (/etc/passwd, say): no
        # path check can tell, so only files with one name are attached.
        if checked.st_nlink > 1:
            raise _MaterialProblem(_HARD_LINK, _HARD_LINK_HINT)
        if checked.st_size > limit:
            raise _MaterialProblem(
                f"is too large: {entry.name} ({_size(checked.st_size)}), more than the "
                f"limit of {_size(limit)}",
                _TOO_BIG_HINT,
            )
        # O_NONBLOCK: should the file have been swapped for a FIFO meanwhile,
        # the open does not wait for a writer; fstat then tells.
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
        fd = os.open(resolved, flags)
        with os.fdopen(fd, "rb") as file:
            opened = os.fstat(file.fileno())
            if (opened.st_dev, opened.st_ino) != (checked.st_dev, checked.st_ino) or not (
                stat.S_ISREG(opened.st_mode)
            ):
                raise _MaterialProblem(
                    "changed while it was being read", "save the file again, then retry"
                )
            if opened.st_nlink > 1:
                raise _MaterialProblem(_HARD_LINK, _HARD_LINK_HINT)
            # Bounded whatever st_size says: files of /proc and the like report 0.
            data = file.read(limit + 1)
    except OSError as exc:
        raise _MaterialProblem(f"cannot be read ({_reason(exc)})", _MATERIALS_HINT) from None
    if len(data) > limit:
        raise _MaterialProblem(f"is larger than the limit of {_size(limit)}", _TOO_BIG_HINT)
    return data


def _reason(exc: BaseException) -> str:
    return str(getattr(exc, "strerror", None) or exc)


# --- helpers ---------------------------------------------------------------------------


def _environment(templates_dir: Path) -> _Sandbox:
    env = _Sandbox(
        loader=_ConfinedLoader(templates_dir),
        autoescape=jinja2.select_autoescape(
            enabled_extensions=("html.j2",), default_for_string=False, default=False
        ),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=False,
        auto_reload=False,
    )
    env.filters["paragraphs"] = paragraphs
    env.filters["wrap"] = wrap
    env.filters["heading"] = heading
    env.filters["typeset"] = typeset
    env.filters["zahlwort"] = german.number_word
    env.globals["lipsum"] = _bounded_lipsum
    for name, func in list(env.filters.items()):
        plain, size = _GROWING.get(name, (func, _GROWING_HELPERS.get(name)))
        env.filters[name] = _bounded_filter(plain, size)
    return env


def _changes(previous: Mapping[str, str], event: Event) -> tuple[Change, ...]:
    """What differs between the version a recipient saw and the current one."""
    current = event.fingerprint()
    changes = []

    def when(fingerprint: Mapping[str, str]) -> str:
        start = datetime.fromisoformat(fingerprint["start"])
        end = datetime.fromisoformat(fingerprint["end"])
        return f"{german.date_long(start.date())}, {german.time_range(start.time(), end.time())}"

    if (previous.get("start"), previous.get("end")) != (current["start"], current["end"]):
        changes.append(Change("Datum und Uhrzeit", when(previous), when(current)))
    if previous.get("title") != current["title"]:
        changes.append(Change("Thema", previous.get("title", ""), current["title"]))
    if previous.get("join_url") != current["join_url"]:
        changes.append(
            Change("Zugangslink", previous.get("join_url") or "–", current["join_url"] or "–")
        )
    return tuple(changes)


def _line_of(lines: list[str], text: str) -> int | None:
    """The first line (1-based) that mentions *text*: where a file: entry stands."""
    return next((number for number, line in enumerate(lines, 1) if text in line), None)


def _part(name: str) -> bool:
    return name.endswith(".subject.j2")


# The text helpers below are pure and mostly see the same series texts for
# every recipient, so they are cached.


@lru_cache(maxsize=4096)
def paragraphs(text: str) -> tuple[str, ...]:
    """Paragraphs of *text* (split at blank lines), each on one line."""
    blocks = re.split(r"\n\s*\n", str(text).strip())
    return tuple(" ".join(block.split()) for block in blocks if block.strip())


@lru_cache(maxsize=4096)
def typeset(text: str) -> Markup:
    """HTML-escaped text where no line starts with a dash: "und -verwaltung"
    stays together and "–" sticks to the word before it."""
    escaped = str(escape(" ".join(str(text).split())))
    escaped = re.sub(r"(\S+ -\w+)", r'<span style="white-space: nowrap;">\1</span>', escaped)
    return Markup(escaped.replace(" –", "&nbsp;–"))


@lru_cache(maxsize=4096)
def wrap(text: str, width: int = TEXT_WIDTH, indent: str = "") -> str:
    """Plain text wrapped for reading: paragraphs kept, lines ≤ *width*.

    Long words such as URLs are never broken.
    """
    return "\n\n".join(_fill(block, width, indent, indent) for block in paragraphs(text))


# Glues a dash to the word before it while wrapping, so no line starts with
# "-verwaltung" or "– " (looks like a list item); a private-use character
# that cannot occur in real text.
_GLUE = "\ue000"


@lru_cache(maxsize=4096)
def _fill(text: str, width: int, indent: str, hang: str) -> str:
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
    out: list[str] = []
    for raw in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        line = raw.rstrip()
        if line == "--":
            out.append("-- ")
        elif len(line) <= width:
            out.append(line)
        else:
            indent = line[: len(line) - len(line.lstrip())]
            hang = indent + ("  " if line.lstrip().startswith("- ") else "")
            out.append(_fill(line.strip(), width, indent, hang))
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip("\n") + "\n"


def _syntax_hint(message: str) -> str:
    if "end of template" in message or "endif" in message or "endfor" in message:
        return (
            "every {% if %}, {% for %} and {% block %} needs its {% endif %}, "
            "{% endfor %} or {% endblock %}"
        )
    if "unknown tag" in message:
        return "check the spelling of the tag between {% and %}"
    return "check the {{ }} and {% %} pairs on this line and the line before"


def _series_view(series: Series) -> SeriesView:
    return SeriesView(
        id=series.id,
        title=series.title,
        subtitle=series.subtitle,
        description=series.description.strip(),
        audience=series.audience.strip(),
        registration_url=str(series.registration_url) if series.registration_url else None,
        privacy_url=str(series.privacy_url) if series.privacy_url else None,
        imprint=series.imprint.strip(),
        organiser=OrganiserView(series.organiser.name, str(series.organiser.email)),
    )


def _material_view(material: Material, files: Mapping[str, File]) -> MaterialView:
    if material.file is not None:
        file = files.get(material.file.name)
        return MaterialView(
            title=material.title,
            description=material.description,
            url=None,
            filename=material.file.name,
            size=_size(len(file.data)) if file is not None else None,
        )
    return MaterialView(
        title=material.title,
        description=material.description,
        url=str(material.url),
        filename=None,
        size=None,
    )


def _qp_size(text: str) -> int:
    """About the quoted-printable size of *text*: three octets for each
    non-ASCII one, plus the soft line breaks."""
    octets = len(text.encode("utf-8"))
    encoded = octets + 2 * (octets - len(text.encode("ascii", "ignore")))
    return encoded + encoded // 25  # "=\r\n" every 75 characters


def _base64_size(octets: int) -> int:
    return (octets + 2) // 3 * 4 * 78 // 76


def _size(octets: int) -> str:
    """ "240 KB", "1,2 MB" (German decimal comma)."""
    if octets < 1024 * 1024:
        return f"{max(1, round(octets / 1024))} KB"
    return f"{octets / (1024 * 1024):.1f} MB".replace(".", ",")
