"""Reading the material files a follow-up attaches (``file:`` in series.yaml).

Material files are organiser files like the others: read once, when the
config is loaded, and only from the folder ``materials/`` of the config
folder, so no path in series.yaml can reach another file of the machine.
"""

from __future__ import annotations

import mimetypes
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from invite_mailer.errors import ProblemCollector
from invite_mailer.inputs.series import SERIES_FILE, Event, Series

#: The folder (inside the config folder) that material files are attached from.
MATERIALS_DIR = "materials"
#: The most material files one mail attaches.
MAX_MATERIAL_FILES = 20
#: The method of a calendar file that publishes dates (iTIP ``PUBLISH``).
PUBLISH = "PUBLISH"

# Control characters and line separators (what str.splitlines() breaks at):
# never allowed in a header.
UNSAFE_HEADER_TEXT = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


@dataclass(frozen=True, slots=True)
class File:
    """A file attached to a mail: a calendar file or a material."""

    filename: str
    data: bytes
    maintype: str
    subtype: str
    method: str = PUBLISH  # for text/calendar parts


#: Per date id: the material files its follow-up attaches.
Materials = Mapping[str, tuple[File, ...]]


def load_materials(
    series: Series, config_dir: Path, limit: int, problems: ProblemCollector
) -> dict[str, tuple[File, ...]]:
    """The material files of every date, each at most *limit* bytes (and all
    of one date together); what is wrong goes to *problems*."""
    series_path = config_dir / SERIES_FILE
    try:
        series_lines = series_path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        series_lines = []
    reader = _Reader(config_dir, materials_folder(config_dir), limit, series_lines, problems)
    loaded: dict[str, tuple[File, ...]] = {}
    for event in series.events:
        files = reader.files_of(event)
        if files is not None:
            loaded[event.id] = files
    return loaded


@dataclass
class _Reader:
    config_dir: Path
    folder: Path | None
    limit: int
    series_lines: list[str]
    problems: ProblemCollector

    @property
    def series_path(self) -> Path:
        return self.config_dir / SERIES_FILE

    def files_of(self, event: Event) -> tuple[File, ...] | None:
        """The files of *event*, or None when it names too many to attach."""
        entries = [m.file for m in event.materials if m.file is not None]
        if len(entries) > MAX_MATERIAL_FILES:
            self.problems.add(
                self.series_path,
                f"{len(entries)} material files for {event.id!r}, more than "
                f"{MAX_MATERIAL_FILES} can be attached to one mail",
                line=_line_of(self.series_lines, str(entries[0])),
                hint="attach a few files and link the rest with url:",
            )
            return None
        files: list[File] = []
        lines: list[int | None] = []
        for entry in entries:
            line = _line_of(self.series_lines, str(entry))
            file = self.file(event, entry, line)
            if file is not None:
                files.append(file)
                lines.append(line)
        total = sum(len(f.data) for f in files)
        if total > self.limit:
            listed = ", ".join(f"{f.filename} ({size_text(len(f.data))})" for f in files)
            self.problems.add(
                self.series_path,
                f"the files attached to the follow-up of {event.id!r} are {size_text(total)} "
                f"together, more than the limit of {size_text(self.limit)}: {listed}",
                line=next((n for n in lines if n is not None), None),
                hint=_TOO_BIG_HINT,
            )
        return tuple(files)

    def file(self, event: Event, entry: Path, line: int | None) -> File | None:
        """The material file *entry* of *event*, or None with the problem added."""
        try:
            data = read_material(self.config_dir, entry, self.folder, self.limit)
        except MaterialProblem as exc:
            self.problems.add(
                self.series_path,
                f"material file {str(entry)!r} of {event.id!r} {exc.what}",
                line=line,
                hint=exc.hint,
            )
            return None
        name = entry.name
        if UNSAFE_HEADER_TEXT.search(name):
            self.problems.add(
                self.series_path,
                f"the name of the material file {str(entry)!r} of {event.id!r} "
                "contains a control character",
                line=line,
                hint="rename the file (letters, digits, - and _ are safe)",
            )
            return None
        guessed, _ = mimetypes.guess_type(name)
        maintype, subtype = (guessed or "application/octet-stream").split("/", 1)
        return File(name, data, maintype, subtype)


def _line_of(lines: list[str], text: str) -> int | None:
    """The first line (1-based) that mentions *text*: where a file: entry stands."""
    return next((number for number, line in enumerate(lines, 1) if text in line), None)


class MaterialProblem(Exception):
    """Why a material file cannot be attached, and what to do about it."""

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


def materials_folder(config_dir: Path) -> Path | None:
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


def read_material(config_dir: Path, entry: Path, folder: Path | None, limit: int) -> bytes:
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
        raise MaterialProblem(f"does not exist (looked for {path})", _MATERIALS_HINT) from None
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop
        raise MaterialProblem(f"cannot be read ({_reason(exc)})", _MATERIALS_HINT) from None
    if folder is None or not resolved.is_relative_to(folder):
        where = f" (it leads to {resolved})" if resolved != path.absolute() else ""
        if folder is None and (config_dir / MATERIALS_DIR).is_symlink():
            where = f" (the folder {MATERIALS_DIR}/ is a link leading outside the config folder)"
        raise MaterialProblem(
            f"lies outside the folder {MATERIALS_DIR}/ of the config{where}", _MATERIALS_HINT
        )
    try:
        checked = os.stat(resolved)
        if not stat.S_ISREG(checked.st_mode):
            raise MaterialProblem(
                "is not a regular file", f"only ordinary files can be attached; {_MATERIALS_HINT}"
            )
        # A hard link is the very file it links to (/etc/passwd, say): no
        # path check can tell, so only files with one name are attached.
        if checked.st_nlink > 1:
            raise MaterialProblem(_HARD_LINK, _HARD_LINK_HINT)
        if checked.st_size > limit:
            raise MaterialProblem(
                f"is too large: {entry.name} ({size_text(checked.st_size)}), more than the "
                f"limit of {size_text(limit)}",
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
                raise MaterialProblem(
                    "changed while it was being read", "save the file again, then retry"
                )
            if opened.st_nlink > 1:
                raise MaterialProblem(_HARD_LINK, _HARD_LINK_HINT)
            # Bounded whatever st_size says: files of /proc and the like report 0.
            data = file.read(limit + 1)
    except OSError as exc:
        raise MaterialProblem(f"cannot be read ({_reason(exc)})", _MATERIALS_HINT) from None
    if len(data) > limit:
        raise MaterialProblem(f"is larger than the limit of {size_text(limit)}", _TOO_BIG_HINT)
    return data


def _reason(exc: BaseException) -> str:
    return str(getattr(exc, "strerror", None) or exc)


def size_text(octets: int) -> str:
    """ "240 KB", "1,2 MB" (German decimal comma)."""
    if octets < 1024 * 1024:
        return f"{max(1, round(octets / 1024))} KB"
    return f"{octets / (1024 * 1024):.1f} MB".replace(".", ",")
