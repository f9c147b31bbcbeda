"""DKIM signing with ``[dkim]``: every mail verifies with dkimpy against the published key.

The key is a test key in ``tests/data``; the public key the receivers would
look up is the one OpenSSL derived from it (``dkim-test.pub.b64``), not the
one invite-mailer derives, so a mistake in either shows. Verification asks no
DNS: dkimpy's lookup is answered from that record.
"""

from __future__ import annotations

import base64
import shutil
from email import message_from_bytes, policy
from pathlib import Path

import dkim
import pytest

from invite_mailer.inputs.config import load_config
from invite_mailer.mail import mime
from invite_mailer.mail.signing import DkimSigner, public_key_der
from support.cli import invoke, run
from support.mails import mails
from support.samples import load_sample_config, sample_mails, sample_project
from support.smtp import SmtpServer, smtp_env

DATA = Path(__file__).parent / "data"
KEY = DATA / "dkim-test.pem"
PUBLIC = base64.b64decode((DATA / "dkim-test.pub.b64").read_text())
SELECTOR = "im2024"
DOMAIN = "example.org"  # the shipped sender's domain
RECORD = b"v=DKIM1; k=rsa; p=" + base64.b64encode(PUBLIC)
RECORD_NAME = f"{SELECTOR}._domainkey.{DOMAIN}.".encode()
SIGNED = [
    "from",
    "to",
    "subject",
    "date",
    "message-id",
    "reply-to",
    "mime-version",
    "content-type",
    "list-unsubscribe",
    "list-unsubscribe-post",
]


def lookup(name: bytes, timeout: int = 5) -> bytes | None:
    """The DNS of the test: only the published record exists."""
    return RECORD if name == RECORD_NAME else None


def verifies(data: bytes) -> bool:
    return bool(dkim.verify(data, dnsfunc=lookup))


def signed_headers(data: bytes) -> list[str]:
    header = message_from_bytes(data, policy=policy.SMTP)["DKIM-Signature"]
    assert header is not None, "not signed"
    tags = dict(
        part.strip().split("=", 1) for part in "".join(str(header).split()).split(";") if part
    )
    return [name.strip() for name in tags["h"].split(":")]


def with_dkim(config: Path, extra: str = "") -> None:
    shutil.copy(KEY, config / "dkim.pem")
    with (config / "settings.toml").open("a", encoding="utf-8") as file:
        file.write(f'\n[dkim]\nselector = "{SELECTOR}"\nkey_file = "config/dkim.pem"\n{extra}')


def test_the_published_key_is_the_one_openssl_derives() -> None:
    assert public_key_der(KEY.read_bytes()) == PUBLIC


def test_every_kind_verifies_and_signs_the_unsubscribe_headers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    project = sample_project(tmp_path / "project")
    monkeypatch.chdir(project.parent)
    with_dkim(project)
    config = load_sample_config(project)
    signer = DkimSigner.from_settings(config.settings)
    assert signer is not None
    samples = sample_mails(config, config.contacts.contacts[0])
    assert {s.kind for s in samples} >= {"invitation", "reminder", "followup", "update"}
    for sample in samples:
        data = signer.sign(mime.wire(sample.message)).data
        assert verifies(data), sample.name
        assert signed_headers(data) == SIGNED, sample.name
        assert b"\r\nList-Unsubscribe-Post: List-Unsubscribe=One-Click" in data or (
            b"List-Unsubscribe-Post" not in data
        )
        # A changed byte in the body or a signed header breaks it.
        assert not verifies(data.replace(b"Sehr geehrte", b"Sehr geehrt", 1)), sample.name
        assert not verifies(data.replace(b"\r\nSubject: ", b"\r\nSubject: Re: ", 1))


def test_send_due_signs_what_the_relay_receives(project: Path, smtp_server: SmtpServer) -> None:
    with_dkim(project / "config")
    env = smtp_env(smtp_server.port)
    code, output = run(["send-due", "--now", "2024-10-24T10:05"], env)
    assert code == 0, output
    received = mails(smtp_server.received)
    assert {m.kind for m in received} == {"invitation", "summary:invitation"}
    for mail in received:
        assert mail.data.startswith(b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed;")
        assert verifies(mail.data), mail.to


@pytest.mark.slow
def test_preview_and_rehearse_show_the_signed_mail(project: Path) -> None:
    with_dkim(project / "config")
    code, output = run(["preview", "reminder", "--out", "preview"])
    assert code == 0, output
    (eml,) = (project / "preview").glob("*.eml")
    assert verifies(eml.read_bytes())
    code, output = run(["rehearse"])
    assert code == 0, output
    written = sorted((project / "rehearsal" / "mails").rglob("*.eml"))
    assert len(written) > 20
    assert all(verifies(path.read_bytes()) for path in written)


def test_validate_checks_the_key_and_prints_the_record(project: Path) -> None:
    with_dkim(project / "config")
    result = invoke(["validate"])
    assert result.exit_code == 0, result.output
    record = "".join(result.output.split())
    assert f"{SELECTOR}._domainkey.{DOMAIN}.INTXT" in record
    assert base64.b64encode(PUBLIC).decode() in record.replace('""', "")


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ('selector = "im2024"\nkey_file = "config/none.pem"', "does not exist"),
        ('selector = "im2024"\nkey_file = "config/bad.pem"', "holds no RSA private key"),
        ('key_file = "config/dkim.pem"', "dkim.selector is empty"),
        ('selector = "im2024"', "dkim.key_file is not"),
        ('selector = "im 2024"\nkey_file = "config/dkim.pem"', "is not a DNS name"),
        (
            'selector = "im2024"\nkey_file = "config/dkim.pem"\nheaders = ["To", "Subject"]',
            "must include From",
        ),
        ('selector = "im2024"\nkey_file = "config/dkim.pem"\nkey = "MIIE..."', "unknown"),
    ],
)
def test_a_wrong_dkim_setting_is_one_clear_error(
    project: Path, smtp_server: SmtpServer, setting: str, message: str
) -> None:
    config = project / "config"
    shutil.copy(KEY, config / "dkim.pem")
    (config / "bad.pem").write_text("-----BEGIN RSA PRIVATE KEY-----\nnot a key\n")
    with (config / "settings.toml").open("a", encoding="utf-8") as file:
        file.write(f"\n[dkim]\n{setting}\n")
    for command in (["validate"], ["send-due", "--now", "2024-10-24T10:05"]):
        result = invoke(command, smtp_env(smtp_server.port))
        assert result.exit_code == 1, result.output
        assert "settings.toml, line" in result.output
        assert message in result.output
    assert smtp_server.received == []


def test_signing_for_another_domain_is_warned_about(project: Path) -> None:
    config = project / "config"
    with_dkim(config, 'domain = "example.com"\n')
    result = invoke(["validate"])
    assert result.exit_code == 0, result.output
    assert "not the sender's domain 'example.org'" in result.output
    assert load_config(config, env_file=None).settings.dkim.domain == "example.com"
