"""Hostile config, templates and contact data meet the composer.

Every case here comes from an attack on a running installation: material
files that point outside the config folder, templates that try to escape the
sandbox or exhaust the machine, names that smuggle addresses into ``To:``,
line breaks in values that end up in headers. Each must end in a clear
:class:`ConfigError` (file, line, hint) or in a correct mail, never in a
leaked file, a hang or a traceback.
"""

from __future__ import annotations

import os
import shutil
from datetime import datetime
from email import policy
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from click.testing import CliRunner

from invite_mailer.cli import cli
from invite_mailer.compose import Composer
from invite_mailer.contacts import Contact
from invite_mailer.errors import ConfigError
from invite_mailer.series import Kind, Series, load_series
from invite_mailer.settings import Settings, load_settings
from samplemails import FIRST_DATE, set_materials

ROOT = Path(__file__).resolve().parents[1]
BERLIN = ZoneInfo("Europe/Berlin")
FOLLOWUP_NOW = datetime(2024, 11, 15, 10, 0, tzinfo=BERLIN)
INVITATION_NOW = datetime(2024, 10, 24, 10, 0, tzinfo=BERLIN)

JANA = Contact(
    email="jana.mueller@example.org",
    anrede="Frau",
    titel="Dr.",
    vorname="Jana",
    nachname="Müller",
    registered_all=True,
)


# --- fixtures ---------------------------------------------------------------------------


@pytest.fixture
def tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the shipped config and templates; returns the config folder."""
    for name in list(os.environ):
        if name.startswith("INVITE_MAILER_"):
            monkeypatch.delenv(name)
    shutil.copytree(ROOT / "config", tmp_path / "config")
    shutil.copytree(ROOT / "templates", tmp_path / "templates")
    (tmp_path / "config" / "materials").mkdir()
    return tmp_path / "config"


def templates_of(config: Path) -> Path:
    return config.parent / "templates" / "email"


def settings_of(config: Path) -> Settings:
    return load_settings(config, env_file=None)


def composer_of(config: Path, settings: Settings | None = None) -> Composer:
    return Composer(
        settings or settings_of(config),
        load_series(config),
        templates_dir=templates_of(config),
        config_dir=config,
    )


def with_material(config: Path, file: str) -> None:
    set_materials(config, FIRST_DATE, f"      - {{title: Protokoll, file: {file}}}\n")


def single_problem(caught: pytest.ExceptionInfo[ConfigError]) -> str:
    (problem,) = caught.value.problems
    assert problem.hint
    return str(problem)


def all_bytes(composer: Composer, series: Series, contact: Contact = JANA) -> bytes:
    """Every kind for *contact*, as sent."""
    out = []
    for kind in composer.kinds:
        event = None if kind == Kind.INVITATION else series.event("verwaltung")
        message = composer.compose(kind, contact, event=event, now=FOLLOWUP_NOW)
        out.append(message.as_bytes(policy=policy.SMTP))
    return b"".join(out)


# --- material files stay inside config/materials/ ---------------------------------------


def _outside_secret(config: Path) -> str:
    secret = config.parent / "secret.txt"
    secret.write_text("INVITE_MAILER_SMTP__PASSWORD=hunter2\n", encoding="utf-8")
    return str(secret)


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda config: "/proc/self/environ", id="proc-environ"),
        pytest.param(lambda config: "../../../../../../../../etc/passwd", id="traversal"),
        pytest.param(lambda config: "materials/../../secret.txt", id="traversal-via-materials"),
        pytest.param(_outside_secret, id="absolute-path"),
        pytest.param(lambda config: "settings.toml", id="config-file-outside-materials"),
        pytest.param(lambda config: "materials/../settings.toml", id="dotdot-to-settings"),
    ],
)
def test_material_paths_outside_the_materials_folder(tree: Path, make: object) -> None:
    _outside_secret(tree)
    file = make(tree)  # type: ignore[operator]
    with_material(tree, file)
    with pytest.raises(ConfigError) as caught:
        composer_of(tree)
    problem = caught.value.problems[0]
    assert problem.path == tree / "series.yaml"
    lines = problem.path.read_text(encoding="utf-8").splitlines()
    assert problem.line is not None and file in lines[problem.line - 1]
    assert "materials" in str(problem.hint)
    assert "outside" in problem.message or "not inside" in problem.message


@pytest.mark.parametrize("target", ["settings.toml", "../secret.txt", "/etc/passwd"])
def test_material_symlink_pointing_outside(tree: Path, target: str) -> None:
    _outside_secret(tree)
    link = tree / "materials" / "protokoll.pdf"
    link.symlink_to(target if target.startswith("/") else Path("..") / target)
    with_material(tree, "materials/protokoll.pdf")
    with pytest.raises(ConfigError) as caught:
        composer_of(tree)
    text = single_problem(caught)
    assert "series.yaml" in text and "protokoll.pdf" in text
    assert "outside" in text


def test_material_symlink_inside_the_folder_is_fine(tree: Path) -> None:
    (tree / "materials" / "echt.pdf").write_bytes(b"%PDF-1.4 echt\n")
    (tree / "materials" / "protokoll.pdf").symlink_to("echt.pdf")
    with_material(tree, "materials/protokoll.pdf")
    composer = composer_of(tree)
    series = load_series(tree)
    message = composer.compose(
        Kind.FOLLOWUP, JANA, event=series.event("verwaltung"), now=FOLLOWUP_NOW
    )
    (part,) = message.iter_attachments()
    assert part.get_filename() == "protokoll.pdf"
    assert part.get_payload(decode=True) == b"%PDF-1.4 echt\n"


def test_special_files_are_not_read(tree: Path) -> None:
    """A FIFO would block for ever, a directory or /dev/zero would never end.

    The files are ordinary when the series is loaded and swapped afterwards,
    as a file may be between two reloads.
    """
    names = ("fifo.pdf", "ordner.pdf", "null.pdf")
    for name in names:
        (tree / "materials" / name).write_bytes(b"%PDF-1.4\n")
    set_materials(
        tree,
        FIRST_DATE,
        "".join(f"      - {{title: {n}, file: materials/{n}}}\n" for n in names),
    )
    series = load_series(tree)
    for name in names:
        (tree / "materials" / name).unlink()
    os.mkfifo(tree / "materials" / "fifo.pdf")
    (tree / "materials" / "ordner.pdf").mkdir()
    (tree / "materials" / "null.pdf").symlink_to("/dev/zero")
    import threading

    outcome: list[BaseException | None] = []

    def load() -> None:
        try:
            Composer(settings_of(tree), series, templates_dir=templates_of(tree), config_dir=tree)
            outcome.append(None)
        except BaseException as exc:  # the test reports what happened
            outcome.append(exc)

    worker = threading.Thread(target=load, daemon=True)
    worker.start()
    worker.join(timeout=30)
    if worker.is_alive():
        # Unblock the reader so the thread can end, then fail.
        fd = os.open(tree / "materials" / "fifo.pdf", os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        pytest.fail("reading the materials blocked on a FIFO")
    (error,) = outcome
    assert isinstance(error, ConfigError)
    messages = [p.message for p in error.problems]
    assert len(messages) == 3, messages
    assert "'materials/fifo.pdf' of 'verwaltung' is not a regular file" in messages[0]
    assert "'materials/ordner.pdf' of 'verwaltung' is not a regular file" in messages[1]
    assert "'materials/null.pdf' of 'verwaltung' lies outside" in messages[2]


def test_material_size_is_checked_before_reading(tree: Path) -> None:
    import tracemalloc

    big = tree / "materials" / "gross.pdf"
    with big.open("wb") as file:
        file.truncate(64 * 1024 * 1024)  # sparse: no disk used
    with_material(tree, "materials/gross.pdf")
    settings = settings_of(tree)
    tracemalloc.start()
    try:
        with pytest.raises(ConfigError) as caught:
            composer_of(tree, settings)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    text = single_problem(caught)
    assert "gross.pdf" in text and "64,0 MB" in text
    assert peak < 16 * 1024 * 1024, f"{peak} bytes allocated: the file was read"


def test_validate_refuses_a_secret_material(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tree.parent)
    monkeypatch.setenv("INVITE_MAILER_SMTP__PASSWORD", "geheim-1234")
    with_material(tree, "/proc/self/environ")
    result = CliRunner().invoke(cli, ["validate", "--config", "config"])
    assert result.exit_code == 1, result.output
    assert "series.yaml" in result.output and "/proc/self/environ" in result.output
    assert "Traceback" not in result.output
    assert "geheim-1234" not in result.output
