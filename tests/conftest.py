"""Shared fixtures. Add more below; keep each one small."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from smtpserver import SmtpServer, make_server


@pytest.fixture
def smtp_server() -> Iterator[SmtpServer]:
    """A real SMTP server on 127.0.0.1 that records what it receives."""
    server = make_server()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def smtp_server_factory() -> Iterator[Any]:
    """Start servers with special options (TLS, AUTH); all stopped at the end."""
    servers: list[SmtpServer] = []

    def factory(**kwargs: Any) -> SmtpServer:
        server = make_server(**kwargs)
        servers.append(server)
        return server

    try:
        yield factory
    finally:
        for server in servers:
            server.stop()


ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the shipped config/ and templates/, as the working directory.

    INVITE_MAILER_* variables of the caller's environment are removed, so the
    tests see exactly the shipped settings.
    """
    shutil.copytree(ROOT / "config", tmp_path / "config")
    shutil.copytree(ROOT / "templates", tmp_path / "templates")
    monkeypatch.chdir(tmp_path)
    for name in list(os.environ):
        if name.startswith("INVITE_MAILER_"):
            monkeypatch.delenv(name)
    return tmp_path
