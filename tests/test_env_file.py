"""``.env`` in the working directory: only ``INVITE_MAILER_*`` keys are invite-mailer's.

Operators share one ``.env`` with docker compose (``POSTGRES_PASSWORD``,
``TZ``, ``COMPOSE_PROJECT_NAME``); those keys are not settings and must be
left alone, while a misspelt ``INVITE_MAILER_*`` key is still refused, naming
``.env``, its line and the key as written.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from invite_mailer.inputs.settings_file import load_settings
from support.cli import run
from support.project import use_project

FOREIGN = (
    "# shared with docker compose\n"
    "POSTGRES_PASSWORD=geheim\n"
    "TZ=Europe/Berlin\n"
    "export COMPOSE_PROJECT_NAME=x\n"
    "postgres_user=lowercase\n"
)


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    return use_project(tmp_path, monkeypatch)


def write_env(project: Path, text: str) -> None:
    (project / ".env").write_text(text, encoding="utf-8")


def test_validate_ignores_keys_that_are_not_invite_mailer_settings(project: Path) -> None:
    write_env(project, FOREIGN + "INVITE_MAILER_SMTP__USERNAME=transferreihe\n")
    code, output = run(["validate"])
    assert code == 0, output
    assert "unknown setting" not in output
    assert "postgres" not in output.lower()


def test_invite_mailer_keys_in_env_still_apply_beside_foreign_ones(project: Path) -> None:
    write_env(
        project,
        FOREIGN + "INVITE_MAILER_SMTP__USERNAME=transferreihe\nINVITE_MAILER_SMTP__PORT=2525\n",
    )
    settings = load_settings(project / "config", env_file=project / ".env")
    assert settings.smtp.username == "transferreihe"
    assert settings.smtp.port == 2525
    assert type(settings).__name__ == "Settings"


def test_misspelt_key_in_env_is_refused_naming_env_and_the_key(project: Path) -> None:
    write_env(project, FOREIGN + "INVITE_MAILER_SMTP__PASWORD=geheim\n")
    code, output = run(["validate"])
    assert code == 1, output
    assert ".env, line 6: unknown setting INVITE_MAILER_SMTP__PASWORD" in output
    assert "config/settings.toml" not in output
    assert "postgres" not in output.lower()
    assert "geheim" not in output


def test_misspelt_section_in_env_is_refused_too(project: Path) -> None:
    write_env(project, "TZ=Europe/Berlin\nINVITE_MAILER_TRANSPRT__KIND=smtp\n")
    code, output = run(["validate"])
    assert code == 1, output
    assert ".env, line 2: unknown setting INVITE_MAILER_TRANSPRT__KIND" in output
    assert "'tz'" not in output


def test_a_bad_value_from_env_names_env(project: Path) -> None:
    write_env(project, FOREIGN + "INVITE_MAILER_SMTP__PORT=siebzig\n")
    code, output = run(["validate"])
    assert code == 1, output
    assert ".env, line 6: smtp.port:" in output
    assert "INVITE_MAILER_SMTP__PORT" in output


def test_environment_wins_over_env_and_is_named_as_such(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_env(project, "INVITE_MAILER_SMTP__PORT=2525\n")
    monkeypatch.setenv("INVITE_MAILER_SMTP__PORT", "siebzig")
    code, output = run(["validate"])
    assert code == 1, output
    assert "(from the environment variable INVITE_MAILER_SMTP__PORT)" in output
    assert ".env, line" not in output


def test_no_env_file_means_the_working_directorys_env_is_not_read(project: Path) -> None:
    write_env(project, "INVITE_MAILER_SMTP__PORT=2525\nINVITE_MAILER_SMTP__PASWORD=x\n")
    settings = load_settings(project / "config", env_file=None)
    assert settings.smtp.port == 587


# --- .env files that are no plain text of a few lines -------------------------------------


def refused(project: Path, data: bytes | None = None) -> str:
    """``validate`` with *data* as .env (or the .env there): exit 1 with a message."""
    if data is not None:
        (project / ".env").write_bytes(data)
    code, output = run(["validate"])
    assert code == 1, output
    assert "this is a bug" not in output
    return " ".join(output.split())


def test_an_env_that_is_not_utf8_is_named(project: Path) -> None:
    output = refused(project, b"INVITE_MAILER_SMTP__PASSWORD=\xff\xfe\n")
    assert ".env: the file is not UTF-8 text" in output


def test_a_whole_section_in_one_variable_is_named_with_its_line(project: Path) -> None:
    output = refused(project, b"# relay\nINVITE_MAILER_SMTP=foo\n")
    assert ".env, line 2: INVITE_MAILER_SMTP must not be set" in output
    assert "INVITE_MAILER_SMTP__KEY=value" in output


def test_a_section_as_json_with_a_bad_key_is_named_in_env(project: Path) -> None:
    output = refused(project, b'INVITE_MAILER_SMTP={"port": "abc"}\n')
    assert ".env, line 1: smtp.port" in output and "settings.toml" not in output


def test_a_byte_order_mark_does_not_hide_the_first_line(project: Path) -> None:
    output = refused(project, b"\xef\xbb\xbfINVITE_MAILER_SMTP__PORTT=25\n")
    assert ".env, line 1: unknown setting INVITE_MAILER_SMTP__PORTT" in output


def test_a_key_without_a_value_is_named_in_env(project: Path) -> None:
    output = refused(project, b"TZ=Europe/Berlin\nINVITE_MAILER_SMTP__PORT\n")
    assert ".env, line 2: smtp.port" in output


def test_an_empty_environment_variable_does_not_take_the_blame(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("INVITE_MAILER_SMTP__PORT", "")  # empty: ignored, .env applies
    output = refused(project, b"invite_mailer_smtp__port=abc\n")
    assert ".env, line 1: smtp.port" in output and "environment variable" not in output


def test_a_huge_env_is_refused_before_it_is_parsed(project: Path) -> None:
    output = refused(project, b"X=1\n" * 70_000)
    assert ".env: the file is too large (280 KB; at most 262 KB are read)" in output


def test_a_fifo_as_env_is_refused_without_blocking(project: Path) -> None:
    os.mkfifo(project / ".env")
    assert ".env: not a regular file" in refused(project)


def test_an_env_linked_from_elsewhere_is_read(
    project: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    elsewhere = tmp_path_factory.mktemp("etc") / "invite-mailer.env"
    elsewhere.write_text("TZ=Europe/Berlin\nINVITE_MAILER_SMTP__PORTT=25\n", encoding="utf-8")
    (project / ".env").symlink_to(elsewhere)
    assert "line 2: unknown setting INVITE_MAILER_SMTP__PORTT" in refused(project)


# --- the environment: a misspelt variable is refused, not ignored ---------------------------


@pytest.mark.parametrize(
    "name",
    ["INVITE_MAILER_TRANSPORT_KIND", "INVITE_MAILER_SMTP__HOSTT", "INVITE_MAILER_SMPT__HOST"],
)
def test_a_misspelt_environment_variable_is_refused_by_name(
    project: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    # A single underscore would otherwise leave the outbox on without a word.
    monkeypatch.setenv(name, "smtp")
    output = refused(project)
    assert f"unknown setting {name} in the environment" in output
    assert not (project / "state").exists() and not (project / "outbox").exists()


def test_foreign_and_empty_environment_variables_are_left_alone(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("POSTGRES_PASSWORD", "geheim")
    monkeypatch.setenv("INVITE_MAILER_SMTP__HOSTT", "")  # empty: as if unset
    monkeypatch.setenv("INVITE_MAILER_SMTP__HOST", "relay.example.org")
    code, output = run(["validate"])
    assert code == 0, output
