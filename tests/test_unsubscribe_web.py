"""The one-click unsubscribe endpoint, over real HTTP.

The app runs in uvicorn on 127.0.0.1 (a free port) inside the test's event
loop; ``httpx.AsyncClient`` talks to it over a real socket. Sending goes
through the real command line (``python -m invite_mailer``) in a subprocess,
on the outbox transport, so what is checked is what an operator would see.
"""

from __future__ import annotations

import asyncio
import base64
import email
import email.policy
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from invite_mailer.core.tokens import make_token, verify_token
from invite_mailer.delivery.ledger import Ledger
from invite_mailer.inputs.config import load_config
from invite_mailer.inputs.series import Kind
from invite_mailer.mail.compose import Composer
from invite_mailer.service.daemon import run_daemon
from invite_mailer.service.server import RunningServer, start_server
from invite_mailer.service.web import create_app, mask_address

ROOT = Path(__file__).resolve().parent.parent
SECRET = "test-secret-0123456789"
BASE_URL = "https://example.org/abmelden"
SERIES = "transferreihe-2024"
JANA = "jana.mueller@example.org"
ONE_CLICK = {"List-Unsubscribe": "One-Click"}


@pytest.fixture
def project(project: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the shipped config with the one-click link switched on."""
    monkeypatch.setenv("INVITE_MAILER_UNSUBSCRIBE__SECRET", SECRET)
    monkeypatch.setenv("INVITE_MAILER_SENDER__UNSUBSCRIBE_URL", BASE_URL)
    return project


@dataclass
class Endpoint:
    server: RunningServer
    client: httpx.AsyncClient
    ledger_path: Path

    def url(self, token: str) -> str:
        return f"{self.server.url}/{token}"

    async def optouts(self) -> dict[str, str]:
        """Email -> source of every opt-out in the ledger ({} when it does not exist)."""
        if not self.ledger_path.exists():
            return {}
        async with Ledger.open(self.ledger_path) as ledger:
            return {e.email: e.source for e in await ledger.optout_entries(SERIES)}


@pytest.fixture
async def endpoint(project: Path) -> AsyncIterator[Endpoint]:
    ledger_path = project / "state" / "invite-mailer.db"
    app = create_app(
        SERIES,
        SECRET,
        ledger_path,
        optout_file=project / "config" / "optout.txt",
        series_title="Online-Transferreihe",
        contact_address="abmeldung@example.org",
    )
    server = await start_server(app, "127.0.0.1", 0)
    try:
        async with httpx.AsyncClient(timeout=10) as client:
            yield Endpoint(server, client, ledger_path)
    finally:
        await server.stop()


async def cli(project: Path, *args: str) -> tuple[int, str]:
    """Run ``invite-mailer ARGS`` as a separate process, as an operator would."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "invite_mailer",
        *args,
        cwd=project,
        env={**os.environ, "COLUMNS": "200"},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await process.communicate()
    assert process.returncode is not None
    return process.returncode, output.decode()


def outbox_recipients(project: Path) -> list[str]:
    recipients = []
    for path in sorted((project / "outbox").glob("*.eml")):
        message = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
        if message["X-Invite-Mailer-Kind"]:  # not the organiser's report
            recipients.append(message["To"].addresses[0].addr_spec.lower())
    return recipients


# --- opting out --------------------------------------------------------------------------


@pytest.mark.slow
async def test_one_click_post_opts_out_and_send_due_skips_them(
    project: Path, endpoint: Endpoint
) -> None:
    token = make_token(SECRET, SERIES, JANA)
    response = await endpoint.client.post(endpoint.url(token), data=ONE_CLICK)
    assert response.status_code == 200, response.text
    assert "Sie wurden abgemeldet" in response.text
    assert "j***@example.org" in response.text
    assert await endpoint.optouts() == {JANA: "one-click"}

    # Mail programs retry; a second click is just as fine.
    again = await endpoint.client.post(endpoint.url(token), data=ONE_CLICK)
    assert again.status_code == 200
    assert await endpoint.optouts() == {JANA: "one-click"}

    code, output = await cli(project, "send-due", "--now", "2024-10-24T10:05")
    assert code == 0, output
    recipients = outbox_recipients(project)
    assert len(recipients) == 11, output
    assert JANA not in recipients

    code, output = await cli(project, "plan", "--now", "2024-10-24T10:06", "--json")
    assert code == 0, output
    assert '"opted_out": 1' in output


@pytest.mark.slow
async def test_the_confirmation_button_posts_and_opts_out(endpoint: Endpoint) -> None:
    token = make_token(SECRET, SERIES, "Thomas.Schmidt@example.org")
    response = await endpoint.client.post(endpoint.url(token), data={"bestaetigt": "ja"})
    assert response.status_code == 200
    assert await endpoint.optouts() == {"thomas.schmidt@example.org": "web form"}


@pytest.mark.slow
async def test_multipart_one_click_body_is_understood(endpoint: Endpoint) -> None:
    # RFC 8058 prefers multipart/form-data; httpx sends it when files are given.
    token = make_token(SECRET, SERIES, JANA)
    response = await endpoint.client.post(
        endpoint.url(token), data=ONE_CLICK, files={"x": ("x.txt", b"")}
    )
    assert response.status_code == 200
    assert await endpoint.optouts() == {JANA: "one-click"}


@pytest.mark.slow
async def test_get_shows_the_page_and_changes_nothing(endpoint: Endpoint) -> None:
    token = make_token(SECRET, SERIES, JANA)
    for _ in range(2):
        response = await endpoint.client.get(endpoint.url(token))
        assert response.status_code == 200
        page = response.text
        assert response.headers["content-type"].startswith("text/html")
        assert '<html lang="de">' in page
        assert "j***@example.org" in page and JANA not in page
        assert '<form method="post">' in page and "<button" in page
        assert "„Online-Transferreihe“" in page
        # Self-contained: no scripts, nothing loaded from elsewhere.
        assert "<script" not in page and "src=" not in page and "<link" not in page
        assert "default-src 'none'" in response.headers["content-security-policy"]
        assert response.headers["cache-control"] == "no-store"
    head = await endpoint.client.head(endpoint.url(token))
    assert head.status_code == 200
    assert await endpoint.optouts() == {}


@pytest.mark.slow
async def test_page_says_when_an_address_is_already_opted_out(
    project: Path, endpoint: Endpoint
) -> None:
    token = make_token(SECRET, SERIES, JANA)
    await endpoint.client.post(endpoint.url(token), data=ONE_CLICK)
    response = await endpoint.client.get(endpoint.url(token))
    assert response.status_code == 200 and "bereits abgemeldet" in response.text

    # Blocked by hand in optout.txt: the page knows that too.
    with (project / "config" / "optout.txt").open("a", encoding="utf-8") as file:
        file.write("Alex.Meyer@example.org\n")
    other = make_token(SECRET, SERIES, "alex.meyer@example.org")
    response = await endpoint.client.get(endpoint.url(other))
    assert "bereits abgemeldet" in response.text
    assert await endpoint.optouts() == {JANA: "one-click"}


def _tamper(token: str) -> str:
    email_part, mac = token.split(".")
    flipped = "A" if mac[5] != "A" else "B"
    return f"{email_part}.{mac[:5]}{flipped}{mac[6:]}"


def _swap_address(token: str) -> str:
    # Someone else's address with Jana's MAC.
    other = make_token(SECRET, SERIES, "alex.meyer@example.org")
    return other.split(".")[0] + "." + token.split(".")[1]


def _upper_case(token: str) -> str:
    # The same address spelt differently, with the genuine MAC of the lower-case one.
    spelt = base64.urlsafe_b64encode(JANA.upper().encode()).rstrip(b"=").decode()
    return spelt + "." + token.split(".")[1]


BAD_TOKENS = {
    "forged-mac": _tamper,
    "truncated": lambda t: t[:-4],
    "mac-missing": lambda t: t.split(".")[0],
    "other-address": _swap_address,
    "other-series": lambda t: make_token(SECRET, "andere-reihe-2025", JANA),
    "other-secret": lambda t: make_token("another-secret", SERIES, JANA),
    "upper-case-address": _upper_case,
    "garbage": lambda t: "not-a-token",
    "two-dots": lambda t: t + ".x",
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(BAD_TOKENS))
async def test_invalid_tokens_get_400_and_change_nothing(endpoint: Endpoint, name: str) -> None:
    token = BAD_TOKENS[name](make_token(SECRET, SERIES, JANA))
    assert verify_token(SECRET, SERIES, token) is None
    for method in ("GET", "POST"):
        response = await endpoint.client.request(method, endpoint.url(token), data=ONE_CLICK)
        assert response.status_code == 400, (method, response.text)
        assert "ungültig" in response.text
        assert "abmeldung@example.org" in response.text
    assert await endpoint.optouts() == {}


@pytest.mark.slow
async def test_healthz_and_unknown_routes(endpoint: Endpoint) -> None:
    response = await endpoint.client.get(f"{endpoint.server.url}/healthz")
    assert response.status_code == 200 and response.text == "ok"
    assert (await endpoint.client.get(f"{endpoint.server.url}/a/b")).status_code == 404
    token = make_token(SECRET, SERIES, JANA)
    assert (await endpoint.client.delete(endpoint.url(token))).status_code == 405
    assert await endpoint.optouts() == {}


@pytest.mark.slow
async def test_oversized_body_is_refused(endpoint: Endpoint) -> None:
    token = make_token(SECRET, SERIES, JANA)
    response = await endpoint.client.post(endpoint.url(token), content=b"x" * (100 * 1024))
    assert response.status_code == 413
    assert await endpoint.optouts() == {}


@pytest.mark.slow
async def test_pages_escape_what_they_show(project: Path) -> None:
    app = create_app(
        SERIES,
        SECRET,
        project / "state" / "x.db",
        series_title="<script>alert(1)</script>",
        contact_address='"><img src=x>@example.org',
    )
    server = await start_server(app, "127.0.0.1", 0)
    try:
        async with httpx.AsyncClient() as client:
            token = make_token(SECRET, SERIES, '"<b>"@example.org')
            page = (await client.get(f"{server.url}/{token}")).text
            assert "<script>" not in page and "&lt;script&gt;" in page
            assert "&#x27;" in page or "&quot;" in page
            invalid = (await client.get(f"{server.url}/nope")).text
            assert "<img" not in invalid
    finally:
        await server.stop()


def test_mask_address() -> None:
    assert mask_address(JANA) == "j***@example.org"
    assert mask_address("x@example.org") == "x***@example.org"
    assert mask_address("nonsense") == "***"


# --- the headers of every mail --------------------------------------------------------------


def _mails(project: Path) -> Iterator[tuple[str, EmailMessage]]:
    config = load_config(project / "config")
    contact = config.contacts.by_key(JANA)
    assert contact is not None
    now = config.series.first_start
    event = config.series.events[0]
    for kind in (Kind.INVITATION, Kind.REMINDER, Kind.FOLLOWUP):
        message = Composer.from_config(config).compose(
            kind, contact, event=None if kind is Kind.INVITATION else event, now=now
        )
        wire = message.as_bytes(policy=email.policy.SMTP)
        yield str(kind), email.message_from_bytes(wire, policy=email.policy.default)


@pytest.mark.slow
async def test_every_kind_of_mail_has_rfc8058_headers(project: Path, endpoint: Endpoint) -> None:
    for kind, message in _mails(project):
        raw = message.get_all("List-Unsubscribe")
        assert raw is not None and len(raw) == 1, kind
        header = str(raw[0])
        assert "=?" not in header, (kind, header)  # never RFC 2047-encoded
        urls = [part.strip().strip("<>") for part in header.replace("\r\n", "").split(",")]
        mailto = [u for u in urls if u.startswith("mailto:")]
        https = [u for u in urls if u.startswith("https://")]
        assert len(mailto) == 1 and mailto[0].startswith("mailto:abmeldung@example.org?"), kind
        assert len(https) == 1 and https[0].startswith(BASE_URL + "/"), kind
        assert message.get_all("List-Unsubscribe-Post") == ["List-Unsubscribe=One-Click"], kind
        token = https[0].removeprefix(BASE_URL + "/")
        assert verify_token(SECRET, SERIES, token) == JANA, kind

    # The link of a real mail works against the real endpoint.
    _, message = next(_mails(project))
    link = next(
        part.strip().strip("<>")
        for part in str(message["List-Unsubscribe"]).split(",")
        if "https://" in part
    )
    response = await endpoint.client.post(
        endpoint.server.url + urlsplit(link).path.removeprefix("/abmelden"), data=ONE_CLICK
    )
    assert response.status_code == 200
    assert await endpoint.optouts() == {JANA: "one-click"}


@pytest.mark.slow
def test_validate_warns_when_the_url_has_no_secret(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("INVITE_MAILER_UNSUBSCRIBE__SECRET")
    config = load_config(project / "config")
    messages = [str(w) for w in config.warnings]
    assert any(
        "unsubscribe_url is set" in m and "INVITE_MAILER_UNSUBSCRIBE__SECRET" in m for m in messages
    )
    _, message = next(_mails(project))
    assert "https://" not in str(message["List-Unsubscribe"])
    assert message["List-Unsubscribe-Post"] is None

    monkeypatch.setenv("INVITE_MAILER_UNSUBSCRIBE__SECRET", SECRET)
    assert not load_config(project / "config").warnings


# --- served by the daemon ---------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.slow
async def test_the_daemon_serves_the_endpoint_and_stops_it(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = _free_port()
    monkeypatch.setenv("INVITE_MAILER_UNSUBSCRIBE__SERVE", "true")
    monkeypatch.setenv("INVITE_MAILER_UNSUBSCRIBE__BIND_PORT", str(port))
    config = load_config(project / "config")
    daemon = asyncio.create_task(
        run_daemon(config, config_dir=project / "config", templates_dir=None)
    )
    base = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(timeout=5) as client:
            for _ in range(500):
                if daemon.done():
                    daemon.result()
                try:
                    if (await client.get(f"{base}/healthz")).status_code == 200:
                        break
                except httpx.TransportError:
                    await asyncio.sleep(0.02)
            token = make_token(SECRET, SERIES, JANA)
            response = await client.post(f"{base}/{token}", data=ONE_CLICK)
            assert response.status_code == 200
        async with Ledger.open(project / "state" / "invite-mailer.db") as ledger:
            assert JANA in await ledger.optouts(SERIES)
    finally:
        if not daemon.done():
            # What systemd does; the daemon's own handler stops it.
            os.kill(os.getpid(), signal.SIGTERM)
        assert await asyncio.wait_for(daemon, 30) == 0
    with pytest.raises(httpx.TransportError):
        async with httpx.AsyncClient(timeout=2) as client:
            await client.get(f"{base}/healthz")


async def test_a_taken_port_is_a_clear_error(project: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        app = create_app(SERIES, SECRET, project / "state" / "x.db")
        with pytest.raises(Exception, match=rf"cannot listen on 127.0.0.1:{port}"):
            await start_server(app, "127.0.0.1", port)


class _ClickingTransport:
    """Accepts every mail; while the first one goes out, a recipient clicks one-click."""

    def __init__(self, client: httpx.AsyncClient, url: str) -> None:
        self.client = client
        self.url = url
        self.sent: list[str] = []

    async def __aenter__(self) -> _ClickingTransport:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def send(self, message: EmailMessage, *, sender: str, recipients: list[str]) -> str:
        if not self.sent:
            response = await self.client.post(self.url, data=ONE_CLICK)
            assert response.status_code == 200
        self.sent.append(recipients[0].lower())
        return "250 accepted"


@pytest.mark.slow
async def test_an_opt_out_during_a_pass_is_honoured_at_once(
    project: Path, endpoint: Endpoint
) -> None:
    from invite_mailer.cli.commands import parse_now
    from invite_mailer.delivery.dispatch import Dispatcher

    config = load_config(project / "config")
    last = config.contacts.contacts[-1].key  # queued last with one worker
    transport = _ClickingTransport(endpoint.client, endpoint.url(make_token(SECRET, SERIES, last)))
    async with Ledger.open(endpoint.ledger_path) as ledger:
        dispatcher = Dispatcher(config, ledger, transport, workers=1)  # type: ignore[arg-type]
        await dispatcher.run_pass(parse_now("2024-10-24T10:05", config))
    invited = [r for r in transport.sent if r != "transferreihe@example.org"]
    assert len(invited) == len(config.contacts.contacts) - 1
    assert last not in invited
