"""The aiosmtplib internals that ``delivery.smtp_wire`` relies on are still there.

When one of these fails after an aiosmtplib upgrade, read ``smtp_wire`` against
the new release (``SMTP.mail``, ``SMTP.rcpt``, ``SMTP.data`` and
``SMTPProtocol.execute_data_command``), fix what changed, and move
``CHECKED_VERSIONS`` on.
"""

from __future__ import annotations

import inspect
from importlib.metadata import version

import aiosmtplib
import aiosmtplib.email
import aiosmtplib.protocol
from aiosmtplib import SMTPStatus
from aiosmtplib.protocol import SMTPProtocol

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
