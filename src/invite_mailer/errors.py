"""The exceptions invite-mailer raises.

One root, :class:`InviteMailerError`; subclasses also inherit the matching
built-in so callers can catch them either way (the aiosmtplib habit).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

# Exit codes, the same for every command and the daemon. 0-3 are the product's;
# 70 and 75 follow sysexits. systemd restarts on 70 and 75, not on 1 (a broken
# config that a restart cannot fix: RestartPreventExitStatus=1).
EXIT_OK = 0
EXIT_INVALID = 1  # invalid config or input; nothing sent
EXIT_USAGE = 2
EXIT_FAILED = 3  # some deliveries failed permanently
EXIT_SOFTWARE = 70  # an unexpected error: a bug
EXIT_TEMPFAIL = 75  # the system refused (I/O error, no descriptors, a lock): try again later


class InviteMailerError(Exception):
    """Base class of every error invite-mailer raises on purpose."""

    #: The cause may pass on its own (a full disk, a failing device): the same
    #: run later can succeed, so the command exits 75 rather than 1.
    temporary: bool = False


@dataclass(frozen=True)
class Problem:
    """One organiser mistake: where it is, what is wrong, how to fix it."""

    path: Path | None
    message: str
    line: int | None = None
    hint: str | None = None

    def __str__(self) -> str:
        where = ""
        if self.path is not None:
            where = str(self.path)
            if self.line is not None:
                where += f", line {self.line}"
            where += ": "
        text = f"{where}{self.message}"
        if self.hint:
            text += f"\n  hint: {self.hint}"
        return text


class ConfigError(InviteMailerError, ValueError):
    """Invalid configuration or input.

    Carries every problem found in the files that were checked, so an organiser
    sees all of them at once instead of fixing one per run.
    """

    def __init__(self, problems: Iterable[Problem]) -> None:
        self.problems: tuple[Problem, ...] = tuple(problems)
        if not self.problems:
            raise ValueError("ConfigError needs at least one problem")
        super().__init__("\n".join(str(p) for p in self.problems))

    @classmethod
    def single(
        cls,
        path: Path | None,
        message: str,
        *,
        line: int | None = None,
        hint: str | None = None,
    ) -> ConfigError:
        return cls([Problem(path, message, line, hint)])

    @property
    def path(self) -> Path | None:
        return self.problems[0].path

    @property
    def line(self) -> int | None:
        return self.problems[0].line

    @property
    def hint(self) -> str | None:
        return self.problems[0].hint

    def __iter__(self) -> Iterator[Problem]:
        return iter(self.problems)


class ProblemCollector:
    """Gathers problems while a file is read, then raises them together."""

    def __init__(self) -> None:
        self.problems: list[Problem] = []

    def add(
        self,
        path: Path | None,
        message: str,
        *,
        line: int | None = None,
        hint: str | None = None,
    ) -> None:
        self.append(Problem(path, message, line, hint))

    def extend(self, error: ConfigError) -> None:
        for problem in error.problems:
            self.append(problem)

    def append(self, problem: Problem) -> None:
        """Every problem passes through here (a subclass may cap or filter them)."""
        self.problems.append(problem)

    def raise_if_any(self) -> None:
        if self.problems:
            raise ConfigError(self.problems)


class LockedError(InviteMailerError, RuntimeError):
    """Another invite-mailer process holds the state lock."""


class TransportError(InviteMailerError):
    """Sending one message failed."""

    def __init__(self, message: str, *, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.response = message


class TemporaryFailure(TransportError):
    """4xx answers, lost connections and timeouts: worth another try later."""


class SetupFailure(TemporaryFailure):
    """The transport cannot send anything as set up: TLS, login, the outbox folder.

    No message is at fault and none left: the pass stops with one message,
    and every mail stays pending for a run after the setup is fixed. *temporary*
    when the cause may pass without anyone changing the setup (a full disk).
    """

    def __init__(
        self,
        message: str,
        *,
        code: int | None = None,
        hint: str | None = None,
        temporary: bool = False,
    ) -> None:
        super().__init__(message, code=code)
        self.hint = hint
        self.temporary = temporary

    def __str__(self) -> str:
        text = super().__str__()
        return f"{text}\n  hint: {self.hint}" if self.hint else text


class PermanentFailure(TransportError):
    """5xx answers: the server refused this message or recipient for good."""


class SenderRefused(PermanentFailure):
    """The relay refuses our envelope sender (5xx at MAIL FROM).

    That is a problem of the setup, not of one recipient: every further mail
    would be refused the same way, so the pass stops and nothing is marked
    failed.
    """


class QuotaReached(TemporaryFailure):
    """A quota of the relay (per hour, per day) allows no further mail for now.

    Not a failure of any mail: nothing was handed over. The pass stops
    cleanly and the rest goes out after *reopens_at* (Unix time, seconds),
    when the oldest send of the full window has left it.
    """

    def __init__(self, setting: str, limit: int, reopens_at: float) -> None:
        super().__init__(f"{setting} = {limit} reached")
        self.setting = setting
        self.limit = limit
        self.reopens_at = reopens_at


class UncertainFailure(TemporaryFailure):
    """The message data was sent, but no answer came: it may have been delivered."""


class LedgerError(InviteMailerError, RuntimeError):
    """The state database cannot be used, or was asked for an impossible change."""

    def __init__(self, message: str, *, hint: str | None = None, temporary: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.temporary = temporary

    def __str__(self) -> str:
        return f"{self.message}\n  hint: {self.hint}" if self.hint else self.message
