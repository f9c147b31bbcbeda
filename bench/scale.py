"""Peak memory and wall time of validate, plan and send-due for growing contact lists.

For each size (default 1,000 / 10,000 / 100,000 generated contacts) a fresh
workspace is made and the three commands run as a user runs them:

validate
    ``invite-mailer validate``: every mail for every recipient rendered
    (the invitation to everyone, reminders and follow-ups to the registered).
plan
    ``invite-mailer plan --now 2024-11-01T09:00 --json``.
send-due
    ``invite-mailer send-due --now 2024-10-24T10:05``: the invitation to
    every contact, over SMTP to Postfix's ``smtp-sink`` on 127.0.0.1, with the
    ledger written for every mail, on an empty ledger.
send-due-1p
    the same with ``limits.compose_workers = 0``: no second process.

Memory: ``peak_main_mb`` is the peak resident set size (RSS) of the
invite-mailer process, as the kernel records it (``ru_maxrss``); the target
(150 MB at 100,000 contacts) is about this figure. send-due also starts a
worker process that composes mails ahead of the senders; ``peak_mb`` is the
whole process tree, sampled every 10 ms as the sum of each process's
proportional set size (PSS, shared pages counted once), and is reported
beside it, never hidden. Usage::

    .venv/bin/python bench/scale.py                       # 1k, 10k, 100k
    .venv/bin/python bench/scale.py --sizes 1000 10000    # quicker
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common
import psutil

from support.smtp import free_port

COMMANDS = {
    "validate": ("validate",),
    "plan": ("plan", "--now", "2024-11-01T09:00", "--json"),
    "send-due": ("send-due", "--now", common.INVITATION_NOW, "--json"),
    "send-due-1p": ("send-due", "--now", common.INVITATION_NOW, "--json"),
}
# Extra environment per command: send-due-1p is send-due with
# limits.compose_workers = 0, composing in the sending process only.
ENV = {"send-due-1p": {"INVITE_MAILER_LIMITS__COMPOSE_WORKERS": "0"}}
LIMIT_MB = 150


def measure(args: list[str], env: dict[str, str], cwd: Path) -> dict[str, float]:
    """Run *args*: wall time and the peak memory of its process tree.

    ``peak_mb`` is the largest sum over the tree of each process's
    proportional set size (PSS: private pages plus its share of pages shared
    with other processes, such as the Python interpreter's own libraries), so
    memory two processes share is counted once. ``peak_rss_sum_mb`` sums
    plain RSS instead and counts shared pages twice (an upper bound);
    ``peak_main_mb`` is the kernel's high-water mark for the command's own
    process (``ru_maxrss``), ``peak_worker_mb`` the largest RSS of a child.
    """
    started = time.perf_counter()
    process = subprocess.Popen(
        args, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    root = psutil.Process(process.pid)
    known: dict[int, psutil.Process] = {process.pid: root}
    peak_pss = peak_rss = peak_worker = 0
    while True:
        # wait4 rather than poll(): it also returns the kernel's ru_maxrss.
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            break
        with contextlib.suppress(psutil.Error):
            for child in root.children(recursive=True):
                known.setdefault(child.pid, child)
        pss = rss = 0
        for pid, proc in list(known.items()):
            try:
                info = proc.memory_full_info()
            except psutil.Error:
                del known[pid]
                continue
            pss += info.pss
            rss += info.rss
            if pid != process.pid:
                peak_worker = max(peak_worker, info.rss)
        peak_pss, peak_rss = max(peak_pss, pss), max(peak_rss, rss)
        time.sleep(0.01)
    seconds = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    stderr = process.stderr.read().decode(errors="replace") if process.stderr else ""
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed ({process.returncode}):\n{stderr[-2000:]}")
    mb = 2**20
    return {
        "seconds": round(seconds, 2),
        "peak_mb": round(peak_pss / mb, 1),
        "peak_rss_sum_mb": round(max(peak_rss, usage.ru_maxrss * 1024) / mb, 1),
        "peak_main_mb": round(usage.ru_maxrss * 1024 / mb, 1),
        "peak_worker_mb": round(peak_worker / mb, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    parser.add_argument("--commands", nargs="+", default=list(COMMANDS), choices=list(COMMANDS))
    parser.add_argument("--connections", type=int, default=4)
    options = parser.parse_args()
    common.require(common.SMTP_SINK)
    port = free_port()
    rows = []
    with tempfile.TemporaryDirectory(prefix="invite-mailer-scale-") as tmp, common.smtp_sink(port):
        for size in options.sizes:
            workspace = common.make_workspace(
                Path(tmp) / str(size), size, port=port, connections=options.connections
            )
            env = workspace.env()
            for name in options.commands:
                common.reset_state(workspace)
                figures = measure(
                    workspace.invoke(*COMMANDS[name]), {**env, **ENV.get(name, {})}, workspace.root
                )
                row = {"contacts": size, "command": name, **figures}
                rows.append(row)
                print(
                    f"{size:>7,} contacts  {name:<9} {figures['seconds']:>8.2f} s  "
                    f"peak {figures['peak_mb']:>6.1f} MB PSS "
                    f"(RSS: sum {figures['peak_rss_sum_mb']} MB, "
                    f"main {figures['peak_main_mb']} MB, worker {figures['peak_worker_mb']} MB)",
                    flush=True,
                )
    largest = max(options.sizes)
    at_largest = [r for r in rows if r["contacts"] == largest]
    result = {
        "machine": common.machine(),
        "command": " ".join(["bench/scale.py", *sys.argv[1:]]),
        "rows": rows,
        "target": {
            f"process peak RSS <= {LIMIT_MB} MB at {largest:,}, every command": all(
                r["peak_main_mb"] <= LIMIT_MB for r in at_largest
            ),
            f"process tree peak PSS <= {LIMIT_MB} MB at {largest:,}, one process": all(
                r["peak_mb"] <= LIMIT_MB for r in at_largest if r["command"] != "send-due"
            ),
            f"process tree peak PSS <= {LIMIT_MB} MB at {largest:,}, "
            "send-due with its composing worker": all(
                r["peak_mb"] <= LIMIT_MB for r in at_largest if r["command"] == "send-due"
            ),
        },
    }
    print(f"written to {common.save('scale', result)}")
    plot(rows)


def plot(rows: list[dict[str, object]]) -> None:
    """docs/scale.png: memory and time against contacts, one line per command."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (pip install -e '.[bench]'): no plot")
        return
    figure, (memory, seconds) = plt.subplots(1, 2, figsize=(10, 4))
    for name in COMMANDS:
        mine = sorted((r for r in rows if r["command"] == name), key=lambda r: r["contacts"])  # type: ignore[arg-type,return-value]
        if not mine:
            continue
        sizes = [r["contacts"] for r in mine]
        line = memory.plot(sizes, [r["peak_main_mb"] for r in mine], marker="o", label=name)[0]
        if any(r["peak_worker_mb"] for r in mine):
            memory.plot(
                sizes,
                [r["peak_mb"] for r in mine],
                marker="s",
                linestyle=":",
                color=line.get_color(),
                label=f"{name} + worker (PSS)",
            )
        seconds.plot(sizes, [r["seconds"] for r in mine], marker="o", label=name)
    memory.axhline(LIMIT_MB, color="grey", linestyle="--", label=f"target {LIMIT_MB} MB")
    memory.set(xlabel="contacts", ylabel="peak RSS, MB", title="Memory")
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
