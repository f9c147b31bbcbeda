"""A round trip through a real Postfix: what arrives is what was sent.

A private Postfix instance (:mod:`support.postfix`: its own config, queue and
data directories in a temporary folder) listens on 127.0.0.1 and a free port
and delivers every recipient of example.org into one local Maildir; it
relays nothing. Every kind of mail goes through invite-mailer's SMTP
transport, and the delivered file must end with exactly the bytes that were sent (Postfix only puts its
own trace headers in front: Return-Path, X-Original-To, Delivered-To,
Received), so bodies, attachments and headers arrive intact, umlauts too.

Needs Postfix and root (Postfix's master runs as root and drops privileges):
skipped where either is missing, except under ``CI=true``, where that is a
failure.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from email import message_from_bytes, policy
from email.message import EmailMessage

import pytest

from invite_mailer.delivery.transport import SmtpTransport
from invite_mailer.inputs.settings import SmtpSettings
from invite_mailer.mail import mime
from support.postfix import Postfix, running_postfix
from support.samples import Sample, load_sample_config, sample_mails, sample_project

pytestmark = pytest.mark.system

SENDER = "transferreihe@example.org"
TRACE_HEADERS = {"return-path", "x-original-to", "delivered-to", "received"}


@pytest.fixture(scope="module")
def postfix() -> Iterator[Postfix]:
    with running_postfix() as instance:
        yield instance


@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory) -> list[Sample]:
    config = load_sample_config(sample_project(tmp_path_factory.mktemp("roundtrip")))
    contact = config.contacts.contacts[0]  # Frau Dr. Jana Müller
    return sample_mails(config, contact)


def dotted() -> EmailMessage:
    """A plain mail whose lines start with dots: SMTP must stuff and unstuff them."""
    message = EmailMessage(policy=policy.SMTP)
    message["From"] = SENDER
    message["To"] = "punkte@example.org"
    message["Subject"] = "Punkte am Zeilenanfang"
    message["Message-ID"] = "<dots.roundtrip@example.org>"
    message.set_content(
        ".\n..\n.eine Zeile mit Punkt\nnormal\n. \n...", cte="7bit", charset="us-ascii"
    )
    return message


def split_headers(data: bytes) -> tuple[list[bytes], bytes]:
    head, _, body = data.partition(b"\n\n")
    return re.split(rb"\n(?![ \t])", head), body


def test_every_kind_arrives_unchanged(postfix: Postfix, samples: list[Sample]) -> None:
    sent = {str(s.message["Message-ID"]): s.message for s in samples}
    probe = dotted()
    sent[str(probe["Message-ID"])] = probe

    async def send_all() -> None:
        settings = SmtpSettings(host="127.0.0.1", port=postfix.port, security="none")
        async with SmtpTransport(settings) as transport:
            for message in sent.values():
                recipient = message["To"].addresses[0].addr_spec
                answer = await transport.send(
                    mime.wire(message), sender=SENDER, recipients=[recipient]
                )
                assert answer.startswith("250"), answer

    asyncio.run(asyncio.wait_for(send_all(), timeout=30))
    arrived = postfix.delivered(len(sent))
    by_id = {}
    for data in arrived:
        found = re.search(rb"^Message-ID: (<[^>]+>)$", data, re.M | re.I)
        assert found, data[:500]
        by_id[found.group(1).decode()] = data
    assert set(by_id) == set(sent)

    for message_id, message in sent.items():
        original = message.as_bytes(policy=policy.SMTP)
        # Maildir files have LF line ends; everything else must be identical.
        expected = original.replace(b"\r\n", b"\n")
        data = by_id[message_id]
        assert data.endswith(expected), f"{message_id} changed on the way"
        added, _ = split_headers(data[: len(data) - len(expected)] + b"\n")
        names = {line.split(b":", 1)[0].decode().lower() for line in added if line}
        assert names <= TRACE_HEADERS, names

        delivered = message_from_bytes(data, policy=policy.default)
        assert isinstance(delivered, EmailMessage)
        assert str(delivered["Subject"]) == str(message["Subject"])
        assert str(delivered["To"]) == str(message["To"])
        assert not any(part.defects for part in delivered.walk())
        for kind in ("plain", "html"):
            part = message.get_body((kind,))
            if part is not None:
                got = delivered.get_body((kind,))
                assert got is not None and got.get_content() == part.get_content()
        assert [
            (p.get_filename(), p.get_payload(decode=True)) for p in delivered.iter_attachments()
        ] == [(p.get_filename(), p.get_payload(decode=True)) for p in message.iter_attachments()]

    # Umlauts survive in the subject, the name and both bodies.
    invitation = message_from_bytes(
        by_id[str(samples[0].message["Message-ID"])], policy=policy.default
    )
    assert isinstance(invitation, EmailMessage)
    assert "–" in str(invitation["Subject"])
    assert invitation["To"].addresses[0].display_name == "Dr. Jana Müller"
    text = invitation.get_body(("plain",))
    assert text is not None and "Sehr geehrte Frau Dr. Müller," in text.get_content()
    page = invitation.get_body(("html",))
    assert page is not None and "Städte" in page.get_content()
