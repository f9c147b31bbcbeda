"""Recipients: ``config/contacts.csv`` (or ``.xlsx``), opt-outs and attendance lists."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

ALL_EVENTS = "alle"


@dataclass(frozen=True, slots=True)
class Contact:
    """One recipient, validated.

    ``email`` is the normalised address (as email-validator returns it);
    comparisons use ``key`` (lower-cased). ``registrations`` holds event ids;
    ``registered_all`` is true for ``alle``.
    """

    email: str
    anrede: str = ""  # "Frau", "Herr" or ""
    titel: str = ""  # "Dr.", "Prof. Dr." or ""
    vorname: str = ""
    nachname: str = ""
    organisation: str = ""
    registrations: frozenset[str] = frozenset()
    registered_all: bool = False
    extra: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    row: int | None = None  # line/row in the source file, for messages

    @property
    def key(self) -> str:
        return self.email.lower()

    def is_registered(self, event_id: str) -> bool:
        return self.registered_all or event_id in self.registrations
