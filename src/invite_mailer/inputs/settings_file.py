"""Reading ``settings.toml`` and the environment into :class:`Settings`.

Problems come back as :class:`~invite_mailer.errors.ConfigError` naming the
file, the line of the key where it can be found, and the environment
variable that sets the same key; :func:`settings_warnings` lists settings
that load but probably do not do what was meant.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from pydantic_core import ErrorDetails
from pydantic_settings import SettingsConfigDict, SettingsError

from invite_mailer.errors import ConfigError, Problem
from invite_mailer.inputs.dkimkey import KeyFileError, dkim_key_bits
from invite_mailer.inputs.setting_base import InvalidSetting
from invite_mailer.inputs.settings import (
    ENV_DELIMITER,
    ENV_PREFIX,
    SETTINGS_FILE,
    Settings,
)
from invite_mailer.inputs.yamlfile import read_config_file

__all__ = ["MAX_SETTINGS_BYTES", "load_settings", "settings_warnings"]


_SECRET_KEYS = {("smtp", "password"), ("unsubscribe", "secret"), ("imap", "password")}


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
    unknown = [Problem(path, *found) for found in _unknown_environment()]
    if unknown:
        raise ConfigError(unknown)
    if env_file is not None:
        _check_dotenv(env_file)

    class _FileSettings(Settings):
        model_config = SettingsConfigDict(toml_file=toml_path)

    try:
        settings = _FileSettings(_env_file=env_file)
    except ValidationError as exc:
        dotenv = _DotEnv.read(env_file)
        raise ConfigError(_problems(path, text or "", dotenv, exc)) from None
    except SettingsError as exc:
        raise _section_value(exc, path, _DotEnv.read(env_file)) from None
    # The plain class (picklable for the compose workers), from the values just
    # validated: validating again would read the sources, .env included, again.
    fields = {name: getattr(settings, name) for name in Settings.model_fields}
    return Settings.model_construct(settings.model_fields_set, **fields)


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
    if settings.bounces.return_path and not has_secret:
        warnings.append(
            Problem(
                path,
                "bounces.return_path is set, but the unsubscribe secret is empty: its tokens "
                "cannot be signed, so mails go out with the sender's address as return path",
                _find_line(text, "bounces", "return_path"),
                f"set the environment variable {secret_env}",
            )
        )
    warnings.extend(_dkim_warnings(path, text, settings))
    return warnings


def _dkim_warnings(path: Path, text: str, settings: Settings) -> list[Problem]:
    dkim = settings.dkim
    if dkim.key_file is None:
        return []
    warnings = []
    sender = settings.sender.domain.lower()
    domain = dkim.domain or sender
    if sender != domain and not sender.endswith("." + domain):
        warnings.append(
            Problem(
                path,
                f"dkim.domain {domain!r} is not the sender's domain {sender!r} nor a parent "
                "of it: the signature does not align with From, so it does not count for DMARC",
                _find_line(text, "dkim", "domain"),
                "sign with the sender's domain (leave dkim.domain empty) or its parent domain",
            )
        )
    try:
        bits = dkim_key_bits(dkim.key_file)
    except KeyFileError:  # reported by the loader
        return warnings
    if bits < 2048:
        warnings.append(
            Problem(
                path,
                f"the DKIM key has {bits} bits; 2048 is the common minimum today",
                _find_line(text, "dkim", "key_file"),
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


def _check_dotenv(path: Path) -> None:
    """A ``.env`` that can be read at once: a regular UTF-8 file of bounded size.

    It may be a link anywhere (to an operator's env file under /etc, say),
    but never a FIFO or a device, which would block the reader.
    """
    if not path.exists() and not path.is_symlink():
        return
    data = read_config_file(path, limit=MAX_SETTINGS_BYTES, root=Path(path.resolve().anchor))
    try:
        data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ConfigError.single(
            path, "the file is not UTF-8 text", hint="save it as UTF-8 in your editor"
        ) from None


def _section_value(exc: SettingsError, path: Path, dotenv: _DotEnv) -> ConfigError:
    """A whole section set from one variable whose value is no JSON object."""
    match = re.search(r'field "([A-Za-z0-9_]+)"', str(exc))
    section = match.group(1) if match else ""
    env = f"{ENV_PREFIX}{section.upper()}"
    message = f"{env} must not be set: a section takes its keys one by one"
    hint = f"set each key on its own, e.g. {env}{ENV_DELIMITER}KEY=value"
    found = dotenv.source_of(env)
    if found is not None:
        return ConfigError.single(found[0], message, line=found[1], hint=hint)
    return ConfigError.single(path, f"{message} (from the environment variable {env})", hint=hint)


def _unknown_environment() -> list[tuple[str, None, str]]:
    """``INVITE_MAILER_*`` variables that name no setting: a typo would go unnoticed.

    pydantic-settings leaves such variables alone, so a misspelt
    ``INVITE_MAILER_TRANSPORT_KIND=smtp`` would quietly keep the outbox.
    """
    found = []
    for name, value in sorted(os.environ.items()):
        upper = name.upper()
        if not upper.startswith(ENV_PREFIX) or not value:
            continue
        section, _, key = upper.removeprefix(ENV_PREFIX).lower().partition(ENV_DELIMITER.lower())
        model = Settings.model_fields.get(section)
        fields = getattr(model.annotation, "model_fields", {}) if model is not None else {}
        if model is None or (key and key not in fields):
            found.append(
                (
                    f"unknown setting {name} in the environment",
                    None,
                    "check the spelling: section and key are joined by two underscores, "
                    f"e.g. {ENV_PREFIX}SMTP{ENV_DELIMITER}HOST; the README lists every setting",
                )
            )
    return found


def _in_environment(env: str) -> bool:
    """Whether the environment sets *env* (any case, not empty), which outweighs .env."""
    return any(name.upper() == env and value for name, value in os.environ.items())


@dataclass(frozen=True)
class _DotEnv:
    """Where each ``INVITE_MAILER_*`` key of a ``.env`` file stands, to name it in problems."""

    path: Path | None = None
    lines: Mapping[str, int] = field(default_factory=dict)

    @classmethod
    def read(cls, path: Path | None) -> _DotEnv:
        if path is None or not path.is_file():
            return cls()
        try:
            text = path.read_text(encoding="utf-8-sig", errors="replace")
        except OSError:
            return cls()
        lines: dict[str, int] = {}
        for number, raw in enumerate(text.splitlines(), start=1):
            match = _DOTENV_KEY.match(raw)
            if match and match.group(1).upper().startswith(ENV_PREFIX):
                lines[match.group(1).upper()] = number
        return cls(path, lines)

    def source_of(self, env: str) -> tuple[Path, int] | None:
        """The file and line *env* was taken from, if from here (the environment wins)."""
        if self.path is None or env not in self.lines or _in_environment(env):
            return None
        return self.path, self.lines[env]


_DOTENV_KEY = re.compile(r"\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*(?:=|$)")


def _problems(path: Path, text: str, dotenv: _DotEnv, exc: ValidationError) -> list[Problem]:
    problems = []
    for error in exc.errors():
        loc = [str(part) for part in error["loc"]]
        if loc and loc[0].upper().startswith(ENV_PREFIX):
            # A .env key naming no section at all: pydantic-settings keeps its whole name.
            loc[0] = loc[0].upper()
            env = loc[0]
        else:
            env = f"{ENV_PREFIX}{ENV_DELIMITER.join(p.upper() for p in loc)}"
        section = loc[0] if loc else ""
        key = loc[1] if len(loc) > 1 else None
        # A key of its own, or a whole section as JSON (INVITE_MAILER_SMTP={...}).
        from_dotenv = dotenv.source_of(env) or dotenv.source_of(f"{ENV_PREFIX}{section.upper()}")
        if from_dotenv is not None:
            problems.append(_dotenv_problem(*from_dotenv, env, loc, error))
            continue
        message, hint = _explain(loc, env, error)
        line = _find_line(text, section, key) if text else None
        if _in_environment(env):
            message += f" (from the environment variable {env})"
        problems.append(Problem(path, message, line, hint))
    return problems


def _dotenv_problem(
    where: Path, line: int, env: str, loc: list[str], error: ErrorDetails
) -> Problem:
    if error["type"] == "extra_forbidden":
        return Problem(
            where,
            f"unknown setting {env}",
            line,
            f"check the spelling; only {ENV_PREFIX}* keys of .env are read (other keys are "
            "left alone), and the README lists every setting",
        )
    message, hint = _explain(loc, env, error, fix=f"fix {env} in .env")
    return Problem(where, message, line, hint)


def _explain(
    loc: list[str], env: str, error: ErrorDetails, *, fix: str | None = None
) -> tuple[str, str]:
    """What is wrong with the setting at *loc*, and how to fix it (*fix*: where)."""
    dotted = ".".join(loc)
    if error["type"] == "extra_forbidden":
        return f"unknown setting {dotted!r}", "check the spelling; the README lists every setting"
    said = str(error["msg"]).removeprefix("Value error, ")
    if len(loc) == 1:
        # A rule across keys of one section (the text names them).
        message = said
        hint = fix or f"fix it in [{loc[0]}] or in the {env}{ENV_DELIMITER}* variables"
    else:
        message = f"{dotted}: {said}"
        hint = fix or f"fix it in the file or in the environment variable {env}"
    cause = (error.get("ctx") or {}).get("error")
    if isinstance(cause, InvalidSetting | KeyFileError):
        hint = f"{cause.hint}; {hint}"
    return message, hint
