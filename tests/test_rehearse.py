"""``invite-mailer rehearse``: the whole series in virtual time, into a folder.

Expected counts are worked out here from ``contacts.csv`` itself, not from the
planner, so a planner bug cannot hide behind its own numbers.
"""

from __future__ import annotations

import csv
import email
import email.policy
import json
import os
import re
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from support.cli import run as run_cli

ROOT = Path(__file__).resolve().parent.parent
EVENTS = ("verwaltung", "kreislaufwirtschaft", "allianzen", "forschung")
CHROMIUM = Path("/usr/bin/chromium")


def run(*args: str) -> tuple[int, str]:
    return run_cli(args)


def rehearse(*args: str) -> dict[str, object]:
    code, output = run("rehearse", "--json", *args)
    assert code == 0, output
    data: dict[str, object] = json.loads(output[output.index("{") :])
    return data


def registrations(project: Path) -> dict[str, int]:
    """Per date, how many contacts registered (``alle`` counts for every date)."""
    text = (project / "config" / "contacts.csv").read_text(encoding="utf-8-sig")
    counts = dict.fromkeys(EVENTS, 0)
    for row in csv.DictReader(text.splitlines(), delimiter=";"):
        wanted = {part.strip() for part in row["anmeldungen"].split(",") if part.strip()}
        for event in EVENTS:
            counts[event] += "alle" in wanted or event in wanted
    return counts


def contacts(project: Path) -> int:
    text = (project / "config" / "contacts.csv").read_text(encoding="utf-8-sig")
    return len(list(csv.DictReader(text.splitlines(), delimiter=";")))


def registered_contacts(project: Path) -> list[str]:
    """Contacts registered for any date, and each one's first date, in contact order."""
    text = (project / "config" / "contacts.csv").read_text(encoding="utf-8-sig")
    firsts = []
    for row in csv.DictReader(text.splitlines(), delimiter=";"):
        wanted = {part.strip() for part in row["anmeldungen"].split(",") if part.strip()}
        dates = EVENTS if "alle" in wanted else [e for e in EVENTS if e in wanted]
        if dates:
            firsts.append(dates[0])
    return firsts


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []
        self.resources: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name == "href" and value is not None:
                self.links.append(value)
            if name == "src" or (tag == "link" and name == "href"):
                self.resources.append(f"{tag} {name}={value}")
        if tag == "script":
            self.resources.append("script")


def links_of(page: Path) -> _Links:
    parser = _Links()
    parser.feed(page.read_text(encoding="utf-8"))
    return parser


# --- what goes out -----------------------------------------------------------------------


@pytest.mark.slow
def test_shipped_series_counts(project: Path) -> None:
    data = rehearse()
    per_date = registrations(project)
    assert data["mails"] == {
        "invitation": contacts(project),  # one per contact
        "reminder": sum(per_date.values()),  # one per registration
        # The contact list's registrations count as new: one confirmation per
        # registered contact, for all their dates at once.
        "confirmation": len(registered_contacts(project)),
    }
    # No materials are listed yet: every follow-up waits, and nothing goes out.
    assert data["waiting_for_materials"] == [f"followup:{event}" for event in EVENTS]
    index = (project / "rehearsal" / "index.html").read_text(encoding="utf-8")
    for event in EVENTS:
        # The follow-ups' recipients are listed, one per registration.
        assert f"{per_date[event]} vorgesehene Empfänger" in index
    assert index.count("wartet auf Unterlagen.") == 4


@pytest.mark.slow
def test_a_follow_up_goes_out_once_materials_are_listed(project: Path) -> None:
    series = project / "config" / "series.yaml"
    text = series.read_text(encoding="utf-8")
    series.write_text(
        text.replace(
            "    materials: []",
            "    materials: [{title: Folien, url: 'https://example.org/folien.pdf'}]",
            1,
        ),
        encoding="utf-8",
    )
    data = rehearse()
    mails = data["mails"]
    assert isinstance(mails, dict)
    assert mails["followup"] == registrations(project)["verwaltung"]
    assert "followup:verwaltung" not in data["waiting_for_materials"]  # type: ignore[operator]


@pytest.mark.slow
def test_every_mail_is_written_and_one_click_away(project: Path) -> None:
    rehearse()
    out = project / "rehearsal"
    index = out / "index.html"
    parsed = links_of(index)
    assert parsed.resources == []  # self-contained: no script, image, stylesheet
    assert parsed.links, "the overview links to the mails"
    for link in parsed.links:
        parts = urlsplit(link)
        assert not parts.scheme and not parts.netloc, f"not relative: {link}"
        if not parts.path:
            continue  # an anchor on the same page
        target = out / unquote(parts.path)
        assert target.is_file(), f"{link} does not resolve"
    emls = sorted((out / "mails").glob("*.eml"))
    htmls = {p.stem for p in (out / "mails").glob("*.html")}
    assert emls and {p.stem for p in emls} == htmls
    linked = {unquote(urlsplit(link).path) for link in parsed.links}
    for eml in emls:
        assert f"mails/{eml.stem}.html" in linked
        message = email.message_from_bytes(eml.read_bytes(), policy=email.policy.default)
        assert message["Subject"] and message["To"]


@pytest.mark.slow
def test_real_state_is_untouched_and_its_opt_outs_hold(project: Path) -> None:
    code, output = run("optout", "add", "jana.mueller@example.org")
    assert code == 0, output
    db = project / "state" / "invite-mailer.db"
    before = db.read_bytes()
    data = rehearse("--out", "probe")
    assert data["mails"]["invitation"] == contacts(project) - 1  # type: ignore[index]
    assert data["optouts"] == 1
    assert db.read_bytes() == before
    assert not (project / "outbox").exists()
    code, output = run("status", "--json")
    assert code == 0, output
    assert all(m["sent"] == 0 for m in json.loads(output)["mailings"])
    # Only the overview, the mails and the previews are left behind.
    assert sorted(p.name for p in (project / "probe").iterdir()) == [
        ".invite-mailer-rehearsal",
        "index.html",
        "mails",
        "previews",
    ]


@pytest.mark.slow
def test_a_second_run_replaces_the_first(project: Path) -> None:
    rehearse()
    stale = project / "rehearsal" / "mails" / "old.eml"
    stale.write_text("x", encoding="utf-8")
    rehearse()
    assert not stale.exists()


@pytest.mark.slow
def test_a_foreign_folder_is_never_overwritten(project: Path) -> None:
    code, output = run("rehearse", "--out", "config")
    assert code == 1
    assert "not written by invite-mailer rehearse" in output
    assert (project / "config" / "series.yaml").exists()
    assert not (project / "config" / "mails").exists()


# --- in a real browser ---------------------------------------------------------------------


def _chromium(url: str, profile: Path) -> tuple[str, str]:
    result = subprocess.run(
        [
            str(CHROMIUM),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            f"--user-data-dir={profile}",
            "--enable-logging=stderr",
            "--v=0",
            "--dump-dom",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout, result.stderr


def _console(stderr: str) -> list[str]:
    return [
        line
        for line in stderr.splitlines()
        if ":CONSOLE" in line or "ERROR:CONSOLE" in line or "Uncaught" in line
    ]


@pytest.mark.system
def test_overview_renders_in_chromium_without_errors(project: Path, tmp_path: Path) -> None:
    if not CHROMIUM.exists():
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true but /usr/bin/chromium is missing (.ci/run installs it)")
        pytest.skip("chromium is not installed (/usr/bin/chromium); apt-get install chromium")
    # The check itself works: a broken page is caught.
    broken = tmp_path / "broken.html"
    broken.write_text("<!DOCTYPE html><script>noSuchFunction();</script>", encoding="utf-8")
    _, stderr = _chromium(broken.as_uri(), tmp_path / "profile-a")
    assert _console(stderr), "chromium reported no console error for a broken page"

    rehearse()
    index = project / "rehearsal" / "index.html"
    dom, stderr = _chromium(index.as_uri(), tmp_path / "profile-b")
    assert _console(stderr) == []
    assert "<h1>Probelauf: Online-Transferreihe</h1>" in dom
    for event in EVENTS:
        assert f'id="reminder-{event}"' in dom and f'id="followup-{event}"' in dom
    assert 'id="invitation-series"' in dom
    # Nine mailings of the rules, and the confirmations filed under each first date.
    confirmations = len(set(registered_contacts(project)))
    assert len(re.findall(r'<section class="mailing"', dom)) == 9 + confirmations
    assert "Verwaltung transformieren – Effizienz steigern" in dom
