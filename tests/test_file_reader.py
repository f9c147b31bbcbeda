"""The one reader of organiser files, against a folder swapped while it reads."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from invite_mailer.errors import ConfigError
from invite_mailer.inputs import yamlfile
from invite_mailer.inputs.yamlfile import read_config_file


def test_a_folder_swapped_for_a_link_while_opening_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "config"
    (config / "attendance").mkdir(parents=True)
    (config / "attendance" / "verwaltung.csv").write_text("a@example.org\n", encoding="utf-8")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "verwaltung.csv").write_text("geheim\n", encoding="utf-8")
    real_open = os.open

    def swap_then_open(path: Any, flags: int, *args: Any) -> int:
        # Another process replaces the checked folder by a link to elsewhere
        # after the path was resolved, before the file is opened.
        (config / "attendance").rename(config / "attendance.old")
        (config / "attendance").symlink_to(outside)
        return real_open(path, flags, *args)

    monkeypatch.setattr(yamlfile.os, "open", swap_then_open)
    with pytest.raises(ConfigError) as caught:
        read_config_file(config / "attendance" / "verwaltung.csv", limit=1000, root=config)
    (problem,) = caught.value.problems
    assert "outside the config folder" in problem.message


def test_an_ordinary_file_is_read(tmp_path: Path) -> None:
    (tmp_path / "optout.txt").write_bytes(b"a@example.org\n")
    assert read_config_file(tmp_path / "optout.txt", limit=100) == b"a@example.org\n"
