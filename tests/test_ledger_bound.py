"""A whole ``send-due`` pass keeps to the window: never more mails claimed without their
answer recorded than ``limits.max_in_flight``, as another process reading the ledger sees it.

On both engines: the shipped SQLite file, and a PostgreSQL ledger.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from support.cli import invoke, status_json
from support.mails import duplicates, mails, split
from support.postgres import query
from support.project import ledger_of
from support.smtp import SmtpServer, smtp_env

NOW = "2024-10-24T10:05"
CONTACTS = 12  # the shipped contact list, all invited


pytestmark = pytest.mark.both_ledgers


@contextmanager
def most_in_flight(database: Path | str) -> Iterator[list[int]]:
    """Sample the committed 'sending' rows of *database* while the block runs."""
    seen = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.001):
            if isinstance(database, Path) and not database.exists():
                continue
            try:
                [(count,)] = query(
                    database, "SELECT count(*) FROM deliveries WHERE state = 'sending'"
                )
            except Exception:
                continue  # created or checkpointed under us, no table yet: the next sample
            seen[0] = max(seen[0], count)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield seen
    finally:
        done.set()
        sampler.join()


def test_a_pass_never_has_more_mails_in_flight_than_max_in_flight(
    project: Path, smtp_server: SmtpServer
) -> None:
    # Slow answers: with four connections, four mails would be out at once.
    smtp_server.behaviour.data_delay = 0.05
    env = smtp_env(smtp_server.port, smtp__max_connections=4, limits__max_in_flight=2)
    with most_in_flight(ledger_of(project)) as seen:
        result = invoke(["send-due", "--now", NOW], env)
    assert result.exit_code == 0, result.output
    assert f"{CONTACTS} sent" in result.output
    got = [m.to for m in split(mails(smtp_server.received))[0]]
    assert len(got) == CONTACTS and not duplicates(got)
    assert 1 <= seen[0] <= 2, seen
    after = status_json(env, "--now", NOW)
    assert after["uncertain"] == []


def test_by_default_every_connection_has_a_mail_in_flight(
    project: Path, smtp_server: SmtpServer
) -> None:
    # The default window (twice the connections) never holds a sender back.
    smtp_server.behaviour.data_delay = 0.05
    env = smtp_env(smtp_server.port, smtp__max_connections=4)
    with most_in_flight(ledger_of(project)) as seen:
        result = invoke(["send-due", "--now", NOW], env)
    assert result.exit_code == 0, result.output
    assert 4 <= seen[0] <= 8, seen
