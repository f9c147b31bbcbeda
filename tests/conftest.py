"""Shared fixtures. Add more below; keep each one small."""

from __future__ import annotations

from collections.abc import Iterator
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
