"""From a rendered mail to a standard-library message: MIME, headers, boundaries.

:func:`build` is the reference form of every mail: the parts, the header
folding (with the fixes below for what the standard library gets wrong) and
the multipart boundaries, all derived from a :class:`RenderedMail`. The fast
path (``mail.fastwire``) produces the same bytes and is checked against it.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from email import message_from_bytes
from email import policy as email_policy
from email.header import Header
from email.headerregistry import (
    Address,
    BaseHeader,
    HeaderRegistry,
    UniqueAddressHeader,
    UnstructuredHeader,
)
from email.message import EmailMessage, MIMEPart
from email.utils import format_datetime, getaddresses, parseaddr
from functools import lru_cache
from typing import Any, cast

from email_validator import EmailNotValidError, validate_email

from invite_mailer.core import german
from invite_mailer.core.plan import MailRequest
from invite_mailer.errors import ConfigError
from invite_mailer.inputs.contacts import Contact
from invite_mailer.inputs.materials import UNSAFE_HEADER_TEXT, File

# Addresses the header parser passes through unchanged: dot-atoms of letters,
# digits, "_", "+" and "-" (no "=" or "?", which could start an encoded word).
PLAIN_ADDRESS = re.compile(
    r"[A-Za-z0-9_+-]+(?:\.[A-Za-z0-9_+-]+)*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*"
)

#: A To address: (display name, plain address), an :class:`Address`, or the
#: header value of an address the standard library has no Address for.
Recipient = Address | tuple[str, str] | str

# --- the List-Unsubscribe header ------------------------------------------------------


class _UrlListHeader(UnstructuredHeader, BaseHeader):
    """``<url>, <url>`` header folded between the URLs, never encoded.

    The default folding RFC 2047-encodes any word longer than a line, which
    turns a long unsubscribe URL into an encoded word no client can follow.
    """

    max_count = 1

    def fold(self, *, policy: Any) -> str:
        urls = re.findall(r"<[^<>]*>", str(self))
        linesep: str = policy.linesep
        return f"{self.name}: " + ("," + linesep + " ").join(urls) + linesep


class _AddressHeader(UniqueAddressHeader):
    """An address header that always parses back to the addresses it was given.

    The standard library (3.11) drops the quotes of a quoted display name when
    it folds a long header: ``"Schmidt, victim@evil.example, ..." <a@b>``
    comes out with the comma bare, so readers see another address; or it
    folds inside the quotes, which RFC 5322 allows but readers that keep the
    line break (Python's default compat32 parser, ``getaddresses`` on
    ``get_all()``) end the quoted string at, so the rest of the name is read
    as addresses. It also cannot write a non-ASCII local part at all. Its
    folding is kept wherever it is right (almost always: the header fits on
    one line); otherwise the header is folded here, never inside quotes.
    """

    def fold(self, *, policy: Any) -> str:
        linesep: str = policy.linesep
        wanted = [(a.display_name, a.addr_spec) for a in self.addresses]
        # "=?" in a name would be read as an encoded word by lenient readers.
        if all(spec.isascii() and "=?" not in name for name, spec in wanted):
            folded: str = super().fold(policy=policy)  # type: ignore[misc]
            if _reads_back(folded, linesep, wanted) and not _breaks_a_quote(folded):
                return folded
        # A mixin of BaseHeader (the registry combines them), which has the name.
        return _fold_addresses(cast(BaseHeader, self).name, wanted, linesep)


class _Headers(HeaderRegistry):
    """Builds each header class once; the stdlib creates a new class per header
    set, a tenth of the time of composing a mail."""

    def __init__(self) -> None:
        super().__init__()
        self._classes: dict[str, type[BaseHeader]] = {}
        self.map_to_type("list-unsubscribe", _UrlListHeader)
        for name in ("from", "to", "reply-to", "cc"):
            self.map_to_type(name, cast(type[BaseHeader], _AddressHeader))

    def __getitem__(self, name: str) -> type[BaseHeader]:
        key = name.lower()
        cls = self._classes.get(key)
        if cls is None:
            cls = self._classes[key] = super().__getitem__(name)
        return cls


_HEADERS = _Headers()
_FOLD_WIDTH = 78  # what policy.SMTP folds headers to


def _reads_back(folded: str, linesep: str, wanted: list[tuple[str, str]]) -> bool:
    """Whether *folded* parses (unfolded, as every reader does) to exactly *wanted*."""
    value = folded.split(":", 1)[1].replace(linesep, "")
    found = getaddresses([value])
    if [spec for _, spec in found] != [spec for _, spec in wanted]:
        return False
    # Non-ASCII names are encoded words, which getaddresses leaves as they are.
    return all(
        name == shown or not shown.isascii()
        for (name, _), (shown, _) in zip(found, wanted, strict=True)
    )


def _breaks_a_quote(folded: str) -> bool:
    """Whether a line break of *folded* lies inside a quoted string."""
    inside = escaped = False
    for char in folded:
        if escaped:
            escaped = False
        elif inside and char == "\\":
            escaped = True
        elif char == '"':
            inside = not inside
        elif inside and char in "\r\n":
            return True
    return False


def _fold_addresses(header: str, addresses: list[tuple[str, str]], linesep: str) -> str:
    """``header: name <spec>, ...`` folded so that every name stays whole.

    ASCII names of plain words are folded at their spaces; ASCII names with
    specials are written as one quoted string, never folded inside (a line
    of its own holds it: lines may have up to 998 octets); longer names and
    other names as RFC 2047 encoded words, which contain no specials and may
    be split between words. A non-ASCII local part has no ASCII form: it is
    written as raw UTF-8 (RFC 6532); such a mail can only go through a relay
    that offers SMTPUTF8, which the transport checks.
    """
    tokens: list[str] = []
    for number, (name, spec) in enumerate(addresses):
        comma = "" if number == len(addresses) - 1 else ","
        phrase = _quoted(name) if name.isascii() and "=?" not in name else ""
        words = [phrase] if phrase.startswith('"') else phrase.split(" ")
        # A long word makes a long line (fine up to 998 octets); beyond that
        # only encoded words can be split.
        if name and phrase and max(map(len, words)) < 900:
            tokens += words
        elif name:
            prefix = len(header) + 2 if not tokens else 1
            encoded = Header(name, "utf-8", maxlinelen=_FOLD_WIDTH - 1).encode(
                linesep="\n", splitchars=" "
            )
            words = [w.strip() for w in encoded.split("\n")]
            if prefix + len(words[0]) > _FOLD_WIDTH:
                tokens.append((linesep + " ").join(words))  # starts on a line of its own
            else:
                tokens += words
        tokens.append((f"<{_raw(spec)}>" if name else _raw(spec)) + comma)
    lines = [f"{header}:"]
    for token in tokens:
        if lines[-1] and len(lines[-1]) + 1 + len(token) > _FOLD_WIDTH and lines[-1].strip():
            lines.append("")
        lines[-1] += " " + token if token else " "
    return linesep.join(lines) + linesep


def _quoted(name: str) -> str:
    """*name* as an RFC 5322 phrase: as it is if it is plain words, else quoted."""
    if all(word and _ATEXT.fullmatch(word) for word in name.split(" ")):
        return name
    return '"' + _escaped(name) + '"'


def _escaped(name: str) -> str:
    return name.replace("\\", "\\\\").replace('"', '\\"')


# A word of a phrase that needs no quotes (RFC 5322 atext).
_ATEXT = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+")


def _raw(spec: str) -> str:
    # Written to the wire as the UTF-8 bytes (surrogateescape, as policy.SMTP does).
    return spec if spec.isascii() else spec.encode("utf-8").decode("ascii", "surrogateescape")


# SMTP line endings; 76 keeps quoted-printable lines within RFC 2045.
POLICY = email_policy.SMTP.clone(max_line_length=76, header_factory=_HEADERS)


def mime_boundary(message_id: str, index: int) -> str:
    """The boundary of the *index*-th multipart (top level first) of a message.

    "=_" occurs in neither quoted-printable nor base64 text, so a boundary
    can never clash with a line of a body.
    """
    digest = hashlib.sha256(f"{message_id} {index}".encode()).hexdigest()[:24]
    return f"=_{digest}_{index}"


def set_boundaries(msg: EmailMessage) -> None:
    """Fix every multipart boundary of *msg*, derived from its Message-ID."""
    seed = str(msg["Message-ID"])
    for index, part in enumerate(p for p in msg.walk() if p.is_multipart()):
        part.set_boundary(mime_boundary(seed, index))


def recipient_parts(contact: Contact) -> tuple[str, str]:
    """The display name and the address of the To header, not yet parsed.

    The display name is the person's name, or for a contact without one the
    organisation ("Projektbüro Kreislaufregion <info@example.com>").
    german.clean removes line breaks so hostile data cannot split the header
    even if the loader missed it. An international domain is written in its
    ASCII form (RFC 2047 forbids encoded words inside an address).
    """
    return (
        german.display_name(contact.titel, contact.vorname, contact.nachname, contact.organisation),
        header_address(german.clean(contact.email)),
    )


@lru_cache(maxsize=4096)
def header_address(spec: str) -> str:
    """*spec* with its domain in the ASCII (IDNA, "xn--") form, as headers need it."""
    local, at, domain = spec.rpartition("@")
    if not at or domain.isascii():
        return spec
    try:
        ascii_domain = validate_email(spec, check_deliverability=False).ascii_domain
    except EmailNotValidError:
        return spec  # Address() below reports it
    return f"{local}@{ascii_domain}"


def recipient(contact: Contact) -> Recipient:
    """The To address of *contact*, checked; ConfigError for an invalid one.

    A plain address comes back as (display name, address): nothing to parse.
    Otherwise the display name goes through the header machinery (quoted or
    encoded there), never into a string.
    """
    name, spec = recipient_parts(contact)
    if PLAIN_ADDRESS.fullmatch(spec):
        return (name, spec)
    try:
        if not spec.isascii():
            # The standard library has no Address with a non-ASCII local
            # part; the header parses this and writes it as UTF-8.
            if UNSAFE_HEADER_TEXT.search(spec) or not _SPEC_CHARS.fullmatch(spec):
                raise ValueError("not a valid address")
            shown = _quoted(name) if name.isascii() else '"' + _escaped(name) + '"'
            return f"{shown} <{spec}>" if name else spec
        return Address(display_name=name, addr_spec=spec)
    except (ValueError, IndexError) as exc:
        where = f" (row {contact.row})" if contact.row is not None else ""
        raise ConfigError.single(
            None,
            f"invalid recipient address {contact.email!r}{where}: {exc}",
            hint="correct the address in the contact list",
        ) from None


# What a validated non-ASCII address may consist of: no quotes, brackets or spaces.
_SPEC_CHARS = re.compile(r"[^\s\"<>()\[\],;:\\@]+@[^\s\"<>()\[\],;:\\@]+")


def reply_to_address(value: str) -> Address | None:
    """The Reply-To header's address, or None when *value* holds none."""
    name, addr = parseaddr(value)
    if not addr:
        return None
    return Address(display_name=name, addr_spec=addr)


# --- the rendered mail, and the message built from it ---------------------------------


@dataclass(frozen=True, slots=True)
class RenderedMail:
    """One mail, rendered: everything its bytes are made from.

    ``request.now`` is the sending moment in the series' time zone. The
    sender, Reply-To and List-Id are the same for every mail of a composer.
    """

    request: MailRequest
    message_id: str
    subject: str
    text: str
    html: str
    to: Recipient
    sender: Address
    reply_to: Address | None
    list_id: str
    unsubscribe: str  # the List-Unsubscribe value: "<mailto:...>, <https://...>"
    one_click: bool  # whether List-Unsubscribe-Post is sent (an https link is in it)
    attachments: tuple[File, ...]


@dataclass(frozen=True, slots=True)
class Wire:
    """A finished mail as every transport takes it: its Message-ID and the exact bytes."""

    message_id: str
    data: bytes


class CrlfBytes(bytes):
    """Message bytes already checked to end every line in CRLF.

    The composing worker process checks its mails (:func:`crlf_checked`), so
    the sending process, the busier of the two, need not scan them again.
    """

    __slots__ = ()


def crlf_checked(data: bytes) -> bytes:
    """*data* as :class:`CrlfBytes` when every line ends in CRLF, else unchanged."""
    return CrlfBytes(data) if crlf_lines(data) else data


def crlf_lines(data: bytes) -> bool:
    """Whether every line of *data* ends in CRLF (as messages from compose do)."""
    if type(data) is CrlfBytes:
        return True
    crlf = data.count(b"\r\n")
    return crlf == data.count(b"\n") == data.count(b"\r") and data.endswith(b"\r\n")


def wire(message: EmailMessage) -> Wire:
    """The standard library's bytes of *message*, exactly as transmitted."""
    return Wire(str(message.get("Message-ID", "")), message.as_bytes(policy=email_policy.SMTP))


def parse(wire: Wire) -> EmailMessage:
    """*wire* read back as a mail client would, for its parts and decoded headers."""
    message = message_from_bytes(wire.data, policy=email_policy.default)
    assert isinstance(message, EmailMessage)
    return message


def build(mail: RenderedMail) -> EmailMessage:
    """The standard library's message for *mail*: the reference of its bytes."""
    request = mail.request
    msg = EmailMessage(policy=POLICY)
    msg["From"] = mail.sender
    to = mail.to
    msg["To"] = Address(display_name=to[0], addr_spec=to[1]) if isinstance(to, tuple) else to
    if mail.reply_to is not None:
        msg["Reply-To"] = mail.reply_to
    msg["Subject"] = mail.subject
    msg["Date"] = format_datetime(request.now)
    msg["Message-ID"] = mail.message_id
    msg["List-Id"] = mail.list_id
    msg["List-Unsubscribe"] = mail.unsubscribe
    if mail.one_click:
        msg["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
    # Exchange honours this: no out-of-office replies to a mailing of thousands.
    msg["X-Auto-Response-Suppress"] = "OOF, AutoReply"
    msg["X-Invite-Mailer-Kind"] = request.kind
    if request.event is not None:
        msg["X-Invite-Mailer-Event"] = request.event.id

    # Quoted-printable keeps umlauts readable in the source and every line
    # short, whatever the relay supports (no 8BITMIME needed).
    msg.set_content(mail.text, subtype="plain", charset="utf-8", cte="quoted-printable")
    msg.add_alternative(mail.html, subtype="html", charset="utf-8", cte="quoted-printable")
    for file in mail.attachments:
        if is_itip(file):
            # Outlook/Exchange, Google and Thunderbird act on an iTIP message
            # (update the entry, show the meeting bar) when its text/calendar
            # part is an alternative of the body; the attachment stays for
            # people who open the file themselves. See docs/calendar.md.
            msg.add_alternative(
                file.data,
                maintype="text",
                subtype="calendar",
                params={"method": file.method, "charset": "UTF-8"},
            )
    for part in msg.iter_parts():
        # add_alternative() gives the new part its own MIME-Version; only
        # the top level needs one.
        del part["MIME-Version"]
    if mail.attachments:
        msg.make_mixed()
        for file in mail.attachments:
            msg.attach(attachment_part(file))
    # After the body: set_content() clears all Content-* headers.
    msg["Content-Language"] = "de"
    # Boundaries from the Message-ID instead of random ones: the same mail
    # is the same bytes every time (mail.fastwire builds them directly).
    set_boundaries(msg)
    return msg


def is_itip(file: File) -> bool:
    """Whether *file* is an iTIP calendar message (REQUEST, CANCEL), not a plain PUBLISH."""
    return (file.maintype, file.subtype) == ("text", "calendar") and file.method in (
        "REQUEST",
        "CANCEL",
    )


# One built part per file name: a calendar file rebuilt for a new minute
# replaces its predecessor instead of piling up.
_PARTS: dict[str, tuple[bytes, MIMEPart]] = {}


def attachment_part(file: File) -> EmailMessage:
    """A fresh part for *file*; the encoding is done once per file.

    Every message gets its own part object and header list; what they
    share (header objects, the base64 text) is immutable.
    """
    cached = _PARTS.get(file.filename)
    if cached is not None and cached[0] is file.data:
        built = cached[1]
    else:
        built = MIMEPart(policy=POLICY)
        params = {}
        if (file.maintype, file.subtype) == ("text", "calendar"):
            params = {"method": file.method, "charset": "UTF-8"}
        built.set_content(
            file.data,
            maintype=file.maintype,
            subtype=file.subtype,
            disposition="attachment",
            filename=file.filename,
            params=params,
        )
        _PARTS[file.filename] = (file.data, built)
    part = EmailMessage(policy=POLICY)
    for name, value in built.raw_items():
        part.set_raw(name, value)
    part.set_payload(built.get_payload())
    return part
