"""Screenshots of every kind of mail for the organiser guide (docs/img/).

Composes one mail of every kind for Frau Dr. Jana Müller from a copy of the
shipped series (with result materials, as ``tests/support/samples.py`` sets
them up), lays each HTML part out in headless Chromium 375 px (a phone) and
600 px (a desktop client's reading pane) wide, and writes
``docs/img/<kind>-375.png`` and ``docs/img/<kind>-600.png`` at full length.

    .venv/bin/python bench/screenshots.py            # all of them
    .venv/bin/python bench/screenshots.py --out DIR  # somewhere else

Needs Chromium (``/usr/bin/chromium``, or ``CHROMIUM=...``).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import common  # first: puts tests/ on the import path

from invite_mailer.mail.compose import Composer
from support import browser
from support.samples import load_sample_config, sample_mails, sample_project

OUT = common.DOCS / "img"
WIDTHS = (375, 600)
# Sample name → file name in the guide (German, as the guide is).
SHOWN = {
    "invitation": "einladung",
    "reminder": "erinnerung",
    "followup-links": "nachbereitung",
    "update": "aenderung",
    "cancellation": "absage",
}


def html_parts(root: Path) -> dict[str, str]:
    """The HTML part of every shown kind, by its file name."""
    config = load_sample_config(sample_project(root))
    contact = config.contacts.contacts[0]  # Frau Dr. Jana Müller
    samples = sample_mails(config, contact, composer=Composer.from_config(config))
    pages = {}
    for sample in samples:
        if sample.name in SHOWN:
            part = sample.message.get_body(("html",))
            assert part is not None, sample.name
            pages[SHOWN[sample.name]] = part.get_content()
    return pages


def shrink(path: Path) -> None:
    """Fewer colours (the mails have few): a quarter of the file size, same look."""
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow comes with the bench extra
        return
    with Image.open(path) as image:
        small = image.convert("RGB").quantize(colors=128, method=Image.Quantize.MEDIANCUT)
    small.save(path, optimize=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=OUT, help="folder for the PNGs")
    options = parser.parse_args()
    if not browser.available():
        raise SystemExit(f"needs Chromium at {browser.CHROMIUM} (apt-get install chromium)")
    options.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        pages = html_parts(work / "project")
        for layout in browser.measure(pages, WIDTHS, work):
            target = options.out / f"{layout.name}-{layout.viewport}.png"
            browser.screenshot(pages[layout.name], layout.viewport, layout.height, target)
            shrink(target)
            print(f"{target} ({layout.viewport}×{layout.height} px)")


if __name__ == "__main__":
    main()
