"""MAIL, RCPT and DATA below aiosmtplib's public API: the one file to re-check
on an aiosmtplib upgrade.

aiosmtplib's ``mail``/``rcpt``/``data`` parse every address again and
normalise line ends and dot-stuff with regular expressions over the whole
message, a fifth of the CPU time of sending a mail. The functions here send
the same bytes and raise the same errors by cheaper means, and to do that
they rely on aiosmtplib's internals: ``SMTP.protocol`` and its
``execute_command``, ``write`` and ``read_response``, ``SMTP.timeout``,
``aiosmtplib.email.quote_address`` and
``aiosmtplib.protocol.normalize_message_line_endings``. ``tests/test_smtp_wire.py``
fails when one of them changes; ``CHECKED_VERSIONS`` is the range of
aiosmtplib releases this file was read against.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import aiosmtplib
from aiosmtplib import (
    SMTPDataError,
    SMTPRecipientRefused,
    SMTPResponse,
    SMTPSenderRefused,
    SMTPServerDisconnected,
    SMTPStatus,
    SMTPTimeoutError,
)
from aiosmtplib.email import quote_address
from aiosmtplib.protocol import normalize_message_line_endings

from invite_mailer.delivery.handover import Handover, mark_handover
from invite_mailer.mail.mime import crlf_lines

__all__ = [
    "CHECKED_VERSIONS",
    "DOT_ATOM",
    "data",
    "data_block",
    "mail",
    "quote",
    "rcpt",
    "transmitted_size",
]

# The aiosmtplib releases (from, up to but excluding) whose internals were
# checked against this file.
CHECKED_VERSIONS = ("5.1.3", "6")

# A dot-atom address: email.utils.parseaddr, which aiosmtplib's quote_address
# runs on every address, returns it unchanged.
DOT_ATOM = re.compile(
    r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
    r"@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*"
)


def quote(address: str) -> str:
    """``aiosmtplib.email.quote_address(address)``, without parsing plain addresses."""
    return f"<{address}>" if DOT_ATOM.fullmatch(address) else quote_address(address)


def transmitted_size(data: bytes) -> int:
    """Octets of *data* as DATA transmits it, CRLF line ends included (RFC 1870)."""
    return len(data) if crlf_lines(data) else len(normalize_message_line_endings(data))


async def mail(
    client: aiosmtplib.SMTP, sender: str, options: Sequence[str], encoding: str
) -> SMTPResponse:
    """``client.mail(sender, options=options, encoding=encoding)``, same bytes and errors."""
    response = await client.execute_command(
        b"MAIL",
        b"FROM:" + quote(sender).encode(encoding),
        *(option.encode("ascii") for option in options),
    )
    if response.code != SMTPStatus.completed:
        raise SMTPSenderRefused(response.code, response.message, sender)
    return response


async def rcpt(client: aiosmtplib.SMTP, recipient: str, encoding: str) -> SMTPResponse:
    """``client.rcpt(recipient, encoding=encoding)``, same bytes and errors."""
    response = await client.execute_command(b"RCPT", b"TO:" + quote(recipient).encode(encoding))
    if response.code not in (SMTPStatus.completed, SMTPStatus.will_forward):
        raise SMTPRecipientRefused(response.code, response.message, recipient)
    return response


def data_block(data: bytes) -> bytes | None:
    """What follows DATA for *data*: dot-stuffed, ended by ".", or None when
    *data* has line ends other than CRLF (aiosmtplib normalises those)."""
    if not crlf_lines(data):
        return None
    # RFC 5321 4.5.2: a line that starts with "." gets one more.
    stuffed = data.replace(b"\r\n.", b"\r\n..")
    if stuffed.startswith(b"."):
        stuffed = b"." + stuffed
    return stuffed + b".\r\n"


async def data(client: aiosmtplib.SMTP, message: bytes, written: Handover) -> SMTPResponse:
    """``client.data(message)``, with the same answers and errors.

    For a message whose line ends are CRLF already (every message
    invite-mailer composes) the bytes come from two quick ``bytes``
    operations; anything else goes through aiosmtplib. *written* (and the
    current send's handover) is marked the moment the data starts to leave.
    """
    protocol = client.protocol
    wire = data_block(message)
    if protocol is None or wire is None:
        # aiosmtplib's own DATA: counted as handed over from the command on.
        written.started = True
        mark_handover()
        return await client.data(message)
    try:
        start = await protocol.execute_command(b"DATA", timeout=client.timeout)
        if start.code != SMTPStatus.start_input:
            raise SMTPDataError(start.code, start.message)
        written.started = True
        mark_handover()
        protocol.write(wire)
        response = await protocol.read_response(timeout=client.timeout)
    except (SMTPServerDisconnected, SMTPTimeoutError):
        client.close()  # as SMTP.data(): the protocol state is unknown
        raise
    if response.code != SMTPStatus.completed:
        raise SMTPDataError(response.code, response.message)
    return response
