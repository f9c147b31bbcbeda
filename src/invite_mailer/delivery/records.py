"""The ledger's records: delivery states, keys, rows and the planner's snapshot.

Plain immutable values, so that planning and reporting can use them without
the database.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from types import MappingProxyType

from invite_mailer.core.registrations import Registration

__all__ = [
    "DateHistory",
    "Delivery",
    "DeliveryKey",
    "DeliveryState",
    "LedgerView",
    "OptOut",
    "format_version",
    "parse_version",
]


class DeliveryState(StrEnum):
    PENDING = "pending"  # not sent yet, or to be tried again at next_attempt_at
    SENDING = "sending"  # claimed: handed to the transport, no answer recorded yet
    SENT = "sent"  # the relay accepted it
    FAILED = "failed"  # the relay refused it for good
    UNCERTAIN = "uncertain"  # in flight when the process died or the line went dead


@dataclass(frozen=True, slots=True)
class DeliveryKey:
    """What makes a mail unique: a series, a kind, a date ('' = series-wide), a recipient."""

    series: str
    kind: str
    event: str
    email: str

    def __post_init__(self) -> None:
        # Addresses compare case-insensitively everywhere in invite-mailer.
        object.__setattr__(self, "email", self.email.strip().lower())


@dataclass(frozen=True)
class Delivery:
    """One row of the ledger."""

    series: str
    kind: str
    event: str
    email: str
    state: DeliveryState
    attempts: int = 0
    last_response: str = ""
    message_id: str = ""
    first_attempt_at: datetime | None = None
    last_attempt_at: datetime | None = None
    next_attempt_at: datetime | None = None
    version: str = ""
    updated_at: datetime | None = None

    @property
    def key(self) -> DeliveryKey:
        return DeliveryKey(self.series, self.kind, self.event, self.email)


_EMPTY_STATES: Mapping[str, DeliveryState] = MappingProxyType({})
_EMPTY_SEEN: Mapping[str, str] = MappingProxyType({})
_EMPTY_ROWS: Mapping[str, Registration] = MappingProxyType({})


@dataclass(frozen=True)
class LedgerView:
    """An immutable snapshot of one series' deliveries, for planning."""

    series: str
    _states: Mapping[tuple[str, str], Mapping[str, DeliveryState]] = field(
        default_factory=dict, repr=False
    )
    _next: Mapping[tuple[str, str, str], datetime] = field(default_factory=dict, repr=False)
    _seen: Mapping[str, Mapping[str, str]] = field(default_factory=dict, repr=False)
    _dates: Mapping[str, DateHistory] = field(default_factory=dict, repr=False)
    _attempts: Mapping[tuple[str, str, str], int] = field(default_factory=dict, repr=False)
    _registrations: Mapping[str, Mapping[str, Registration]] = field(
        default_factory=dict, repr=False
    )
    _confirmed: Mapping[str, frozenset[str]] = field(default_factory=dict, repr=False)

    @classmethod
    def empty(cls, series: str) -> LedgerView:
        return cls(series)

    def states(self, kind: str, event: str = "") -> Mapping[str, DeliveryState]:
        """Email → state for one mailing; recipients without a row are absent."""
        return self._states.get((kind, event), _EMPTY_STATES)

    def next_attempt(self, kind: str, event: str, email: str) -> datetime | None:
        """When a pending or uncertain delivery should be tried again, if set."""
        return self._next.get((kind, event, email.lower()))

    def attempts(self, kind: str, event: str, email: str) -> int:
        """How often a delivery waiting for its retry has been tried already."""
        return self._attempts.get((kind, event, email.lower()), 0)

    def seen(self, event: str) -> Mapping[str, str]:
        """Email → version of *event* described by the latest mail they got about it."""
        return self._seen.get(event, _EMPTY_SEEN)

    def date(self, event: str) -> DateHistory | None:
        """What the ledger knows about the versions of one date."""
        return self._dates.get(event)

    def registrations(self) -> Mapping[str, Mapping[str, Registration]]:
        """email -> date -> the ledger's registration row."""
        return self._registrations

    def registrations_of(self, email: str) -> Mapping[str, Registration]:
        """date -> the ledger's registration rows of one address."""
        return self._registrations.get(email.lower(), _EMPTY_ROWS)

    def confirmed(self, email: str) -> frozenset[str]:
        """The dates a confirmation sent to *email* (or refused for good) covered."""
        return self._confirmed.get(email.lower(), frozenset())


@dataclass(frozen=True)
class DateHistory:
    """The versions of one date the ledger has seen in the config.

    ``current`` is the version the config described most recently, and since
    when (the start of the update grace period). ``sequences`` maps each
    version that mail went out about to its calendar ``SEQUENCE``.
    """

    current: str
    observed_since: datetime
    sequences: Mapping[str, int]
    details: Mapping[str, Mapping[str, str]]

    @property
    def last_sequence(self) -> int | None:
        return max(self.sequences.values(), default=None)

    def sequence_for(self, version: str) -> int:
        """The SEQUENCE a mail describing *version* must carry."""
        last = self.last_sequence
        if last is None:
            return 0
        known = self.sequences.get(version)
        return known if known == last else last + 1


def format_version(versions: Mapping[str, str]) -> str:
    """``event=hash,event=hash``: what a mail described, stored with its delivery."""
    return ",".join(f"{event}={digest}" for event, digest in sorted(versions.items()))


def parse_version(text: str) -> dict[str, str]:
    result = {}
    for item in text.split(","):
        event, sep, digest = item.partition("=")
        if sep:
            result[event] = digest
    return result


@dataclass(frozen=True, slots=True)
class OptOut:
    """One address that must never be mailed again, and how that came about."""

    email: str
    source: str  # "one-click", "web form", "cli", ...
    created_at: datetime
