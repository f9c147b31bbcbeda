"""Headless Chromium for the mails' HTML: how wide each page lays out, and screenshots.

Used by the layout tests and by ``bench/screenshots.py``. Chromium runs with
a throw-away profile and no network; pages are local files.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

CHROMIUM = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))

_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--hide-scrollbars",
    "--force-device-scale-factor=1",
)

_STYLE = re.compile(r"<style\b[^>]*>.*?</style>", re.S | re.I)


def available() -> bool:
    """Whether Chromium can be run here."""
    return CHROMIUM.exists() and os.access(CHROMIUM, os.X_OK)


def without_style(html: str) -> str:
    """*html* as a client that drops ``<style>`` shows it (Gmail's apps for other
    accounts, Gmail in a phone's browser): every ``<style>`` element removed.
    Conditional comments for Outlook are comments, so they stay out too."""
    return _STYLE.sub("", html)


@dataclass(frozen=True)
class Layout:
    """How one page laid out in a viewport of *viewport* CSS pixels."""

    name: str
    viewport: int
    scroll_width: int
    height: int
    # Elements whose right edge is beyond the viewport: "tag.class: text".
    overflowing: tuple[str, ...]


# Lays every page out in an iframe of its width, then writes what it measured
# into the DOM that --dump-dom prints.
_MEASURE = """<!DOCTYPE html><html><head><meta charset="utf-8"></head><body>
<pre id="result"></pre>
<script>
const pages = %s;
const frames = pages.map((page) => {
  const frame = document.createElement("iframe");
  frame.style.width = page.width + "px";
  frame.style.height = "800px";
  frame.style.border = "0";
  frame.srcdoc = page.html;
  document.body.appendChild(frame);
  return frame;
});
window.addEventListener("load", () => {
  const out = frames.map((frame, i) => {
    const doc = frame.contentDocument;
    const width = pages[i].width;
    const over = [];
    for (const el of doc.body.querySelectorAll("*")) {
      const box = el.getBoundingClientRect();
      if (box.width > 0 && box.right > width + 0.5) {
        const text = (el.textContent || "").trim().replace(/\\s+/g, " ").slice(0, 60);
        over.push(el.tagName.toLowerCase() + "." + (el.className || "") + " (" +
                  Math.round(box.right) + " px): " + text);
      }
    }
    return {name: pages[i].name, viewport: width,
            scroll_width: doc.documentElement.scrollWidth,
            height: doc.documentElement.scrollHeight, overflowing: over.slice(0, 10)};
  });
  document.getElementById("result").textContent = JSON.stringify(out);
});
</script></body></html>
"""


def _run(args: Sequence[str], profile: Path, timeout: float = 180) -> str:
    result = subprocess.run(
        [str(CHROMIUM), *_FLAGS, f"--user-data-dir={profile}", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"chromium failed ({result.returncode}): {result.stderr[-2000:]}")
    return result.stdout


def measure(pages: Mapping[str, str], widths: Sequence[int], work: Path) -> list[Layout]:
    """Lay out every page of *pages* (name → HTML) at every width, in one Chromium run."""
    entries = [
        {"name": name, "width": width, "html": html}
        for name, html in pages.items()
        for width in widths
    ]
    page = work / "measure.html"
    # "</" cannot end the script early once escaped; JSON stays valid.
    page.write_text(_MEASURE % json.dumps(entries).replace("</", "<\\/"), encoding="utf-8")
    dom = _run(
        ["--virtual-time-budget=20000", "--dump-dom", page.as_uri()], work / "profile-measure"
    )
    found = re.search(r'<pre id="result">(.*?)</pre>', dom, re.S)
    if not found or not found.group(1).strip():
        raise RuntimeError(f"the measuring page wrote no result: {dom[:500]!r}")
    text = found.group(1).replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")
    return [
        Layout(
            name=item["name"],
            viewport=item["viewport"],
            scroll_width=item["scroll_width"],
            height=item["height"],
            overflowing=tuple(item["overflowing"]),
        )
        for item in json.loads(text)
    ]


def screenshot(html: str, width: int, height: int, out: Path) -> None:
    """A PNG of *html* laid out *width* CSS pixels wide, *height* tall."""
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        page = work / "page.html"
        page.write_text(html, encoding="utf-8")
        _run(
            [
                f"--window-size={width},{height}",
                f"--screenshot={out}",
                "--virtual-time-budget=5000",
                page.as_uri(),
            ],
            work / "profile",
        )


def require_chromium() -> None:
    """Skip the calling test without Chromium, or fail it under ``CI=true``."""
    import pytest

    if available():
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true but {CHROMIUM} is missing (.ci/run installs chromium)")
    pytest.skip(f"chromium is not installed ({CHROMIUM}); apt-get install chromium")
