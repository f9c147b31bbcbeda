"""Operator settings: ``config/settings.toml``, overridden by the environment.

Every key can be set as ``INVITE_MAILER_<SECTION>__<KEY>`` (environment or a
``.env`` file in the working directory). Secrets (the SMTP password, the
unsubscribe secret) are only ever read from there, never from the TOML file.
"""

from __future__ import annotations

import functools
import os
import re
from email.errors import InvalidHeaderDefect
from email.headerregistry import Address, HeaderRegistry
from email.utils import getaddresses
from enum import StrEnum
from pathlib import Path
from typing import Any, Self
from urllib.parse import urlsplit

from pydantic import (
    Field,
    SecretStr,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    DotEnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from invite_mailer.inputs.dkimkey import dkim_key_bits
from invite_mailer.inputs.setting_base import InvalidSetting, Section, no_control
from invite_mailer.inputs.state_settings import StateSettings

ENV_PREFIX = "INVITE_MAILER_"
ENV_DELIMITER = "__"
SETTINGS_FILE = "settings.toml"


class TransportKind(StrEnum):
    SMTP = "smtp"
    OUTBOX = "outbox"


class Security(StrEnum):
    STARTTLS = "starttls"
    TLS = "tls"
    NONE = "none"


# Control characters end up in SMTP commands and mail headers, where a line
# break starts a new command or header.
_ONE_ADDRESS_HINT = (
    "one address only; put a display name with a comma in double quotes, "
    'e.g. "Team, KomKomIn" <name@example.org>'
)


@functools.lru_cache(maxsize=16)
def _sender_address(value: str) -> Address:
    """The parsed sender, once per value: the header parser costs ~0.1 ms a call."""
    return _single_address(value, named=True)


def _single_address(value: str, *, named: bool) -> Address:
    """The one address *value* holds, or an error.

    Parsed twice (the lenient ``getaddresses`` and the strict header parser),
    because each misses some ways a second address hides in the text; a second
    one would silently become the sender or get every reply.
    """
    no_control(value)
    example = '"Name <address@example.org>" or a plain address' if named else "name@example.org"
    # Typeshed's header classes lack what the parser gives them (.addresses, .defects).
    header: Any = _HEADERS("From", value)
    parsed = [addr for _, addr in getaddresses([value]) if addr]
    if len(parsed) > 1 or len(header.addresses) > 1:
        found = ", ".join(dict.fromkeys([*parsed, *(a.addr_spec for a in header.addresses)]))
        raise InvalidSetting(f"holds more than one address ({found}): {value!r}", _ONE_ADDRESS_HINT)
    broken = any(isinstance(d, InvalidHeaderDefect) for d in header.defects)
    if broken or len(header.addresses) != 1 or "@" not in header.addresses[0].addr_spec:
        raise InvalidSetting(
            f"expected {example}, got {value!r}",
            f"write it like {example}; {_ONE_ADDRESS_HINT}",
        )
    address = header.addresses[0]
    try:
        return Address(display_name=address.display_name, addr_spec=address.addr_spec)
    except ValueError as exc:  # e.g. a non-ASCII local part
        raise InvalidSetting(
            f"not a usable address ({exc}): {value!r}", f"write it like {example}"
        ) from None


_HEADERS = HeaderRegistry()


class TransportSettings(Section):
    kind: TransportKind = TransportKind.OUTBOX
    outbox_dir: Path = Path("outbox")


class RelayPreset(StrEnum):
    """Relays whose documented sending limits ``smtp.preset`` fills in."""

    # Microsoft 365 / Exchange Online: 30 messages per minute, 10,000
    # recipients per day per mailbox (Exchange Online limits, sending limits).
    EXCHANGE_ONLINE = "exchange-online"
    # Google Workspace (Gmail): 2,000 messages per day per user.
    GOOGLE_WORKSPACE = "google-workspace"


PRESETS: dict[RelayPreset, dict[str, int]] = {
    RelayPreset.EXCHANGE_ONLINE: {"rate_per_minute": 30, "rate_per_day": 10_000},
    RelayPreset.GOOGLE_WORKSPACE: {"rate_per_day": 2_000},
}


class SmtpSettings(Section):
    host: str = "localhost"
    port: int = Field(587, ge=1, le=65535)
    security: Security = Security.STARTTLS
    username: str = ""
    password: SecretStr = SecretStr("")
    timeout: float = Field(30, gt=0)
    max_connections: int = Field(4, ge=1, le=64)
    rate_per_minute: int = Field(0, ge=0, description="mails in any 60 s; 0 = no limit")
    rate_per_hour: int = Field(0, ge=0, description="mails in any 60 minutes; 0 = no limit")
    rate_per_day: int = Field(0, ge=0, description="recipients in any 24 hours; 0 = no limit")
    preset: RelayPreset | None = Field(
        None, description="fills in the documented limits of a known relay; set ones win"
    )
    verify_certificates: bool = True
    ca_file: Path | None = None
    local_hostname: str | None = None
    messages_per_connection: int = Field(
        0, ge=0, description="re-open a connection after this many messages; 0 = never"
    )
    allow_plaintext_auth: bool = Field(
        False,
        description="send username and password over a connection without TLS "
        '(security = "none"); only for a trusted relay on this host or network',
    )

    @property
    def quotas(self) -> list[tuple[int, float]]:
        """The limits set, as (mails, window in seconds)."""
        windows = ((self.rate_per_minute, 60.0), (self.rate_per_hour, 3600.0))
        return [(n, w) for n, w in (*windows, (self.rate_per_day, 86400.0)) if n]

    @model_validator(mode="before")
    @classmethod
    def _preset_limits(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("preset"):
            try:
                limits = PRESETS[RelayPreset(data["preset"])]
            except ValueError:
                return data  # the field's own check names the choices
            data = {**limits, **data}
        return data

    @field_validator("host", "username", "local_hostname")
    @classmethod
    def _one_line(cls, value: str | None) -> str | None:
        return None if value is None else no_control(value)

    @field_validator("ca_file")
    @classmethod
    def _ca_file(cls, value: Path | None) -> Path | None:
        # Checked here, so that validate reports it instead of every send failing.
        if value is None:
            return None
        if not value.exists():
            raise ValueError(f"the CA file {str(value)!r} does not exist")
        if not value.is_file():
            raise ValueError(f"the CA file {str(value)!r} is not a regular file")
        if not os.access(value, os.R_OK):
            raise ValueError(f"the CA file {str(value)!r} is not readable")
        return value

    @model_validator(mode="after")
    def _no_plaintext_password(self) -> Self:
        if self.username and self.security is Security.NONE and not self.allow_plaintext_auth:
            raise ValueError(
                'smtp.username is set but smtp.security is "none": the password would be '
                'sent unencrypted. Use security = "starttls" or "tls"; for a trusted relay '
                "on this host only, set smtp.allow_plaintext_auth = true"
            )
        return self


class SenderSettings(Section):
    address: str = "KomKomIn Transferreihe <transferreihe@example.org>"
    reply_to: str = ""
    unsubscribe_mailto: str = ""
    unsubscribe_url: str = ""
    # The https base of the daemon's web app for registration links
    # (registration.mode = "links"): <web_url>/anmeldung/<token>, /absage/<token>.
    web_url: str = ""

    @field_validator("address", "reply_to", "unsubscribe_mailto")
    @classmethod
    def _address(cls, value: str, info: ValidationInfo) -> str:
        if value or info.field_name == "address":
            _single_address(value, named=info.field_name == "address")
        return value

    @field_validator("unsubscribe_url", "web_url")
    @classmethod
    def _https(cls, value: str, info: ValidationInfo) -> str:
        no_control(value)
        if not value:
            return value
        if not value.startswith("https://"):
            what = "one-click unsubscribe" if info.field_name == "unsubscribe_url" else "web app"
            raise ValueError(f"the {what} URL must start with https://")
        try:
            parts = urlsplit(value)
            parts.port  # noqa: B018 - raises for a port that is no number
        except ValueError as exc:
            raise ValueError(f"not a valid URL: {exc}") from None
        if not parts.hostname or " " in value or "<" in value or ">" in value:
            raise ValueError(f"not a valid URL: {value!r}")
        return value.rstrip("/")

    @property
    def from_address(self) -> Address:
        return _sender_address(self.address)

    @property
    def domain(self) -> str:
        return self.from_address.domain or "localhost"


class LimitsSettings(Section):
    max_attachment_bytes: int = Field(5 * 1024 * 1024, ge=0)
    max_message_bytes: int = Field(
        10 * 1024 * 1024,
        ge=64 * 1024,
        description="the most one composed mail may be on the wire, attachments included; "
        "relays refuse larger ones (Exchange Online: 25 MB after encoding)",
    )
    max_in_flight: int | None = Field(
        None,
        ge=1,
        le=10_000,
        description="the most mails claimed in the ledger whose outcome is not recorded yet; "
        "after a crash at most this many can arrive twice. Unset: twice smtp.max_connections",
    )
    retry_initial_seconds: float = Field(30, gt=0)
    retry_max_seconds: float = Field(1800, gt=0)
    retry_in_pass_seconds: float = Field(
        120, ge=0, description="temporary failures are retried within one pass for this long"
    )
    compose_workers: int = Field(
        0,
        ge=0,
        le=16,
        description="processes composing mails ahead of the senders in large passes (each "
        "about 70 MB); 0: compose in the sending process, which renders each mail shape once",
    )


#: Signed by default: what a receiver shows or acts on (RFC 6376 section 5.4.1),
#: the one-click unsubscribe headers included (RFC 8058 section 4).
DKIM_HEADERS = (
    "From",
    "To",
    "Subject",
    "Date",
    "Message-ID",
    "Reply-To",
    "MIME-Version",
    "Content-Type",
    "List-Unsubscribe",
    "List-Unsubscribe-Post",
)

_DNS_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")
_HEADER_NAME = re.compile(r"[!-9;-~]{1,76}")


class DkimSettings(Section):
    """Signing with DKIM (RFC 6376); on when ``key_file`` is set."""

    selector: str = ""
    domain: str = Field("", description="d= of the signature; empty: the sender's domain")
    key_file: Path | None = Field(None, description="the PEM private key; never the key inline")
    headers: tuple[str, ...] = DKIM_HEADERS

    @property
    def enabled(self) -> bool:
        return self.key_file is not None

    @field_validator("selector", "domain")
    @classmethod
    def _dns_name(cls, value: str) -> str:
        if value and not all(_DNS_LABEL.fullmatch(label) for label in value.split(".")):
            raise ValueError(
                f"{value!r} is not a DNS name (letters, digits, '-' and '_' between dots)"
            )
        return value.lower()

    @field_validator("headers")
    @classmethod
    def _header_names(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for name in value:
            if not _HEADER_NAME.fullmatch(name):
                raise ValueError(f"{name!r} is not a header name")
        if "from" not in {name.lower() for name in value}:
            raise ValueError("the signed headers must include From (RFC 6376 section 5.4)")
        return value

    @field_validator("key_file")
    @classmethod
    def _key(cls, value: Path | None) -> Path | None:
        # Read and parsed here, so that validate reports a bad key, not every send.
        if value is not None:
            dkim_key_bits(value)
        return value

    @model_validator(mode="after")
    def _selector_with_key(self) -> Self:
        if self.enabled and not self.selector:
            raise ValueError(
                "dkim.key_file is set but dkim.selector is empty: the receiver finds the "
                "public key at <selector>._domainkey.<domain>; set the selector you publish"
            )
        if self.selector and not self.enabled:
            raise ValueError(
                "dkim.selector is set but dkim.key_file is not: set the private key's file, "
                "or remove the selector to send unsigned"
            )
        return self


class BouncesSettings(Section):
    soft_limit: int = Field(
        3,
        ge=1,
        le=100,
        description="soft bounces (a full mailbox, a temporary failure given up on) after "
        "which an address gets no more mail of the series",
    )
    return_path: str = Field(
        "",
        description="envelope sender with {token}, e.g. bounces+{token}@example.org: each "
        "recipient's bounces name them (VERP); signed with the unsubscribe secret",
    )

    @field_validator("return_path")
    @classmethod
    def _verp(cls, value: str) -> str:
        if not value:
            return value
        local, at, domain = value.rpartition("@")
        if local.count("{token}") != 1 or "{token}" in domain or not domain:
            raise InvalidSetting(
                f"must be an address with {{token}} once before the @, got {value!r}",
                'write it like "bounces+{token}@example.org"',
            )
        probe = value.replace("{token}", "t" * 16)
        if len(probe.partition("@")[0]) > 64:
            raise InvalidSetting(
                f"the part before the @ would be longer than 64 characters: {value!r}",
                'keep it short, like "bounces+{token}@example.org"',
            )
        _single_address(probe, named=False)
        return value


class ImapSettings(Section):
    """The mailbox bounces and complaints arrive in; polled by the daemon when ``host`` is set."""

    host: str = ""
    port: int = Field(993, ge=1, le=65535)
    security: Security = Security.TLS
    username: str = ""
    password: SecretStr = SecretStr("")
    folder: str = "INBOX"
    processed_folder: str = Field(
        "", description="move read reports there; empty: flag them as seen where they are"
    )
    poll_seconds: int = Field(300, ge=30, le=86400)
    timeout: float = Field(30, gt=0)
    verify_certificates: bool = True

    @field_validator("host", "username", "folder", "processed_folder")
    @classmethod
    def _one_line(cls, value: str) -> str:
        no_control(value)
        if '"' in value or "\\" in value:
            raise ValueError("must not contain double quotes or backslashes")
        return value

    @property
    def enabled(self) -> bool:
        return bool(self.host)


class NotifySettings(Section):
    organiser_summary: bool = True


class UnsubscribeSettings(Section):
    secret: SecretStr = SecretStr("")
    serve: bool = False
    bind_host: str = "127.0.0.1"
    bind_port: int = Field(8080, ge=1, le=65535)


class Settings(BaseSettings):
    """Everything the operator configures. Built by :func:`load_settings`."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """The environment, then ``.env`` (its ``INVITE_MAILER_*`` keys), then the TOML file."""
        sources = [init_settings, env_settings, prefixed_dotenv(dotenv_settings)]
        if settings_cls.model_config.get("toml_file") is not None:
            sources.append(TomlConfigSettingsSource(settings_cls))
        return tuple(sources)

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=ENV_DELIMITER,
        env_file=".env",
        env_file_encoding="utf-8",
        # An empty variable (INVITE_MAILER_SMTP__CA_FILE=) means "not set".
        env_ignore_empty=True,
        extra="forbid",
        frozen=True,
    )

    transport: TransportSettings = TransportSettings()
    smtp: SmtpSettings = SmtpSettings()
    sender: SenderSettings = SenderSettings()
    state: StateSettings = StateSettings()
    limits: LimitsSettings = LimitsSettings()
    notify: NotifySettings = NotifySettings()
    unsubscribe: UnsubscribeSettings = UnsubscribeSettings()
    dkim: DkimSettings = DkimSettings()
    bounces: BouncesSettings = BouncesSettings()
    imap: ImapSettings = ImapSettings()


def prefixed_dotenv(dotenv: PydanticBaseSettingsSource) -> PydanticBaseSettingsSource:
    """The ``.env`` source pydantic-settings built, with only its ``INVITE_MAILER_*`` keys.

    The file is often shared with docker compose (``POSTGRES_PASSWORD``,
    ``TZ``, ...); those keys are someone else's and never reach the model,
    while a misspelt ``INVITE_MAILER_*`` key still does and is refused. The
    source has read the file already; its variables are filtered, not read again.
    """
    assert isinstance(dotenv, DotEnvSettingsSource)
    prefix = ENV_PREFIX.lower()
    dotenv.env_vars = {
        name: value for name, value in dotenv.env_vars.items() if name.lower().startswith(prefix)
    }
    return dotenv
