"""``.env`` in the working directory: only ``INVITE_MAILER_*`` keys are invite-mailer's.

Operators share one ``.env`` with docker compose (``POSTGRES_PASSWORD``,
``TZ``, ``COMPOSE_PROJECT_NAME``); those keys are not settings and must be
left alone, while a misspelt ``INVITE_MAILER_*`` key is still refused, naming
``.env``, its line and the key as written.
"""

from __future__ import annotations

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
