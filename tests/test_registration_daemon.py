"""Registration links end to end: the daemon, its web app and a real SMTP server.

The daemon runs in this process on a fake clock (see ``test_daemon_clock``),
sending through aiosmtpd on 127.0.0.1; its web app listens on a free port
of 127.0.0.1 and is wired as ``invite-mailer run`` wires it. The links are
taken from the mails the server received, as a recipient would click them.
No test waits for the wall clock: time moves by setting the clock and
waking the daemon as its jobs do.
"""

from __future__ import annotations

import asyncio
import base64
import email
import email.policy
import json
import os
import re
import signal
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from email.message import EmailMessage
from pathlib import Path
from zoneinfo import ZoneInfo

import httpx
import icalendar
import pytest

from invite_mailer.core.plan import PlanInput, plan
from invite_mailer.core.registrations import with_registrations
from invite_mailer.core.tokens import REGISTER, WITHDRAW, make_link_token
from invite_mailer.delivery.ledger import Ledger
from invite_mailer.delivery.transport import make_transport
from invite_mailer.inputs.config import load_config
from invite_mailer.service.daemon import Daemon, run_daemon
from invite_mailer.service.server import RunningServer
from invite_mailer.service.web import start_unsubscribe
from support.cli import run_process
from support.clock import FakeClock
from support.contacts import write_contacts
from support.daemon import make_daemon, serving
from support.project import copy_project, ledger_of, use_state_url
from support.smtp import SmtpServer, smtp_env
from test_daemon_clock import series_text

pytestmark = pytest.mark.both_ledgers

BERLIN = ZoneInfo("Europe/Berlin")
SERIES = "transferreihe-2024"
SECRET = "registration-secret-0123456789"
WEB_URL = "https://example.org/transferreihe"
BJOERN = "bjoern.oestreich@example.org"  # in the shipped contacts, registered for nothing
INVITATION_DUE = datetime(2024, 10, 24, 10, 5, tzinfo=BERLIN)
LINK = re.compile(re.escape(WEB_URL) + r"/(anmeldung|absage)/([A-Za-z0-9_.-]+)")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
def env(project: Path, smtp_server: SmtpServer, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The shipped project with registration links on, sending to the test server."""
    series = project / "config" / "series.yaml"
    text = series.read_text(encoding="utf-8")
    text = text.replace(
        "registration_url: https://example.org/transferreihe/anmeldung\n",
        "registration_url: https://example.org/transferreihe/anmeldung\n"
        "registration:\n  mode: links\n",
    )
    series.write_text(text, encoding="utf-8")
    variables = smtp_env(
        smtp_server.port,
        unsubscribe__secret=SECRET,
        unsubscribe__serve="true",
        unsubscribe__bind_port=free_port(),
        sender__web_url=WEB_URL,
        notify__organiser_summary="false",
    )
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    return variables


@dataclass
class Running:
    daemon: Daemon
    clock: FakeClock
    web: RunningServer
    client: httpx.AsyncClient
    server: SmtpServer
    ledger_path: Path | str

    def received(self, to: str, kind: str | None = None) -> list[EmailMessage]:
        found = []
        for received in self.server.received:
            message = email.message_from_bytes(received.data, policy=email.policy.default)
            assert isinstance(message, EmailMessage)
            if received.rcpt_tos[0].lower() == to and kind in (
                None,
                message["X-Invite-Mailer-Kind"],
            ):
                found.append(message)
        return found

    def kinds(self) -> list[str]:
        """The kind of every mail received, in order."""
        return [
            str(
                email.message_from_bytes(r.data, policy=email.policy.default)[
                    "X-Invite-Mailer-Kind"
                ]
            )
            for r in self.server.received
        ]

    def local(self, url: str) -> str:
        """The link of a mail, pointed at the web app (what the reverse proxy does)."""
        return url.replace(WEB_URL, self.web.url)

    async def registrations(self) -> dict[str, dict[str, str]]:
        async with Ledger.open(self.ledger_path) as ledger:
            rows = await ledger.registrations(SERIES)
        return {
            email: {
                event: f"{row.source}{'' if row.active else ' withdrawn'}"
                for event, row in events.items()
                if row.source != "csv"
            }
            for email, events in rows.items()
            if any(row.source != "csv" for row in events.values())
        }

    async def wake(self) -> None:
        """A wake-up of the daemon at the clock's time (a job or the sweep)."""
        await self.daemon.run_pass()


@asynccontextmanager
async def running(project: Path, server: SmtpServer, at: datetime) -> AsyncIterator[Running]:
    clock = FakeClock(at)
    config = load_config(project / "config")
    ledger_path = ledger_of(project)
    async with Ledger.open(ledger_path) as ledger, make_transport(config.settings) as transport:
        daemon = make_daemon(config, ledger, transport, project, clock)
        # As invite-mailer run wires them (service.daemon._run).
        web = await start_unsubscribe(
            config,
            series=lambda: daemon.config.series,
            on_registration=daemon.registration_changed,
            clock=daemon.now,
        )
        assert web is not None
        try:
            async with serving(daemon), httpx.AsyncClient(timeout=10) as client:
                yield Running(daemon, clock, web, client, server, ledger_path)
        finally:
            await web.stop()


def links(message: EmailMessage) -> dict[tuple[str, str], str]:
    """(action, date) -> link, from the plain-text part of *message*."""
    text = message.get_body(("plain",))
    assert text is not None
    found = {}
    for match in LINK.finditer(text.get_content()):
        event = _event_of(match.group(2))
        found[(match.group(1), event)] = match.group(0)
    return found


def _event_of(token: str) -> str:
    part = token.split(".")[1]
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)).decode()


def calendars(message: EmailMessage) -> list[icalendar.Calendar]:
    found = []
    for part in message.walk():
        if part.get_content_type() == "text/calendar" and part.get_filename():
            found.append(icalendar.Calendar.from_ical(part.get_content()))
    return found


@pytest.mark.slow
async def test_a_link_registers_on_post_only_confirms_once_and_the_reminder_follows(
    project: Path, env: dict[str, str], smtp_server: SmtpServer
) -> None:
    async with running(project, smtp_server, INVITATION_DUE) as run:
        # The catch-up pass sent the invitations: Björn's has a link per date and,
        # registered for nothing, no calendar file.
        [invitation] = run.received(BJOERN, "invitation")
        found = links(invitation)
        assert {event for action, event in found if action == "anmeldung"} == {
            "verwaltung",
            "kreislaufwirtschaft",
            "allianzen",
            "forschung",
        }
        assert calendars(invitation) == []
        register = run.local(found[("anmeldung", "verwaltung")])

        # A link scanner's GET shows the date and changes nothing.
        page = await run.client.get(register)
        assert page.status_code == 200
        assert (
            "Verwaltung transformieren" in page.text
            and "Donnerstag, 14. November 2024" in page.text
        )
        assert '<form method="post">' in page.text
        assert await run.registrations() == {}

        # The recipient's POST registers.
        registered_at = run.clock.move(timedelta(minutes=3))
        answer = await run.client.post(register, data={"bestaetigt": "ja"})
        assert answer.status_code == 200 and "angemeldet" in answer.text
        assert await run.registrations() == {BJOERN: {"verwaltung": "link"}}
        # The web app woke the daemon: a pass now, and a wake-up after the quiet period.
        assert run.daemon.scheduler.get_job("registration") is not None
        await run.wake()
        assert run.received(BJOERN, "confirmation") == []
        assert run.daemon.scheduler.get_job("confirmation:verwaltung") is not None

        # Within a minute of the registration: one confirmation with the date's calendar file.
        run.clock.move(timedelta(seconds=31))
        await run.wake()
        [confirmation] = run.received(BJOERN, "confirmation")
        assert run.clock() - registered_at < timedelta(seconds=60)
        assert confirmation["Subject"].startswith("Anmeldebestätigung: Do., 14.11.2024")
        [calendar] = calendars(confirmation)
        [entry] = calendar.walk("VEVENT")
        assert str(entry["UID"]) == f"{SERIES}-verwaltung@example.org"
        assert calendar["METHOD"] == "PUBLISH"
        assert ("absage", "verwaltung") in links(confirmation)

        # A second POST is the same registration: nothing more is sent.
        again = await run.client.post(register, data={"bestaetigt": "ja"})
        assert again.status_code == 200
        run.clock.move(timedelta(minutes=5))
        await run.wake()
        assert len(run.received(BJOERN, "confirmation")) == 1

        # The reminder the day before goes to him, with the link to withdraw.
        run.clock.moment = datetime(2024, 11, 13, 14, 5, tzinfo=BERLIN)
        await run.wake()
        [reminder] = run.received(BJOERN, "reminder")
        assert reminder["X-Invite-Mailer-Event"] == "verwaltung"
        assert ("absage", "verwaltung") in links(reminder)

    # As the organiser runs it.
    args = ["registrations", "list", "--json", "--event", "verwaltung"]
    listed = await asyncio.to_thread(run_process, args, env, project)
    assert listed.returncode == 0, listed.stderr
    rows = {row["email"]: row for row in json.loads(listed.stdout)["registrations"]}
    assert rows[BJOERN]["source"] == "link"
    assert rows[BJOERN]["registered_at"] is not None
    assert rows["jana.mueller@example.org"]["source"] == "csv"


@pytest.mark.slow
async def test_forged_truncated_and_foreign_links_change_nothing(
    project: Path, env: dict[str, str], smtp_server: SmtpServer
) -> None:
    async with running(project, smtp_server, INVITATION_DUE) as run:
        [invitation] = run.received(BJOERN, "invitation")
        good = run.local(links(invitation)[("anmeldung", "verwaltung")])
        token = good.rsplit("/", 1)[1]
        base = good.rsplit("/", 1)[0]
        flipped = token[:-1] + ("A" if token[-1] != "A" else "B")
        wrong_secret = make_link_token("wrong-secret", REGISTER, SERIES, BJOERN, "allianzen")
        other_series = make_link_token(SECRET, REGISTER, "another-series", BJOERN, "verwaltung")
        # A withdrawal link's token does not register.
        withdrawal = make_link_token(SECRET, WITHDRAW, SERIES, BJOERN, "verwaltung")
        unknown_date = make_link_token(SECRET, REGISTER, SERIES, BJOERN, "no-such-date")
        bad = [flipped, token[: len(token) // 2], wrong_secret, other_series, withdrawal]
        bad += [unknown_date, "x" * 600, "a.b.c"]
        for candidate in bad:
            for method in ("GET", "POST"):
                answer = await run.client.request(method, f"{base}/{candidate}")
                assert answer.status_code in (400, 414), (candidate, method)
        assert await run.registrations() == {}
        run.clock.move(timedelta(minutes=2))
        await run.wake()
        assert run.received(BJOERN, "confirmation") == []


@pytest.mark.slow
async def test_a_registration_added_to_the_contact_list_gets_one_confirmation(
    project: Path, env: dict[str, str], smtp_server: SmtpServer
) -> None:
    contacts = project / "config" / "contacts.csv"
    async with running(project, smtp_server, INVITATION_DUE) as run:
        # What the contact list held at the first reading is confirmed to nobody.
        assert "confirmation" not in run.kinds()
        text = contacts.read_text(encoding="utf-8")
        line = next(line for line in text.splitlines() if line.startswith(BJOERN))
        contacts.write_text(text.replace(line, line + "allianzen"), encoding="utf-8")
        run.clock.move(timedelta(hours=1))
        assert await run.daemon.reload("test edit")
        assert run.received(BJOERN, "confirmation") == []  # the quiet period first
        run.clock.move(timedelta(seconds=40))
        await run.wake()
        run.clock.move(timedelta(minutes=10))
        await run.wake()
        [confirmation] = run.received(BJOERN, "confirmation")
        assert "Allianzen bilden" in confirmation["Subject"]
        assert [c.walk("VEVENT")[0]["UID"] for c in calendars(confirmation)] == [
            f"{SERIES}-allianzen@example.org"
        ]
        assert run.kinds().count("confirmation") == 1


@pytest.mark.slow
async def test_invite_mailer_run_serves_the_links_on_its_clock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, state_url: str | None
) -> None:
    """``run`` as an operator starts it: the web app is wired to the daemon.

    The series lies years ahead of the wall clock, so a link registers now;
    the link's pass records it and plans the confirmation.
    """
    copy_project(tmp_path)
    if state_url is not None:
        use_state_url(tmp_path, state_url)
    monkeypatch.chdir(tmp_path)
    for name in [n for n in os.environ if n.startswith("INVITE_MAILER_")]:
        monkeypatch.delenv(name)
    text = series_text().replace(
        "registration_url: https://example.org/probe/anmeldung\n",
        "registration_url: https://example.org/probe/anmeldung\nregistration:\n  mode: links\n",
    )
    (tmp_path / "config" / "series.yaml").write_text(text, encoding="utf-8")
    write_contacts(
        tmp_path / "config" / "contacts.csv",
        [
            ("anna.alt@example.org", "Frau", "Anna", "Alt", ""),
            ("bernd.berg@example.org", "", "Bernd", "Berg", ""),
        ],
    )
    port = free_port()
    for name, value in {
        "INVITE_MAILER_UNSUBSCRIBE__SECRET": SECRET,
        "INVITE_MAILER_UNSUBSCRIBE__SERVE": "true",
        "INVITE_MAILER_UNSUBSCRIBE__BIND_PORT": str(port),
        "INVITE_MAILER_SENDER__WEB_URL": WEB_URL,
    }.items():
        monkeypatch.setenv(name, value)
    config = load_config(tmp_path / "config")
    daemon = asyncio.create_task(
        run_daemon(config, config_dir=tmp_path / "config", templates_dir=None)
    )
    base = f"http://127.0.0.1:{port}"
    token = make_link_token(SECRET, REGISTER, "uhr-probe", "anna.alt@example.org", "zweiter")
    ledger_path = ledger_of(tmp_path)
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
            page = await client.get(f"{base}/anmeldung/{token}")
            assert page.status_code == 200 and "Zweiter Termin" in page.text
            answer = await client.post(f"{base}/anmeldung/{token}", data={"bestaetigt": "ja"})
            assert answer.status_code == 200 and "angemeldet" in answer.text
        confirmation = None
        for _ in range(200):  # the link's pass runs at once, in the daemon's loop
            async with Ledger.open(ledger_path) as ledger:
                view = await ledger.view("uhr-probe")
            config_now = load_config(tmp_path / "config")
            mailings = plan(
                PlanInput.of(with_registrations(config_now, view.registrations())),
                view,
                datetime.now(BERLIN),
            )
            confirmation = next((m for m in mailings if m.kind == "confirmation"), None)
            if confirmation is not None:
                break
            await asyncio.sleep(0.05)
        assert view.registrations_of("anna.alt@example.org")["zweiter"].source == "link"
        assert confirmation is not None and confirmation.event == "zweiter"
    finally:
        if not daemon.done():
            os.kill(os.getpid(), signal.SIGTERM)
        assert await asyncio.wait_for(daemon, 30) == 0
