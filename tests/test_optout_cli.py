"""``invite-mailer optout list|add|remove``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from support.cli import run as run_cli

pytestmark = pytest.mark.both_ledgers

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str) -> tuple[int, str]:
    return run_cli(args)


def listed(*args: str) -> list[dict[str, object]]:
    code, output = run("optout", "list", "--json", *args)
    assert code == 0, output
    entries: list[dict[str, object]] = json.loads(output)["optouts"]
    return entries


def add_to_file(project: Path, line: str) -> None:
    with (project / "config" / "optout.txt").open("a", encoding="utf-8") as file:
        file.write(line + "\n")


def test_empty(project: Path) -> None:
    code, output = run("optout", "list")
    assert code == 0 and "No opt-outs" in output
    assert listed() == []
    assert not (project / "state").exists()  # listing creates no database


@pytest.mark.slow
def test_add_list_remove(project: Path) -> None:
    code, output = run(
        "optout", "add", "Jana.Mueller@Example.org", "alex.meyer@example.org", "--source", "Mail"
    )
    assert code == 0, output
    assert "jana.mueller@example.org: opted out" in output
    code, output = run("optout", "add", "jana.mueller@example.org")
    assert code == 0 and "already opted out" in output

    add_to_file(project, "info@example.com   # Anruf vom 3.11.")
    entries = listed()
    assert [(e["email"], e["stored_in"], e["source"]) for e in entries] == [
        ("alex.meyer@example.org", "ledger", "Mail"),
        ("jana.mueller@example.org", "ledger", "Mail"),
        ("info@example.com", "file", "optout.txt"),
    ]
    assert entries[0]["created_at"] and entries[2]["line"] == 2

    code, output = run("optout", "list")
    assert code == 0
    assert "jana.mueller@example.org" in output and "state database" in output
    assert "optout.txt, line 2" in output

    code, output = run("optout", "remove", "JANA.mueller@example.org")
    assert code == 0 and "removed" in output
    assert [e["email"] for e in listed()] == ["alex.meyer@example.org", "info@example.com"]
    code, output = run("optout", "remove", "jana.mueller@example.org")
    assert code == 0 and "was not opted out" in output


@pytest.mark.slow
def test_opt_outs_are_honoured_by_send_due(project: Path) -> None:
    assert run("optout", "add", "jana.mueller@example.org")[0] == 0
    code, output = run("plan", "--now", "2024-10-24T10:05", "--json")
    assert code == 0
    invitation = json.loads(output)["mailings"][0]
    assert invitation["opted_out"] == 1 and invitation["recipients"] == 11
    code, output = run("send-due", "--now", "2024-10-24T10:05", "--json")
    assert code == 0, output
    assert json.loads(output[output.index("{") :])["sent"] == 11


@pytest.mark.slow
def test_remove_of_a_file_entry_says_to_edit_the_file(project: Path) -> None:
    add_to_file(project, "info@example.com")
    code, output = run("optout", "remove", "info@example.com")
    assert code == 1
    assert "optout.txt, line 2" in output and "delete that line" in output

    # In both places: the ledger entry goes, the file keeps it blocked.
    assert run("optout", "add", "info@example.com")[0] == 0
    code, output = run("optout", "remove", "info@example.com")
    assert code == 1
    assert "stays blocked" in output
    assert [e["stored_in"] for e in listed()] == ["file"]


def test_invalid_address(project: Path) -> None:
    code, output = run("optout", "add", "jana.mueller@")
    assert code == 1
    assert "not a valid email address" in output and "hint" in output
    assert listed() == []


def test_works_with_a_broken_contact_list(project: Path) -> None:
    # Blocking someone must not depend on the rest of the config being valid.
    (project / "config" / "contacts.csv").write_text("kaputt\n", encoding="utf-8")
    code, output = run("optout", "add", "jana.mueller@example.org")
    assert code == 0, output
