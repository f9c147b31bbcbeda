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
from support.project import use_project, use_state_url
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


LEDGER_ENGINES = ("sqlite", "postgresql")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Run ledger tests once per engine: ``test_x[sqlite]`` and ``test_x[postgresql]``.

    That is every test of ``ledger_target``, and every test marked
    ``both_ledgers`` whose project (``project`` or ``state_url``) holds the ledger.
    """
    marked = metafunc.definition.get_closest_marker("both_ledgers") is not None
    if not (marked or "ledger_target" in metafunc.fixturenames):
        return
    if "ledger_engine" not in metafunc.fixturenames:
        if any(mark.name == "both_ledgers" for mark in metafunc.definition.own_markers):
            raise pytest.UsageError(
                f"{metafunc.definition.nodeid}: both_ledgers needs the project or "
                "state_url fixture, which put the ledger on the engine"
            )
        return  # a module's mark on a test that has no ledger
    metafunc.parametrize("ledger_engine", LEDGER_ENGINES, indirect=True)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The PostgreSQL run of a ``both_ledgers`` test is ``slow``: the fast tier
    runs the SQLite one, the whole suite both."""
    for item in items:
        callspec = getattr(item, "callspec", None)
        engine = callspec.params.get("ledger_engine") if callspec is not None else None
        if engine == "postgresql" and item.get_closest_marker("both_ledgers") is not None:
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def ledger_engine(request: pytest.FixtureRequest) -> str:
    """The ledger's engine: "sqlite", unless the test runs on both (see above)."""
    return str(getattr(request, "param", "sqlite"))


@pytest.fixture
def state_url(ledger_engine: str) -> Iterator[str | None]:
    """With PostgreSQL: the URL of a fresh schema, dropped afterwards; else None."""
    if ledger_engine == "sqlite":
        yield None
        return
    with fresh_schema() as url:
        yield url


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, state_url: str | None) -> Path:
    """A copy of the shipped config/ and templates/, as the working directory.

    INVITE_MAILER_* variables of the caller's environment are removed, so the
    tests see exactly the shipped settings. On PostgreSQL (``both_ledgers``)
    its settings.toml names the test's schema in ``[state] url``;
    ``support.project.ledger_of`` says where the ledger is.
    """
    root = use_project(tmp_path, monkeypatch)
    if state_url is not None:
        use_state_url(root, state_url)
    return root


@pytest.fixture
def ledger_target(state_url: str | None, tmp_path: Path) -> Path | str:
    """Where a ledger test opens its ledger: an SQLite file, or a fresh PostgreSQL schema."""
    return tmp_path / "state" / "ledger.db" if state_url is None else state_url
