"""The filters templates can use, each bounded in what it builds.

Every filter is wrapped, so it is bounded however it is called: directly, or
through map(), select() and the like, which bypass the sandbox's call().
Filters whose result can be far larger than their arguments have a check
that estimates the result from the arguments before it is built; for all
others the result (at most a small multiple of the input) is counted.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable
from typing import Any

import jinja2
from jinja2 import filters

from invite_mailer.inputs import typeset
from invite_mailer.inputs.sandbox import (
    MAX_RENDER_CHARS,
    TemplateLimitError,
    bounded_lipsum,
    percent_size,
    reserve,
    weight_of,
)


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
    return percent_size(str(a["value"]), a["kwargs"] or a["args"])


def _filled_size(count_name: str) -> Callable[[dict[str, Any]], int]:
    def size(a: dict[str, Any]) -> int:
        count, fill = a[count_name], a["fill_with"]
        if not isinstance(count, int):
            return 0
        if count > MAX_RENDER_CHARS:
            raise TemplateLimitError(f"a {count_name} of {count:,} items is too large")
        weight = weight_of(fill) if isinstance(fill, str | bytes | list | tuple) else 1
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
    return sum(weight_of(p) if isinstance(p, str | bytes | list | tuple) else 1 for p in parts)


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
# The same for the template language's own filters (see typeset).
_GROWING_HELPERS: dict[str, Callable[[dict[str, Any]], int]] = {
    "heading": _heading_size,
    "wrap": _wrap_size,
}
# Texts longer than this skip the caches of the text helpers.
_CACHED_CHARS = 64 * 1024


def bounded_filter(func: Callable[..., Any], size: Callable[[dict[str, Any]], int] | None) -> Any:
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
            reserve(size(arguments))
            args, kwargs = (), arguments
        elif signature is not None and size is not None:
            # Also where the arguments do not fit: bind() says what is wrong.
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            reserve(size(bound.arguments))
            args, kwargs = bound.args, bound.kwargs
        if any(isinstance(a, str) and len(a) > _CACHED_CHARS for a in (*args, *kwargs.values())):
            call = uncached
        result = call(*args, **kwargs)
        if isinstance(result, str | bytes | list | tuple):
            reserve(len(result))
        return result

    return bounded


def _chars(count: int) -> str:
    return f"{count:,} characters".replace(",", ".")


def add_filters(env: jinja2.Environment) -> None:
    """Give *env* the template language's own filters, and bound every filter."""
    env.filters["paragraphs"] = typeset.paragraphs
    env.filters["wrap"] = typeset.wrap
    env.filters["heading"] = typeset.heading
    env.filters["typeset"] = typeset.typeset
    env.filters["zahlwort"] = typeset.number_word
    env.filters["shorten"] = typeset.shorten
    env.filters["nobreak"] = typeset.nobreak
    env.globals["lipsum"] = bounded_lipsum
    for name, func in list(env.filters.items()):
        plain, size = _GROWING.get(name, (func, _GROWING_HELPERS.get(name)))
        env.filters[name] = bounded_filter(plain, size)
