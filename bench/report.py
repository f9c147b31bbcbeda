"""Writes docs/benchmarks.md from the figures under bench/results/.

Every number in the document comes from a results file written by one of the
benchmark scripts, together with the machine, the date and the exact command
of that run, so the document cannot drift from what was measured. Usage::

    .venv/bin/python bench/report.py
"""

from __future__ import annotations

import json
from typing import Any

import common

OUT = common.DOCS / "benchmarks.md"

INTRO = """\
# Benchmarks

invite-mailer should never be what a mailing waits for, and it must keep its
promises about time and rate while nobody watches. The figures below are
measured against software nobody here wrote — Postfix's `smtp-sink` and
`smtp-source` — and each comes with the machine, the date and the command that
produced it. Run the scripts again to reproduce them; then run
`bench/report.py` to rewrite this page from `bench/results/*.json`.

Setup, once (Debian/Ubuntu; Postfix's test tools come with the `postfix`
package):

```sh
sudo apt-get install postfix          # smtp-sink, smtp-source
python3 -m venv .venv && .venv/bin/pip install -q -e '.[test,bench]'
```

Figures are ratios against a baseline measured in the same run wherever a
target is a ratio, because absolute speeds differ from machine to machine.
"""


def load(name: str) -> dict[str, Any] | None:
    path = common.RESULTS / f"{name}.json"
    if not path.exists():
        return None
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data


def mark(ok: object) -> str:
    return "**met**" if ok else "**not met**"


def provenance(result: dict[str, Any]) -> str:
    m = result["machine"]
    return (
        f"Measured {m['date']}"
        + (f" at commit `{m['commit']}`" if m.get("commit") else "")
        + f" on {m['cpu']}, {m['cores']} cores, {m['memory']}, "
        f"{m['os']}, Python {m['python']}"
        + (f", Postfix {m['postfix']}" if m.get("postfix") else "")
        + f". Command: `.venv/bin/python {result['command']}`"
    )


def throughput(result: dict[str, Any]) -> str:
    med, rates = result["median"], result["rates"]
    runs = result["runs"]

    def row(name: str, label: str) -> str:
        each = ", ".join(f"{r:,.0f}" for r in rates[name])
        return f"| {label} | {med[name]:,.0f} | {each} |"

    p = result["connections"]
    ours = rates["invite-mailer"]
    spread = 100 * (max(ours) - min(ours)) / med["invite-mailer"]
    margin = 100 * (result["of_ceiling"] / 0.15 - 1)
    side = "above" if margin >= 0 else "below"
    paired = ""
    if "baseline" in rates:
        paired = f"""
**Paired with a baseline.** Each run also timed `--baseline`, another
invite-mailer executable, on the same workspace right after this one:
{", ".join(f"{r:,.0f}" for r in rates["baseline"])} msg/s (median
{med["baseline"]:,.0f}); this code sends at {result["vs_baseline"]:.2f} × the
baseline's median. Ratios of runs taken side by side are what to compare:
the ceiling and the naive loop move by tens of percent between runs here.
"""
    return f"""\
## Throughput: messages per second against the protocol's limit

`bench/throughput.py` sends to Postfix's `smtp-sink` on 127.0.0.1 (it accepts
and discards every message) three ways, interleaved, {runs} runs each:

- **ceiling** — Postfix's own C client, `smtp-source -d -s {p}`, blasting one
  invitation as invite-mailer composes it ({result["message_bytes"]:,} bytes on
  average) {result["contacts"]:,} times over {p} reused connections;
- **naive** — a plain Python loop that builds each message with the standard
  `email` package (the same text, HTML and calendar files; the salutation put in
  with `str.format`; about {result["naive_message_bytes"]:,} bytes) and sends it
  with `smtplib` over one reused connection, {result["naive_count"]:,} messages
  per run;
- **invite-mailer** — `invite-mailer send-due` of the invitation to
  {result["contacts"]:,} generated contacts, as a user runs it: templates
  rendered and CSS inlined per recipient, MIME, four calendar files, the ledger
  written before and after every mail, `max_connections = {p}`, rate limit off.
  Wall time of the whole command, start-up included.

| sender | median msg/s | single runs |
|---|---:|---|
{row("ceiling", "smtp-source (ceiling)")}
{row("naive", "naive email + smtplib")}
{row("invite-mailer", "invite-mailer send-due")}
{row("baseline", "baseline (--baseline)") if "baseline" in rates else ""}

| target | measured | |
|---|---:|---|
| invite-mailer ≥ 5 × naive | {result["vs_naive"]:.2f} × | {mark(result["vs_naive"] >= 5)} |
| invite-mailer ≥ 15 % of ceiling | {100 * result["of_ceiling"]:.1f} % | \
{mark(result["of_ceiling"] >= 0.15)} |

Single runs of invite-mailer spread by {spread:.0f} % of the median here; the
median lies {abs(margin):.0f} % {side} the 15 % target. On a shared 2-core machine runs
have spread by more than 10 %, so a noisy day can bring a median below it.

{paired}
![Messages per second](throughput.png)

How invite-mailer gets there without giving up a single byte of what the
standard library would write: per mailing it builds a skeleton of the MIME
message once and fills in only what differs per recipient (address, salutation,
unsubscribe link, Message-ID, boundaries); CSS is inlined once per HTML
structure; a second process composes mails ahead of the senders; `DATA` is
dot-stuffed without regular expressions. `tests/test_fastpath.py` proves the
bytes equal `email` with `policy.SMTP` (hostile names and addresses included),
and the fast path checks itself against the standard library for the first
mails of every mailing at run time.

{provenance(result)}.
"""


def scale(result: dict[str, Any]) -> str:
    rows = result["rows"]
    lines = [
        "| contacts | command | wall time | peak RSS (process) | "
        "peak PSS (process + worker) | worker RSS |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        worker = f"{r['peak_worker_mb']:.0f} MB" if r["peak_worker_mb"] else "–"
        lines.append(
            f"| {r['contacts']:,} | {r['command']} | {r['seconds']:,.1f} s | "
            f"{r['peak_main_mb']:.0f} MB | {r['peak_mb']:.0f} MB | {worker} |"
        )
    targets = "\n".join(f"| {name} | {mark(ok)} |" for name, ok in result["target"].items())
    paired = ""
    if result.get("paired"):
        pairs = "\n".join(
            f"| {r['contacts']:,} | {r['command']} | {r['this_mb']:.1f} MB | "
            f"{r['baseline_mb']:.1f} MB |"
            for r in result["paired"]
        )
        paired = f"""
Peak RSS of the invite-mailer process, this build and the baseline
({result["paired_baseline"]}) measured back to back with
`bench/scale.py --sizes N --commands C` on the same machine:

| contacts | command | this build | baseline |
|---:|---|---:|---:|
{pairs}
"""
    return f"""\
## Memory and time at scale

`bench/scale.py` runs `validate` (every mail for every recipient rendered),
`plan --json` and `send-due` (the invitation to everyone over SMTP to
`smtp-sink`, ledger written, empty ledger at the start) on generated contact
lists; `send-due-1p` is `send-due` with `limits.compose_workers = 0`.
*Peak RSS (process)* is the kernel's high-water mark of the invite-mailer
process (`ru_maxrss`). For large passes `send-due` starts a second
process that composes mails ahead of the senders; *peak PSS* is the whole
process tree sampled every 10 ms, each process's proportional set size summed
(shared pages counted once).

{chr(10).join(lines)}

| target | |
|---|---|
{targets}

{paired}
![Memory and time against the number of contacts](scale.png)

The composing worker is what makes `send-due` fast (see above), and it costs
about 50 MB of its own. Where memory is tighter than time, set
`limits.compose_workers = 0` (or `INVITE_MAILER_LIMITS__COMPOSE_WORKERS=0`):
everything then stays in one process, at the speed shown for `send-due-1p`.

Contacts are held in memory once (about 500 bytes each: address, names, row
number), plans keep references, never copies; mails are composed one at a time
and written to the socket and the ledger as they go, never collected. Time grows
linearly with the list. The composing worker costs a fixed amount (its own
Python and templates), independent of the list size. Generated contacts draw
first names and organisations from short lists; invite-mailer shares those
strings between contacts, as it would for a real list where first names and
institutions repeat; last names and addresses are held per contact.

{provenance(result)}.
"""


def timing(result: dict[str, Any]) -> str:
    daemon, rate = result["daemon"], result["rate"]
    mailings_per_minute = daemon["mailings"] // max(1, len(daemon["due_minutes"]))
    late = daemon["lateness_first_arrival_s"]
    started = daemon.get("lateness_started_s")
    started_row = (
        f"| job started (daemon's log) | {started['p50']:.3f} s | {started['p99']:.3f} s | "
        f"{started['max']:.3f} s |\n"
        if started
        else ""
    )
    limit = rate["rate_per_minute"]
    return f"""\
## Timing: how punctual the daemon is, how exact the rate limit

`bench/timing.py` runs the real daemon (`invite-mailer run`) on a series whose
dates lie just ahead of the real clock, so that {daemon["mailings"]} mailings
fall due while it runs ({mailings_per_minute} at each of {len(daemon["due_minutes"])}
consecutive minutes, since series times have minute resolution), and measures
how late each one starts: the time from its due moment to the first of its
messages arriving at the SMTP server on 127.0.0.1 (and, from the daemon's own
log, to the start of its delivery pass). Mailings due in the same minute go out
in one pass, one after the other, so the last of them waits for the mails of
those before it: that, not the scheduler, is most of the lateness.

| lateness over {daemon["mailings"]} mailings | p50 | p99 | max |
|---|---:|---:|---:|
| first message at the server | {late["p50"]:.3f} s | {late["p99"]:.3f} s | {late["max"]:.3f} s |
{started_row}
Target p99 ≤ 1 s: {mark(late["p99"] <= 1.0)}. Received {daemon["messages_received"]:,} of
{daemon["messages_expected"]:,} messages, {daemon["duplicates"]} duplicates;
SIGTERM stopped the daemon in {daemon["sigterm_stop_s"]:.1f} s with exit code
{daemon["sigterm_exit_code"]}.

The rate limit: `send-due` with `rate_per_minute = {limit}` sends one mailing
large enough to keep the limiter busy for {rate["minutes"]} minutes; the
server records when each message arrives (what a relay counts).

| figure | measured | target | |
|---|---:|---:|---|
| messages per minute over the run | {rate["achieved_per_minute"]:,.1f} | \
{limit} ± 2 % | {mark(abs(rate["achieved_of_limit"] - 1) <= 0.02)} |
| most messages in any sliding 60 s window | {rate["sliding_max"]:,} | ≤ {limit} | \
{mark(rate["sliding_max"] <= limit)} |
| the same, counted at the MAIL command | {rate["mail_commands"]["sliding_max"]:,} | \
≤ {limit} | {mark(rate["mail_commands"]["sliding_max"] <= limit)} |
| messages in the first 60 s | {rate["first_window"]:,} | {limit} | \
{mark(rate["first_window"] == limit)} |

Per minute: {", ".join(str(n) for n in rate["arrivals"]["per_minute"])}. The smallest
distance between a message and the one {limit} before it was
{rate["arrivals"]["min_gap_to_nth_before_s"]:.6f} s (a window could hold one
too many only below 60 s).

![Lateness and messages per 60-second window](timing.png)

{provenance(result)}.
"""


def main() -> None:
    parts = [INTRO]
    for name, render in (("throughput-p4", throughput), ("scale", scale), ("timing", timing)):
        result = load(name)
        if result is None:
            parts.append(f"## {name}\n\nNo results yet: run `bench/{name.split('-')[0]}.py`.\n")
        else:
            parts.append(render(result))
    OUT.write_text("\n".join(parts), encoding="utf-8")
    print(f"written to {OUT}")


if __name__ == "__main__":
    main()
