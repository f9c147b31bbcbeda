"""Operator settings: ``config/settings.toml``, overridden by the environment.

Every key can be set as ``INVITE_MAILER_<SECTION>__<KEY>`` (environment or a
``.env`` file in the working directory). Secrets (the SMTP password, the
unsubscribe secret) are only ever read from there, never from the TOML file.
"""

from __future__ import annotations

import os
import re
import tomllib
from email.errors import InvalidHeaderDefect
from email.headerregistry import Address, HeaderRegistry
from email.utils import getaddresses
from enum import StrEnum
from pathlib import Path
from typing import Any, Self
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from invite_mailer.errors import ConfigError, Problem
from invite_mailer.inputs.yamlfile import read_config_file

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
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _no_control(value: str) -> str:
    if _CONTROL.search(value):
        raise ValueError("contains a line break or another control character; write it on one line")
    return value


class _Invalid(ValueError):
    """A setting's value is wrong in a way that deserves its own hint."""

    def __init__(self, message: str, hint: str) -> None:
        super().__init__(message)
        self.hint = hint


_ONE_ADDRESS_HINT = (
    "one address only; put a display name with a comma in double quotes, "
    'e.g. "Team, KomKomIn" <name@example.org>'
)


def _single_address(value: str, *, named: bool) -> Address:
    """The one address *value* holds, or an error.

    Parsed twice (the lenient ``getaddresses`` and the strict header parser),
    because each misses some ways a second address hides in the text; a second
    one would silently become the sender or get every reply.
    """
    _no_control(value)
    example = '"Name <address@example.org>" or a plain address' if named else "name@example.org"
    # Typeshed's header classes lack what the parser gives them (.addresses, .defects).
    header: Any = _HEADERS("From", value)
    parsed = [addr for _, addr in getaddresses([value]) if addr]
    if len(parsed) > 1 or len(header.addresses) > 1:
        found = ", ".join(dict.fromkeys([*parsed, *(a.addr_spec for a in header.addresses)]))
        raise _Invalid(f"holds more than one address ({found}): {value!r}", _ONE_ADDRESS_HINT)
    broken = any(isinstance(d, InvalidHeaderDefect) for d in header.defects)
    if broken or len(header.addresses) != 1 or "@" not in header.addresses[0].addr_spec:
        raise _Invalid(
            f"expected {example}, got {value!r}",
            f"write it like {example}; {_ONE_ADDRESS_HINT}",
        )
    address = header.addresses[0]
    try:
        return Address(display_name=address.display_name, addr_spec=address.addr_spec)
    except ValueError as exc:  # e.g. a non-ASCII local part
        raise _Invalid(
            f"not a usable address ({exc}): {value!r}", f"write it like {example}"
        ) from None


_HEADERS = HeaderRegistry()


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TransportSettings(_Section):
    kind: TransportKind = TransportKind.OUTBOX
    outbox_dir: Path = Path("outbox")


class SmtpSettings(_Section):
    host: str = "localhost"
    port: int = Field(587, ge=1, le=65535)
    security: Security = Security.STARTTLS
    username: str = ""
    password: SecretStr = SecretStr("")
    timeout: float = Field(30, gt=0)
    max_connections: int = Field(4, ge=1, le=64)
    rate_per_minute: int = Field(0, ge=0)
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

    @field_validator("host", "username", "local_hostname")
    @classmethod
    def _one_line(cls, value: str | None) -> str | None:
        return None if value is None else _no_control(value)

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


class SenderSettings(_Section):
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
        _no_control(value)
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
        return _single_address(self.address, named=True)

    @property
    def domain(self) -> str:
        return self.from_address.domain or "localhost"


class StateSettings(_Section):
    url: str = "sqlite:///state/invite-mailer.db"

    @field_validator("url")
    @classmethod
    def _sqlite(cls, value: str) -> str:
        _no_control(value)
        if not value.startswith("sqlite:///"):
            raise ValueError('only SQLite is supported: use "sqlite:///path/to/file.db"')
        path = value.removeprefix("sqlite:///")
        # The ledger is what keeps a mail from going out twice: an in-memory or
        # URI database would be empty at every run and send everything again.
        if not path or path == ":memory:" or path.startswith("file:") or "?" in path:
            raise _Invalid(
                f"the state database must be a file path, got {value!r} "
                "(no :memory:, no file: URI, no ?query)",
                'use a file that lasts between runs: url = "sqlite:///state/invite-mailer.db"',
            )
        return value

    @property
    def path(self) -> Path:
        return Path(self.url.removeprefix("sqlite:///"))


class LimitsSettings(_Section):
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
    compose_workers: int | None = Field(
        None,
        ge=0,
        le=16,
        description="processes composing mails ahead of the senders in large passes; "
        "unset: one per core beyond the first (at most 4); 0: compose in the sending process",
    )


class NotifySettings(_Section):
    organiser_summary: bool = True


class UnsubscribeSettings(_Section):
    secret: SecretStr = SecretStr("")
    serve: bool = False
    bind_host: str = "127.0.0.1"
    bind_port: int = Field(8080, ge=1, le=65535)


class Settings(BaseSettings):
    """Everything the operator configures. Built by :func:`load_settings`."""

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


_SECRET_KEYS = {("smtp", "password"), ("unsubscribe", "secret")}


def load_settings(config_dir: Path, *, env_file: Path | None = Path(".env")) -> Settings:
    """Read ``settings.toml`` from *config_dir*, apply the environment, validate."""
    path = config_dir / SETTINGS_FILE
    text = _read_toml_text(path)
    data = _parse_toml(path, text)
    for section, key in _SECRET_KEYS:
        if isinstance(data.get(section), dict) and key in data[section]:
            env = f"{ENV_PREFIX}{section.upper()}{ENV_DELIMITER}{key.upper()}"
            raise ConfigError.single(
                path,
                f"[{section}] {key} must not be written into the settings file",
                line=_find_line(text or "", section, key),
                hint=f"remove it and set the environment variable {env} (or put it in .env)",
            )

    toml_path = path if text is not None else None

    class _FileSettings(Settings):
        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
            if env_file is not None:
                sources.append(dotenv_settings)
            if toml_path is not None:
                sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_path))
            return tuple(sources)

    try:
        settings = _FileSettings(_env_file=env_file)
    except ValidationError as exc:
        raise ConfigError(_problems(path, text or "", exc)) from None
    return Settings.model_validate(settings.model_dump())


def settings_warnings(config_dir: Path, settings: Settings) -> list[Problem]:
    """Settings that load but probably do not do what was meant (nothing is sent wrong)."""
    path = config_dir / SETTINGS_FILE
    try:
        text = _read_toml_text(path) or ""
    except ConfigError:  # reported by the loader already
        text = ""
    secret_env = f"{ENV_PREFIX}UNSUBSCRIBE{ENV_DELIMITER}SECRET"
    warnings = []
    has_secret = bool(settings.unsubscribe.secret.get_secret_value())
    if settings.sender.unsubscribe_url and not has_secret:
        warnings.append(
            Problem(
                path,
                "sender.unsubscribe_url is set, but the unsubscribe secret is empty: the mails "
                "carry no one-click link (only the mailto address)",
                _find_line(text, "sender", "unsubscribe_url"),
                f"set the environment variable {secret_env} (in .env or the service's env "
                "file) to a long random string, e.g. from: python3 -c "
                '"import secrets; print(secrets.token_urlsafe(32))"',
            )
        )
    if settings.unsubscribe.serve and not has_secret:
        warnings.append(
            Problem(
                path,
                "unsubscribe.serve is true, but the unsubscribe secret is empty: the daemon "
                "will not start the one-click endpoint",
                _find_line(text, "unsubscribe", "serve"),
                f"set the environment variable {secret_env}",
            )
        )
    return warnings


#: settings.toml is a page of keys; anything larger is not one.
MAX_SETTINGS_BYTES = 256 * 1024


def _read_toml_text(path: Path) -> str | None:
    if not path.exists() and not path.is_symlink():
        return None
    # Through the one reader of organiser files: a FIFO or a device never blocks.
    data = read_config_file(path, limit=MAX_SETTINGS_BYTES)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError.single(
            path, "the file is not UTF-8 text", hint="save it as UTF-8 in your editor"
        ) from None


def _parse_toml(path: Path, text: str | None) -> dict[str, Any]:
    if text is None:
        return {}
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        match = re.search(r"\(at line (\d+), column (\d+)\)", str(exc))
        line = int(match.group(1)) if match else None
        message = re.sub(r"\s*\(at line.*\)$", "", str(exc))
        raise ConfigError.single(
            path,
            f"TOML syntax error: {message}",
            line=line,
            hint='write settings as key = value, text in double quotes: host = "mail.example.org"',
        ) from None
    except RecursionError:
        raise ConfigError.single(
            path,
            "TOML syntax error: values are nested too deeply (lists or tables inside each "
            "other hundreds of times)",
            hint="settings are flat: key = value under [section] headers, lists one level deep",
        ) from None
    except Exception as exc:  # the parser's own failure, on input it should have refused
        raise ConfigError.single(
            path,
            f"TOML cannot be read: {type(exc).__name__}: {exc}",
            hint='write settings as key = value, text in double quotes: host = "mail.example.org"',
        ) from None


def _find_line(text: str, section: str, key: str | None) -> int | None:
    current = None
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        header = re.fullmatch(r"\[\s*([A-Za-z0-9_]+)\s*\]", line)
        if header:
            current = header.group(1)
            if key is None and current == section:
                return number
            continue
        if current == section and key and re.match(rf"{re.escape(key)}\s*=", line):
            return number
    return None


def _problems(path: Path, text: str, exc: ValidationError) -> list[Problem]:
    problems = []
    for error in exc.errors():
        loc = [str(part) for part in error["loc"]]
        section = loc[0] if loc else ""
        key = loc[1] if len(loc) > 1 else None
        env = f"{ENV_PREFIX}{ENV_DELIMITER.join(p.upper() for p in loc)}"
        dotted = ".".join(loc)
        if error["type"] == "extra_forbidden":
            message = f"unknown setting {dotted!r}"
            hint = "check the spelling; the README lists every setting"
        else:
            said = str(error["msg"]).removeprefix("Value error, ")
            if key is None and section:
                # A rule across keys of one section (the text names them).
                message = said
                hint = f"fix it in [{section}] or in the {env}{ENV_DELIMITER}* variables"
            else:
                message = f"{dotted}: {said}"
                hint = f"fix it in the file or in the environment variable {env}"
            cause = (error.get("ctx") or {}).get("error")
            if isinstance(cause, _Invalid):
                hint = f"{cause.hint}; {hint}"
        where = path
        line = _find_line(text, section, key) if text else None
        if env in os.environ:
            message += f" (from the environment variable {env})"
        problems.append(Problem(where, message, line, hint))
    return problems
