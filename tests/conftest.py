"""Shared fixtures. Add more below; keep each one small.

The helpers behind them live in the ``support`` package beside this file,
which the benchmarks under ``bench/`` import too.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from support.postgres import fresh_schema
from support.project import use_project
from support.smtp import SmtpServer, make_server


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


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the shipped config/ and templates/, as the working directory.

    INVITE_MAILER_* variables of the caller's environment are removed, so the
    tests see exactly the shipped settings.
    """
    return use_project(tmp_path, monkeypatch)


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger_target(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path | str]:
    """Where a ledger test opens its ledger: an SQLite file, or a fresh PostgreSQL schema."""
    if request.param == "sqlite":
        yield tmp_path / "state" / "ledger.db"
        return
    with fresh_schema() as url:
        yield url
