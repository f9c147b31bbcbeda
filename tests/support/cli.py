"""Running ``invite-mailer``: in this process through click's runner, or as a child process."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from click.testing import CliRunner, Result

from invite_mailer.cli import cli
from support.project import clean_environ


def invoke(args: Sequence[str], env: Mapping[str, str] | None = None) -> Result:
    """``invite-mailer ARGS`` in this process, as the CLI runner sees it."""
    return CliRunner().invoke(
        cli, list(args), env=None if env is None else dict(env), catch_exceptions=False
    )


def run(args: Sequence[str], env: Mapping[str, str] | None = None) -> tuple[int, str]:
    """``invite-mailer ARGS`` in this process: the exit code and everything printed."""
    result = invoke(args, env)
    return result.exit_code, result.output


def status_json(env: Mapping[str, str], *extra: str) -> dict[str, Any]:
    """``invite-mailer status --json``, parsed."""
    result = invoke(["status", "--json", *extra], env)
    assert result.exit_code in (0, 3), result.output
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def subprocess_env(env: Mapping[str, str]) -> dict[str, str]:
    """A child's environment: this one without ``INVITE_MAILER_*``, plus *env*.

    Unbuffered, so a log read while the child runs is complete, and wide, so
    no message is wrapped.
    """
    full = clean_environ()
    full.update(env)
    full["PYTHONUNBUFFERED"] = "1"
    full["COLUMNS"] = "200"
    return full


def run_process(
    args: list[str], env: Mapping[str, str], cwd: Path, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """``python -m invite_mailer ARGS`` as a real child process."""
    return subprocess.run(
        [sys.executable, "-m", "invite_mailer", *args],
        cwd=cwd,
        env=subprocess_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def start_process(
    args: list[str], env: Mapping[str, str], cwd: Path, *, stderr: Path | None = None
) -> subprocess.Popen[str]:
    """``python -m invite_mailer ARGS`` started in the background."""
    err: Any = subprocess.PIPE if stderr is None else stderr.open("w", encoding="utf-8")
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "invite_mailer", *args],
            cwd=cwd,
            env=subprocess_env(env),
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
    finally:
        if stderr is not None:
            err.close()


def stop_processes(*processes: subprocess.Popen[str], grace: float = 30) -> None:
    """SIGTERM to every one still running, then reap each; SIGKILL after *grace* seconds."""
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            process.communicate(timeout=grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()


def wait_for(
    condition: Callable[[], object], timeout: float, what: str, interval: float = 0.02
) -> None:
    """Poll *condition* until it is true; fail with *what* after *timeout* seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)
