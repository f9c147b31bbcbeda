"""Several daemons on one PostgreSQL ledger: messages per second and duplicates.

Three setups, each ``invite-mailer run`` (the daemon, on the real clock)
sending the shipped series' invitation to N generated contacts, to one
Postfix ``smtp-sink`` on 127.0.0.1 that appends every message it receives to
one dump file (``smtp-sink -D``):

sqlite
    one daemon on the SQLite ledger, the shipped default.
postgres-1
    one daemon on a PostgreSQL ledger.
postgres-2
    two daemons on one PostgreSQL ledger, sharing the mailing through row
    locks and leases.

The shipped series is moved into the future with its invitation due an hour
ago (as ``tests/test_scale_out.py`` does); the shipped ``settings.toml``
stays unchanged except transport, host, port, TLS and
``notify.organiser_summary = false`` (through ``INVITE_MAILER_*``), and the
ledger's URL. Every run starts on an empty ledger (a fresh SQLite file, a
fresh PostgreSQL schema). In each of the rounds every setup runs once, the
order alternating from round to round, so that drift of a shared machine
hits all alike.

The rate is N divided by the time from starting the daemon(s) until the
ledger holds all N invitations as sent (polled every 0.1 s): start-up
included. Beside it, the rate from the first to the last message arrived at
the sink (its counter, ``smtp-sink -c``, polled every 0.02 s). Duplicates are
recipients that arrived more than once in the sink's dump (its
``X-Rcpt-Args`` records); without kills they must be 0, or the run stops.
Usage::

    .venv/bin/python bench/scale_out.py                   # N=5000, 3 rounds
    .venv/bin/python bench/scale_out.py --contacts 2000 --rounds 3
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import common
import psycopg

from support.cli import start_process, stop_processes
from support.contacts import write_generated
from support.postgres import SERVER, fresh_schema, query
from support.project import copy_project, series_due_now
from support.smtp import free_port

SETUPS = {"sqlite": ("sqlite", 1), "postgres-1": ("postgres", 1), "postgres-2": ("postgres", 2)}
LABELS = {
    "sqlite": "1 daemon, SQLite (default)",
    "postgres-1": "1 daemon, PostgreSQL",
    "postgres-2": "2 daemons, one PostgreSQL",
}
TITLE = "## Several daemons on PostgreSQL"
SENT = "SELECT count(*) FROM deliveries WHERE kind = 'invitation' AND state = 'sent'"
HOLDERS = "SELECT claimed_by, count(*) FROM deliveries GROUP BY claimed_by ORDER BY 2 DESC"
RCPT = re.compile(rb"^X-Rcpt-Args: <([^>]*)>", re.MULTILINE)
TIMEOUT_S = 600


@dataclass
class DumpSink:
    """``smtp-sink -c -D FILE``: counts every message and appends it to FILE."""

    sink: common.Sink
    dump: Path

    def received(self) -> int:
        return self.sink.received()

    def recipients(self) -> Counter[str]:
        """Recipient -> messages, over everything dumped since the last :meth:`clear`."""
        if not self.dump.exists():
            return Counter()
        return Counter(m.decode() for m in RCPT.findall(self.dump.read_bytes()))

    def clear(self) -> None:
        # smtp-sink opens the dump file anew for every transaction.
        self.dump.unlink(missing_ok=True)


@contextlib.contextmanager
def dump_sink(port: int, folder: Path) -> Iterator[DumpSink]:
    """smtp-sink on 127.0.0.1:*port* writing into *folder* (owned by nobody under root)."""
    common.require(common.SMTP_SINK)
    folder.mkdir(parents=True, exist_ok=True)
    args = [common.SMTP_SINK, "-c", "-D", str(folder / "dump")]
    if os.geteuid() == 0:
        args += ["-u", "nobody"]
        shutil.chown(folder, "nobody")
    args += [f"{common.LOOPBACK}:{port}", "256"]
    with tempfile.TemporaryFile() as counters:
        process = subprocess.Popen(args, stdout=counters, stderr=subprocess.PIPE)
        try:
            common.wait_for_port(port)
            yield DumpSink(common.Sink(process, counters.fileno()), folder / "dump")
        finally:
            process.terminate()
            process.wait(timeout=10)


def make_project(root: Path, contacts: int) -> Path:
    """The shipped config and templates, *contacts* generated, the invitation due."""
    project = copy_project(root)
    write_generated(project / "config" / "contacts.csv", contacts)
    series_due_now(project)
    return project


def environment(port: int, url: str | None) -> dict[str, str]:
    env = {
        "INVITE_MAILER_TRANSPORT__KIND": "smtp",
        "INVITE_MAILER_SMTP__HOST": common.LOOPBACK,
        "INVITE_MAILER_SMTP__PORT": str(port),
        "INVITE_MAILER_SMTP__SECURITY": "none",
        "INVITE_MAILER_NOTIFY__ORGANISER_SUMMARY": "false",
    }
    if url is not None:
        env["INVITE_MAILER_STATE__URL"] = url
    return env


@contextlib.contextmanager
def ledger(kind: str, project: Path) -> Iterator[tuple[str | None, Path | str]]:
    """An empty ledger: (the URL to set or None for the default, what to query)."""
    if kind == "sqlite":
        shutil.rmtree(project / "state", ignore_errors=True)
        yield None, project / "state" / "invite-mailer.db"
    else:
        with fresh_schema() as url:
            yield url, url


def sent(target: Path | str) -> int:
    if isinstance(target, Path) and not target.exists():
        return 0
    with contextlib.suppress(Exception):  # SQLite's tables may not exist yet
        return int(query(target, SENT)[0][0])
    return 0


def children_cpu() -> float:
    """User and system time of the reaped children so far: the daemons, not smtp-sink."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_setup(name: str, project: Path, sink: DumpSink, port: int, n: int) -> dict[str, Any]:
    """One setup on an empty ledger: rates, duplicates and who sent how much."""
    kind, daemons = SETUPS[name]
    sink.clear()
    before = sink.received()
    load = os.getloadavg()[0]
    cpu_before = children_cpu()
    with ledger(kind, project) as (url, target):
        env = environment(port, url)
        started = time.perf_counter()
        processes = [start_process(["run"], env, project) for _ in range(daemons)]
        first = last = None
        next_poll = 0.0
        try:
            while True:
                now = time.perf_counter()
                arrived = sink.received() - before
                if first is None and arrived > 0:
                    first = now
                if last is None and arrived >= n:
                    last = now
                if now >= next_poll:
                    if sent(target) >= n:
                        break
                    next_poll = now + 0.1
                if now - started > TIMEOUT_S or any(p.poll() is not None for p in processes):
                    raise SystemExit(f"{name}: {sent(target)} of {n} sent, {arrived} arrived")
                time.sleep(0.02)
            seconds = time.perf_counter() - started
        finally:
            stop_processes(*processes, grace=60)
        holders = [(h, int(c)) for h, c in query(target, HOLDERS)]
    # The ledger records a mail once the sink has answered; its count follows at once.
    deadline = time.perf_counter() + 10
    while sink.received() - before < n and time.perf_counter() < deadline:
        time.sleep(0.05)
    recipients = sink.recipients()
    dump_mb = sink.dump.stat().st_size / 2**20 if sink.dump.exists() else 0.0
    invitations = {r: c for r, c in recipients.items() if "@bench." in r}
    duplicates = sum(c - 1 for c in invitations.values() if c > 1)
    if len(invitations) != n:
        raise SystemExit(f"{name}: {len(invitations)} distinct recipients arrived, not {n}")
    if duplicates:
        raise SystemExit(f"{name}: {duplicates} duplicate invitations without any kill")
    sink.clear()
    arrival = (last or time.perf_counter()) - (first or started)
    return {
        "setup": name,
        "daemons": daemons,
        "seconds": round(seconds, 3),
        "rate": round(n / seconds, 1),
        "arrival_seconds": round(arrival, 3),
        "arrival_rate": round((n - 1) / arrival, 1) if arrival > 0 else None,
        "messages": sum(recipients.values()),
        "dump_mb": round(dump_mb, 1),
        "duplicates": duplicates,
        "sent_by": [count for holder, count in holders if holder] if kind == "postgres" else [],
        "daemon_cpu_ms_per_mail": round(1000 * (children_cpu() - cpu_before) / n, 3),
        "load_1min": [round(load, 2), round(os.getloadavg()[0], 2)],
    }


def spread(values: list[float]) -> dict[str, float]:
    return {"median": common.median(values), "min": min(values), "max": max(values)}


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    found = {}
    for name in SETUPS:
        mine = [r for r in rows if r["setup"] == name]
        found[name] = {
            "rate": spread([r["rate"] for r in mine]),
            "arrival_rate": spread([r["arrival_rate"] for r in mine if r["arrival_rate"]]),
            "duplicates": sum(r["duplicates"] for r in mine),
            "cpu_ms": common.median([r["daemon_cpu_ms_per_mail"] for r in mine]),
        }
    return found


def require_postgres() -> None:
    try:
        with psycopg.connect(SERVER, connect_timeout=3):
            return
    except psycopg.Error as exc:
        sys.exit(f"no PostgreSQL at {SERVER}: {exc} (set TEST_POSTGRESQL_URL)")


def measure(options: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="invite-mailer-scale-out-") as tmp:
        # smtp-sink runs as nobody under root and must reach its folder.
        Path(tmp).chmod(0o755)
        project = make_project(Path(tmp) / "project", options.contacts)
        with dump_sink(port, Path(tmp) / "sink") as sink:
            for round_ in range(options.rounds):
                order = list(SETUPS) if round_ % 2 == 0 else list(reversed(SETUPS))
                for name in order:
                    row = run_setup(name, project, sink, port, options.contacts)
                    rows.append({"round": round_ + 1} | row)
                    split = "/".join(f"{n:,}" for n in row["sent_by"])
                    print(
                        f"round {round_ + 1}  {name:<10} {row['seconds']:7.2f} s  "
                        f"{row['rate']:8.1f} msg/s (arrivals {row['arrival_rate']} msg/s)  "
                        f"duplicates {row['duplicates']}" + (f"  sent by {split}" if split else ""),
                        flush=True,
                    )
    return rows


def table(result: dict[str, Any]) -> str:
    lines = [
        "| setup | msg/s, start to all sent: median | min – max | "
        "msg/s, first to last arrival: median | min – max | every round | "
        "daemons' CPU ms per mail | duplicates |",
        "|---|---:|---:|---:|---:|---|---:|---:|",
    ]
    for name, figures in result["summary"].items():
        rate, arrival = figures["rate"], figures["arrival_rate"]
        rounds = ", ".join(f"{r['rate']:,.0f}" for r in result["rows"] if r["setup"] == name)
        lines.append(
            f"| {LABELS[name]} | {rate['median']:,.0f} | {rate['min']:,.0f} – {rate['max']:,.0f} "
            f"| {arrival['median']:,.0f} | {arrival['min']:,.0f} – {arrival['max']:,.0f} "
            f"| {rounds} | {figures['cpu_ms']:.2f} | {figures['duplicates']} |"
        )
    return "\n".join(lines)


def split_text(result: dict[str, Any]) -> str:
    rows = [r for r in result["rows"] if r["daemons"] == 2]
    return "; ".join(
        f"round {r['round']}: " + " / ".join(f"{n:,}" for n in r["sent_by"]) for r in rows
    )


def section(result: dict[str, Any]) -> str:
    """The section of docs/benchmarks.md, every figure from *result*."""
    m, n = result["machine"], result["contacts"]
    s = result["summary"]
    loads = [x for r in result["rows"] for x in r["load_1min"]]
    low, high, before = min(loads), max(loads), loads[0]
    dump_mb = common.median([r["dump_mb"] for r in result["rows"]])
    two = s["postgres-2"]["rate"]["median"] / s["postgres-1"]["rate"]["median"]
    vs_sqlite = s["postgres-1"]["rate"]["median"] / s["sqlite"]["rate"]["median"]
    return f"""\
{TITLE}

`bench/scale_out.py` runs `invite-mailer run` (the daemon) sending the shipped
series' invitation to {n:,} generated contacts, to one Postfix `smtp-sink` on
127.0.0.1, in three setups: one daemon on the SQLite ledger (the default), one
daemon on PostgreSQL, and two daemons sharing one PostgreSQL ledger (claims under
the row lock with a lease). The shipped settings, only transport, host, port,
TLS, `notify.organiser_summary = false` and the ledger's URL set through
`INVITE_MAILER_*`; every run on an empty ledger. Rounds: {result["rounds"]},
every setup once per round, the order alternating.

*Start to all sent* is {n:,} divided by the time from starting the daemon(s)
until the ledger holds all {n:,} invitations as sent (start-up included);
*first to last arrival* is the time between the first and the last message
counted by the sink. *Duplicates* are recipients the sink received more than
once (from its `-D` dump), summed over the rounds: without kills they must be 0.
*Daemons' CPU* is the user and system time of the daemon processes together
(start-up included), the median over the rounds.

{table(result)}

Two daemons ÷ one on PostgreSQL (medians): {two:.2f} ×. One daemon on
PostgreSQL ÷ SQLite: {vs_sqlite:.2f} ×. How the two daemons split the mailing
({n:,} each round): {split_text(result)}.

What limits two daemons here: this machine has {m["cores"]} cores, and both
daemons, PostgreSQL and `smtp-sink` compete for them; a second daemon on the
same cores shares the work, it cannot add CPU. Their CPU per mail together
rises from {s["postgres-1"]["cpu_ms"]:.2f} ms (one daemon) to
{s["postgres-2"]["cpu_ms"]:.2f} ms (two): each has its own start-up, claims and
heartbeats, and each waits for cores the other is using. Scaling out pays with
separate machines or more cores, and for availability: a daemon that dies
hands its leases to the other (`tests/test_scale_out.py`).

The sink writes every message to its dump (about {dump_mb:,.0f} MB per run) on
the same cores, so every rate here is lower than without it and not comparable
with the throughput section above; the setups are comparable with each other.
The 1-minute load ranged {low:.1f} – {high:.1f} over the runs ({before:.1f} before
the first): above the core count, other work on the machine competed too,
hence the spread.

Measured {m["date"]} at commit `{m["commit"]}` on {m["cpu"]}, {m["cores"]} cores,
{m["memory"]}, {m["os"]}, Python {m["python"]}, Postfix {m["postfix"]},
PostgreSQL {result["postgresql"]}. Command: `.venv/bin/python {result["command"]}`.
"""


def write_section(text: str) -> Path:
    """Write or replace the section in docs/benchmarks.md (up to the next ``## ``)."""
    path = common.DOCS / "benchmarks.md"
    old = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"^{re.escape(TITLE)}\n.*?(?=^## |\Z)", re.MULTILINE | re.DOTALL)
    if pattern.search(old):
        new = pattern.sub(lambda _: text + "\n", old, count=1).rstrip("\n") + "\n"
    else:
        new = old.rstrip("\n") + "\n\n" + text
    path.write_text(new, encoding="utf-8")
    return path


def postgres_version() -> str:
    with psycopg.connect(SERVER) as connection:
        row = connection.execute("SHOW server_version").fetchone()
    return str(row[0]).split()[0] if row else "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contacts", type=int, default=5_000)
    parser.add_argument("--rounds", type=int, default=3)
    options = parser.parse_args()
    require_postgres()
    rows = measure(options)
    result = {
        "machine": common.machine(),
        "postgresql": postgres_version(),
        "command": common.public_command("bench/scale_out.py", sys.argv[1:]),
        "contacts": options.contacts,
        "rounds": options.rounds,
        "rows": rows,
        "summary": summary(rows),
    }
    print(table(result))
    print(f"written to {common.save('scale_out', result)}")
    print(f"section written to {write_section(section(result))}")


if __name__ == "__main__":
    main()
