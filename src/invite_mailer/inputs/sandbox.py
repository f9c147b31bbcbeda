"""The sandbox organisers' templates run in: Jinja's, bounded in time and size.

Templates are organisers' files, so they are input, not code: they run in
Jinja's sandbox (no Python internals, no changing shared objects), may only
load files of the templates folder, and every render is bounded in output
and time so that a runaway loop or "x" * 10**9 ends as a template error.
"""

from __future__ import annotations

import functools
import math
import re
import threading
import time
import types
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.exceptions import SecurityError
from jinja2.runtime import Context, LoopContext
from jinja2.sandbox import (
    ImmutableSandboxedEnvironment,
    SandboxedEscapeFormatter,
    SandboxedFormatter,
)
from jinja2.utils import generate_lorem_ipsum
from markupsafe import Markup

from invite_mailer.inputs.contacts import Contact


class View:
    """Base of the records handed to templates: frozen plain data whose public
    attributes templates may all read.

    The sandbox skips its generic checks for them, which keeps it nearly free
    (a mail reads ~150 attributes).
    """

    __slots__ = ()


# Other types whose public attributes are all safe to read.
_PLAIN: frozenset[type] = frozenset({Contact, LoopContext})

#: The most characters one template may write (or any one value may have).
MAX_RENDER_CHARS = 2 * 1024 * 1024
#: The most seconds rendering one template may take.
MAX_RENDER_SECONDS = 5.0
# The most bits an integer computed in a template may have (10**1000 is fine).
_MAX_INT_BITS = 64 * 1024


class TemplateLimitError(SecurityError):
    """A template went beyond the output size or time it may take."""


#: The most characters the filters and operators of one render may build in
#: all; each value is bounded on its own, this bounds many values together
#: (a filter applied to every item of a long list).
MAX_BUILT_CHARS = 16 * MAX_RENDER_CHARS


class _Budget(threading.local):
    deadline: float = math.inf
    seconds: float = MAX_RENDER_SECONDS
    ticks: int = 0
    built: int = 0


_BUDGET = _Budget()


def reserve(size: int) -> None:
    """Count a value of *size* characters against the render, before it is built."""
    if size > MAX_RENDER_CHARS:
        raise TemplateLimitError(too_long(size))
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


class Sandbox(ImmutableSandboxedEnvironment):
    code_generator_class = _BoundedCodeGenerator
    intercepted_binops = frozenset({"*", "**", "+", "-", "%", "<<"})

    @contextmanager
    def budget(self, seconds: float) -> Iterator[None]:
        """Bound the rendering done inside the block to *seconds* (and what it builds)."""
        budget = _BUDGET
        saved = budget.deadline, budget.seconds, budget.built
        budget.deadline, budget.seconds, budget.built = time.monotonic() + seconds, seconds, 0
        try:
            yield
        finally:
            budget.deadline, budget.seconds, budget.built = saved

    def tick(self) -> None:
        budget = _BUDGET
        budget.ticks += 1
        if budget.ticks % 256 == 0:
            self.check_time()

    def check_time(self) -> None:
        if time.monotonic() > _BUDGET.deadline:
            raise TemplateLimitError(
                f"rendering took longer than {_BUDGET.seconds:g} seconds (a loop that "
                "runs too often?)"
            )

    def bounded(self, value: Any) -> Any:
        if isinstance(value, str | bytes | list | tuple) and len(value) > MAX_RENDER_CHARS:
            raise TemplateLimitError(too_long(len(value)))
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
                size = weight_of(left) + weight_of(right)
                if size > MAX_RENDER_CHARS:
                    raise TemplateLimitError(too_long(size))
        elif operator == "%" and isinstance(left, str):
            reserve(percent_size(left, right))
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
        if (type(obj) in _PLAIN or isinstance(obj, View)) and not attribute.startswith("_"):
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
        check_format(text)
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
            raise TemplateLimitError(too_long(self._written))
        return result


class _BoundedEscapeFormatter(_BoundedFormatter, SandboxedEscapeFormatter):
    pass


_DIGITS = re.compile(r"[0-9]+")


def too_long(length: int) -> str:
    return (
        f"a text of {length:,} characters is more than the limit of {MAX_RENDER_CHARS:,}"
    ).replace(",", ".")


def weight_of(value: str | bytes | list[Any] | tuple[Any, ...]) -> int:
    """The characters *value* stands for: a list of long texts weighs their lengths."""
    if isinstance(value, str | bytes):
        return len(value)
    return sum(len(v) if isinstance(v, str | bytes | list | tuple) else 1 for v in value)


def _check_repeat(sequence: Any, count: Any) -> None:
    if isinstance(sequence, str | bytes | list | tuple) and isinstance(count, int):
        reserve(weight_of(sequence) * max(0, count))


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


def check_numbers(args: Iterable[Any], kwargs: Mapping[str, Any]) -> None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, int) and value > MAX_RENDER_CHARS:
            raise TemplateLimitError(f"a width of {value:,} is too large")


def bounded_lipsum(n: int = 5, html: bool = True, min: int = 20, max: int = 100) -> Any:  # noqa: A002
    if n > 100 or max > 1000:
        raise TemplateLimitError("lipsum() this long is too large")
    return generate_lorem_ipsum(n=n, html=html, min=min, max=max)


def percent_size(text: str, values: Any) -> int:
    """About the length of ``text % values``, and huge widths refused."""
    check_format(text)
    items = tuple(values) if isinstance(values, tuple) else (values,)
    if "*" in text:  # "%*s": the width is an argument
        check_numbers(items, {})
    if isinstance(values, Mapping):  # "%(a)s%(a)s": a name may be used again and again
        lengths = [len(v) for v in values.values() if isinstance(v, str)]
        return len(text) + text.count("%") * max(lengths, default=0)
    return len(text) + sum(len(v) for v in items if isinstance(v, str))


def check_format(text: str) -> None:
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
            raise TemplateLimitError(too_long(len(text) + grows))
