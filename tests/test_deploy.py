"""The deployment files, checked by parsing (no Docker engine, no systemd needed).

Every ``INVITE_MAILER_*`` name in them must be a real setting, and
``.env.example`` must list every setting, so none of them can drift from
:mod:`invite_mailer.inputs.settings`.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml
from pydantic import BaseModel, SecretStr, TypeAdapter

from invite_mailer.inputs.config import default_templates_dir
from invite_mailer.inputs.settings import ENV_DELIMITER, ENV_PREFIX, Settings
from invite_mailer.inputs.settings_file import load_settings
from support.project import strip_environment

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
UNIT = ROOT / "deploy" / "invite-mailer.service"
OPERATIONS = ROOT / "docs" / "operations.md"
SECRETS = [
    "INVITE_MAILER_SMTP__PASSWORD",
    "INVITE_MAILER_UNSUBSCRIBE__SECRET",
    "INVITE_MAILER_IMAP__PASSWORD",
]
ENV_NAME = re.compile(r"\bINVITE_MAILER_[A-Z0-9_]+")


# --- the settings model: the one source of truth -------------------------------------


@dataclass(frozen=True)
class Field:
    env: str
    section: str
    key: str
    annotation: Any
    default: Any


def settings_fields() -> Iterator[Field]:
    for section, info in Settings.model_fields.items():
        model = info.annotation
        assert isinstance(model, type) and issubclass(model, BaseModel), section
        for key, field in model.model_fields.items():
            env = f"{ENV_PREFIX}{section.upper()}{ENV_DELIMITER}{key.upper()}"
            yield Field(env, section, key, field.annotation, field.default)


FIELDS = {field.env: field for field in settings_fields()}


def test_the_settings_model_is_walked_completely() -> None:
    assert "INVITE_MAILER_SMTP__PASSWORD" in FIELDS
    assert "INVITE_MAILER_UNSUBSCRIBE__BIND_HOST" in FIELDS
    assert len(FIELDS) >= 28


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No INVITE_MAILER_* from the developer's shell leaks into a test."""
    strip_environment(monkeypatch)
    return monkeypatch


def load_with(env: dict[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Settings:
    """Settings from *env* alone (no settings.toml, no .env): raises on any bad value."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    (tmp_path / "config").mkdir(exist_ok=True)
    return load_settings(tmp_path / "config", env_file=None)


@pytest.mark.parametrize(
    "path",
    [DOCKERFILE, COMPOSE, ENV_EXAMPLE, UNIT, OPERATIONS],
    ids=lambda p: p.name,
)
def test_every_named_variable_is_a_real_setting(path: Path) -> None:
    names = set(ENV_NAME.findall(path.read_text(encoding="utf-8")))
    # "INVITE_MAILER_SMTP__*" in prose stands for a whole section.
    sections = {name for name in names if name.endswith(ENV_DELIMITER)}
    unknown = sorted(names - sections - FIELDS.keys())
    unknown += sorted(s for s in sections if not any(f.startswith(s) for f in FIELDS))
    assert not unknown, f"{path.name} names variables that are no setting: {unknown}"


# --- .env.example ----------------------------------------------------------------------

ENV_LINE = re.compile(r"^(?P<comment>#\s*)?(?P<name>INVITE_MAILER_[A-Z0-9_]+)=(?P<value>.*)$")


@dataclass(frozen=True)
class EnvLine:
    number: int
    name: str
    value: str
    commented: bool
    explained: bool


def env_example() -> list[EnvLine]:
    lines = ENV_EXAMPLE.read_text(encoding="utf-8").splitlines()
    found = []
    for index, line in enumerate(lines):
        match = ENV_LINE.match(line)
        if match is None:
            continue
        previous = lines[index - 1] if index else ""
        explained = previous.startswith("# ") and ENV_LINE.match(previous) is None
        value = match["value"]
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1]
        found.append(EnvLine(index + 1, match["name"], value, bool(match["comment"]), explained))
    return found


def test_env_example_names_every_setting_exactly_once() -> None:
    names = [line.name for line in env_example()]
    assert sorted(names) == sorted(FIELDS), "add or remove lines in .env.example"
    assert len(names) == len(set(names))


def test_env_example_explains_every_variable() -> None:
    unexplained = [line.name for line in env_example() if not line.explained]
    assert not unexplained, "put a one-line '# explanation' above each variable"


def test_env_example_puts_the_secrets_first_and_ready_to_fill_in() -> None:
    lines = env_example()
    assert [line.name for line in lines[: len(SECRETS)]] == SECRETS
    for line in lines[: len(SECRETS)]:
        assert not line.commented and line.value == ""
    assert all(line.commented for line in lines[len(SECRETS) :]), "only secrets are uncommented"


def test_env_example_shows_the_real_defaults() -> None:
    for line in env_example():
        field = FIELDS[line.name]
        default = field.default
        if isinstance(default, SecretStr):
            default = default.get_secret_value()
        if default is None:
            assert line.value == "", f"{line.name}: unset by default, leave the value empty"
            continue
        adapter = TypeAdapter(field.annotation)
        if line.value.startswith("["):  # a list, written as JSON as pydantic-settings reads it
            documented = adapter.validate_json(line.value)
        else:
            documented = adapter.validate_python(line.value)
        if isinstance(documented, SecretStr):
            documented = documented.get_secret_value()
        assert documented == default, f".env.example line {line.number}: {line.name}"


def test_env_example_uncommented_is_valid_and_changes_nothing(
    clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Uncomment every line that has a value, as an operator would, and load it
    # the way the daemon does (.env in the working directory).
    text = ENV_EXAMPLE.read_text(encoding="utf-8")
    dotenv = tmp_path / ".env"
    dotenv.write_text(re.sub(r"(?m)^#\s*(INVITE_MAILER_\w+=.+)$", r"\1", text), encoding="utf-8")
    (tmp_path / "config").mkdir()
    from_example = load_settings(tmp_path / "config", env_file=dotenv)
    defaults = load_settings(tmp_path / "config", env_file=None)
    assert from_example == defaults


# --- Dockerfile ------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str


def dockerfile_stages() -> list[list[Instruction]]:
    """Instructions per build stage, continuation lines joined, comments dropped."""
    stages: list[list[Instruction]] = []
    preamble: list[Instruction] = []
    logical = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or not stripped:
            continue  # comments and blank lines end nothing, even inside a continuation
        if stripped.endswith("\\"):
            logical += stripped[:-1] + " "
            continue
        logical += stripped
        keyword, _, args = logical.partition(" ")
        instruction = Instruction(keyword.upper(), args.strip())
        logical = ""
        if instruction.keyword == "FROM":
            stages.append([])
        (stages[-1] if stages else preamble).append(instruction)
    assert not logical, "the Dockerfile ends inside a continuation line"
    # ARG defaults before the first FROM may be used in FROM lines.
    args = dict(i.args.split("=", 1) for i in preamble if i.keyword == "ARG" and "=" in i.args)
    for stage in stages:
        head = stage[0]
        stage[0] = Instruction("FROM", re.sub(r"\$\{(\w+)\}", lambda m: args[m[1]], head.args))
    return stages


def runtime_stage() -> list[Instruction]:
    return dockerfile_stages()[-1]


def only(stage: list[Instruction], keyword: str) -> Instruction:
    found = [i for i in stage if i.keyword == keyword]
    assert len(found) == 1, f"expected one {keyword}, found {len(found)}"
    return found[0]


def dockerfile_env(stage: list[Instruction]) -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction in stage:
        if instruction.keyword == "ENV":
            for item in shlex.split(instruction.args):
                name, _, value = item.partition("=")
                env[name] = value
    return env


def test_dockerfile_builds_on_a_pinned_slim_python() -> None:
    for stage in dockerfile_stages():
        image = stage[0].args.split()[0]
        assert re.fullmatch(r"python:3\.1[1-9]-slim(-\w+)?", image), image


def test_dockerfile_installs_the_project_without_pip_cache() -> None:
    text = " ".join(f"{i.keyword} {i.args}" for stage in dockerfile_stages() for i in stage)
    for name in ("pyproject.toml", "README.md", "src/"):
        assert re.search(rf"COPY [^\n]*{re.escape(name)}", text), f"COPY {name}"
    assert re.search(r"pip install --no-cache-dir \.(\s|$)", text)


def test_dockerfile_runs_as_an_unprivileged_user() -> None:
    stage = runtime_stage()
    user = [i for i in stage if i.keyword == "USER"]
    assert user, "no USER in the runtime stage"
    name = user[-1].args.split(":")[0]
    assert name not in ("root", "0")
    # Nothing runs as root after the switch.
    after = stage[stage.index(user[-1]) :]
    assert not [i for i in after if i.keyword == "RUN"]
    assert any(re.search(rf"useradd .*--uid \d+ .*{name}", i.args) for i in stage)


def test_dockerfile_forwards_signals_through_tini() -> None:
    stage = runtime_stage()
    assert any("apt-get install" in i.args and " tini" in i.args for i in stage)
    entrypoint = json.loads(only(stage, "ENTRYPOINT").args)
    assert entrypoint[0] in ("tini", "/usr/bin/tini")
    assert entrypoint[1:] == ["--", "invite-mailer"]
    assert json.loads(only(stage, "CMD").args) == ["run"]
    assert only(stage, "STOPSIGNAL").args == "SIGTERM"


def test_dockerfile_health_check_calls_invite_mailer_health() -> None:
    check = only(runtime_stage(), "HEALTHCHECK").args
    command = check.split("CMD", 1)[1].strip()
    assert json.loads(command) == ["invite-mailer", "health"]


def test_dockerfile_environment_is_valid(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    env = dockerfile_env(runtime_stage())
    assert env["PYTHONUNBUFFERED"] == "1"
    ours = {k: v for k, v in env.items() if k.startswith(ENV_PREFIX)}
    settings = load_with(ours, clean_env, tmp_path)
    workdir = PurePosixPath(only(runtime_stage(), "WORKDIR").args)
    assert workdir / "state" == PurePosixPath(settings.state.path).parent
    assert workdir / "outbox" == PurePosixPath(settings.transport.outbox_dir)


def test_dockerignore_keeps_state_secrets_and_caches_out() -> None:
    patterns = {
        line.strip().rstrip("/")
        for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    }
    for name in (".venv", ".git", "state", "outbox", "preview", ".env", ".pytest_cache"):
        assert name in patterns, name


# --- docker-compose.yml ----------------------------------------------------------------


def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def compose_environment(service: dict[str, Any]) -> dict[str, str]:
    """The service's environment with ``${VAR:-default}`` resolved to the default."""
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", str(v)) for k, v in env.items()}


def mounts(service: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """target -> (source, mode) for the short volume syntax."""
    result = {}
    for item in service["volumes"]:
        source, target, *mode = item.split(":")
        result[target] = (source, mode[0] if mode else "rw")
    return result


def test_compose_has_the_daemon_and_mailpit() -> None:
    services = compose()["services"]
    assert set(services) >= {"invite-mailer", "mailpit"}
    app = services["invite-mailer"]
    assert app["build"] in (".", {"context": "."})
    assert app["restart"] == "unless-stopped"
    assert app["stop_grace_period"] == "60s"
    assert "mailpit" in app["depends_on"]


def test_compose_mailpit_is_pinned_and_published() -> None:
    mailpit = compose()["services"]["mailpit"]
    assert re.fullmatch(r"axllent/mailpit:v\d+\.\d+(\.\d+)?", mailpit["image"])
    assert {"1025:1025", "8025:8025"} <= set(mailpit["ports"])
    assert mailpit["healthcheck"]["test"]


def test_compose_mounts_config_and_templates_read_only_and_state_on_a_volume(
    clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    data = compose()
    app = data["services"]["invite-mailer"]
    volumes = mounts(app)
    assert volumes["/app/config"] == ("./config", "ro")
    assert volumes["/app/templates"] == ("./templates", "ro")
    # The daemon finds the templates beside the config folder.
    assert default_templates_dir(Path("/app/config")) == Path("/app/templates/email")
    # The ledger is on the named volume, wherever the state URL points.
    settings = load_with(compose_environment(app), clean_env, tmp_path)
    state_dir = str(PurePosixPath(settings.state.path).parent)
    source, mode = volumes[state_dir]
    assert source in data["volumes"] and mode == "rw"


def test_compose_points_the_daemon_at_mailpit(
    clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    app = compose()["services"]["invite-mailer"]
    settings = load_with(compose_environment(app), clean_env, tmp_path)
    assert settings.transport.kind == "smtp"
    assert (settings.smtp.host, settings.smtp.port, settings.smtp.security) == (
        "mailpit",
        1025,
        "none",
    )
    assert settings.unsubscribe.bind_host == "0.0.0.0"
    assert {"path": ".env", "required": False} in app["env_file"]


def test_compose_health_check_calls_invite_mailer_health() -> None:
    check = compose()["services"]["invite-mailer"]["healthcheck"]
    assert check["test"] == ["CMD", "invite-mailer", "health"]


# --- docker-compose.yml, profile "ha": several daemons on one PostgreSQL ledger --------

HA = "ha"
HA_DAEMON = "invite-mailer-ha"


def in_profile(service: dict[str, Any], profile: str | None) -> bool:
    """Whether *service* is started by ``docker compose [--profile PROFILE] up``."""
    profiles = service.get("profiles")
    return not profiles or (profile is not None and profile in profiles)


def depends_on(service: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """name -> options, for the list and the mapping syntax."""
    deps = service.get("depends_on", {})
    if isinstance(deps, list):
        return {name: {"condition": "service_started"} for name in deps}
    return dict(deps)


def started_with(name: str, services: dict[str, Any]) -> set[str]:
    """*name* and everything ``docker compose up NAME`` starts for it."""
    seen: set[str] = set()
    todo = [name]
    while todo:
        current = todo.pop()
        if current not in seen:
            seen.add(current)
            todo.extend(depends_on(services[current]))
    return seen


def raw_environment(service: dict[str, Any]) -> dict[str, str]:
    """The environment as written, ``${...}`` left alone."""
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def replicas(service: dict[str, Any]) -> int:
    return int(service.get("deploy", {}).get("replicas", service.get("scale", 1)))


def published(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(host address, host port or range) of each published port; "" = all addresses."""
    result = []
    for port in service.get("ports", []):
        if isinstance(port, dict):
            if "published" in port:
                result.append((str(port.get("host_ip", "")), str(port["published"])))
            continue
        mapping = str(port).split("/", 1)[0]
        host, _, _container = mapping.rpartition(":")
        if host:  # a bare container port gets a random host port: no collision
            address, _, host_port = host.rpartition(":")
            result.append((address, host_port))
    return result


def ledger_url() -> str:
    return compose_environment(compose()["services"][HA_DAEMON])["INVITE_MAILER_STATE__URL"]


def test_compose_ha_profile_holds_postgres_migrate_and_the_daemons() -> None:
    services = compose()["services"]
    ha_only = {name for name, s in services.items() if not in_profile(s, None)}
    assert ha_only == {"postgres", "migrate", HA_DAEMON}
    for name in ha_only:
        assert services[name]["profiles"] == [HA], name


def test_compose_default_profile_is_unchanged_and_stands_alone() -> None:
    data = compose()
    services = data["services"]
    default = {name for name, s in services.items() if in_profile(s, None)}
    assert default == {"invite-mailer", "mailpit"}
    for name in default:
        # `docker compose up` without a profile may not need an ha service.
        assert started_with(name, services) <= default, name
    app = services["invite-mailer"]
    assert replicas(app) == 1
    assert compose_environment(app)["INVITE_MAILER_STATE__URL"].startswith("sqlite:///")
    assert mounts(app)["/app/state"] == ("state", "rw")
    assert published(app) == [("127.0.0.1", "8080")]
    assert "PGPASSWORD" not in raw_environment(app)


def test_compose_postgres_is_pinned_healthchecked_and_not_published() -> None:
    data = compose()
    postgres = data["services"]["postgres"]
    # A major version, never latest: a new major cannot read the data directory.
    assert re.fullmatch(r"postgres:1[4-9](\.\d+)?-alpine(\d+\.\d+)?", postgres["image"])
    check = postgres["healthcheck"]
    assert check["test"][0] in ("CMD", "CMD-SHELL") and "pg_isready" in " ".join(check["test"])
    assert not postgres.get("ports"), "PostgreSQL is for the services of this file only"
    volumes = mounts(postgres)
    source, mode = volumes["/var/lib/postgresql/data"]
    assert source in data["volumes"] and source != "state" and mode == "rw"
    env = raw_environment(postgres)
    assert re.fullmatch(r"\$\{POSTGRES_PASSWORD(:?-)?\}", env["POSTGRES_PASSWORD"])
    assert postgres["cap_drop"] == ["ALL"]
    assert postgres["security_opt"] == ["no-new-privileges:true"]


def test_compose_ha_ledger_url_names_the_postgres_service_without_a_password() -> None:
    postgres = compose_environment(compose()["services"]["postgres"])
    url = urlsplit(ledger_url())
    assert url.scheme == "postgresql"
    assert url.password is None and ":" not in url.netloc.split("@")[0]
    assert "password" not in {key.lower() for key in parse_qs(url.query)}
    assert (url.hostname, url.port) == ("postgres", 5432)
    assert url.username == postgres["POSTGRES_USER"]
    assert url.path == "/" + postgres["POSTGRES_DB"]


def test_compose_migrate_runs_once_before_the_daemons() -> None:
    services = compose()["services"]
    migrate = services["migrate"]
    assert migrate["command"] == ["migrate"]
    assert migrate["restart"] == "no"
    assert depends_on(migrate)["postgres"]["condition"] == "service_healthy"
    assert migrate["image"] == services["invite-mailer"]["image"]
    env = raw_environment(migrate)
    assert compose_environment(migrate)["INVITE_MAILER_STATE__URL"] == ledger_url()
    assert env["PGPASSWORD"] == raw_environment(services["postgres"])["POSTGRES_PASSWORD"]
    # It can read the single-host ledger, to move it (migrate --from sqlite:///...).
    assert mounts(migrate)["/app/state"] == ("state", "rw")


def test_compose_ha_daemons_are_two_replicas_after_migrate() -> None:
    services = compose()["services"]
    daemon = services[HA_DAEMON]
    assert replicas(daemon) == 2
    assert depends_on(daemon)["migrate"]["condition"] == "service_completed_successfully"
    env = raw_environment(daemon)
    assert env["PGPASSWORD"] == raw_environment(services["postgres"])["POSTGRES_PASSWORD"]
    # One name for both replicas would make one node id out of two nodes.
    assert "container_name" not in daemon and "hostname" not in daemon
    # The SQLite ledger is not theirs: sharing it would only invite confusion.
    assert all(not str(v).startswith("state:") for v in daemon.get("volumes", []))


def test_compose_ha_daemons_run_like_the_single_host_daemon() -> None:
    services = compose()["services"]
    single, daemon = services["invite-mailer"], services[HA_DAEMON]
    for key in ("image", "build", "restart", "stop_grace_period", "env_file", "healthcheck"):
        assert daemon[key] == single[key], key
    for key in ("cap_drop", "security_opt", "logging"):
        assert daemon[key] == single[key], key
    ours, theirs = raw_environment(daemon), raw_environment(single)
    assert ours.pop("INVITE_MAILER_STATE__URL") != theirs.pop("INVITE_MAILER_STATE__URL")
    ours.pop("PGPASSWORD")
    assert ours == theirs
    single_mounts = {t: m for t, m in mounts(single).items() if t != "/app/state"}
    assert mounts(daemon) == single_mounts


def test_compose_ha_daemons_do_not_start_the_single_host_daemon() -> None:
    services = compose()["services"]
    # `docker compose --profile ha up -d invite-mailer-ha` starts these.
    started = started_with(HA_DAEMON, services)
    assert started == {HA_DAEMON, "migrate", "postgres", "mailpit"}


def host_ports(service: dict[str, Any]) -> Iterator[tuple[str, int]]:
    for address, port in published(service):
        first, _, last = port.partition("-")
        for number in range(int(first), int(last or first) + 1):
            yield ("" if address == "0.0.0.0" else address), number


@pytest.mark.parametrize("profile", [None, HA])
def test_compose_published_host_ports_never_collide(profile: str | None) -> None:
    taken: list[tuple[str, int, str]] = []
    for name, service in compose()["services"].items():
        if not in_profile(service, profile):
            continue
        ports = list(host_ports(service))
        assert not ports or replicas(service) == 1, f"{name}: its replicas share a host port"
        for address, number in ports:
            for other_address, other_number, other in taken:
                # An empty address (all of them) collides with every address.
                same = address == other_address or "" in (address, other_address)
                assert not (same and number == other_number), f"{name}, {other}: {number}"
            taken.append((address, number, name))
    assert taken, "the default setup publishes the endpoint and Mailpit"


def documented_override() -> dict[str, Any]:
    """The docker-compose.override.yml that docs/operations.md builds, its blocks merged."""
    text = OPERATIONS.read_text(encoding="utf-8")
    section = text.split("### The compose profile `ha`", 1)[1].split("\n### ", 1)[0]
    services: dict[str, Any] = {}
    for block in re.findall(r"```yaml\n(.*?)```", section, re.DOTALL):
        services.update(yaml.safe_load(block)["services"])
    return services


def test_the_documented_override_keeps_the_single_host_daemon_out_of_the_profile() -> None:
    override = documented_override()
    services = compose()["services"]
    for name, changes in override.items():
        services[name] = {**services.get(name, {}), **changes}
    started = {name for name, s in services.items() if in_profile(s, HA)}
    # `docker compose --profile ha up -d` with the override: the shared ledger only.
    assert "invite-mailer" not in started
    assert started >= {"postgres", "migrate", HA_DAEMON}
    for name in started:
        assert started_with(name, services) <= started, name
    taken = [port for name in started for port in host_ports(services[name])]
    assert len(taken) == len(set(taken)), taken
    # The proxy takes over the address the single-host daemon published.
    assert ("127.0.0.1", 8080) in taken


# --- systemd unit ----------------------------------------------------------------------


def unit() -> dict[str, dict[str, list[str]]]:
    """section -> key -> values (keys may repeat), comments and blank lines dropped."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in UNIT.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        assert not line.endswith("\\"), "keep unit lines unwrapped"
        header = re.fullmatch(r"\[(\w+)\]", line)
        if header:
            current = sections.setdefault(header[1], {})
            continue
        assert current is not None, f"key outside a section: {line}"
        key, sep, value = line.partition("=")
        assert sep, f"not a key=value line: {line}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def service() -> dict[str, str]:
    """[Service] with the last value of each key (as systemd applies most keys)."""
    return {key: values[-1] for key, values in unit()["Service"].items()}


HARDENING = {
    "User": "invite-mailer",
    "Group": "invite-mailer",
    "WorkingDirectory": "/opt/invite-mailer",
    "ExecStart": "/opt/invite-mailer/.venv/bin/invite-mailer run",
    "ExecReload": "/bin/kill -HUP $MAINPID",
    "EnvironmentFile": "-/etc/invite-mailer/invite-mailer.env",
    "Restart": "on-failure",
    "RestartSec": "10",
    "TimeoutStopSec": "60",
    "KillSignal": "SIGTERM",
    "StateDirectory": "invite-mailer",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "NoNewPrivileges": "yes",
    "PrivateDevices": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes",
    "ProtectControlGroups": "yes",
    "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
    "RestrictNamespaces": "yes",
    "LockPersonality": "yes",
    "MemoryDenyWriteExecute": "yes",
    "SystemCallArchitectures": "native",
    "CapabilityBoundingSet": "",
    "UMask": "0077",
}


@pytest.mark.parametrize(("key", "value"), HARDENING.items(), ids=list(HARDENING))
def test_unit_sets(key: str, value: str) -> None:
    assert service().get(key) == value


def test_unit_filters_system_calls_to_a_service_set() -> None:
    assert unit()["Service"]["SystemCallFilter"][0] == "@system-service"


def test_unit_writes_only_to_its_state_directory(
    clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    svc = service()
    state_dir = PurePosixPath("/var/lib") / svc["StateDirectory"]
    assert unit()["Service"]["ReadWritePaths"] == [str(state_dir)]
    env = dict(item.split("=", 1) for item in unit()["Service"]["Environment"])
    ours = {k: v for k, v in env.items() if k.startswith(ENV_PREFIX)}
    settings = load_with(ours, clean_env, tmp_path)
    assert PurePosixPath(settings.state.path).parent == state_dir
    assert PurePosixPath(settings.transport.outbox_dir).is_relative_to(state_dir)


def test_unit_is_installable() -> None:
    assert unit()["Install"]["WantedBy"] == ["multi-user.target"]
    assert "network-online.target" in unit()["Unit"]["After"][0]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    # verify checks that ExecStart/ExecReload exist, so build a tiny root with
    # them and the standard targets.
    venv_bin = tmp_path / "opt/invite-mailer/.venv/bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "invite-mailer").write_text("#!/bin/sh\n")
    (venv_bin / "invite-mailer").chmod(0o755)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin/kill").write_text("#!/bin/sh\n")
    (tmp_path / "bin/kill").chmod(0o755)
    units = tmp_path / "usr/lib/systemd/system"
    units.mkdir(parents=True)
    targets = [*Path("/usr/lib/systemd/system").glob("*.target")]
    targets += Path("/lib/systemd/system").glob("*.target")
    if not targets:
        pytest.skip("no systemd unit directory to verify against")
    for target in targets:
        shutil.copy(target, units)
    installed = tmp_path / "etc/systemd/system" / UNIT.name
    installed.parent.mkdir(parents=True)
    shutil.copy(UNIT, installed)
    result = subprocess.run(
        ["systemd-analyze", "verify", f"--root={tmp_path}", str(installed)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    # verify exits 0 on unknown keys and bad values; it only prints them.
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr
