"""Relay quotas per minute, hour and day, shared through the ledger; priorities.

The limiters run in virtual time (no test sleeps for the clock). The command
line tests run ``send-due`` as a user does; the day passes by moving the
ledger's record of the sends a day back, which is what the limiter reads.
"""

from __future__ import annotations

import asyncio
import bisect
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from invite_mailer.core.forecast import forecast
from invite_mailer.core.plan import Mailing, MailingState
from invite_mailer.delivery.ledger import Ledger
from invite_mailer.delivery.ratelimit import Quotas
from invite_mailer.errors import QuotaReached
from invite_mailer.inputs.series import Kind
from invite_mailer.inputs.settings import SmtpSettings
from support.cli import invoke
from support.mails import mails
from support.postgres import move_sends_back
from support.project import ledger_of
from support.smtp import SmtpServer, smtp_env

pytestmark = pytest.mark.both_ledgers

START = 1_700_000_000.0


def most_in_any_window(starts: list[float], window: float) -> int:
    starts = sorted(starts)
    return max(
        (bisect.bisect_left(starts, t + window) - i for i, t in enumerate(starts)), default=0
    )


class Clock:
    """One virtual clock for the monotonic and the wall time; sleeping moves it."""

    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds
        await asyncio.sleep(0)


def quotas(clock: Clock, minute: int, hour: int, day: int) -> Quotas:
    return Quotas(minute, hour, day, clock=clock, sleep=clock.sleep, wall_clock=clock)


async def test_no_window_holds_more_than_its_quota_and_a_full_one_stops() -> None:
    clock = Clock()
    limits = quotas(clock, minute=5, hour=12, day=30)
    starts: list[float] = []
    stops: list[float] = []
    while clock.now < START + 4 * 3600:
        try:
            limits.check()
            await limits.acquire()
        except QuotaReached as exc:
            assert exc.reopens_at > clock.now + 60  # a long wait: stopped, not slept
            stops.append(exc.reopens_at)
            clock.now = exc.reopens_at  # the next pass, when the window reopens
            continue
        starts.append(clock.now)
        clock.now += 1.0  # the send itself
    assert most_in_any_window(starts, 60) <= 5
    assert most_in_any_window(starts, 3600) <= 12
    assert most_in_any_window(starts, 86400) == 30  # the whole day's quota, no more
    assert stops, "the hour's quota must have stopped some passes"


async def test_the_quota_of_a_day_is_shared_by_the_next_process(tmp_path: Path) -> None:
    # One process at a time (SQLite): the count of earlier runs is read once, on
    # this clock. PostgreSQL's shared places: test_ledger_postgres.py.
    clock = Clock()
    path = tmp_path / "ledger.db"
    async with Ledger.open(path) as ledger:
        first = quotas(clock, minute=0, hour=0, day=3)
        await first.share(ledger)
        for _ in range(3):
            first.check()
            await first.acquire()
            clock.now += 5
        with pytest.raises(QuotaReached) as full:
            first.check()
        await first.flush()
        # One record per send, however many windows count it.
        assert len(await ledger.recent_sends(START - 1)) == 3
    clock.now += 600  # a cron run ten minutes later
    async with Ledger.open(path) as ledger:
        second = quotas(clock, minute=0, hour=0, day=3)
        await second.share(ledger)
        with pytest.raises(QuotaReached) as again:
            second.check()
    assert again.value.setting == "smtp.rate_per_day"
    assert again.value.reopens_at == pytest.approx(START + 86400, abs=1e-6)
    assert full.value.reopens_at == pytest.approx(START + 86400, abs=1e-6)


def test_a_preset_fills_in_the_relays_limits_and_set_ones_win() -> None:
    exchange = SmtpSettings(preset="exchange-online")  # type: ignore[arg-type]
    assert (exchange.rate_per_minute, exchange.rate_per_day) == (30, 10_000)
    own = SmtpSettings(preset="exchange-online", rate_per_minute=20)  # type: ignore[arg-type]
    assert (own.rate_per_minute, own.rate_per_day) == (20, 10_000)
    assert SmtpSettings(preset="google-workspace").rate_per_day == 2_000  # type: ignore[arg-type]


def test_an_unknown_preset_is_a_clear_error(project: Path) -> None:
    settings = project / "config" / "settings.toml"
    text = settings.read_text(encoding="utf-8")
    settings.write_text(text.replace("[smtp]\n", '[smtp]\npreset = "exchange"\n', 1))
    result = invoke(["validate"])
    assert result.exit_code == 1
    assert "smtp.preset" in result.output and "exchange-online" in result.output


# --- as a user runs it ---------------------------------------------------------------


def a_day_later(project: Path) -> None:
    """Move the ledger's record of every send a day and a minute back."""
    move_sends_back(ledger_of(project), 86460)


def send_due(env: dict[str, str], now: str) -> dict[str, object]:
    result = invoke(["send-due", "--now", now, "--json"], env)
    assert result.exit_code == 0, result.output
    data: dict[str, object] = json.loads(result.stdout)
    return data


@pytest.mark.slow
def test_a_day_quota_spreads_the_invitation_over_three_days(
    project: Path, smtp_server: SmtpServer
) -> None:
    env = smtp_env(smtp_server.port, smtp__rate_per_day=5, notify__organiser_summary="false")
    sent = []
    for day in range(3):
        data = send_due(env, "2024-10-24T10:05")
        sent.append(data["sent"])
        if day < 2:
            quota = data["quota_reached"]
            assert isinstance(quota, dict) and quota["setting"] == "smtp.rate_per_day"
            # Straight away again: nothing more, and no claim left behind.
            assert send_due(env, "2024-10-24T10:06")["sent"] == 0
        a_day_later(project)
    assert sent == [5, 5, 2]
    recipients = [r.rcpt_tos for r in smtp_server.received]
    assert len(recipients) == len(set(recipients)) == 12
    status = json.loads(invoke(["status", "--json"], env).stdout)
    assert status["retrying"] == [] and status["uncertain"] == []


def test_when_the_quota_is_tight_the_reminder_goes_before_the_invitation_backlog(
    project: Path, smtp_server: SmtpServer
) -> None:
    env = smtp_env(smtp_server.port, smtp__rate_per_day=2, notify__organiser_summary="false")
    assert send_due(env, "2024-10-24T10:05")["sent"] == 2  # 10 invitations still to send
    a_day_later(project)
    before = len(smtp_server.received)
    data = send_due(env, "2024-11-13T14:05")  # the reminders for 14.11. are due
    assert data["sent"] == 2, (data, len(smtp_server.received) - before)
    kinds = [mail.kind for mail in mails(smtp_server.received[before:])]
    assert kinds == ["reminder", "reminder"]


# --- the forecast ----------------------------------------------------------------------

BERLIN = ZoneInfo("Europe/Berlin")
NOW = datetime(2024, 10, 24, 10, 5, tzinfo=BERLIN)


def mailing(kind: Kind, event: str, due: datetime, deadline: datetime, n: int) -> Mailing:
    keys = tuple(f"k{i}@example.org" for i in range(n))
    state = MailingState.OPEN if due <= NOW else MailingState.SCHEDULED
    return Mailing(kind, event, due, deadline, state, keys, keys)


DAY = timedelta(days=1)


@pytest.mark.parametrize(
    ("quota", "deadline", "last", "unreached"),
    [
        ([(5, 86400.0)], NOW + 21 * DAY, NOW + 2 * DAY, 0),  # 5 + 5 + 2 over three days
        ([(5, 86400.0)], NOW + DAY + timedelta(hours=1), NOW + DAY, 2),  # the window ends first
        ([(30, 60.0), (10_000, 86400.0)], NOW + DAY, NOW, 0),  # 12 of 30 a minute: at once
        ([(4, 60.0)], NOW + DAY, NOW + 2 * timedelta(minutes=1), 0),
    ],
)
def test_forecast_of_one_mailing(
    quota: list[tuple[int, float]], deadline: datetime, last: datetime, unreached: int
) -> None:
    invitation = mailing(Kind.INVITATION, "", NOW, deadline, 12)
    (finish,) = forecast([invitation], quota, [], NOW).values()
    assert (finish.last_send, finish.unreached) == (last, unreached)


def test_forecast_counts_earlier_sends_and_puts_the_reminder_first() -> None:
    invitation = mailing(Kind.INVITATION, "", NOW, NOW + 21 * DAY, 12)
    due = NOW + DAY + timedelta(hours=2)
    reminder = mailing(Kind.REMINDER, "verwaltung", due, due + DAY, 3)
    earlier = [NOW - timedelta(hours=1)] * 2  # two sends an hour ago
    finishes = forecast([invitation, reminder], [(5, 86400.0)], earlier, NOW)
    # 3 invitations now (2 places are taken); 2 more when those reopen (+23 h), 3 at
    # +1 day. The reminder, due at +1 day 2 h, takes the next 2 places (+2 days -1 h)
    # and 1 of the 3 at +2 days; the last 2 invitations go at +3 days -1 h.
    utc = NOW.astimezone(UTC)
    assert finishes[reminder.id].last_send == utc + 2 * DAY
    assert finishes[invitation.id].last_send == utc + 3 * DAY - timedelta(hours=1)
    assert forecast([invitation], [], [], NOW) == {}


def test_plan_shows_when_the_invitation_finishes_under_the_quota(
    project: Path, smtp_server: SmtpServer
) -> None:
    env = smtp_env(smtp_server.port, smtp__rate_per_day=5, notify__organiser_summary="false")
    assert send_due(env, "2024-10-24T10:05")["sent"] == 5
    result = invoke(["plan", "--now", "2024-10-24T10:05", "--json"], env)
    assert result.exit_code == 0, result.output
    (invitation,) = [m for m in json.loads(result.stdout)["mailings"] if m["kind"] == "invitation"]
    last = datetime.fromisoformat(invitation["forecast"]["last_send"])
    assert abs(last - (NOW + 2 * DAY)) < timedelta(minutes=1)
    assert invitation["forecast"]["unreached"] == 0
    table = invoke(["plan", "--now", "2024-10-24T10:05"], env)
    assert "last mail (quota)" in table.output and "26.10.2024" in table.output


def test_validate_warns_when_a_window_closes_before_the_quota_allows(project: Path) -> None:
    env = smtp_env(2525, smtp__rate_per_day=1)
    result = invoke(["validate"], env)
    assert result.exit_code == 0, result.output
    assert "the reminder mailing (reminder:verwaltung) reaches only 1 of" in result.output
    assert "1 per day" in result.output
