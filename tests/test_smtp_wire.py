"""The aiosmtplib internals that ``delivery.smtp_wire`` relies on are still there.

When one of these fails after an aiosmtplib upgrade, read ``smtp_wire`` against
the new release (``SMTP.mail``, ``SMTP.rcpt``, ``SMTP.data``,
``SMTPProtocol.execute_command``, ``execute_data_command``, ``read_response``,
``data_received`` and ``connection_lost``), fix what changed, and move
``CHECKED_VERSIONS`` on.
"""

from __future__ import annotations

import asyncio
import inspect
from importlib.metadata import version

import aiosmtplib
import aiosmtplib.email
import aiosmtplib.protocol
import pytest
from aiosmtplib import SMTPStatus
from aiosmtplib.protocol import SMTPProtocol

from invite_mailer.delivery import smtp_wire
from invite_mailer.delivery.smtp_wire import CHECKED_VERSIONS


def _release(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(".")[:3] if part.isdigit())


def test_aiosmtplib_is_a_release_smtp_wire_was_checked_against() -> None:
    low, high = CHECKED_VERSIONS
    installed = version("aiosmtplib")
    assert _release(low) <= _release(installed) < _release(high), (
        f"aiosmtplib {installed} is outside {low} to {high}: re-check delivery/smtp_wire.py"
    )


def test_the_client_attributes_smtp_wire_reads_exist() -> None:
    client = aiosmtplib.SMTP(hostname="localhost", timeout=7.0)
    # Set on every client, None until connected.
    assert "protocol" in vars(client) and client.protocol is None
    assert client.timeout == 7.0
    assert inspect.iscoroutinefunction(aiosmtplib.SMTP.execute_command)
    params = inspect.signature(aiosmtplib.SMTP.execute_command).parameters
    assert params["args"].kind is inspect.Parameter.VAR_POSITIONAL
    assert "timeout" in params
    assert "message" in inspect.signature(aiosmtplib.SMTP.data).parameters


def test_the_protocol_methods_smtp_wire_calls_exist() -> None:
    assert inspect.iscoroutinefunction(SMTPProtocol.execute_command)
    params = inspect.signature(SMTPProtocol.execute_command).parameters
    assert params["args"].kind is inspect.Parameter.VAR_POSITIONAL
    assert params["timeout"].kind is inspect.Parameter.KEYWORD_ONLY
    assert inspect.iscoroutinefunction(SMTPProtocol.read_response)
    assert "timeout" in inspect.signature(SMTPProtocol.read_response).parameters
    assert list(inspect.signature(SMTPProtocol.write).parameters) == ["self", "data"]
    # What SMTP.data does itself, and the fast DATA replaces.
    assert inspect.iscoroutinefunction(SMTPProtocol.execute_data_command)


def test_the_helpers_smtp_wire_imports_behave_as_read() -> None:
    assert aiosmtplib.email.quote_address("a@example.org") == "<a@example.org>"
    normalize = aiosmtplib.protocol.normalize_message_line_endings
    assert normalize(b"a\nb\rc") == b"a\r\nb\r\nc\r\n"
    assert aiosmtplib.protocol.PERIOD_REGEX.sub(b"..", b".a\r\n.b\r\n") == b"..a\r\n..b\r\n"
    assert SMTPStatus.completed == 250
    assert SMTPStatus.will_forward == 251
    assert SMTPStatus.start_input == 354


def test_the_errors_smtp_wire_raises_take_the_arguments_it_passes() -> None:
    sender = aiosmtplib.SMTPSenderRefused(550, "no", "a@example.org")
    assert (sender.code, sender.message, sender.sender) == (550, "no", "a@example.org")
    recipient = aiosmtplib.SMTPRecipientRefused(450, "later", "b@example.org")
    assert (recipient.code, recipient.recipient) == (450, "b@example.org")
    refused = aiosmtplib.SMTPDataError(554, "spam")
    assert (refused.code, refused.message) == (554, "spam")


def test_what_the_pipelining_reader_stands_in_for() -> None:
    # The reader takes over the transport's protocol for a group's replies and
    # passes everything else on to aiosmtplib's protocol.
    for name in ("connection_lost", "pause_writing", "resume_writing", "data_received"):
        assert callable(getattr(SMTPProtocol, name)), name
    assert callable(asyncio.Transport.set_protocol) and callable(asyncio.Transport.get_protocol)
    assert callable(asyncio.WriteTransport.writelines)
    # The reply limits the reader applies are aiosmtplib's.
    assert aiosmtplib.protocol.MAX_LINE_LENGTH == 8192
    assert aiosmtplib.protocol.MAX_RESPONSE_LENGTH == 8192 * 4
    assert SMTPStatus.domain_unavailable == 421
    assert SMTPStatus.invalid_response == -1
    # The control characters a pipelined command line refuses are aiosmtplib's.
    assert aiosmtplib.protocol.COMMAND_INJECTION_REGEX.pattern == rb"[\x00-\x1f\x7f]"
    for byte in range(256):
        char = bytes([byte])
        refused = aiosmtplib.protocol.COMMAND_INJECTION_REGEX.search(char) is not None
        assert (smtp_wire.PROHIBITED.search(char) is not None) is refused, byte


async def test_aiosmtplib_still_reads_one_reply_per_write() -> None:
    """Why the reader exists: replies that arrive together, aiosmtplib takes one of.

    When this fails, aiosmtplib may read pipelined replies itself, and the
    reader in smtp_wire could go.
    """
    protocol = SMTPProtocol()
    assert "transport" in vars(protocol)  # the reader writes through it
    protocol.connection_made(asyncio.Transport())  # never written to
    protocol.data_received(b"250 first\r\n250 second\r\n")
    assert await protocol.read_response(timeout=1) == (250, "first")
    with pytest.raises(aiosmtplib.SMTPTimeoutError):
        # The second reply stays in its buffer until more data arrives.
        await protocol.read_response(timeout=0.05)
