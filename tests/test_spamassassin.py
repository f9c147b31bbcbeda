"""Every kind of mail, scored by SpamAssassin with local tests only.

``spamassassin -L -t`` runs the rules shipped with the Debian package (no
network tests: no DNS blocklists, no Razor/Pyzor, no sa-update needed) on the
exact bytes invite-mailer sends. Each mail must score below 1.0 (SpamAssassin
calls 5.0 spam); the rules that fired are printed with their points.

Needs the ``spamassassin`` program: skipped where it is missing, except under
``CI=true`` (``.ci/run`` installs it), where that is a failure.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from email import policy
from pathlib import Path

import pytest

from invite_mailer.inputs.settings import DKIM_HEADERS
from invite_mailer.mail import mime
from invite_mailer.mail.signing import DkimSigner
from support.samples import Sample, load_sample_config, sample_mails, sample_project

pytestmark = pytest.mark.system

LIMIT = 1.0
NAMES = [
    "invitation",
    "reminder",
    "followup-links",
    "followup-attachment",
    "followup-absent",
    "update",
    "update-link",
    "cancellation",
    "confirmation",
    "confirmation-several",
]


def require(program: str) -> None:
    if shutil.which(program) is not None:
        return
    problem = f"needs {program} (Debian: apt-get install spamassassin)"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{problem}; with CI=true this test must run (.ci/run installs it)")
    pytest.skip(problem)


@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Sample]:
    config = load_sample_config(sample_project(tmp_path_factory.mktemp("spamassassin")))
    contact = config.contacts.contacts[0]  # Frau Dr. Jana Müller
    return {sample.name: sample for sample in sample_mails(config, contact)}


def spamassassin(data: bytes, home: Path) -> tuple[float, list[tuple[float, str]]]:
    """SpamAssassin's score for *data* and the rules that fired (points, name)."""
    prefs = home / "user_prefs"
    prefs.touch()
    result = subprocess.run(
        ["spamassassin", "-L", "-t", "--prefspath", str(prefs)],
        input=data,
        capture_output=True,
        timeout=120,
        env={"HOME": str(home), "PATH": os.environ.get("PATH", ""), "LANG": "C.UTF-8"},
        check=False,
    )
    report = result.stdout.decode("utf-8", "replace")
    found = re.search(r"Content analysis details:\s+\((-?[0-9.]+) points", report)
    assert found, f"no SpamAssassin report (exit {result.returncode}): {result.stderr!r}"
    table = report[found.end() :]
    rules = [
        (float(points), name)
        for points, name in re.findall(r"^\s*(-?[0-9]+\.[0-9]+)\s+([A-Z][A-Z0-9_]+)\s", table, re.M)
    ]
    return float(found.group(1)), rules


def assert_scores_low(
    label: str, data: bytes, home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """SpamAssassin's score of *data* is below the limit; printed either way."""
    total, rules = spamassassin(data, home)
    fired = ", ".join(f"{rule} {points:+.1f}" for points, rule in rules) or "no rule"
    with capsys.disabled():  # in the test output even when the test passes
        print(f"\n  SpamAssassin, {label}: {total:.1f} points ({fired})", end="")
    assert total < LIMIT, f"{label} scores {total:.1f} points: {fired}"


@pytest.mark.parametrize("name", NAMES)
def test_spam_score_is_low(
    name: str,
    samples: dict[str, Sample],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    require("spamassassin")
    sample = samples[name]
    if sample.attachment:
        files = [part.get_filename() or "" for part in sample.message.iter_attachments()]
        assert any(f.endswith(".pdf") for f in files), files
    assert_scores_low(name, sample.message.as_bytes(policy=policy.SMTP), tmp_path, capsys)


@pytest.mark.parametrize("name", NAMES)
def test_dkim_signed_mail_scores_low(
    name: str,
    samples: dict[str, Sample],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Signed with ``[dkim]`` (the test key). SpamAssassin's DKIM rules are network
    tests, off with ``-L``: this checks that the signature header itself trips
    no local rule."""
    require("spamassassin")
    key = Path(__file__).parent / "data" / "dkim-test.pem"
    signer = DkimSigner("im2024", "example.org", key.read_bytes(), DKIM_HEADERS)
    data = signer.sign(mime.wire(samples[name].message)).data
    assert data.startswith(b"DKIM-Signature: v=1; a=rsa-sha256;")
    assert_scores_low(f"{name}, DKIM-signed", data, tmp_path, capsys)
