"""What every settings section shares: no unknown keys, no control characters, hints."""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict

__all__ = ["InvalidSetting", "Section", "no_control"]

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def no_control(value: str) -> str:
    if _CONTROL.search(value):
        raise ValueError("contains a line break or another control character; write it on one line")
    return value


class InvalidSetting(ValueError):
    """A setting's value is wrong in a way that deserves its own hint."""

    def __init__(self, message: str, hint: str) -> None:
        super().__init__(message)
        self.hint = hint


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
