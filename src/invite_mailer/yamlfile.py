"""YAML reading that remembers where each value stood.

Organisers need line numbers in error messages, so the document is composed
into nodes first; every value's line is kept under its path (``("events", 2,
"date")``), which is exactly the shape of a pydantic error location.

The loader is YAML 1.2-ish on purpose: ``14:00`` stays the text "14:00" (YAML
1.1 would read it as the base-60 number 840) and dates stay text, so that an
impossible date like 2024-11-31 becomes a clear validation message with a line
instead of a crash inside the parser.
"""

from __future__ import annotations

import re
from collections.abc import Hashable
from pathlib import Path
from typing import Any

import yaml

from invite_mailer.errors import ConfigError, Problem

Path_ = tuple[str | int, ...]


class _Loader(yaml.SafeLoader):
    pass


# Copy the resolvers without numbers and timestamps, then add numbers back
# without YAML 1.1's base-60 forms.
_Loader.yaml_implicit_resolvers = {
    key: [
        (tag, regexp)
        for tag, regexp in resolvers
        if tag
        not in (
            "tag:yaml.org,2002:timestamp",
            "tag:yaml.org,2002:int",
            "tag:yaml.org,2002:float",
        )
    ]
    for key, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:int",
    re.compile(
        r"^(?:[-+]?0b[0-1_]+|[-+]?0o?[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"
    ),
    list("-+0123456789"),
)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+][0-9]+)?|\.[0-9][0-9_]*(?:[eE][-+][0-9]+)?"
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+0123456789."),
)


class LocatedDocument:
    """A parsed YAML document plus the line of every value in it."""

    def __init__(self, data: Any, lines: dict[Path_, int]) -> None:
        self.data = data
        self.lines = lines

    def line_of(self, path: Path_) -> int | None:
        """The line of *path*, or of its nearest parent that has one."""
        parts = tuple(path)
        while parts:
            if parts in self.lines:
                return self.lines[parts]
            parts = parts[:-1]
        return self.lines.get((), None)


def load_yaml(path: Path) -> LocatedDocument:
    """Parse *path*; raise :class:`ConfigError` with line numbers on bad syntax."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ConfigError.single(
            path,
            "file not found",
            hint="create it, or pass --config pointing at your config folder",
        ) from None
    except UnicodeDecodeError:
        raise ConfigError.single(
            path, "the file is not UTF-8 text", hint="save it as UTF-8 in your editor"
        ) from None
    return parse_yaml(text, path)


def parse_yaml(text: str, path: Path | None = None) -> LocatedDocument:
    try:
        node = yaml.compose(text, Loader=_Loader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        problem = exc.problem or "the file is not valid YAML"
        raise ConfigError.single(
            path,
            f"YAML syntax error: {problem}",
            line=line,
            hint="check indentation (spaces, not tabs) and put text containing ': ' or '#' "
            "in quotes",
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigError.single(path, f"YAML error: {exc}") from None
    if node is None:
        return LocatedDocument(None, {})
    lines: dict[Path_, int] = {}
    problems: list[Problem] = []
    _walk(node, (), lines, problems, path)
    if problems:
        raise ConfigError(problems)
    loader = _Loader(text)
    try:
        data = loader.get_single_data()
    except yaml.YAMLError as exc:  # pragma: no cover - compose already succeeded
        raise ConfigError.single(path, f"YAML error: {exc}") from None
    finally:
        loader.dispose()
    return LocatedDocument(data, lines)


def _walk(
    node: yaml.Node,
    path: Path_,
    lines: dict[Path_, int],
    problems: list[Problem],
    file: Path | None,
) -> None:
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        seen: dict[Hashable, int] = {}
        for key_node, value_node in node.value:
            key = key_node.value
            if key in seen:
                problems.append(
                    Problem(
                        file,
                        f"the key {key!r} appears twice (first on line {seen[key]})",
                        key_node.start_mark.line + 1,
                        "delete one of them; otherwise the second silently wins",
                    )
                )
            seen[key] = key_node.start_mark.line + 1
            _walk(value_node, (*path, key), lines, problems, file)
            lines[(*path, key)] = key_node.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _walk(item, (*path, index), lines, problems, file)
