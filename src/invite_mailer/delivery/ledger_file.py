"""The ledger's file: its schema and migrations, the checks that it is ours,
what its errors mean to an operator, and the lock that lets one process send.
"""

from __future__ import annotations

import errno
import fcntl
import os
import sqlite3
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from invite_mailer.errors import LedgerError, LockedError

__all__ = [
    "APPLICATION_ID",
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "check_file",
    "check_ours",
    "connect",
    "create",
    "ledger_error",
    "lock_path",
    "migrate",
    "state_lock",
]

# Marks the file as an invite-mailer ledger ("IMLG" in PRAGMA application_id).
APPLICATION_ID = 0x494D4C47

# Migration n (1-based) brings the schema from version n-1 to n. Append only;
# never edit a migration that has shipped.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """
        CREATE TABLE deliveries (
            id INTEGER PRIMARY KEY,
            series TEXT NOT NULL,
            kind TEXT NOT NULL,
            event TEXT NOT NULL DEFAULT '',
            email TEXT NOT NULL,
            state TEXT NOT NULL
                CHECK (state IN ('pending', 'sending', 'sent', 'failed', 'uncertain')),
            attempts INTEGER NOT NULL DEFAULT 0,
            last_response TEXT NOT NULL DEFAULT '',
            message_id TEXT NOT NULL DEFAULT '',
            version TEXT NOT NULL DEFAULT '',
            first_attempt_at TEXT,
            last_attempt_at TEXT,
            next_attempt_at TEXT,
            updated_at TEXT NOT NULL,
            UNIQUE (series, kind, event, email)
        )
        """,
        """
        CREATE TABLE optouts (
            series TEXT NOT NULL,
            email TEXT NOT NULL,
            source TEXT NOT NULL DEFAULT '',
            created_at TEXT NOT NULL,
            PRIMARY KEY (series, email)
        )
        """,
    ),
    (
        # The versions of each date that the config has described (issue:
        # updates and cancellations). A row per (date, version); SEQUENCE is
        # set when the first mail describing that version goes out.
        """
        CREATE TABLE date_versions (
            series TEXT NOT NULL,
            event TEXT NOT NULL,
            version TEXT NOT NULL,
            details TEXT NOT NULL,
            observed_since TEXT NOT NULL,
            sequence INTEGER,
            PRIMARY KEY (series, event, version)
        )
        """,
    ),
    (
        # Every send handed to the relay, by wall-clock time (Unix seconds),
        # so that a rate limit holds across processes and restarts. Kept for
        # a day, long enough for per-hour and per-day quotas too.
        """
        CREATE TABLE sends (
            id INTEGER PRIMARY KEY,
            at REAL NOT NULL
        )
        """,
        "CREATE INDEX sends_at ON sends (at)",
        # See check_ours.
        f"PRAGMA application_id = {APPLICATION_ID:d}",
    ),
    (
        # Registrations per (date, address), with where they came from (link,
        # csv, cli) and when; a withdrawal keeps the row, so it wins over a
        # contact list that still names the person. confirm = 0 for what the
        # contact list held when the ledger first read it (nobody is told
        # about those again). registration_imports marks that first reading,
        # and the digest of the list's registrations read last.
        """
        CREATE TABLE registrations (
            series TEXT NOT NULL,
            event TEXT NOT NULL,
            email TEXT NOT NULL,
            source TEXT NOT NULL,
            registered_at TEXT NOT NULL,
            withdrawn_at TEXT,
            withdrawn_by TEXT NOT NULL DEFAULT '',
            confirm INTEGER NOT NULL DEFAULT 1,
            PRIMARY KEY (series, event, email)
        )
        """,
        """
        CREATE TABLE registration_imports (
            series TEXT PRIMARY KEY,
            first_at TEXT NOT NULL,
            digest TEXT NOT NULL DEFAULT ''
        )
        """,
    ),
    (
        # Bounces and complaints, one row per (report, recipient); the report's
        # fingerprint keeps a report imported twice from counting twice.
        """
        CREATE TABLE bounces (
            id INTEGER PRIMARY KEY,
            series TEXT NOT NULL,
            email TEXT NOT NULL,
            kind TEXT NOT NULL CHECK (kind IN ('hard', 'soft', 'complaint')),
            status TEXT NOT NULL DEFAULT '',
            diagnostic TEXT NOT NULL DEFAULT '',
            message_id TEXT NOT NULL DEFAULT '',
            source TEXT NOT NULL DEFAULT '',
            fingerprint TEXT NOT NULL,
            received_at TEXT NOT NULL,
            UNIQUE (series, fingerprint, email)
        )
        """,
        "CREATE INDEX bounces_email ON bounces (series, email)",
        # A bounce names the Message-ID of the mail it returns.
        "CREATE INDEX deliveries_message_id ON deliveries (message_id)",
    ),
    (
        # Several nodes on one ledger (PostgreSQL): who holds a claimed mail and
        # until when (Unix seconds) without a heartbeat; the nodes and their beats.
        "ALTER TABLE deliveries ADD COLUMN claimed_by TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE deliveries ADD COLUMN lease_until REAL",
        "CREATE INDEX deliveries_claims ON deliveries (state, claimed_by)",
        """
        CREATE TABLE nodes (
            id TEXT PRIMARY KEY,
            host TEXT NOT NULL,
            pid INTEGER NOT NULL,
            role TEXT NOT NULL,
            started_at REAL NOT NULL,
            beat_at REAL NOT NULL,
            stopped_at REAL
        )
        """,
        # The relay quotas of several nodes (see send_slots): a place per send,
        # taken before it starts and ended when the relay has answered.
        """
        CREATE TABLE send_slots (
            id INTEGER PRIMARY KEY,
            node TEXT NOT NULL,
            started REAL NOT NULL,
            lease_until REAL NOT NULL,
            ended REAL
        )
        """,
        "CREATE INDEX send_slots_ended ON send_slots (ended)",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)
_SQLITE_HEADER = b"SQLite format 3\x00"


def connect(path: Path, *, timeout: float = 5.0) -> sqlite3.Connection:
    """A connection to *path* for the one thread that will use it.

    ``isolation_level=None``: autocommit, so each statement is its own
    transaction and explicit BEGIN/COMMIT mean what they say.
    """
    return sqlite3.connect(path, isolation_level=None, timeout=timeout, check_same_thread=False)


def create(path: Path) -> None:
    """Create a new ledger beside *path* and put it in place only when complete.

    SQLite creates an empty file the moment it connects: a process killed
    before its first migration would leave a 0-byte ledger that every later
    start (rightly) refuses as not ours.
    """
    draft = path.with_name(f".{path.name}.{os.getpid()}.new")
    draft.unlink(missing_ok=True)
    try:
        db = connect(draft)
        try:
            # As every later open does, so a full disk fails here the same way.
            db.execute("PRAGMA journal_mode = WAL")
            migrate(db, draft)
        finally:
            db.close()
        try:
            # A hard link, not a rename: never replaces a ledger that another
            # process put in place meanwhile.
            os.link(draft, path)
        except FileExistsError:
            pass
    finally:
        draft.unlink(missing_ok=True)


def check_file(path: Path) -> None:
    """Refuse a file at *path* that cannot be an SQLite database at all."""
    try:
        info = path.stat()
    except FileNotFoundError:
        return  # a new ledger
    if not stat.S_ISREG(info.st_mode):
        raise LedgerError(
            f"{path}: the state database is not a regular file",
            hint="set [state] url to a file path, e.g. sqlite:///state/invite-mailer.db",
        )
    with path.open("rb") as file:
        header = file.read(len(_SQLITE_HEADER))
    if info.st_size == 0 or header != _SQLITE_HEADER:
        what = "is empty (0 bytes)" if info.st_size == 0 else "is not an SQLite database"
        raise LedgerError(
            f"{path}: cannot use this file as the state database: it {what}, so it is not "
            "an invite-mailer ledger. Nothing was sent: starting with an empty ledger would "
            "send every mail again",
            hint=_FOREIGN_HINT,
        )


_FOREIGN_HINT = (
    "restore the ledger from a backup, or point [state] url at the right file; only if "
    "no mail of this series was ever sent, move the file away and run again"
)


def check_ours(db: sqlite3.Connection, path: Path) -> None:
    """Refuse an SQLite database that another program wrote."""
    version = _user_version(db)
    application = int(db.execute("PRAGMA application_id").fetchone()[0])
    tables = {
        str(row[0])
        for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
    }
    if version == 0 and not tables and application == 0:
        return  # new and empty: ours to create
    if application not in (0, APPLICATION_ID) or (version == 0 and tables):
        foreign = True
    else:
        # Ledgers written before the application id was set are known by their tables.
        foreign = "deliveries" not in tables
    if foreign:
        raise LedgerError(
            f"{path}: cannot use this file as the state database: it is an SQLite database "
            "of another program (no invite-mailer ledger tables). Nothing was sent",
            hint=_FOREIGN_HINT,
        )


def ledger_error(path: Path, exc: BaseException) -> LedgerError:
    """The cause of an SQLite or file error, for an operator."""
    if isinstance(exc, LedgerError):
        return exc
    text = str(exc)
    if "locked" in text or "busy" in text:
        return LedgerError(
            f"{path}: the state database is locked by another process ({text})",
            hint="wait until the other program (a backup, an sqlite3 shell, another "
            "invite-mailer) has finished, then run again",
        )
    if "malformed" in text or "not a database" in text or "corrupt" in text:
        return LedgerError(
            f"{path}: the state database is damaged ({text})",
            hint="stop invite-mailer and restore the file from a backup (sqlite3 "
            "'.recover' can rescue the readable rows); do not delete it: an empty ledger "
            "would send every mail again",
        )
    passing = "disk is full" in text or "disk I/O" in text
    errno_ = getattr(exc, "errno", None)
    if passing or errno_ in _PASSING_ERRNOS:
        return LedgerError(
            f"{path}: cannot write the state database ({text})",
            hint="free disk space (or wait for the storage to come back), then run again",
            temporary=True,
        )
    access = _access_problem(path)
    if access is not None or errno_ is not None or "readonly" in text or "unable to open" in text:
        why = access or f"the file or its folder cannot be opened for writing ({text})"
        return LedgerError(
            f"{path}: cannot open the state database: {why}",
            hint="invite-mailer reads and writes the state folder and the database in it "
            "(SQLite also creates the -wal and -shm files beside it): run as the user that "
            "owns them, fix the permissions or the mount, or point [state] url at a "
            "writable place",
        )
    return LedgerError(f"{path}: cannot use this file as the state database: {text}")


# A full disk or a failing device may pass; a permission stays until someone fixes it.
_PASSING_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO}


def _access_problem(path: Path) -> str | None:
    """What the file system says against writing the ledger at *path*, if anything."""
    folder = path.parent
    try:
        read_only = bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except OSError:
        read_only = False
    if read_only:
        return f"the state folder {folder} is read-only (a read-only file system)"
    if folder.is_dir() and not os.access(folder, os.W_OK | os.X_OK):
        return f"the state folder {folder} is not writable (permission denied)"
    if path.exists() and not os.access(path, os.R_OK | os.W_OK):
        return f"the database file {path} cannot be read and written (permission denied)"
    return None


def migrate(db: sqlite3.Connection, path: Path) -> None:
    """Bring the database at *path* to ``SCHEMA_VERSION``, all migrations or none."""
    version = _user_version(db)
    if version == SCHEMA_VERSION:
        return
    refuse_newer(version, path, ", or set [state] url to another file")
    # IMMEDIATE takes the write lock first, so two processes opening a fresh
    # database at once cannot both run a migration.
    db.execute("BEGIN IMMEDIATE")
    try:
        version = _user_version(db)
        refuse_newer(version, path, ", or set [state] url to another file")
        for number in range(version + 1, SCHEMA_VERSION + 1):
            for statement in MIGRATIONS[number - 1]:
                db.execute(statement)
            db.execute(f"PRAGMA user_version = {number:d}")
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


def _user_version(db: sqlite3.Connection) -> int:
    return int(db.execute("PRAGMA user_version").fetchone()[0])


def refuse_newer(version: int, where: Path | str, instead: str) -> None:
    """Stop at a schema newer than this version knows; *instead*: what else to do."""
    if version > SCHEMA_VERSION:
        raise LedgerError(
            f"{where}: the ledger has schema version {version}, but this invite-mailer "
            f"only knows versions up to {SCHEMA_VERSION}. It was written by a newer "
            f"invite-mailer: upgrade invite-mailer{instead}. Nothing was sent"
        )


def lock_path(database: Path) -> Path:
    """The file beside *database* that :func:`state_lock` locks."""
    return database.with_name(database.name + ".lock")


@contextmanager
def state_lock(database: Path | str) -> Iterator[None]:
    """Hold the exclusive lock that lets this process send from *database*.

    Raises :class:`~invite_mailer.errors.LockedError` at once when another
    process holds it. The lock dies with the process, so a crash never leaves
    a stale lock behind.
    """
    if str(database).startswith(("postgresql://", "postgres://")):
        raise ValueError("a PostgreSQL ledger has no file lock: any number of processes send")
    path = lock_path(Path(database))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            who = f" (process {holder})" if holder.isdigit() else ""
            raise LockedError(
                f"another invite-mailer (send-due or run){who} is working on the state "
                f"database {database}; wait for it to finish or stop it first"
            ) from None
        # The holder's PID, for the message above; informational only.
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock
