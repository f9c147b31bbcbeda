"""One mail transaction on a connected client: the envelope, the data, the replies.

With a relay that announces PIPELINING (RFC 2920) MAIL FROM, every RCPT TO
and DATA go out in one write and the replies are read in order afterwards;
otherwise each command waits for its reply (aiosmtplib's lock-step). Either
way a refusal raises the same aiosmtplib error at the same :class:`Phase`, so
:mod:`~invite_mailer.delivery.smtp_pool` gives it the same meaning: a refused
sender is :class:`aiosmtplib.SMTPSenderRefused` at MAIL, a refused
recipient is recorded in :attr:`Transaction.refused` and only raised (the
mildest refusal) when every recipient was refused, a refused DATA or message
is :class:`aiosmtplib.SMTPDataError` at DATA.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from enum import StrEnum

import aiosmtplib
from aiosmtplib import (
    SMTPDataError,
    SMTPHeloError,
    SMTPRecipientRefused,
    SMTPResponse,
    SMTPResponseException,
    SMTPSenderRefused,
    SMTPServerDisconnected,
    SMTPStatus,
    SMTPTimeoutError,
)
from email_validator import EmailNotValidError, validate_email

from invite_mailer.delivery import smtp_wire
from invite_mailer.delivery.handover import Handover
from invite_mailer.errors import PermanentFailure, SenderRefused

__all__ = ["Phase", "Transaction", "exchange"]

log = logging.getLogger(__name__)


class Phase(StrEnum):
    """The command whose reply a transaction waits for."""

    MAIL = "MAIL"
    RCPT = "RCPT"
    DATA = "DATA"


class Transaction:
    """How far one mail transaction got, for the meaning of its failure."""

    __slots__ = ("phase", "refused", "unsendable", "written")

    def __init__(self) -> None:
        self.phase = Phase.MAIL
        self.written = Handover()  # whether this message's data went onto the wire
        self.refused: list[SMTPRecipientRefused] = []
        self.unsendable: list[str] = []


_ACCEPTED = (SMTPStatus.completed, SMTPStatus.will_forward)


async def exchange(
    client: aiosmtplib.SMTP,
    tx: Transaction,
    sender: str,
    recipients: Sequence[str],
    data: bytes,
) -> SMTPResponse:
    """EHLO if needed, MAIL, RCPT for every recipient, DATA: the relay's final answer."""
    if client.is_ehlo_or_helo_needed:
        try:
            await client.ehlo()
        except SMTPHeloError:
            await client.helo()
    sender, sendable, tx.unsendable = _envelope(client, sender, recipients)
    if not sendable:
        raise PermanentFailure(tx.unsendable[0])
    options, encoding = _mail_options(client, sender, sendable, data)
    if client.supports_extension("pipelining"):
        with smtp_wire.Pipeline(client) as pipeline:
            return await _pipelined(pipeline, tx, sender, sendable, options, encoding, data)
    await smtp_wire.mail(client, sender, options, encoding)
    tx.phase = Phase.RCPT
    for recipient in sendable:
        try:
            await smtp_wire.rcpt(client, recipient, encoding)
        except SMTPRecipientRefused as exc:
            tx.refused.append(exc)
    if len(tx.refused) == len(sendable):
        raise _mildest(tx.refused)
    tx.phase = Phase.DATA
    return await smtp_wire.data(client, data, tx.written)


async def _pipelined(
    pipeline: smtp_wire.Pipeline,
    tx: Transaction,
    sender: str,
    recipients: Sequence[str],
    options: Sequence[str],
    encoding: str,
    data: bytes,
) -> SMTPResponse:
    """The envelope and DATA in one write, then every reply in order (RFC 2920 3.1)."""
    pipeline.send_envelope(sender, options, recipients, encoding)
    refusal: SMTPResponseException | None = None
    try:
        mail = await pipeline.reply()
        if mail.code == SMTPStatus.completed:
            tx.phase = Phase.RCPT
        else:
            refusal = SMTPSenderRefused(mail.code, mail.message, sender)
        for recipient in recipients:
            answer = await pipeline.reply()
            if answer.code not in _ACCEPTED:
                tx.refused.append(SMTPRecipientRefused(answer.code, answer.message, recipient))
        if refusal is None and len(tx.refused) == len(recipients):
            refusal = _mildest(tx.refused)
        if refusal is None:
            tx.phase = Phase.DATA
        start = await pipeline.reply()
    except (SMTPServerDisconnected, SMTPTimeoutError):
        # A verdict that came before the connection broke stands; a relay
        # that answers 421 closes the connection right after.
        closing = [exc for exc in tx.refused if exc.code == SMTPStatus.domain_unavailable]
        verdict = refusal or (closing[0] if closing else None)
        if verdict is None:
            raise
        raise verdict from None
    if refusal is not None:
        if start.code == SMTPStatus.start_input:
            # RFC 2920 3.1: DATA may be accepted even though nothing else
            # was; end the empty message. The refusal stands whatever the
            # answer, and a connection that breaks now is closed.
            with contextlib.suppress(SMTPServerDisconnected, SMTPTimeoutError):
                await pipeline.end_empty_data()
        raise refusal
    if start.code != SMTPStatus.start_input:
        raise SMTPDataError(start.code, start.message)
    return await pipeline.data(data, tx.written)


def _mildest(refused: Sequence[SMTPRecipientRefused]) -> SMTPRecipientRefused:
    # Temporary refusals win: the message may still go out later.
    return min(refused, key=lambda exc: exc.code)


def _envelope(
    client: aiosmtplib.SMTP, sender: str, recipients: Sequence[str]
) -> tuple[str, list[str], list[str]]:
    """Sender and recipients as this relay can take them, and the ones it cannot.

    A relay without SMTPUTF8 takes an internationalised domain in its ASCII
    (IDNA) form, which is the same address; a non-ASCII local part has no
    such form.
    """
    addresses = [sender, *recipients]
    if all(address.isascii() for address in addresses) or client.supports_extension("smtputf8"):
        return sender, list(recipients), []
    try:
        ascii_sender = _ascii_address(sender)
    except ValueError as exc:
        raise SenderRefused(f"the sender address {sender!r}: {exc}") from None
    sendable, unsendable = [], []
    for recipient in recipients:
        try:
            sendable.append(_ascii_address(recipient))
        except ValueError as exc:
            unsendable.append(f"{recipient}: {exc}")
    return ascii_sender, sendable, unsendable


def _ascii_address(address: str) -> str:
    local, at, domain = address.rpartition("@")
    if not at or not local.isascii():
        raise ValueError(
            "the relay does not support SMTPUTF8; this address has a non-ASCII local part"
        )
    if domain.isascii():
        return address
    try:
        # IDNA 2008 through email-validator, as the To header is written: Python's
        # own "idna" codec is IDNA 2003 and maps straße.de to strasse.de, another
        # domain with another owner.
        ascii_domain = validate_email(address, check_deliverability=False).ascii_domain
    except EmailNotValidError:
        raise ValueError(
            "the relay does not support SMTPUTF8, and the domain has no valid ASCII (IDNA) form"
        ) from None
    return f"{local}@{ascii_domain}"


def _mail_options(
    client: aiosmtplib.SMTP, sender: str, recipients: Sequence[str], data: bytes
) -> tuple[list[str], str]:
    options: list[str] = []
    if client.supports_extension("size"):
        options.append(f"SIZE={smtp_wire.transmitted_size(data)}")
    if not data.isascii():
        if client.supports_extension("8bitmime"):
            options.append("BODY=8BITMIME")
        else:
            log.warning("the relay does not announce 8BITMIME; sending 8-bit data anyway")
    encoding = "ascii"
    if not (sender.isascii() and all(recipient.isascii() for recipient in recipients)):
        if not client.supports_extension("smtputf8"):
            raise PermanentFailure(
                "an address contains non-ASCII characters and the relay does not support SMTPUTF8"
            )
        options.append("SMTPUTF8")
        encoding = "utf-8"
    return options, encoding
