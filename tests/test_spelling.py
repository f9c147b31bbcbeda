"""Every kind of mail, spell-checked with hunspell's German dictionary (de_DE).

The subject, the text part and the visible text of the HTML part of every
kind, for every contact of the shipped list, in three series: the shipped
one (feminine title), "Klimadialog Kommunen" (masculine) and the same without
``title_genus``. Only names and technical words may be unknown to the
dictionary, and they are listed here.

Needs ``hunspell`` and ``hunspell-de-de``: skipped where they are missing,
except under ``CI=true`` (``.ci/run`` installs them), where that is a failure.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from html import unescape
from pathlib import Path

import pytest

from support.samples import load_sample_config, sample_mails, sample_project, second_series

pytestmark = pytest.mark.system

DICTIONARY = Path("/usr/share/hunspell/de_DE.dic")
# Names (of people, places, the project) and abbreviations the dictionary cannot know.
KNOWN = {
    "KomKomIn",
    "BMBF-Fördermaßnahmen",
    "Musterhausen",
    "Östreich",
    "Yılmaz",
    "Kim",
    "Do.",
}


def _require() -> None:
    if shutil.which("hunspell") is not None and DICTIONARY.exists():
        return
    problem = "needs hunspell with the German dictionary (apt-get install hunspell hunspell-de-de)"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{problem}; with CI=true this test must run (.ci/run installs it)")
    pytest.skip(problem)


def _visible(html: str) -> str:
    html = re.sub(r"<!--.*?-->|<style\b.*?</style>|<title>.*?</title>", " ", html, flags=re.S)
    return unescape(re.sub(r"<[^>]+>", " ", html)).replace("\xa0", " ")


def _words(text: str) -> str:
    """*text* without links, addresses, file names and the signature separator."""
    text = re.sub(r"https?://\S+|\S+@\S+|\S+\.(?:ics|pdf)\b", " ", text)
    return re.sub(r"(?m)^--\s*$", " ", text)


def unknown(text: str) -> set[str]:
    """The words of *text* that hunspell's de_DE dictionary does not accept."""
    result = subprocess.run(
        ["hunspell", "-d", "de_DE", "-l"],
        input=text,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "LANG": "C.UTF-8"},
        check=True,
    )
    return {word for word in result.stdout.split() if word.strip("-")}


@pytest.mark.parametrize("series", ["transferreihe", "klimadialog", "ohne-genus"])
def test_every_mail_is_spelled_right(series: str, tmp_path: Path) -> None:
    _require()
    config_dir = sample_project(tmp_path)
    if series != "transferreihe":
        second_series(config_dir, genus="m" if series == "klimadialog" else None)
    config = load_sample_config(config_dir)
    texts = []
    for contact in config.contacts.contacts:
        for sample in sample_mails(config, contact):
            plain = sample.message.get_body(("plain",))
            html = sample.message.get_body(("html",))
            assert plain is not None and html is not None
            texts += [str(sample.message["Subject"]), plain.get_content()]
            texts.append(_visible(html.get_content()))
    wrong = unknown(_words("\n".join(texts))) - KNOWN
    assert wrong == set()


def test_the_spell_check_finds_a_mistake() -> None:
    _require()
    assert unknown("Sehr geehrte Frau Müller, wir laden Sie herzlich zur Verantstaltung ein.") == {
        "Verantstaltung"
    }
