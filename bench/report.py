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
import scale_out

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
sudo apt-get install postfix nodejs npm   # smtp-sink, smtp-source; node for nodemailer
python3 -m venv .venv && .venv/bin/pip install -q -e '.[test,bench]'
.venv/bin/python bench/throughput.py      # installs nodemailer into bench/.cache/
.venv/bin/python bench/scale.py
.venv/bin/python bench/report.py          # rewrites this page
```

Figures are ratios against contenders measured in the same run wherever a
target is a ratio, because absolute speeds differ from machine to machine,
and every figure comes with its spread: on a shared machine single runs
differ by tens of percent.
"""


def machine_line(result: dict[str, Any]) -> str:
    m = result["machine"]
    return f"{m['cpu']}, {m['cores']} cores, {m['date']}"


def overview(throughput: dict[str, Any] | None, scale: dict[str, Any] | None) -> str:
    """The issue's targets, each with the figure that decides it and where it was measured."""
    rows = []
    if throughput:
        for t in throughput["targets"]:
            name, limit = t["against"], t["at_least"]
            rows.append(
                f"| send-due {goal_text(name, limit)}, same run | "
                f"{ratio_text(name, t['measured'])} "
                f"(worst round {ratio_text(name, t['worst_round'])}) | {mark(t['met'])} | "
                f"{machine_line(throughput)} |"
            )
    if scale:
        for t in scale["targets"]:
            rows.append(
                f"| {t['target']} | {t['measured']} | {mark(t['met'])} | {machine_line(scale)} |"
            )
    if not rows:
        return ""
    table = "\n".join(rows)
    return f"""\
## Targets at a glance

| target | measured | | where, when |
|---|---:|---|---|
{table}

Throughput targets are decided on the ratio of the medians over all rounds;
the worst single round is shown beside it.
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


def pct(value: float) -> str:
    return f"{100 * value:.1f} %"


def goal_text(name: str, limit: float) -> str:
    """A ratio target as the issue words it: "≥ 40 % of X" or "≥ 10 × X"."""
    return f"≥ {100 * limit:g} % of {name}" if name in RATIO_FORMAT else f"≥ {limit:g} × {name}"


def times(value: float) -> str:
    return f"{value:.2f} ×"


THROUGHPUT_LABELS = {
    "smtp-source": "smtp-source -d (ceiling)",
    "naive": "naive email + smtplib",
    "nodemailer": "nodemailer (pool)",
    "send-due": "invite-mailer send-due",
    "baseline": "baseline send-due (`--baseline`)",
}
# How each target's ratio reads: a share of the ceiling, or a multiple.
RATIO_FORMAT = {"smtp-source": pct}


def ratio_text(name: str, value: float) -> str:
    return RATIO_FORMAT.get(name, times)(value)


def throughput_tables(result: dict[str, Any]) -> str:
    rates, counts, spreads = result["rates"], result["counts"], result["spread"]
    names = [n for n in THROUGHPUT_LABELS if n in rates]
    lines = [
        "| contender | mails per run | median msg/s | min – max msg/s | spread | every round "
        "| CPU ms per mail (median) |",
        "|---|---:|---:|---:|---:|---|---:|",
    ]
    cpu = result.get("cpu_ms_per_mail", {})
    for name in names:
        s = spreads[name]
        width = 100 * (s["max"] - s["min"]) / s["median"]
        each = ", ".join(f"{r:,.0f}" for r in rates[name])
        per_mail = f"{common.median(cpu[name]):.2f}" if cpu.get(name) else "–"
        lines.append(
            f"| {THROUGHPUT_LABELS[name]} | {counts[name]:,} | {s['median']:,.0f} | "
            f"{s['min']:,.0f} – {s['max']:,.0f} | {width:.0f} % | {each} | {per_mail} |"
        )
    others = [n for n in names if n != "send-due"]
    ratio = result["ratios"]
    header = " | ".join(f"send-due ÷ {n}" for n in others)
    rows = [f"| round | order | load | {header} |", "|---:|---|---|" + "---:|" * len(others)]
    loads = result.get("load_1min", [])
    for number, order in enumerate(result["orders"]):
        cells = " | ".join(ratio_text(n, ratio[n]["per_round"][number]) for n in others)
        load = " → ".join(f"{x:.1f}" for x in loads[number]) if number < len(loads) else ""
        rows.append(f"| {number + 1} | {' → '.join(order)} | {load} | {cells} |")
    median_cells = " | ".join(
        f"{ratio_text(n, ratio[n]['round_median'])} "
        f"({ratio_text(n, ratio[n]['round_min'])} – {ratio_text(n, ratio[n]['round_max'])})"
        for n in others
    )
    rows.append(f"| all | median of rounds (min – max) | | {median_cells} |")
    overall = " | ".join(ratio_text(n, ratio[n]["of_medians"]) for n in others)
    rows.append(f"| all | median ÷ median | | {overall} |")
    goals = [
        "| target (same run) | measured: median ÷ median | worst round | |",
        "|---|---:|---:|---|",
    ]
    for t in result["targets"]:
        name, limit = t["against"], t["at_least"]
        every = " (not in every round)" if t["met"] and not t["met_every_round"] else ""
        goals.append(
            f"| send-due {goal_text(name, limit)} | {ratio_text(name, t['measured'])} | "
            f"{ratio_text(name, t['worst_round'])} | {mark(t['met'])}{every} |"
        )
    return "\n".join(lines) + "\n\n" + "\n".join(rows) + "\n\n" + "\n".join(goals)


def throughput(result: dict[str, Any]) -> str:
    p, n = result["connections"], result["contacts"]
    setting = "the shipped default" if result.get("connections_default") else "set by --connections"
    paired = ""
    if "baseline" in result["rates"]:
        paired = f"""
**Paired with a baseline.** Every round also ran `--baseline`, another
invite-mailer executable ({result.get("baseline_version", "?")}), on the same
workspace and sink, in the same alternating order. Ratios of runs taken side
by side are what to compare: absolute rates move by tens of percent between
runs on a shared machine.
"""
    return f"""\
## Throughput: messages per second, against the protocol's limit and the peers

`bench/throughput.py` sends to one Postfix `smtp-sink` on 127.0.0.1 (it accepts
and discards every message). {result["rounds"]} rounds; in each round every
contender runs once, the order alternating from round to round (forward, then
backward), so that the drift of a shared machine hits all alike. After every
contender the sink's own message counter (`smtp-sink -c`) must have grown by
exactly the messages that contender sent, or the run stops: every figure
below is of delivered mail. {p} parallel connections ({setting}) for every
contender that can use more than one:

- **smtp-source** — Postfix's own C client, `smtp-source -d -s {p} -m {n:,}`,
  sending one invitation exactly as `invite-mailer preview invitation` wrote it
  ({result["sample_bytes"]:,} bytes) over {p} reused connections. It builds
  nothing: the ceiling.
- **naive** — a plain Python loop that builds each message with the standard
  `email` package (the same text, HTML and four calendar files; the salutation
  put in with `str.format`; about {result["naive_message_bytes"]:,} bytes) and
  sends it with `smtplib` over one reused connection.
- **nodemailer** — what a Node user picks: `bench/nodemailer_send.js`,
  nodemailer with `pool: true, maxConnections: {p}`, every message built anew by
  `transporter.sendMail` (nodemailer's MailComposer) from the invitation's
  subject, headers, text part, HTML part and four calendar files, the recipient
  changed per message ({result["nodemailer_message_bytes"]:,} bytes);
  {result.get("node", "")}, installed by the script with `npm install --no-save`
  into the ignored `bench/.cache/`.
- **send-due** — `invite-mailer send-due` of the invitation to {n:,} generated
  contacts with the shipped `config/settings.toml` unchanged (only transport,
  host, port and TLS set through `INVITE_MAILER_*` variables): default
  connections, composing in the sending process (no composing workers), the
  organiser's summary on. The invitation rendered once per shape and each
  recipient's values filled in, MIME, four calendar files, the ledger written
  for every mail ({result["message_bytes"]:,} bytes on average). Its rate
  counts the invitations only, not the summary.

Each rate is the mails of one run divided by the wall time of the whole
command, start-up included. *CPU ms per mail* is the user and system time of
the contender's processes together (send-due's composing worker included,
start-up included) per mail: on a machine shared with other work it moves
less than the wall-clock rates, and it shows what a rate costs. *Load* is the
1-minute load average before and after a round: above the core count, other
work competed for the CPU.

{throughput_tables(result)}
{paired}
![Messages per second](throughput.png)

How invite-mailer gets there without giving up a byte of what the standard
library would write: each shape of a mailing is rendered once (templates,
CSS inlining, text tidying, the MIME skeleton) and every recipient's values
are filled in; `tests/test_shapes.py` and `tests/test_fastpath.py` prove the
bytes equal `email` with `policy.SMTP`. All of it runs in the sending
process; a composing worker (`limits.compose_workers = 1`) adds about a
fifth to the rate for about 70 MB (`send-due-workers` in the next section).
Where the rest of the gap to `smtp-source` goes, profiled in one process
(py-spy): about half of the 0.8 ms of CPU per mail is the SMTP exchange
(two socket writes per mail, replies, the event loop), a third composing,
the rest the ledger's batched writes and the pass's bookkeeping.

{provenance(result)}.
"""


def repeats(count: int) -> str:
    if count == 1:
        return "Each command ran once per size."
    return (
        f"Each command ran {count} times per size, the repeats interleaved; memory "
        "targets are decided on the largest peak, time targets on the median."
    )


def scale(result: dict[str, Any]) -> str:
    rows = result["rows"]
    lines = [
        "| contacts | command | build | run | wall time | peak PSS, whole tree | "
        "peak RSS, main process | samples / PSS reads | sampler CPU | load before → after |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        load = " → ".join(f"{x:.1f}" for x in r.get("load_1min", []))
        lines.append(
            f"| {r['contacts']:,} | {r['command']} | {r['build']} | {r.get('run', 1)} | "
            f"{r['seconds']:,.1f} s | "
            f"{r['peak_pss_mb']:.1f} MB | {r['peak_main_mb']:.1f} MB | "
            f"{r['samples']:,} / {r.get('pss_reads', r['samples']):,} | "
            f"{r['sampler_cpu_s']:.1f} s | {load} |"
        )
    if result["targets"]:
        goals = "\n".join(
            f"| {t['target']} | {t['measured']} | {mark(t['met'])} |" for t in result["targets"]
        )
        targets = f"| target | measured | |\n|---|---:|---|\n{goals}"
    else:
        targets = "The targets are at 100,000 contacts; this run did not include that size."
    interval = 1000 * result["interval_s"]
    baseline = ""
    if any(r["build"] == "baseline" for r in rows):
        baseline = (
            f"\nRows marked *baseline* are another invite-mailer executable "
            f"({result.get('baseline_version', '?')}), run right after this build on the "
            "same workspace.\n"
        )
    return f"""\
## Memory and time at scale

`bench/scale.py` runs `validate` (every mail of the series' 9 mailings rendered
for every recipient, nothing sent), `plan --json` and `send-due` (the
invitation to everyone over SMTP to `smtp-sink`, the ledger written, on an
empty ledger; the sink's counter checked) on generated contact lists, with
the shipped `config/settings.toml` unchanged: default connections
({result["defaults"]["max_connections"]}), composing in the sending process, the
organiser's summary on; `send-due-workers`, when measured, sets
`INVITE_MAILER_LIMITS__COMPOSE_WORKERS=1`. *Peak PSS, whole tree* is the largest sum of `Pss`
from `/proc/<pid>/smaps_rollup` over the command's process and all its
descendants (a composing worker included, memory they share counted once).
The tree's RSS counters are sampled every {interval:g} ms, and its PSS is read
whenever they have grown by 1 MB since the last reading, a process has joined
the tree, or half a second has passed (*PSS reads*): reading `smaps_rollup`
walks every page, about 1.5 ms of CPU per 100 MB here, too dear to do 100
times a second beside the command being timed. PSS grows no faster than RSS,
so the peak is missed by less than 1 MB. *Peak RSS, main process* is the kernel's
high-water mark of the command's own process (`ru_maxrss`). *Sampler CPU* is
what the sampling took on the same cores while the command ran; *load* is the
1-minute load average before and after it (above the core count, other work
competed for the CPU). {repeats(result.get("repeat", 1))}

{chr(10).join(lines)}
{baseline}
{targets}

![Memory and time against the number of contacts](scale.png)

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
    parts = [INTRO, overview(load("throughput"), load("scale"))]
    for name, render in (("throughput", throughput), ("scale", scale), ("timing", timing)):
        result = load(name)
        if result is None:
            parts.append(f"## {name}\n\nNo results yet: run `bench/{name}.py`.\n")
        else:
            parts.append(render(result))
    # bench/scale_out.py renders its own section; kept when this page is rewritten.
    several = load("scale_out")
    if several is not None:
        parts.append(scale_out.section(several))
    OUT.write_text("\n".join(parts), encoding="utf-8")
    print(f"written to {OUT}")


if __name__ == "__main__":
    main()
