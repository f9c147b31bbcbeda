"""Peak memory of the whole process tree, and wall time, of validate, plan and send-due.

For each size (default 1,000 / 10,000 / 100,000 generated contacts) a fresh
workspace is made with the shipped ``config/settings.toml`` unchanged (default
connections, no composing workers, the organiser's summary on); only
transport, host, port and TLS are set through ``INVITE_MAILER_*`` variables,
as the README shows. The commands run as a user runs them:

validate
    ``invite-mailer validate``: every mail of the 9 mailings of the shipped
    series rendered for every recipient (the invitation to everyone,
    reminders and follow-ups to the registered), nothing sent.
plan
    ``invite-mailer plan --now 2024-11-01T09:00 --json``.
send-due
    ``invite-mailer send-due --now 2024-10-24T10:05 --json``: the invitation
    to every contact over SMTP to Postfix's ``smtp-sink`` on 127.0.0.1, the
    ledger written for every mail, on an empty ledger; the sink's counter
    must show every invitation and the summary.
send-due-workers (only when asked for)
    the same with ``INVITE_MAILER_LIMITS__COMPOSE_WORKERS=1``: one process composing ahead.

Memory: ``peak_pss_mb`` is the peak of the sum of the proportional set size
(``Pss`` in ``/proc/<pid>/smaps_rollup``: private pages plus a share of
shared ones) of the command's process and all its descendants, so memory two
processes share is counted once and a composing worker is never left out.
The tree's RSS counters are sampled every ``--interval`` seconds and its PSS
read whenever they have grown by 1 MB since the last reading, a process has
joined, or half a second has passed (see ``TreeSampler``). ``peak_main_mb``
is the kernel's high-water mark of the command's own process (``ru_maxrss``,
RSS). ``sampler_cpu_s`` is the CPU time the sampler itself took on the same
machine while the command ran. Usage::

    .venv/bin/python bench/scale.py                       # 1k, 10k, 100k
    .venv/bin/python bench/scale.py --sizes 2000          # quicker
    .venv/bin/python bench/scale.py --sizes 100000 --baseline OTHER-VENV/bin/invite-mailer
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import common

COMMANDS = {
    "validate": ("validate",),
    "plan": ("plan", "--now", "2024-11-01T09:00", "--json"),
    "send-due": ("send-due", "--now", common.INVITATION_NOW, "--json"),
    "send-due-workers": ("send-due", "--now", common.INVITATION_NOW, "--json"),
}
DEFAULT_COMMANDS = ("validate", "plan", "send-due")
# Extra environment per command: send-due-workers composes in a second process.
ENV = {"send-due-workers": {"INVITE_MAILER_LIMITS__COMPOSE_WORKERS": "1"}}
LIMIT_MB = 150
VALIDATE_LIMIT_S = 30
# How often the tree's members are looked for (a scan of /proc).
CHILDREN_EVERY_S = 0.25
# PSS is read again when the tree's RSS has grown by this much, or after this long.
PSS_GROWTH_KB = 1024
PSS_EVERY_S = 0.5
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024


def pss_kb(pid: int) -> int | None:
    """The process's proportional set size in kB, or None once it is gone."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as file:
            for line in file:
                if line.startswith(b"Pss:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return 0


def descendants(pid: int) -> set[int]:
    """Every living descendant of *pid*, found by each process's parent in /proc."""
    parents: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            with open(f"/proc/{entry.name}/stat", "rb") as file:
                stat = file.read()
            # The command name is in parentheses and may contain spaces.
            ppid = int(stat[stat.rindex(b")") + 2 :].split()[1])
            parents.setdefault(ppid, []).append(int(entry.name))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def rss_kb(pid: int) -> int | None:
    """The process's resident set size in kB from ``statm`` (a counter: cheap to read)."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as file:
            return int(file.read().split()[1]) * PAGE_KB
    except (FileNotFoundError, ProcessLookupError, PermissionError, IndexError):
        return None


class TreeSampler:
    """Peak PSS of a process tree, read from smaps_rollup when it can have grown.

    Reading ``smaps_rollup`` walks every page of the process: about 1.5 ms of
    CPU for 100 MB, which at 100 samples a second would take a good share of a
    core from the command being measured. So every sample reads the cheap RSS
    counters, and the tree's PSS is read again only when their sum has grown by
    ``PSS_GROWTH_KB`` since the last reading, when a process joins the tree,
    or after ``PSS_EVERY_S``. PSS never grows by more than RSS does (new pages
    count fully in both; a page another process stops sharing is the exception,
    caught by the periodic reading), so the peak is missed by less than
    ``PSS_GROWTH_KB``.
    """

    def __init__(self, pid: int) -> None:
        self.root = pid
        self.tree = {pid}
        self.peak_kb = self.samples = self.pss_reads = 0
        self.looked = self.read_at = 0.0
        self.rss_at_read = -1

    def sample(self, now: float) -> None:
        grew = False
        if now - self.looked >= CHILDREN_EVERY_S:
            found = descendants(self.root)
            grew = not found <= self.tree
            self.tree |= found
            self.looked = now
        rss = 0
        for member in list(self.tree):
            kb = rss_kb(member)
            if kb is None:
                self.tree.discard(member)
            else:
                rss += kb
        self.samples += 1
        if grew or rss >= self.rss_at_read + PSS_GROWTH_KB or now - self.read_at >= PSS_EVERY_S:
            self.peak_kb = max(self.peak_kb, sum(pss_kb(m) or 0 for m in list(self.tree)))
            self.pss_reads += 1
            self.rss_at_read, self.read_at = rss, now


def measure(args: list[str], env: dict[str, str], cwd: Path, interval: float) -> dict[str, Any]:
    """Run *args*: wall time, its stdout, and the peak PSS of its process tree."""
    sampler_before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    # Files, not pipes: a command that logs a lot must never block on a full pipe.
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        process = subprocess.Popen(args, env=env, cwd=cwd, stdout=out, stderr=err)
        sampler = TreeSampler(process.pid)
        while True:
            # wait4 rather than poll(): it also returns the kernel's ru_maxrss.
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            sampler.sample(time.perf_counter())
            time.sleep(interval)
        seconds = time.perf_counter() - started
        out.seek(0)
        err.seek(0)
        stdout = out.read().decode(errors="replace")
        stderr = err.read().decode(errors="replace")
    sampler_after = resource.getrusage(resource.RUSAGE_SELF)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"{' '.join(args)} failed ({code}):\n{stderr[-2000:]}")
    cpu = (sampler_after.ru_utime + sampler_after.ru_stime) - (
        sampler_before.ru_utime + sampler_before.ru_stime
    )
    return {
        "seconds": round(seconds, 2),
        "peak_pss_mb": round(sampler.peak_kb / 1024, 1),
        "peak_main_mb": round(usage.ru_maxrss / 1024, 1),
        "samples": sampler.samples,
        "pss_reads": sampler.pss_reads,
        "sampler_cpu_s": round(cpu, 2),
        "stdout": stdout,
    }


def run(
    name: str,
    workspace: common.Workspace,
    sink: common.Sink,
    options: argparse.Namespace,
    executable: Path | None = None,
) -> dict[str, Any]:
    """One command on an empty ledger; send-due's mails counted at the sink."""
    common.reset_state(workspace)
    args = workspace.invoke(*COMMANDS[name])
    if executable is not None:
        args[0] = str(executable)
    received = sink.received()
    env = {**workspace.env(), **ENV.get(name, {})}
    load = os.getloadavg()[0]
    figures = measure(args, env, workspace.root, options.interval)
    # What else ran on the machine: a 1-minute load above the core count slows everyone.
    figures["load_1min"] = [round(load, 2), round(os.getloadavg()[0], 2)]
    stdout = figures.pop("stdout")
    if name.startswith("send-due"):
        expected = common.send_due_claim(workspace.contacts)(stdout)
        got = sink.received() - received
        if got != expected:
            raise SystemExit(f"{name}: smtp-sink received {got} messages, not {expected}")
        figures["messages"] = got
    return figures


def targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets at 100,000 contacts; none when that size was not run.

    Memory is decided on the largest peak over the repeats, time on the median
    (with the range beside it).
    """
    mine = [r for r in rows if r["contacts"] == 100_000 and r["build"] == "this"]
    found = []
    peaks = [r["peak_pss_mb"] for r in mine if r["command"] == "send-due"]
    if peaks:
        found.append(
            {
                "target": f"send-due at 100,000: whole tree ≤ {LIMIT_MB} MB PSS, defaults",
                "measured": f"{max(peaks):.1f} MB"
                + (f" (largest of {len(peaks)} runs)" if len(peaks) > 1 else ""),
                "met": max(peaks) <= LIMIT_MB,
            }
        )
    seconds = [r["seconds"] for r in mine if r["command"] == "validate"]
    if seconds:
        found.append(
            {
                "target": f"validate at 100,000 × 9 mailings ≤ {VALIDATE_LIMIT_S} s",
                "measured": f"{common.median(seconds):.1f} s"
                + (
                    f" (median; {min(seconds):.1f} – {max(seconds):.1f} s)"
                    if len(seconds) > 1
                    else ""
                ),
                "met": common.median(seconds) <= VALIDATE_LIMIT_S,
            }
        )
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    parser.add_argument("--commands", nargs="+", default=DEFAULT_COMMANDS, choices=list(COMMANDS))
    parser.add_argument("--interval", type=float, default=0.01, help="seconds between samples")
    parser.add_argument("--repeat", type=int, default=1, help="runs of every command, interleaved")
    parser.add_argument(
        "--baseline",
        type=Path,
        metavar="EXECUTABLE",
        help="another invite-mailer executable, measured right after this build on the "
        "same workspace, for a paired comparison",
    )
    options = parser.parse_args()
    from support.smtp import free_port

    common.require(common.SMTP_SINK)
    port = free_port()
    rows = []
    builds: list[tuple[str, Path | None]] = [("this", None)]
    if options.baseline:
        builds.append(("baseline", options.baseline))
    with tempfile.TemporaryDirectory(prefix="invite-mailer-scale-") as tmp:
        with common.smtp_sink(port) as sink:
            for size in options.sizes:
                workspace = common.make_default_workspace(Path(tmp) / str(size), size, port=port)
                runs = [
                    (repeat, name, build, executable)
                    for repeat in range(options.repeat)
                    for name in options.commands
                    for build, executable in builds
                ]
                for repeat, name, build, executable in runs:
                    figures = run(name, workspace, sink, options, executable)
                    rows.append(
                        {"contacts": size, "command": name, "build": build, "run": repeat + 1}
                        | figures
                    )
                    print(
                        f"{size:>7,} contacts  {name:<11} {build:<8} #{repeat + 1} "
                        f"{figures['seconds']:>8.2f} s  "
                        f"tree peak {figures['peak_pss_mb']:>6.1f} MB PSS, "
                        f"process peak {figures['peak_main_mb']:>6.1f} MB RSS "
                        f"({figures['samples']} samples, sampler "
                        f"{figures['sampler_cpu_s']} s CPU)",
                        flush=True,
                    )
    result = {
        "machine": common.machine(),
        "command": common.public_command("bench/scale.py", sys.argv[1:]),
        "defaults": {
            "max_connections": common.shipped_setting("smtp", "max_connections"),
            "settings": "config/settings.toml as shipped",
        },
        "interval_s": options.interval,
        "repeat": options.repeat,
        "rows": rows,
        "targets": targets(rows),
    }
    if options.baseline:
        result["baseline_version"] = common.version_of(options.baseline)
    print(f"written to {common.save('scale', result)}")
    plot(rows)


def plot(rows: list[dict[str, Any]]) -> None:
    """docs/scale.png: peak PSS of the tree and wall time against contacts."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (pip install -e '.[bench]'): no plot")
        return
    figure, (memory, seconds) = plt.subplots(1, 2, figsize=(10, 4))
    for name in COMMANDS:
        for build in ("this", "baseline"):
            mine = sorted(
                (r for r in rows if r["command"] == name and r["build"] == build),
                key=lambda r: int(r["contacts"]),
            )
            if not mine:
                continue
            label = name if build == "this" else f"{name} (baseline)"
            style = "-" if build == "this" else ":"
            sizes = [r["contacts"] for r in mine]
            memory.plot(sizes, [r["peak_pss_mb"] for r in mine], style, marker="o", label=label)
            seconds.plot(sizes, [r["seconds"] for r in mine], style, marker="o", label=label)
    memory.axhline(LIMIT_MB, color="grey", linestyle="--", label=f"target {LIMIT_MB} MB")
    seconds.axhline(VALIDATE_LIMIT_S, color="grey", linestyle="--", label="validate target")
    memory.set(xlabel="contacts", ylabel="peak PSS of the process tree, MB", title="Memory")
    seconds.set(xscale="log", yscale="log", xlabel="contacts", ylabel="seconds", title="Wall time")
    for axes in (memory, seconds):
        axes.grid(True, which="both", alpha=0.3)
        axes.legend()
    figure.tight_layout()
    path = common.DOCS / "scale.png"
    figure.savefig(path, dpi=110)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
