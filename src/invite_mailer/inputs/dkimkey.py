"""The DKIM private key file: read bounded, parsed, checked (for ``[dkim] key_file``)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["KEY_HINT", "MAX_DKIM_KEY_BYTES", "KeyFileError", "dkim_key_bits", "read_dkim_key"]

#: A private key is a few kilobytes; anything much larger is not one.
MAX_DKIM_KEY_BYTES = 64 * 1024

KEY_HINT = (
    "point dkim.key_file at a PEM file with an RSA private key of 2048 bits, e.g. made "
    "with: openssl genrsa -out dkim.pem 2048 (keep it readable for invite-mailer only)"
)


class KeyFileError(ValueError):
    """The key file is missing, unreadable or holds no usable key; *hint* says how to fix it."""

    def __init__(self, message: str, hint: str) -> None:
        super().__init__(message)
        self.hint = hint


def read_dkim_key(path: Path) -> bytes:
    """The bytes of a DKIM key file: a regular, readable file of at most 64 KiB."""
    try:
        with path.open("rb") as file:
            if not path.is_file():
                raise KeyFileError(f"the DKIM key {str(path)!r} is not a regular file", KEY_HINT)
            data = file.read(MAX_DKIM_KEY_BYTES + 1)
    except FileNotFoundError:
        raise KeyFileError(f"the DKIM key file {str(path)!r} does not exist", KEY_HINT) from None
    except OSError as exc:
        raise KeyFileError(
            f"the DKIM key file {str(path)!r} cannot be read ({exc.strerror})", KEY_HINT
        ) from None
    if len(data) > MAX_DKIM_KEY_BYTES:
        raise KeyFileError(f"the DKIM key file {str(path)!r} is larger than 64 KiB", KEY_HINT)
    return data


def dkim_key_bits(path: Path) -> int:
    """The size in bits of the RSA private key in *path*, or the reason it is unusable."""
    import dkim.crypto

    data = read_dkim_key(path)
    try:
        key = dkim.crypto.parse_pem_private_key(data)
    except Exception:  # UnparsableKeyError, or the ASN.1 parser on garbage
        raise KeyFileError(
            f"the DKIM key file {str(path)!r} holds no RSA private key in PEM form", KEY_HINT
        ) from None
    bits = int(key["modulus"]).bit_length()
    if bits < 1024:
        raise KeyFileError(
            f"the DKIM key in {str(path)!r} has {bits} bits; receivers ignore keys below "
            "1024 bits (RFC 8301)",
            KEY_HINT,
        )
    return bits
