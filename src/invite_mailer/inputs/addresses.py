"""Address lists: ``config/optout.txt`` and the attendance lists of ``config/attendance/``.

One address per line (``#`` starts a comment), or a CSV export with a column
that holds the addresses, as video-conference tools write them. Addresses are
compared as lower-cased keys.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence
from contextlib import closing
from pathlib import Path

from email_validator import EmailNotValidError, validate_email

from invite_mailer.errors import ConfigError, ProblemCollector
from invite_mailer.inputs.fields import EMAIL_LIMIT, column_of, email_hint, known_ids, show
from invite_mailer.inputs.tables import CappedProblems, csv_rows, read_text, text_lines

ATTENDANCE_DIR = "attendance"

#: Lines of an opt-out or attendance list.
MAX_LIST_LINES = 1_000_000


def load_address_list(path: Path) -> frozenset[str]:
    """Addresses from a plain list such as ``config/optout.txt``, as lower-cased keys.

    One address per line; blank lines and ``#`` comments are skipped. A CSV with a
    column ``email`` works too. A missing file is an empty list; a link to a
    missing file is an error (a list that silently vanished would be worse).
    """
    return frozenset(address_lines(path))


def address_lines(path: Path) -> dict[str, int]:
    """Like :func:`load_address_list`, with the first line that names each address."""
    if not path.is_symlink() and not path.exists():
        return {}
    return _read_addresses(path, path.parent)


def load_attendance(
    config_dir: Path, event_ids: Collection[str] | None
) -> dict[str, frozenset[str]]:
    """Who attended which date: ``config/attendance/<event-id>.csv``.

    Returns lower-cased address keys per event id. Events without a file are
    absent from the result (no list given), which is different from an empty
    list (nobody attended). A missing folder gives ``{}``. With *event_ids*
    ``None`` (the series could not be read) the lists are still checked, under
    the names of their files.
    """
    folder = config_dir / ATTENDANCE_DIR
    if not folder.is_dir():
        return {}
    ids = {event_id.casefold(): event_id for event_id in event_ids or ()}
    known = known_ids(event_ids or ())
    problems = ProblemCollector()
    found: dict[str, set[str]] = {}
    for file in sorted(folder.iterdir()):
        name = file.name
        # Hidden files, Office lock files and editor backups are not lists.
        if name.startswith((".", "~$")) or name.endswith("~"):
            continue
        if file.is_dir() and not file.is_symlink():
            continue
        if file.suffix.lower() not in (".csv", ".txt"):
            problems.add(
                file,
                f"{name!r} is not an attendance list (only .csv and .txt files are read)",
                hint="save the list as CSV named <event-id>.csv, one address per line or "
                "with a column 'email'; ids: " + known,
            )
            continue
        event_id = file.stem if event_ids is None else ids.get(file.stem.casefold())
        if event_id is None:
            problems.add(
                file,
                f"{file.stem!r} is not an event id of the series",
                hint=f"name the file after the date's id: {known} (e.g. "
                f"{next(iter(event_ids or ()), 'verwaltung')}.csv)",
            )
            continue
        try:
            found.setdefault(event_id, set()).update(_read_addresses(file, config_dir))
        except ConfigError as exc:
            problems.extend(exc)
    problems.raise_if_any()
    return {event_id: frozenset(keys) for event_id, keys in found.items()}


_COMMENT = re.compile(r"(?:^|\s)#.*")


def _address_key(value: str) -> str:
    return validate_email(value, check_deliverability=False).normalized.lower()


def _address_column(header: Sequence[str]) -> int | None:
    """The column holding addresses, if *header* is a CSV header row."""
    for index, name in enumerate(header):
        if column_of(name) == "email":
            return index
    if any("@" in name for name in header):
        return None
    # Exports of video-conference tools: "User Email", "Teilnehmer-E-Mail", ...
    mail = [index for index, name in enumerate(header) if "mail" in name.casefold()]
    return mail[0] if len(mail) == 1 else None


def _read_addresses(path: Path, root: Path) -> dict[str, int]:
    """Lower-cased keys from a list, each with its first line.

    One address per line, or a CSV with a column email.
    """
    text = read_text(path, root)
    problems = CappedProblems(path)
    keys: dict[str, int] = {}
    with closing(csv_rows(path, text, CappedProblems(path))) as probe:
        header = next(
            ((n, cells) for n, cells in probe if any(cells) and not cells[0].startswith("#")),
            None,
        )
    column = None if header is None else _address_column(header[1])
    hint = "write one complete address per line (lines starting with # are comments)"
    if header is not None and column is not None:
        hint = "write one complete address per row in the column with the addresses"
        with closing(csv_rows(path, text, problems)) as rows:
            for number, cells in rows:
                if number > MAX_LIST_LINES:
                    _too_many_lines(problems, path)
                    break
                if number <= header[0] or column >= len(cells) or not cells[column]:
                    continue  # e.g. participants who dialled in by phone
                _add_address(keys, problems, path, number, cells[column], hint)
    else:
        for number, line in enumerate(text_lines(text), start=1):
            if number > MAX_LIST_LINES:
                _too_many_lines(problems, path)
                break
            value = _COMMENT.sub("", line).strip()
            if value:
                # Tolerate what a one-column spreadsheet export adds around an address.
                value = value.rstrip(";,\t ").strip('"').strip()
                _add_address(keys, problems, path, number, value, hint)
    problems.raise_if_any()
    return keys


def _too_many_lines(problems: CappedProblems, path: Path) -> None:
    problems.add(
        path,
        f"the list has more than {MAX_LIST_LINES:,} lines; reading stopped there",
        hint="check that this is the right file",
    )


def _add_address(
    keys: dict[str, int], problems: CappedProblems, path: Path, number: int, value: str, hint: str
) -> None:
    if len(value) > EMAIL_LIMIT:
        problems.add(
            path,
            f"value {show(value)} is {len(value):,} characters long; no address is that long",
            line=number,
            hint=hint,
        )
        return
    try:
        keys.setdefault(_address_key(value), number)
    except EmailNotValidError as exc:
        problems.add(
            path,
            f"invalid email address {show(value)}: {exc}",
            line=number,
            hint=email_hint(value) if "@" in value else hint,
        )
