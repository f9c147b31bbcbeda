"""Every kind of mail in the clients recipients use: Outlook for Windows, Gmail's apps, phones.

Two series: the shipped one and a copy titled "Klimadialog Kommunen" (a
masculine title). Three checks on the HTML parts exactly as composed:

- **caniemail** (the data of caniemail.com, npm package ``caniemail``): no
  feature that Outlook for Windows or a Gmail client does not support at all,
  unless it is one of :data:`FALLBACKS`, each with a check that its fallback
  is really there.
- **Chromium**: laid out 320 and 375 px wide, with and without the
  ``<style>`` block (Gmail's apps with other accounts drop it), nothing is
  wider than the screen.
- The structure those rely on: one ``<h1>``, ``lang="de"``, a VML button for
  Outlook beside every button, line heights Outlook honours.

caniemail is installed with npm into ``tests/.cache/node`` (gitignored; ``.ci/run``
installs it there too). Without node, npm (or the package) and Chromium these
tests skip with the reason, except under ``CI=true``, where that is a failure.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from support import browser
from support.samples import load_sample_config, sample_mails, sample_project, second_series

pytestmark = pytest.mark.system

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache" / "node"
MODULES = CACHE / "node_modules"
CHECKER = HERE / "support" / "caniemail_check.mjs"
CANIEMAIL = "caniemail@2.0.2"
# Outlook for Windows (Word engine) and every Gmail client: apps, mobile web, desktop web.
CLIENTS = ["outlook.windows", "gmail.*"]
VIEWPORTS = (320, 375)


def _in_ci() -> bool:
    return os.environ.get("CI") == "true"


def _missing(problem: str) -> None:
    if _in_ci():
        pytest.fail(f"{problem}; with CI=true this test must run (.ci/run installs it)")
    pytest.skip(problem)


# --- the mails ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The HTML part of every kind (both follow-up wordings, both update kinds),
    of the shipped series and of "Klimadialog Kommunen", by name."""
    found = {}
    for series, change in (("transferreihe", None), ("klimadialog", second_series)):
        config_dir = sample_project(tmp_path_factory.mktemp(series))
        if change is not None:
            change(config_dir)
        config = load_sample_config(config_dir)
        # Frau Dr. Jana Müller, and an organisation without a person's name.
        office = config.contacts.by_key("info@example.com")
        assert office is not None
        for contact in (config.contacts.contacts[0], office):
            for sample in sample_mails(config, contact):
                part = sample.message.get_body(("html",))
                assert part is not None
                found[f"{series}/{sample.name}/{contact.email}"] = part.get_content()
    assert len(found) == 2 * 2 * 10
    return found


# --- caniemail ---------------------------------------------------------------------------


def _style_is_only_media(html: str) -> bool:
    """Everything but @media was inlined: the <style> block holds no other rule."""
    styles = re.findall(r"<style\b[^>]*>(.*?)</style>", _without_comments(html), re.S)
    rest = re.sub(r"@media[^{]*\{(?:[^{}]*\{[^{}]*\})*\s*\}", "", "".join(styles))
    return rest.strip() == ""


def _without_comments(html: str) -> str:
    return re.sub(r"<!--.*?-->", "", html, flags=re.S)


def _every_button_has_vml(html: str) -> bool:
    """Each button has a VML roundrect for Outlook (rounded, clickable as a whole)
    next to the link that other clients show, hidden from Outlook."""
    links = html.count('class="button-link"')
    vml = len(re.findall(r"<!--\[if mso\]>\s*<v:roundrect\b[^>]*\bhref=", html))
    hidden = html.count("<!--[if !mso]><!-->")
    return links > 0 and links == vml == hidden


# A feature caniemail marks unsupported is allowed only with a fallback that
# still reads well; each says what happens without it, and the check proves
# the fallback is there.
FALLBACKS: dict[str, tuple[str, Callable[[str], bool]]] = {
    "@media": (
        "only widens the margins on big screens; the layout is fluid without it "
        "(test_no_mail_is_wider_than_a_phone lays it out without <style>)",
        _style_is_only_media,
    ),
    "<style> element": (
        "every rule is inlined into style attributes; only @media stays",
        _style_is_only_media,
    ),
    "border-radius": (
        "Outlook for Windows shows the VML roundrect instead of the rounded link",
        _every_button_has_vml,
    ),
}


@pytest.fixture(scope="module")
def caniemail_modules() -> Path:
    """The caniemail package in the gitignored cache, installed on first use."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        _missing("needs node and npm (Debian: apt-get install nodejs npm)")
    wanted = CANIEMAIL.rpartition("@")[2]
    package = MODULES / "caniemail" / "package.json"
    if not package.exists() or json.loads(package.read_text())["version"] != wanted:
        CACHE.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(
            ["npm", "install", "--no-save", "--no-audit", "--no-fund", "--prefix", str(CACHE)]
            + [CANIEMAIL],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        if result.returncode != 0:
            _missing(f"npm could not install {CANIEMAIL}: {result.stderr.strip()[-500:]}")
    return MODULES


def caniemail(modules: Path, pages: dict[str, str]) -> dict[str, list[dict[str, object]]]:
    """caniemail's errors (unsupported features) for every page, for :data:`CLIENTS`."""
    result = subprocess.run(
        ["node", str(CHECKER), str(modules)],
        input=json.dumps({"clients": CLIENTS, "pages": pages}),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    answer: dict[str, list[dict[str, object]]] = json.loads(result.stdout)["pages"]
    return answer


def test_caniemail_catches_what_outlook_and_gmail_do_not_support(
    caniemail_modules: Path,
) -> None:
    # The check itself works: the features the mails used to have are found.
    old = (
        '<html><head><meta name="color-scheme" content="light"></head><body>'
        '<div style="display:none; opacity:0; max-height:0; overflow:hidden">x</div>'
        '<span style="white-space:nowrap">14:00–16:00</span>'
        '<a href="https://example.org" target="_blank">a</a></body></html>'
    )
    found = caniemail(caniemail_modules, {"old": old})["old"]
    titles = {(str(i["client"]), str(i["title"])) for i in found}
    assert ("outlook.windows", "white-space") in titles, titles
    assert ("outlook.windows", "opacity") in titles, titles
    assert ("gmail.mobile-webmail", "display:none") in titles, titles
    assert ("gmail.android", "target attribute") in titles, titles


def test_no_unsupported_feature_without_fallback(
    caniemail_modules: Path, pages: dict[str, str]
) -> None:
    found = caniemail(caniemail_modules, pages)
    assert set(found) == set(pages)
    problems = []
    for name, issues in found.items():
        for issue in issues:
            title = str(issue["title"])
            fallback = FALLBACKS.get(title)
            where = f"{name}: {title} ({issue['client']}, line {issue['line']})"
            if fallback is None:
                problems.append(f"{where}: not supported and no fallback")
            elif not fallback[1](pages[name]):
                problems.append(f"{where}: the fallback is missing ({fallback[0]})")
    assert problems == []


# --- Chromium ----------------------------------------------------------------------------


def test_the_width_check_finds_a_wide_mail(tmp_path: Path) -> None:
    browser.require_chromium()
    wide = (
        '<html><body><table width="624"><tr><td>x</td></tr></table>'
        "<p>https://example.org/ein/sehr/langer/link/ohne/eine/stelle/zum/umbrechen/"
        "0123456789abcdefghijklmnopqrstuvwxyz</p></body></html>"
    )
    layouts = browser.measure({"wide": wide}, VIEWPORTS, tmp_path)
    assert [layout.viewport for layout in layouts] == list(VIEWPORTS)
    for layout in layouts:
        assert layout.scroll_width > layout.viewport
        assert any(item.startswith("table.") for item in layout.overflowing), layout


def test_no_mail_is_wider_than_a_phone(pages: dict[str, str], tmp_path: Path) -> None:
    browser.require_chromium()
    shown = {
        **pages,
        **{f"{name} (no <style>)": browser.without_style(h) for name, h in pages.items()},
    }
    layouts = browser.measure(shown, VIEWPORTS, tmp_path)
    assert len(layouts) == len(shown) * len(VIEWPORTS)
    too_wide = [
        f"{layout.name} at {layout.viewport} px: {layout.scroll_width} px wide; "
        + "; ".join(layout.overflowing)
        for layout in layouts
        if layout.scroll_width > layout.viewport or layout.overflowing
    ]
    assert too_wide == []
    # Laid out at all: a mail is far longer than it is wide.
    assert all(layout.height > 1000 for layout in layouts)


# --- the structure the checks rely on --------------------------------------------------------


def test_structure_for_outlook_and_screen_readers(pages: dict[str, str]) -> None:
    for name, html in pages.items():
        visible = _without_comments(html)
        assert len(re.findall(r"<h1\b", visible)) == 1, name
        assert re.search(r'<html lang="de"', html), name
        # A fixed 600 px table only for Outlook, which ignores max-width.
        assert '<!--[if mso]><table role="presentation" width="600"' in html, name
        assert "max-width: 600px" in visible, name
        # Outlook takes line heights in px only together with this rule.
        for style in re.findall(r'style="([^"]*line-height[^"]*)"', visible):
            assert "mso-line-height-rule: exactly" in style, (name, style)
        if "button-link" in html:
            assert _every_button_has_vml(html), name
        # What the mails no longer use (caniemail: unsupported in Outlook or Gmail).
        for gone in ("white-space", "display: none", "opacity", 'target="_blank"'):
            assert gone not in visible, (name, gone)


def test_old_values_are_struck_through_with_their_dashes_visible(pages: dict[str, str]) -> None:
    html = pages["transferreihe/update/jana.mueller@example.org"]
    # 10:00–12:00 was the old time: the dash stays outside the strike-through.
    assert "<s>Donnerstag, 14. November 2024, 10:00</s>&nbsp;–&nbsp;<s>12:00 Uhr</s>" in html
    link = pages["transferreihe/update-link/jana.mueller@example.org"]
    # The old join link may break (it is not clickable: nobody should use it).
    assert re.search(r'bisher: <span class="url" style="[^"]*word-break: break-word', link)
    assert "<s>https://konferenz.example.org/j/0123456789?pwd=" in link
