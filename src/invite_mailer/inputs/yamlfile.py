"""Reading organiser files safely, and YAML that remembers where each value stood.

Organisers' files are input, not code: :func:`read_config_file` reads only
regular files inside the config folder, and only up to a size limit, so a FIFO,
a device, a link to ``/dev/zero`` or an oversized export ends in a clear
message instead of a hang or an exhausted machine. Every loader of ``config/``
reads through it.

Organisers need line numbers in error messages, so the document is composed
into nodes first; every value's line is kept under its path (``("events", 2,
"date")``), which is exactly the shape of a pydantic error location. Aliases
(``*name``) are counted while doing so: a document that expands into a huge
tree ("billion laughs") is refused before anything else walks it.

The loader is YAML 1.2-ish on purpose: ``14:00`` stays the text "14:00" (YAML
1.1 would read it as the base-60 number 840) and dates stay text, so that an
impossible date like 2024-11-31 becomes a clear validation message with a line
instead of a crash inside the parser.
"""

from __future__ import annotations

import os
import re
import stat
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


# --- reading files -------------------------------------------------------------------

#: The largest series.yaml read: the shipped one has 5 KB; two megabytes hold
#: hundreds of dates with long descriptions.
MAX_YAML_BYTES = 2 * 1024 * 1024

#: YAML aliases that repeat a list or mapping, and values in the expanded
#: document: generous for hand-written files, far below what hurts.
MAX_ALIASES = 100
MAX_NODES = 200_000

_KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a device"),
    (stat.S_ISBLK, "a device"),
    (stat.S_ISSOCK, "a socket"),
)


def megabytes(size: int) -> str:
    """*size* for messages: "350 KB" below a megabyte, else "2.1 MB"; never 0 when not empty."""
    if size < 1_000_000:
        return f"{max(round(size / 1000), 1)} KB" if size else "0 KB"
    return f"{size / 1_000_000:.1f} MB"


def read_config_file(path: Path, *, limit: int, root: Path | None = None) -> bytes:
    """The bytes of an organiser's file: a regular file of at most *limit* bytes.

    Links are followed, but only to files inside *root* (default: the folder
    of *path*, i.e. the config folder for its own files). FIFOs, devices and
    folders are refused without blocking: the file is opened non-blocking and
    checked with ``fstat`` before a byte is read. The size is checked before
    reading and again while reading (a file can grow in between), so at most
    *limit* + 1 bytes are ever read.
    """
    base = (root if root is not None else path.parent).resolve()
    resolved = _resolve_inside(path, base)
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(resolved, flags)
    except OSError as exc:
        raise ConfigError.single(
            path,
            f"cannot read the file: {exc.strerror or exc}",
            hint="check that the file exists and that invite-mailer may read it",
        ) from None
    try:
        _check_opened(path, fd, base, limit)
        data = _read_at_most(fd, limit + 1)
    except OSError as exc:
        raise ConfigError.single(path, f"cannot read the file: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    if len(data) > limit:
        raise _too_large(path, len(data), limit)
    return data


def _resolve_inside(path: Path, base: Path) -> Path:
    """Where *path* leads, refused unless that is inside *base*."""
    try:
        resolved = path.resolve(strict=True)
    except FileNotFoundError:
        message = "file not found"
        if path.is_symlink():
            message = "file not found: it is a link to a file that does not exist"
        raise ConfigError.single(
            path,
            message,
            hint="create it, or pass --config pointing at your config folder",
        ) from None
    except (OSError, RuntimeError) as exc:  # a link loop, or a folder we may not enter
        raise ConfigError.single(
            path,
            f"cannot read the file: {getattr(exc, 'strerror', None) or exc}",
            hint="replace the link with an ordinary file",
        ) from None
    if not resolved.is_relative_to(base):
        raise ConfigError.single(
            path,
            "the file is a link that points outside the config folder",
            hint="copy the file into the config folder instead of linking to it",
        )
    return resolved


def _check_opened(path: Path, fd: int, base: Path, limit: int) -> None:
    """Refuse what *fd* turned out to be: outside *base*, not a regular file, too large."""
    # A folder on the way may have been swapped for a link since the path
    # was resolved: what counts is the file actually opened.
    opened = _opened_path(fd)
    if opened is not None and not opened.is_relative_to(base):
        raise ConfigError.single(
            path,
            "the file changed into a link that points outside the config folder",
            hint="copy the file into the config folder instead of linking to it",
        )
    info = os.fstat(fd)
    for test, kind in _KINDS:
        if test(info.st_mode):
            raise ConfigError.single(
                path,
                f"not a regular file: it is {kind}",
                hint="replace it with an ordinary file; invite-mailer reads only regular files",
            )
    if not stat.S_ISREG(info.st_mode):
        raise ConfigError.single(
            path, "not a regular file", hint="replace it with an ordinary file"
        )
    if info.st_size > limit:
        raise _too_large(path, info.st_size, limit)


def _read_at_most(fd: int, size: int) -> bytes:
    """Up to *size* bytes of *fd*: a file can grow after it was checked."""
    chunks: list[bytes] = []
    left = size
    while left > 0:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _opened_path(fd: int) -> Path | None:
    """Where an open file really is (Linux names it under /proc); None elsewhere."""
    try:
        return Path(os.readlink(f"/proc/self/fd/{fd}"))
    except OSError:
        return None


def _too_large(path: Path, size: int, limit: int) -> ConfigError:
    return ConfigError.single(
        path,
        f"the file is too large ({megabytes(size)}; at most {megabytes(limit)} are read)",
        hint="check that this is the right file; organiser files are small text files",
    )


# --- YAML ------------------------------------------------------------------------------


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


def load_yaml(path: Path, *, limit: int = MAX_YAML_BYTES) -> LocatedDocument:
    """Parse *path*; raise :class:`ConfigError` with line numbers on bad syntax."""
    data = read_config_file(path, limit=limit)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError.single(
            path,
            "the file is not UTF-8 text",
            line=data[: exc.start].count(b"\n") + 1,
            hint="save it as UTF-8 in your editor",
        ) from None
    return parse_yaml(text, path)


def parse_yaml(text: str, path: Path | None = None) -> LocatedDocument:
    try:
        node = yaml.compose(text, Loader=_Loader)
    except RecursionError:
        raise ConfigError.single(
            path,
            "the document is nested too deeply to be read",
            hint="series.yaml needs a few levels of indentation; check for runaway brackets",
        ) from None
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
    _walk(node, (), lines, problems, _Budget(path), node.start_mark.line + 1)
    if problems:
        raise ConfigError(problems)
    loader = _Loader(text)
    try:
        data = loader.get_single_data()
    except yaml.MarkedYAMLError as exc:  # tags such as !!python/object: never code
        mark = exc.problem_mark or exc.context_mark
        raise ConfigError.single(
            path,
            f"YAML error: {exc.problem or exc.context or 'a value cannot be read'}",
            line=mark.line + 1 if mark else None,
            hint="write plain values; tags starting with '!' are not supported",
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigError.single(path, f"YAML error: {exc}") from None
    finally:
        loader.dispose()
    return LocatedDocument(data, lines)


class _Budget:
    """Counts what walking the composed document costs, and stops it in time."""

    def __init__(self, file: Path | None) -> None:
        self.file = file
        self.aliases = 0
        self.nodes = 0
        self.seen: set[int] = set()
        self.open: set[int] = set()  # collections being walked: an alias to one is a loop

    def refuse(self, message: str, line: int | None) -> ConfigError:
        return ConfigError.single(
            self.file,
            message,
            line=line,
            hint="write the values out instead of repeating them with YAML aliases (*name)",
        )


def _walk(
    node: yaml.Node,
    path: Path_,
    lines: dict[Path_, int],
    problems: list[Problem],
    budget: _Budget,
    used_at: int,
) -> None:
    budget.nodes += 1
    if budget.nodes > MAX_NODES:
        raise budget.refuse(f"the document expands to more than {MAX_NODES:,} values", used_at)
    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.ScalarNode):
        return
    # Composed aliases are the very node they name: a node met again is an alias.
    ident = id(node)
    if ident in budget.open:
        raise budget.refuse("a YAML alias refers to itself (the value contains itself)", used_at)
    if ident in budget.seen:
        budget.aliases += 1
        if budget.aliases > MAX_ALIASES:
            raise budget.refuse(
                f"too many YAML aliases (*name): more than {MAX_ALIASES} repeat a list or mapping",
                used_at,
            )
    budget.seen.add(ident)
    budget.open.add(ident)
    if isinstance(node, yaml.MappingNode):
        seen: dict[Hashable, int] = {}
        for key_node, value_node in node.value:
            key_line = key_node.start_mark.line + 1
            if not isinstance(key_node, yaml.ScalarNode):
                raise ConfigError.single(
                    budget.file,
                    "a key is a list or mapping; keys must be plain words",
                    line=key_line,
                    hint="write keys like 'title:'; remove the '?' or brackets before the colon",
                )
            key = key_node.value
            if key in seen:
                problems.append(
                    Problem(
                        budget.file,
                        f"the key {key!r} appears twice (first on line {seen[key]})",
                        key_line,
                        "delete one of them; otherwise the second silently wins",
                    )
                )
            seen[key] = key_line
            lines[(*path, key)] = key_line
            _walk(value_node, (*path, key), lines, problems, budget, key_line)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _walk(item, (*path, index), lines, problems, budget, used_at)
    budget.open.discard(ident)
