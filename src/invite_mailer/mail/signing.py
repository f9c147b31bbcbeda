"""DKIM signatures (RFC 6376) on the finished bytes of a mail, with dkimpy.

For relays that do not sign themselves. The signature is the last header
added, on exactly the bytes that go out; the transports sign every mail they
send (and ``preview`` writes the signed bytes), so a mail that left unsigned
cannot have been meant to be signed. Relaxed canonicalisation for header and
body: a relay that re-folds a header or changes trailing blanks does not
break it.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass

import dkim
import dkim.crypto

from invite_mailer.core.plan import request_for
from invite_mailer.errors import ConfigError
from invite_mailer.inputs.config import Config
from invite_mailer.inputs.contacts import Contact
from invite_mailer.inputs.dkimkey import dkim_key_bits, read_dkim_key
from invite_mailer.inputs.series import Kind
from invite_mailer.inputs.settings import Settings
from invite_mailer.mail.fastwire import WireComposer
from invite_mailer.mail.mime import Wire

__all__ = ["DkimSigner", "checked_signer", "public_key_der"]


@dataclass(frozen=True)
class DkimSigner:
    """Signs mails as *domain* with the key published at *selector*."""

    selector: str
    domain: str
    key: bytes  # the PEM file's bytes
    headers: tuple[str, ...]

    @classmethod
    def from_settings(cls, settings: Settings) -> DkimSigner | None:
        """The signer ``[dkim]`` describes, or None when signing is off."""
        dkim_settings = settings.dkim
        if dkim_settings.key_file is None:
            return None
        path = dkim_settings.key_file
        try:
            dkim_key_bits(path)  # checked when the settings were loaded; the file may have gone
            key = read_dkim_key(path)
        except ValueError as exc:
            raise ConfigError.single(path, str(exc), hint=getattr(exc, "hint", None)) from None
        return cls(
            selector=dkim_settings.selector,
            domain=dkim_settings.domain or settings.sender.domain.lower(),
            key=key,
            headers=dkim_settings.headers,
        )

    def sign(self, wire: Wire) -> Wire:
        """*wire* with a ``DKIM-Signature`` header in front."""
        header = dkim.sign(
            wire.data,
            self.selector.encode("ascii"),
            self.domain.encode("ascii"),
            self.key,
            canonicalize=(b"relaxed", b"relaxed"),
            include_headers=[name.encode("ascii") for name in self.headers],
        )
        return Wire(wire.message_id, header + wire.data)

    @property
    def record_name(self) -> str:
        """Where receivers look the public key up."""
        return f"{self.selector}._domainkey.{self.domain}"

    def dns_record(self) -> str:
        """The TXT record to publish, as a zone file line (strings of at most 255)."""
        value = "v=DKIM1; k=rsa; p=" + base64.b64encode(public_key_der(self.key)).decode()
        strings = " ".join(f'"{value[i : i + 255]}"' for i in range(0, len(value), 255))
        return f"{self.record_name}. IN TXT ( {strings} )"

    def txt_value(self) -> bytes:
        """The record's text, as a resolver returns it (for verifying here)."""
        return b"v=DKIM1; k=rsa; p=" + base64.b64encode(public_key_der(self.key))

    def verifies(self, wire: Wire) -> bool:
        """Whether *wire*'s signature holds for this key's record (no DNS asked)."""
        record = self.txt_value()
        name = f"{self.record_name}.".encode("ascii")

        def lookup(asked: bytes, timeout: int = 5) -> bytes | None:
            return record if asked == name else None

        return bool(dkim.verify(wire.data, dnsfunc=lookup))


def checked_signer(config: Config, wires: WireComposer) -> DkimSigner | None:
    """The DKIM signer, once a signed sample verifies against its own public key."""
    signer = DkimSigner.from_settings(config.settings)
    if signer is None:
        return None
    series = config.series
    sample = Contact(email=f"probe@{signer.domain}", vorname="Jana", nachname="Müller")
    request = request_for(
        Kind.INVITATION, None, sample, series.first_start, attendance=config.attendance
    )
    if not signer.verifies(signer.sign(wires.wire_for(request))):
        raise ConfigError.single(
            config.settings.dkim.key_file,
            "a mail signed with this DKIM key does not verify against its public key",
            hint="make a new key: openssl genrsa -out dkim.pem 2048",
        )
    return signer


def public_key_der(pem: bytes) -> bytes:
    """The SubjectPublicKeyInfo (DER) of the RSA private key *pem*: the p= of the record."""
    key = dkim.crypto.parse_pem_private_key(pem)
    rsa_public_key = _der(0x30, _integer(key["modulus"]) + _integer(key["publicExponent"]))
    # AlgorithmIdentifier: rsaEncryption (1.2.840.113549.1.1.1), NULL parameters.
    algorithm = _der(0x30, bytes.fromhex("06092a864886f70d010101") + b"\x05\x00")
    return _der(0x30, algorithm + _der(0x03, b"\x00" + rsa_public_key))


def _integer(value: int) -> bytes:
    # Two's complement, big-endian, with a leading zero when the top bit is set.
    return _der(0x02, value.to_bytes(value.bit_length() // 8 + 1, "big"))


def _der(tag: int, content: bytes) -> bytes:
    size = len(content)
    if size < 0x80:
        return bytes([tag, size]) + content
    length = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(length)]) + length + content
