"""Logging set-up: readable lines for people, one JSON object per line for machines.

Everything the process writes to stderr goes through one handler on the root
logger: invite-mailer's own records, those of the libraries (APScheduler,
uvicorn, asyncio), Python warnings and uncaught exceptions. So with
``--log-format json`` every line is JSON, a traceback included (as the
``exception`` field of its record).
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

__all__ = ["JsonFormatter", "RepeatFilter", "setup_logging"]

_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}

LIBRARY_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "apscheduler", "asyncio")
"""Loggers that may have handlers of their own; theirs are replaced by the root's."""

REPEAT_SECONDS = 60.0


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                data[key] = value if isinstance(value, int | float | bool | None) else str(value)
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            data["exception"] = record.exc_text
        if record.stack_info:
            data["stack"] = record.stack_info
        return json.dumps(data, ensure_ascii=False)


class RepeatFilter(logging.Filter):
    """Lets a repeated message through at most once per *interval* seconds.

    A flood of one message (``accept()`` failing on every loop turn when
    descriptors run out, a scanner sending the same bad request) would
    otherwise fill the disk and bury everything else. The first record of a
    message passes; repeats within *interval* are counted, and the next one
    that passes says how many were left out. Records are told apart by their
    logger, level and formatted message, so two different problems never
    hide each other. Records below *level* and of the *exempt* loggers always
    pass.
    """

    MAX_KEYS = 1000

    def __init__(
        self,
        interval: float = REPEAT_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        *,
        level: int = logging.WARNING,
        exempt: tuple[str, ...] = (),
    ) -> None:
        super().__init__()
        self.interval = interval
        self.clock = clock
        self.level = level
        self.exempt = exempt
        self._seen: dict[tuple[str, int, str], tuple[float, int]] = {}
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < self.level or record.name.startswith(self.exempt):
            return True
        try:
            message = record.getMessage()
        except Exception:  # a record with bad arguments: let the handler report it
            return True
        key = (record.name, record.levelno, message)
        now = self.clock()
        with self._lock:
            last = self._seen.get(key)
            if last is not None and now - last[0] < self.interval:
                self._seen[key] = (last[0], last[1] + 1)
                return False
            if len(self._seen) >= self.MAX_KEYS:
                self._forget_old(now)
            self._seen[key] = (now, 0)
        if last is not None and last[1]:
            # Formatted once here, so the count is part of the message in either format.
            record.msg = f"{message} (repeated {last[1]} more time(s) in {self.interval:.0f} s)"
            record.args = None
        return True

    def _forget_old(self, now: float) -> None:
        for key, (since, _) in list(self._seen.items()):
            if now - since >= self.interval:
                del self._seen[key]
        if len(self._seen) >= self.MAX_KEYS:
            self._seen.clear()


def _text_formatter() -> logging.Formatter:
    return logging.Formatter("%(asctime)s %(levelname)-7s %(message)s", "%Y-%m-%d %H:%M:%S")


def setup_logging(fmt: str = "text", level: int = logging.INFO) -> None:
    """Send every log record of the process to stderr, as text or as JSON lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else _text_formatter())
    # The daemon's own messages answer what someone just did (an edit, a
    # signal): each answer must be seen, even the same one twice a minute.
    handler.addFilter(RepeatFilter(exempt=("invite_mailer.service.daemon",)))
    handler._invite_mailer = True  # type: ignore[attr-defined]
    root = logging.getLogger()
    # Only our own earlier handler is replaced: a host (a test runner) may have its own.
    root.handlers[:] = [h for h in root.handlers if not getattr(h, "_invite_mailer", False)]
    root.addHandler(handler)
    # Libraries log at INFO on every wake-up (APScheduler's "Running job"):
    # only their warnings and errors are worth an operator's attention.
    root.setLevel(logging.DEBUG if level <= logging.DEBUG else logging.WARNING)
    ours = logging.getLogger("invite_mailer")
    ours.handlers.clear()
    ours.setLevel(level)
    ours.propagate = True
    for name in LIBRARY_LOGGERS:
        library = logging.getLogger(name)
        library.handlers.clear()
        library.propagate = True
    logging.captureWarnings(True)
    _install_hooks(fmt == "json")


_saved_hooks: list[Any] = []


def _install_hooks(as_json: bool) -> None:
    """Uncaught exceptions as log records in JSON mode; otherwise whatever was there."""
    if as_json and not _saved_hooks:
        _saved_hooks[:] = [sys.excepthook, threading.excepthook]
        sys.excepthook = _log_uncaught
        threading.excepthook = _log_uncaught_in_thread
    elif not as_json and _saved_hooks:
        sys.excepthook, threading.excepthook = _saved_hooks
        _saved_hooks.clear()


def _log_uncaught(
    kind: type[BaseException], value: BaseException, tb: TracebackType | None
) -> None:
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, value, tb)
        return
    logging.getLogger("invite_mailer").critical(
        "unexpected error: %s: %s", kind.__name__, value, exc_info=(kind, value, tb)
    )


def _log_uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    if args.exc_value is None:
        return
    name = args.thread.name if args.thread is not None else "a thread"
    logging.getLogger("invite_mailer").critical(
        "unexpected error in %s: %s: %s",
        name,
        args.exc_type.__name__,
        args.exc_value,
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback),
    )
