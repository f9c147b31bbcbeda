"""A clock that stands still until a test moves it, for the daemon's *clock*."""

from __future__ import annotations

from datetime import datetime, timedelta


class FakeClock:
    """A clock that stands still until a test moves it (forward only)."""

    def __init__(self, moment: datetime) -> None:
        self.moment = moment

    def __call__(self) -> datetime:
        return self.moment

    def set(self, moment: datetime) -> None:
        assert moment >= self.moment, "the fake clock only moves forward"
        self.moment = moment

    def move(self, by: timedelta) -> datetime:
        self.set(self.moment + by)
        return self.moment
