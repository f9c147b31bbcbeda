"""Messages per second: Postfix's smtp-source, a naive Python loop, invite-mailer.

All three send to Postfix's ``smtp-sink`` on 127.0.0.1 (it accepts and
discards), in one run, with the same message and the same number of parallel
connections (the naive loop, by definition, uses one):

ceiling
    ``smtp-source -d -s P -m N -F invitation.eml``: Postfix's own C test
    client, reusing its connections, sending one invitation as composed by
    invite-mailer (so the very same size) N times.
naive
    a plain Python loop (``naive_loop`` below, run in its own interpreter):
    for each contact it builds the message with the standard ``email``
    package (the same text, HTML and four calendar files, the salutation
    filled in with ``str.format``) and sends it with ``smtplib`` over one
    reused connection. No templates, no CSS inlining, no ledger.
invite-mailer
    ``invite-mailer send-due`` of the invitation to N generated contacts:
    templates rendered and CSS inlined per recipient, MIME, calendar files,
    the ledger written for every mail (claimed before, marked after), rate
    limit off, ``max_connections = P``.

Each figure is N divided by the wall time of the whole command (start-up
included), the median of ``--runs`` runs; the three are interleaved so that
drift of the machine hits all alike. Usage::

    .venv/bin/python bench/throughput.py                 # N=10000, P=4, 3 runs
    .venv/bin/python bench/throughput.py --connections 16
"""

from __future__ import annotations

import argparse
import json
import smtplib
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from email import message_from_bytes, policy
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from pathlib import Path

import common

from invite_mailer.cli.commands import parse_now
from invite_mailer.inputs.config import load_config
from invite_mailer.mail.compose import Composer
from invite_mailer.mail.fastwire import WireComposer
from support.smtp import free_port

SENDER = "transferreihe@example.org"


def invitation_sample(workspace: common.Workspace, out: Path) -> tuple[Path, float]:
    """One invitation as invite-mailer sends it, and the mean size over 200 contacts."""
    config = load_config(workspace.config, workspace.templates, env_file=None)
    now = parse_now(common.INVITATION_NOW, config)
    composer = WireComposer(Composer.from_config(config))
    wires = [
        composer.wire("invitation", contact, event=None, now=now)
        for contact in config.contacts.contacts[:200]
    ]
    out.write_bytes(wires[0].data)
    return out, statistics.mean(len(wire.data) for wire in wires)


def naive_builder(sample: Path) -> Callable[[int], EmailMessage]:
    """The baseline's message: what one would write with the standard library alone.

    Text, HTML and calendar files come from invite-mailer's own invitation,
    with the salutation filled in by ``str.format``.
    """
    reference = message_from_bytes(sample.read_bytes(), policy=policy.default)
    text_part = reference.get_body(("plain",))
    html_part = reference.get_body(("html",))
    assert isinstance(text_part, EmailMessage) and isinstance(html_part, EmailMessage)
    text, html = text_part.get_content(), html_part.get_content()
    first_line = text.splitlines()[0]

    def template(body: str) -> str:
        body = body.replace(first_line, "\0", 1).replace("{", "{{").replace("}", "}}")
        return body.replace("\0", "{salutation}")

    text, html = template(text), template(html)
    calendars = [
        (part.get_filename(), part.get_content())
        for part in reference.iter_attachments()
        if part.get_content_type() == "text/calendar"
    ]
    subject = str(reference["Subject"])
    names = ["Müller", "Schmidt", "Weiß", "Öztürk", "Meyer"]

    def build(number: int) -> EmailMessage:
        name = names[number % len(names)]
        msg = EmailMessage()
        msg["From"] = Address("KomKomIn Transferreihe", addr_spec=SENDER)
        msg["To"] = Address(f"Dr. Jana {name}", addr_spec=f"kontakt{number:06d}@example.org")
        msg["Subject"] = subject
        msg["Date"] = format_datetime(datetime.now(UTC))
        msg["Message-ID"] = make_msgid(domain="example.org")
        salutation = f"Sehr geehrte Frau Dr. {name},"
        msg.set_content(text.format(salutation=salutation))
        msg.add_alternative(html.format(salutation=salutation), subtype="html")
        for filename, data in calendars:
            msg.add_attachment(
                data.encode("utf-8"), maintype="text", subtype="calendar", filename=filename
            )
        return msg

    return build


def naive_loop(port: int, count: int, sample: Path) -> None:
    """The baseline loop: build each message, send it over one reused connection."""
    build = naive_builder(sample)
    with smtplib.SMTP(common.LOOPBACK, port) as smtp:
        for number in range(count):
            smtp.send_message(build(number))


def naive_size(sample: Path) -> int:
    build = naive_builder(sample)
    return round(statistics.mean(len(build(n).as_bytes(policy=policy.SMTP)) for n in range(20)))


def timed(args: list[str], **kwargs: object) -> float:
    started = time.perf_counter()
    subprocess.run(args, check=True, **kwargs)  # type: ignore[call-overload]
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contacts", type=int, default=10_000)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--naive-count", type=int, default=2_000, help="mails per naive run")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument(
        "--baseline",
        type=Path,
        metavar="EXECUTABLE",
        help="another invite-mailer executable (e.g. an older release in its own venv), "
        "timed in the same runs, interleaved, for a paired comparison",
    )
    options = parser.parse_args()
    common.require(common.SMTP_SINK, common.SMTP_SOURCE)
    n, p = options.contacts, options.connections
    port = options.port or free_port()

    with tempfile.TemporaryDirectory(prefix="invite-mailer-bench-") as tmp:
        root = Path(tmp)
        workspace = common.make_workspace(root / "ws", n, port=port, connections=p)
        sample, size = invitation_sample(workspace, root / "invitation.eml")
        # smtp-source -F reads lines and sends each with CRLF.
        lf = root / "invitation-lf.eml"
        lf.write_bytes(sample.read_bytes().replace(b"\r\n", b"\n"))
        baseline_size = naive_size(sample)
        source = [
            common.SMTP_SOURCE,
            "-d",
            "-s",
            str(p),
            "-m",
            str(n),
            "-F",
            str(lf),
            "-f",
            SENDER,
            "-t",
            "kontakt@bench.example.org",
            f"{common.LOOPBACK}:{port}",
        ]
        naive = [
            sys.executable,
            __file__,
            "--naive-child",
            str(port),
            str(options.naive_count),
            str(sample),
        ]
        invite = workspace.invoke("send-due", "--now", common.INVITATION_NOW, "--json")
        env = workspace.env()
        rates: dict[str, list[float]] = {"ceiling": [], "naive": [], "invite-mailer": []}
        if options.baseline:
            rates["baseline"] = []
        with common.smtp_sink(port):
            for run in range(options.runs):
                rates["ceiling"].append(n / timed(source, stdout=subprocess.DEVNULL))
                rates["naive"].append(options.naive_count / timed(naive))
                common.reset_state(workspace)
                seconds = timed(invite, env=env, cwd=workspace.root, stdout=subprocess.DEVNULL)
                rates["invite-mailer"].append(n / seconds)
                if options.baseline:
                    common.reset_state(workspace)
                    other = [str(options.baseline), *invite[1:]]
                    seconds = timed(other, env=env, cwd=workspace.root, stdout=subprocess.DEVNULL)
                    rates["baseline"].append(n / seconds)
                print(
                    f"run {run + 1}: " + ", ".join(f"{k} {v[-1]:,.0f}/s" for k, v in rates.items()),
                    flush=True,
                )
    medians = {k: common.median(v) for k, v in rates.items()}
    result = {
        "machine": common.machine(),
        "command": " ".join(["bench/throughput.py", *sys.argv[1:]]),
        "contacts": n,
        "connections": p,
        "runs": options.runs,
        "naive_count": options.naive_count,
        "message_bytes": round(size),
        "naive_message_bytes": baseline_size,
        "rates": rates,
        "median": medians,
        "vs_naive": medians["invite-mailer"] / medians["naive"],
        "of_ceiling": medians["invite-mailer"] / medians["ceiling"],
        **(
            {"vs_baseline": medians["invite-mailer"] / medians["baseline"]}
            if options.baseline
            else {}
        ),
        "targets": {
            "vs_naive >= 5": medians["invite-mailer"] / medians["naive"] >= 5,
            "of_ceiling >= 0.15": medians["invite-mailer"] / medians["ceiling"] >= 0.15,
        },
    }
    path = common.save(f"throughput-p{p}", result)
    shown = ("median", "vs_naive", "of_ceiling", "vs_baseline", "targets")
    summary = {k: result[k] for k in shown if k in result}
    print(json.dumps(summary, indent=2))
    print(f"written to {path}")
    plot(result)


def plot(result: dict[str, object]) -> None:
    """docs/throughput.png: messages per second of the three senders, every run shown."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (pip install -e '.[bench]'): no plot")
        return
    rates: dict[str, list[float]] = result["rates"]  # type: ignore[assignment]
    medians: dict[str, float] = result["median"]  # type: ignore[assignment]
    names = ["naive", "invite-mailer", "ceiling"]
    labels = [
        "naive loop\n(email + smtplib, 1 connection)",
        f"invite-mailer send-due\n({result['connections']} connections)",
        f"smtp-source -d\n({result['connections']} connections)",
    ]
    figure, axes = plt.subplots(figsize=(8, 3.2))
    axes.barh(range(3), [medians[n] for n in names], color=["#9aa5b1", "#1f6f8b", "#52606d"])
    for row, name in enumerate(names):
        axes.plot(rates[name], [row] * len(rates[name]), "k|", markersize=14)
        axes.text(medians[name], row, f"  {medians[name]:,.0f}/s", va="center")
    axes.set_yticks(range(3), labels)
    axes.set_xscale("log")
    axes.set_xlabel("messages per second (median; ticks: single runs), log scale")
    axes.set_title(
        f"{result['contacts']:,} invitations of {result['message_bytes']:,} bytes to smtp-sink"
    )
    axes.set_xlim(right=max(medians.values()) * 4)
    figure.tight_layout()
    path = common.DOCS / "throughput.png"
    figure.savefig(path, dpi=110)
    print(f"plot: {path}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--naive-child":
        naive_loop(int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))
    else:
        main()
