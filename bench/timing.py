"""On the real clock: how late the daemon fires its mailings, how exactly it holds the rate limit.

Both parts send over SMTP to an aiosmtpd server in a thread of this process
on 127.0.0.1, which notes for every message when its MAIL command came and
when its data was complete ("arrival", what a relay counts), and which mail
it was (the ``X-Invite-Mailer-Kind`` and ``-Event`` headers).

lateness
    A workspace whose series.yaml places ``--mailings`` mailings (default 96:
    half reminders, half follow-ups) a short time ahead of the real clock, as
    tests/test_daemon.py does with a few. Reminders are due ``1 day`` before a
    date starts, so a date starting tomorrow at 14:05 has its reminder due
    today at 14:05; follow-ups are due ``1 day`` after a date ends (``at:
    null``, materials listed), so a date that ended yesterday at 14:06 has its
    follow-up due today at 14:06. Dates and durations in series.yaml have
    minute resolution (``"HH:MM"``, ``N minutes``), so the due times fall on
    ``--spread`` consecutive whole minutes (default 3), the first at least
    ``--lead`` seconds away. Each mailing goes to ``--registered`` contacts
    (of ``--contacts`` generated ones). ``invite-mailer --log-format json
    run`` runs as a subprocess until the last mailing is in, then gets
    SIGTERM.

    The due time of each mailing is taken from ``invite-mailer plan --json``
    before the daemon starts. Its lateness is the moment the *first message of
    the mailing arrived at the server* minus its due time (wall clock of the
    same machine). Reported beside it: the ``time`` of the daemon's JSON log
    line "mailing ...: sending to N recipient(s)", written when the pass has
    planned and before anything is composed, for all mailings of the pass at
    once: the wake-up of the scheduler and the planning. The mailings due at
    the same minute go out in one pass, one after another, so the first
    message of the k-th of them waits for the messages of those before it
    (composed one at a time in the daemon's event loop); ``per_minute`` gives
    the time this adds per mailing. Target: p99 <= 1 s for the first arrival.

rate
    ``invite-mailer send-due`` of the shipped invitation to ``rate ×
    --minutes`` generated contacts plus a tenth of a minute's worth more, with
    ``smtp.rate_per_minute = --rate`` (default 600) and four connections, so
    the limiter, not the sender, sets the pace for ``--minutes`` (default 5)
    real minutes. The limiter (src/invite_mailer/delivery/ratelimit.py) lets a send
    start only while fewer than N sends are in flight or ended less than 60 s
    ago, a send ending when the relay has answered it: the first N go out as
    fast as the sender can, each later one 60 s after the relay answered the
    one N before it, so the first burst repeats every minute. The first 60 s
    from the first arrival must hold exactly N messages, every later minute N
    more, and the extra tenth falls just after the measured span.

    A relay counts a message somewhere between the sender's MAIL and its own
    answer to the data, so the arrivals at the server are what is
    measured here: the achieved rate is the number of arrivals in the
    ``--minutes`` × 60 s from the first one, per minute (target within 2 % of
    the limit), and the most arrivals in any sliding 60-second window,
    computed exactly from the timestamps (half-open windows ``[t, t + 60 s)``,
    the limiter's own rule; a window's maximum always has a message at its
    left edge, so checking the window at every arrival is exact). Target: it
    never exceeds the limit. The same figures are given for the MAIL times.
    The smallest distance between a message and the one N before it is
    reported too: the window never holds N + 1 exactly when that distance is
    at least 60 s.

Both parts run on the real clock: run them on an otherwise idle machine (the
load average before and after each part is recorded beside its figures; on a
small machine another busy process shows up as stalls of the daemon).
Results go to bench/results/timing.json and docs/timing.png. Usage::

    .venv/bin/python bench/timing.py                        # 96 mailings, then 600/min for 5 min
    .venv/bin/python bench/timing.py --minutes 1            # quicker
    .venv/bin/python bench/timing.py --parts rate --rate 1200
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import common

from support.contacts import contact_rows
from support.smtp import free_port

BERLIN = ZoneInfo("Europe/Berlin")
WINDOW = 60.0
LATENESS_TARGET = 1.0  # seconds, p99
RATE_TOLERANCE = 0.02


# --- the SMTP server ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Arrival:
    """One accepted message."""

    mail_at: float  # time.monotonic() when MAIL came
    at: float  # time.monotonic() when the data was complete
    wall: float  # time.time() when the data was complete
    kind: str
    event: str
    to: str


_MARK = re.compile(rb"^X-Invite-Mailer-(Kind|Event):[ \t]*(\S+)", re.MULTILINE | re.IGNORECASE)


@dataclass
class Recorder:
    """aiosmtpd handler: accepts everything, keeps an :class:`Arrival` per message."""

    arrivals: list[Arrival] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        envelope.mail_at = time.monotonic()
        return "250 2.1.0 Ok"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        at, wall = time.monotonic(), time.time()
        head = envelope.original_content.split(b"\r\n\r\n", 1)[0]
        marks = {m.group(1).lower(): m.group(2).decode() for m in _MARK.finditer(head)}
        arrival = Arrival(
            envelope.mail_at,
            at,
            wall,
            marks.get(b"kind", ""),
            marks.get(b"event", ""),
            envelope.rcpt_tos[0].lower(),
        )
        with self.lock:
            self.arrivals.append(arrival)
        return "250 2.0.0 Ok: queued"

    def snapshot(self) -> list[Arrival]:
        with self.lock:
            return list(self.arrivals)


@contextlib.contextmanager
def recording_server(port: int) -> Iterator[Recorder]:
    """An aiosmtpd server on 127.0.0.1:*port*, in a thread of this process."""
    try:
        from aiosmtpd.controller import Controller
    except ImportError:
        sys.exit("aiosmtpd missing: pip install -e '.[test]' (the tests' SMTP server)")

    recorder = Recorder()
    controller = Controller(
        recorder, hostname=common.LOOPBACK, port=port, server_hostname="sink.bench.invalid"
    )
    controller.start()
    try:
        yield recorder
    finally:
        controller.stop()


# --- statistics ---------------------------------------------------------------------


def percentile(values: Sequence[float], p: float) -> float:
    """The p-th percentile, linear between the closest ranks (numpy's default)."""
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    rank = (len(ordered) - 1) * p / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def spread(values: Sequence[float]) -> dict[str, float]:
    return {
        "p50": round(percentile(values, 50), 4),
        "p99": round(percentile(values, 99), 4),
        "max": round(max(values), 4),
        "min": round(min(values), 4),
        "mean": round(statistics.fmean(values), 4),
    }


def sliding_max(times: Sequence[float], window: float = WINDOW) -> tuple[int, float]:
    """Most timestamps in any half-open window ``[t, t + window)``, and one such ``t``.

    A window with the most timestamps can be slid right until its left edge
    meets one, so it is enough to look at the window starting at each of them.
    """
    ordered = sorted(times)
    best, where, end = 0, ordered[0] if ordered else 0.0, 0
    for start, t in enumerate(ordered):
        while end < len(ordered) and ordered[end] < t + window:
            end += 1
        if end - start > best:
            best, where = end - start, t
    return best, where


def trailing_counts(times: Sequence[float], window: float = WINDOW) -> list[int]:
    """For each timestamp t (sorted): how many fall in ``(t - window, t]``."""
    ordered = sorted(times)
    return [i + 1 - bisect.bisect_right(ordered, t - window) for i, t in enumerate(ordered)]


def window_steps(times: Sequence[float], window: float = WINDOW) -> tuple[list[float], list[int]]:
    """How many timestamps lie in ``(t - window, t]``, as a step function of t.

    Each timestamp a counts for t in ``[a, a + window)``: +1 at a, -1 at
    a + window (the -1 first when both fall on the same moment). Returned as
    the moments of change and the count from each of them on, up to the last
    timestamp.
    """
    ordered = sorted(times)
    if not ordered:
        return [], []
    changes = sorted([(t + window, -1) for t in ordered] + [(t, 1) for t in ordered])
    moments, counts, count = [], [], 0
    for moment, step in changes:
        if moment > ordered[-1]:
            break
        count += step
        moments.append(moment)
        counts.append(count)
    return moments, counts


def gaps(times: Sequence[float], n: int) -> list[float]:
    """``t[k] - t[k - n]`` for every k: where one is below the window, a window holds n + 1."""
    ordered = sorted(times)
    return [ordered[k] - ordered[k - n] for k in range(n, len(ordered))]


# --- part 1: lateness ---------------------------------------------------------------

SERIES_HEAD = """\
id: timing-probe
title: Zeitmessung
organiser:
  name: "KomKomIn – Wissenschaftliches Begleitvorhaben"
  email: transferreihe@example.org
timezone: Europe/Berlin
registration_url: https://example.org/probe/anmeldung
imprint: |
  KomKomIn – Wissenschaftliches Begleitvorhaben
  Musterstraße 1, 10115 Berlin
events:
"""
EVENT = """\
  - id: {id}
    title: "{title}"
    date: {date}
    start: "{start}"
    end: "{end}"
    join_url: https://example.org/probe/{id}
    materials: {materials}
"""
MATERIALS = "[{title: Folien, url: https://example.org/probe/folien.pdf}]"
SERIES_TAIL = """\
mailings:
  reminder:   {before: 1 day, audience: registered}
  followup:   {after: 1 day, at: null, audience: registered, wait_for_materials: 14 days}
"""


def boundaries(count: int, lead: float) -> list[datetime]:
    """*count* consecutive whole minutes (Berlin), the first at least *lead* seconds away.

    Dates need a start before their end on the same day, so no minute may be
    00:00 or 23:59: near midnight this waits until the minutes are clear of it.
    """
    while True:
        now = datetime.now(BERLIN)
        first = (now + timedelta(seconds=lead)).replace(second=0, microsecond=0)
        first += timedelta(minutes=1)
        minutes = [first + timedelta(minutes=k) for k in range(count)]
        if all(m.hour * 60 + m.minute not in (0, 23 * 60 + 59) for m in minutes):
            return minutes
        print("the minutes touch midnight; waiting for them to pass", flush=True)
        time.sleep(60)


def hhmm(minute: int) -> str:
    return f"{minute // 60:02d}:{minute % 60:02d}"


def lateness_series(minutes: Sequence[datetime], mailings: int) -> tuple[str, dict[str, datetime]]:
    """series.yaml with *mailings* mailings due at *minutes*, and the due time of each id."""
    text = [SERIES_HEAD]
    expected: dict[str, datetime] = {}
    for n in range(mailings):
        due = minutes[n % len(minutes)]
        at = due.hour * 60 + due.minute
        if n % 2 == 0:
            # Tomorrow's date: its reminder is due one day before it starts.
            event_id = f"morgen-{n:03d}"
            day, start, end = due.date() + timedelta(days=1), at, min(at + 60, 23 * 60 + 59)
            materials = "[]"
            expected[f"reminder:{event_id}"] = due
        else:
            # Yesterday's date: its follow-up is due one day after it ended.
            event_id = f"gestern-{n:03d}"
            day, start, end = due.date() - timedelta(days=1), max(at - 60, 0), at
            materials = MATERIALS
            expected[f"followup:{event_id}"] = due
        text.append(
            EVENT.format(
                id=event_id,
                title=f"Termin {n + 1} – Zeitmessung",
                date=day.isoformat(),
                start=hhmm(start),
                end=hhmm(end),
                materials=materials,
            )
        )
    text.append(SERIES_TAIL)
    return "".join(text), expected


def write_contacts(path: Path, count: int, registered: int) -> None:
    """*count* generated contacts; the first *registered* registered for every date."""
    with path.open("w", encoding="utf-8") as file:
        file.write("email;anrede;titel;vorname;nachname;organisation;anmeldungen\n")
        for n, row in enumerate(contact_rows(count)):
            # The generated registrations name the shipped dates: replace them.
            file.write(row.rsplit(";", 1)[0] + (';"alle"\n' if n < registered else ';""\n'))


def log_time(line: dict[str, Any]) -> float:
    return datetime.fromisoformat(str(line["time"])).timestamp()


def run_lateness(options: argparse.Namespace, root: Path) -> dict[str, Any]:
    port = free_port()
    workspace = common.make_workspace(
        root / "lateness", options.contacts, port=port, connections=options.connections
    )
    write_contacts(workspace.config / "contacts.csv", options.contacts, options.registered)
    minutes = boundaries(options.spread, options.lead)
    text, expected = lateness_series(minutes, options.mailings)
    (workspace.config / "series.yaml").write_text(text, encoding="utf-8")
    env = workspace.env()

    planned = subprocess.run(
        workspace.invoke("plan", "--json"),
        env=env,
        cwd=workspace.root,
        capture_output=True,
        text=True,
        check=False,
    )
    if planned.returncode != 0:
        raise SystemExit(f"plan failed ({planned.returncode}):\n{planned.stderr[-3000:]}")
    due: dict[str, float] = {}
    for mailing in json.loads(planned.stdout)["mailings"]:
        if mailing["id"] in expected:
            if mailing["state"] != "scheduled":
                raise SystemExit(f"{mailing['id']} is {mailing['state']}, not scheduled")
            due[mailing["id"]] = datetime.fromisoformat(mailing["due"]).timestamp()
    wrong = {k for k, v in expected.items() if due.get(k) != v.timestamp()}
    if wrong:
        raise SystemExit(f"plan disagrees with the generated due times: {sorted(wrong)[:5]}")

    args = workspace.invoke("run")
    args[1:1] = ["--log-format", "json"]
    log_path = root / "daemon.log"
    wanted = len(due) * options.registered
    print(
        f"lateness: {len(due)} mailings due at {', '.join(f'{m:%H:%M}' for m in minutes)} "
        f"(Europe/Berlin), {options.registered} recipient(s) each; daemon starting",
        flush=True,
    )
    with recording_server(port) as server, log_path.open("wb") as log:
        started = time.time()
        daemon = subprocess.Popen(
            args, env=env, cwd=workspace.root, stdout=subprocess.DEVNULL, stderr=log
        )
        try:
            give_up = max(due.values()) + options.settle
            while len(server.snapshot()) < wanted and time.time() < give_up:
                if daemon.poll() is not None:
                    raise SystemExit(
                        f"the daemon exited ({daemon.returncode}):\n{log_path.read_text()[-3000:]}"
                    )
                time.sleep(0.2)
            time.sleep(1)  # anything arriving twice would show now
            stop_at = time.monotonic()
            daemon.send_signal(signal.SIGTERM)
            code = daemon.wait(timeout=60)
            stop_seconds = time.monotonic() - stop_at
        finally:
            if daemon.poll() is None:
                daemon.kill()
                daemon.wait()
        arrivals = server.snapshot()

    lines = []
    for raw in log_path.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            lines.append(json.loads(raw))
    fired: dict[str, float] = {}
    scheduled_at = []
    complaints = [
        str(line.get("message", ""))[:200]
        for line in lines
        if line.get("level") in ("warning", "error", "critical")
    ]
    for line in lines:
        message = str(line.get("message", ""))
        if "sending to" in message and line.get("mailing") in due:
            fired.setdefault(str(line["mailing"]), log_time(line))
        if message.startswith("scheduled "):
            scheduled_at.append(log_time(line))
    first: dict[str, float] = {}
    received: dict[str, int] = {}
    keys = []
    for arrival in sorted(arrivals, key=lambda a: a.wall):
        mailing_id = f"{arrival.kind}:{arrival.event or 'series'}"
        first.setdefault(mailing_id, arrival.wall)
        received[mailing_id] = received.get(mailing_id, 0) + 1
        keys.append((mailing_id, arrival.to))
    missing = sorted(set(due) - set(first))
    lateness = {k: first[k] - due[k] for k in due if k in first}
    fire = {k: fired[k] - due[k] for k in due if k in fired}
    ready = [t for t in scheduled_at if t < min(due.values())]
    per_minute = []
    for minute in minutes:
        ids = [k for k, v in expected.items() if v == minute and k in lateness]
        per_minute.append(
            {
                "due": minute.isoformat(),
                "mailings": len(ids),
                "first_arrival_min_s": round(min(lateness[k] for k in ids), 4) if ids else None,
                "first_arrival_max_s": round(max(lateness[k] for k in ids), 4) if ids else None,
                # Mailings due together share a pass and go out one after another.
                "added_per_mailing_ms": round(
                    (max(lateness[k] for k in ids) - min(lateness[k] for k in ids))
                    / (len(ids) - 1)
                    * 1000,
                    1,
                )
                if len(ids) > 1
                else None,
                "started_max_s": round(max(fire[k] for k in ids if k in fire), 4)
                if any(k in fire for k in ids)
                else None,
            }
        )
    result: dict[str, Any] = {
        "mailings": len(due),
        "due_minutes": [m.isoformat() for m in minutes],
        "recipients_per_mailing": options.registered,
        "contacts": options.contacts,
        "connections": options.connections,
        "daemon_ready_s_before_first_due": round(min(due.values()) - max(ready), 1)
        if ready
        else None,
        "daemon_startup_s": round(min(scheduled_at) - started, 2) if scheduled_at else None,
        "messages_expected": wanted,
        "messages_received": len(arrivals),
        "duplicates": len(keys) - len(set(keys)),
        "missing_mailings": missing,
        "short_mailings": sorted(k for k, n in received.items() if n < options.registered),
        "lateness_first_arrival_s": spread(list(lateness.values())) if lateness else None,
        "lateness_started_s": spread(list(fire.values())) if fire else None,
        "per_minute": per_minute,
        "daemon_warnings": complaints[:20],
        "sigterm_exit_code": code,
        "sigterm_stop_s": round(stop_seconds, 2),
        "samples": {
            k: [
                round(lateness[k], 4) if k in lateness else None,
                round(fire[k], 4) if k in fire else None,
            ]
            for k in due
        },
    }
    result["target_met"] = (
        bool(ready)
        and not missing
        and len(lateness) == len(due)
        and percentile(list(lateness.values()), 99) <= LATENESS_TARGET
    )
    return result


# --- part 2: rate -------------------------------------------------------------------


def window_figures(times: Sequence[float], rate: int, minutes: int) -> dict[str, Any]:
    """Achieved rate over the measured span, per minute, and the sliding-window maximum."""
    ordered = sorted(times)
    t0 = ordered[0]
    in_span = bisect.bisect_left(ordered, t0 + minutes * WINDOW)
    per_minute = [
        bisect.bisect_left(ordered, t0 + (k + 1) * WINDOW)
        - bisect.bisect_left(ordered, t0 + k * WINDOW)
        for k in range(minutes)
    ]
    most, where = sliding_max(ordered)
    close = gaps(ordered, rate)
    return {
        "in_span": in_span,
        "achieved_per_minute": round(in_span / minutes, 2),
        "achieved_of_limit": round(in_span / minutes / rate, 5),
        "per_minute": per_minute,
        "first_window": per_minute[0],
        "sliding_max": most,
        "sliding_max_at_s": round(where - t0, 3),
        "windows_over_limit": sum(1 for c in trailing_counts(ordered) if c > rate),
        # t[k] - t[k - rate]: a window holds rate + 1 exactly where this is below 60 s.
        "min_gap_to_nth_before_s": round(min(close), 6) if close else None,
        "gaps_below_window": sum(1 for gap in close if gap < WINDOW),
        # Which messages: [index of the earlier one, seconds short of the window].
        "gaps_below_window_first": [
            [k, round(WINDOW - gap, 6)] for k, gap in enumerate(close) if gap < WINDOW
        ][:12],
    }


def lag_by_minute(arrivals: Sequence[Arrival], minutes: int) -> list[dict[str, float]]:
    """MAIL-to-arrival time of the messages of each minute of the run."""
    t0 = min(a.at for a in arrivals)
    rows = []
    for k in range(minutes + 1):
        lags = [a.at - a.mail_at for a in arrivals if k * WINDOW <= a.at - t0 < (k + 1) * WINDOW]
        if lags:
            rows.append({"minute": k + 1, "messages": len(lags), **spread(lags)})
    return rows


def run_rate(
    options: argparse.Namespace, root: Path
) -> tuple[dict[str, Any], dict[str, list[float]]]:
    """send-due under the limit: the figures, and the arrival and MAIL times for the plot
    (seconds from the first arrival)."""
    rate, minutes = options.rate, options.minutes
    contacts = rate * minutes + max(1, rate // 10)
    port = free_port()
    workspace = common.make_workspace(
        root / "rate", contacts, port=port, connections=options.connections
    )
    env = workspace.env(rate_per_minute=rate)
    args = workspace.invoke("send-due", "--now", common.INVITATION_NOW, "--json")
    print(
        f"rate: {contacts:,} invitations at {rate}/min over {options.connections} connections "
        f"(about {minutes} min)",
        flush=True,
    )
    with recording_server(port) as server:
        started = time.monotonic()
        done = subprocess.run(
            args, env=env, cwd=workspace.root, capture_output=True, text=True, check=False
        )
        seconds = time.monotonic() - started
        arrivals = server.snapshot()
    if done.returncode != 0:
        raise SystemExit(f"send-due failed ({done.returncode}):\n{done.stderr[-3000:]}")
    arrivals.sort(key=lambda a: a.at)
    at = [a.at for a in arrivals]
    mail = [a.mail_at for a in arrivals]
    lags = [a.at - a.mail_at for a in arrivals]
    result: dict[str, Any] = {
        "rate_per_minute": rate,
        "minutes": minutes,
        "contacts": contacts,
        "connections": options.connections,
        "send_due_s": round(seconds, 2),
        "messages_received": len(arrivals),
        "duplicates": len(arrivals) - len({a.to for a in arrivals}),
        "arrivals": window_figures(at, rate, minutes),
        "mail_commands": window_figures(mail, rate, minutes),
        "mail_to_arrival_s": spread(lags),
        "mail_to_arrival_by_minute_s": lag_by_minute(arrivals, minutes),
        "first_burst_s": round(at[min(rate, len(at)) - 1] - at[0], 3),
    }
    figures = result["arrivals"]
    # The headline figures are the arrivals' (what a relay counts).
    for key in ("achieved_per_minute", "achieved_of_limit", "sliding_max", "first_window"):
        result[key] = figures[key]
    result["target_met"] = {
        "achieved within 2%": abs(figures["achieved_of_limit"] - 1) <= RATE_TOLERANCE,
        "sliding 60 s max <= limit": figures["sliding_max"] <= rate,
        "first 60 s window == limit": figures["first_window"] == rate,
    }
    return result, {"arrivals": [t - at[0] for t in at], "mail": [t - at[0] for t in mail]}


# --- output -------------------------------------------------------------------------


def plot(
    lateness: dict[str, Any] | None,
    rate: dict[str, Any] | None,
    series: dict[str, list[float]],
) -> Path | None:
    """docs/timing.png: lateness CDF; arrivals per sliding 60 s, whole run and worst moment."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        print("matplotlib not installed (pip install -e '.[bench]'): no plot")
        return None
    figure, (left, middle, right) = plt.subplots(
        1, 3, figsize=(16, 4.8), gridspec_kw={"width_ratios": [1, 1.3, 1]}
    )
    if lateness is not None:
        samples = lateness["samples"].values()
        for index, label in ((0, "first message arrived"), (1, "daemon started it (log)")):
            values = sorted(s[index] * 1000 for s in samples if s[index] is not None)
            if values:
                fractions = [(i + 1) / len(values) for i in range(len(values))]
                left.step(values, fractions, where="post", label=label)
        left.axvline(LATENESS_TARGET * 1000, color="grey", linestyle="--", label="target p99 1 s")
        left.axhline(0.99, color="grey", linestyle=":", linewidth=0.8)
        left.set(
            xscale="log",
            xlabel="after the due time, ms",
            ylabel="fraction of mailings",
            title=f"Daemon lateness, {lateness['mailings']} mailings",
        )
        left.grid(True, which="both", alpha=0.3)
        left.legend(loc="upper left", fontsize=8)
    for axes, part in ((left, lateness), (middle, rate), (right, rate)):
        if part is None:
            axes.set_axis_off()
            axes.text(0.5, 0.5, "not measured in this run", ha="center", transform=axes.transAxes)
    if rate is not None:
        limit = rate["rate_per_minute"]
        most = rate["arrivals"]["sliding_max"]
        arrivals = window_steps(series["arrivals"])
        middle.plot(*arrivals, drawstyle="steps-post", linewidth=0.9, label="arrivals")
        middle.axhline(limit, color="red", linestyle="--", linewidth=0.9, label=f"limit {limit}")
        middle.set(
            xlabel="seconds since the first arrival",
            ylabel="messages in the 60 s up to t",
            title=f"Rate limit {limit}/min for {rate['minutes']} min: at most {most} in 60 s",
            ylim=(limit * 0.98, max(limit, most) + max(2, limit * 0.005)),
        )
        middle.text(
            0.01,
            0.02,
            "the first minute's ramp from 0 lies below the view",
            transform=middle.transAxes,
            fontsize=8,
            color="grey",
        )
        # The worst window ends where a burst a minute later is under way: zoom in there.
        end = rate["arrivals"]["sliding_max_at_s"] + WINDOW
        mail = window_steps(series["mail"])
        right.plot(*arrivals, drawstyle="steps-post", linewidth=0.9, label="arrivals")
        right.plot(*mail, drawstyle="steps-post", linewidth=0.9, label="MAIL commands", alpha=0.7)
        right.axhline(limit, color="red", linestyle="--", linewidth=0.9)
        right.set(
            xlim=(end - 0.3, min(end + rate["first_burst_s"], arrivals[0][-1]) + 0.1),
            ylim=(limit - 8, max(limit, most) + 2),
            xlabel="seconds since the first arrival",
            title=f"Around the worst window's end ({end:.1f} s)",
        )
        for axes in (middle, right):
            axes.yaxis.set_major_locator(MaxNLocator(integer=True))
            axes.grid(True, alpha=0.3)
            axes.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    path = common.DOCS / "timing.png"
    figure.savefig(path, dpi=110)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--parts", nargs="+", default=["lateness", "rate"], choices=["lateness", "rate"]
    )
    parser.add_argument("--mailings", type=int, default=96, help="scheduled mailings")
    parser.add_argument("--spread", type=int, default=3, help="minutes they are due at")
    parser.add_argument("--lead", type=float, default=30, help="seconds before the first is due")
    parser.add_argument("--settle", type=float, default=30, help="seconds to wait for stragglers")
    parser.add_argument("--contacts", type=int, default=500, help="contacts (lateness)")
    parser.add_argument("--registered", type=int, default=2, help="recipients per mailing")
    parser.add_argument("--rate", type=int, default=600, help="rate_per_minute")
    parser.add_argument("--minutes", type=int, default=5, help="minutes the limiter is busy")
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument(
        "--keep", type=Path, help="keep the workspaces and the daemon's log in this folder"
    )
    options = parser.parse_args()
    lateness = rate = None
    rate_series: dict[str, list[float]] = {}
    with contextlib.ExitStack() as stack:
        if options.keep is not None:
            options.keep.mkdir(parents=True, exist_ok=True)
            tmp = str(options.keep.resolve())
        else:
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="invite-mailer-timing-"))
        if "lateness" in options.parts:
            load = os.getloadavg()[0]
            lateness = run_lateness(options, Path(tmp))
            lateness["load_average_1min"] = [round(load, 2), round(os.getloadavg()[0], 2)]
            print(summary_lateness(lateness), flush=True)
        if "rate" in options.parts:
            load = os.getloadavg()[0]
            rate, rate_series = run_rate(options, Path(tmp))
            rate["load_average_1min"] = [round(load, 2), round(os.getloadavg()[0], 2)]
            print(summary_rate(rate), flush=True)
    result: dict[str, Any] = {
        "machine": common.machine(),
        "command": " ".join(["bench/timing.py", *sys.argv[1:]]),
        "daemon": lateness,
        "rate": rate,
        "targets": {},
    }
    if lateness is not None:
        result["targets"]["lateness p99 <= 1 s"] = lateness["target_met"]
    if rate is not None:
        for name, met in rate["target_met"].items():
            result["targets"][f"rate: {name}"] = met
    path = common.save("timing", result)
    print(json.dumps(result["targets"], indent=2))
    print(f"written to {path}")
    picture = plot(lateness, rate, rate_series)
    if picture is not None:
        print(f"plot: {picture}")


def summary_lateness(r: dict[str, Any]) -> str:
    first, started = r["lateness_first_arrival_s"], r["lateness_started_s"]
    text = (
        f"lateness over {r['mailings']} mailings: first arrival p50 {first['p50'] * 1000:.0f} ms, "
        f"p99 {first['p99'] * 1000:.0f} ms, max {first['max'] * 1000:.0f} ms; "
        f"started (log) p50 {started['p50'] * 1000:.0f} ms, p99 {started['p99'] * 1000:.0f} ms; "
        f"{r['messages_received']}/{r['messages_expected']} messages, {r['duplicates']} twice; "
        f"SIGTERM: exit {r['sigterm_exit_code']} in {r['sigterm_stop_s']} s"
    )
    if r["missing_mailings"]:
        text += f"; MISSING {r['missing_mailings'][:5]}"
    return text


def summary_rate(r: dict[str, Any]) -> str:
    a, m, n = r["arrivals"], r["mail_commands"], r["rate_per_minute"]
    return (
        f"rate {r['rate_per_minute']}/min: {a['in_span']} arrivals in the first "
        f"{r['minutes']} min = {a['achieved_per_minute']}/min ({a['achieved_of_limit']:.2%}); "
        f"per minute {a['per_minute']}; sliding 60 s max {a['sliding_max']} "
        f"(MAIL commands: {m['sliding_max']}); smallest gap to the {n}th before "
        f"{a['min_gap_to_nth_before_s']} s; {r['messages_received']} messages "
        f"in {r['send_due_s']} s"
    )


if __name__ == "__main__":
    main()
