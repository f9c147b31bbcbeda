"""``[state]``: where the ledger lives (SQLite, or PostgreSQL for several nodes)."""

from __future__ import annotations

from pathlib import Path
from typing import Self
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator

from invite_mailer.inputs.setting_base import InvalidSetting, Section, no_control

__all__ = ["POSTGRES_SCHEMES", "StateSettings"]


class StateSettings(Section):
    url: str = "sqlite:///state/invite-mailer.db"
    lease_seconds: float = Field(
        120,
        ge=10,
        le=3600,
        description="PostgreSQL: how long a claimed mail stays with its node without a "
        "heartbeat; after that another node treats it as uncertain and finishes it",
    )
    heartbeat_seconds: float = Field(
        10,
        ge=1,
        le=300,
        description="PostgreSQL: how often each node records that it is alive and renews "
        "the leases of the mails it holds",
    )

    @field_validator("url")
    @classmethod
    def _database(cls, value: str) -> str:
        no_control(value)
        if value.startswith(POSTGRES_SCHEMES):
            return _postgres_url(value)
        if not value.startswith("sqlite:///"):
            raise InvalidSetting(
                f"unknown state database {value!r}",
                'use "sqlite:///state/invite-mailer.db" (one host) or '
                '"postgresql://user@host:5432/database" (several daemons sharing one ledger)',
            )
        path = value.removeprefix("sqlite:///")
        # The ledger is what keeps a mail from going out twice: an in-memory or
        # URI database would be empty at every run and send everything again.
        if not path or path == ":memory:" or path.startswith("file:") or "?" in path:
            raise InvalidSetting(
                f"the state database must be a file path, got {value!r} "
                "(no :memory:, no file: URI, no ?query)",
                'use a file that lasts between runs: url = "sqlite:///state/invite-mailer.db"',
            )
        return value

    @model_validator(mode="after")
    def _beats_within_the_lease(self) -> Self:
        if self.heartbeat_seconds * 3 > self.lease_seconds:
            raise InvalidSetting(
                f"state.heartbeat_seconds ({self.heartbeat_seconds:g}) must be at most a third "
                f"of state.lease_seconds ({self.lease_seconds:g})",
                "a node renews its leases with every heartbeat; leave room for two missed "
                "beats, e.g. heartbeat_seconds = 10 with lease_seconds = 120",
            )
        return self

    @property
    def is_postgresql(self) -> bool:
        return self.url.startswith(POSTGRES_SCHEMES)

    @property
    def path(self) -> Path:
        """The SQLite file; with PostgreSQL, where this host keeps its heartbeat file."""
        if self.is_postgresql:
            return Path("state") / "postgresql.db"
        return Path(self.url.removeprefix("sqlite:///"))

    @property
    def target(self) -> Path | str:
        """What :meth:`Ledger.open` takes: the SQLite file or the PostgreSQL URL."""
        return self.url if self.is_postgresql else self.path


POSTGRES_SCHEMES = ("postgresql://", "postgres://")
_PASSWORD_HINT = (
    "never put the password into the settings: set PGPASSWORD in the environment, "
    "or use a password file (PGPASSFILE, ~/.pgpass) or a service file (?service=name)"
)


def _postgres_url(value: str) -> str:
    parts = urlsplit(value)
    query = {
        key.strip().lower() for key, _, _ in (p.partition("=") for p in parts.query.split("&"))
    }
    if parts.password is not None or "password" in query:
        raise InvalidSetting("state.url must not contain a password", _PASSWORD_HINT)
    if not parts.hostname and "host" not in query and "service" not in query:
        raise InvalidSetting(
            f"state.url names no database server: {value!r}",
            'e.g. url = "postgresql://invite_mailer@db.example.org:5432/invite_mailer"',
        )
    return value
