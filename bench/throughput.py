"""Messages per second: smtp-source, a naive Python loop, nodemailer and send-due.

Every contender sends to one Postfix ``smtp-sink`` on 127.0.0.1 (it accepts and
discards), in one run, in rounds; within a round the contenders run one after
the other, and the order alternates from round to round (forward, backward),
so that drift of a shared machine hits all alike. After each contender the
sink's own message counter must have grown by exactly what that contender
claims to have sent, or the run stops.

smtp-source
    ``smtp-source -d -s P -m N -F invitation.eml``: Postfix's own C test
    client, P reused connections, sending one invitation exactly as
    invite-mailer composes it N times. It builds nothing: the ceiling.
naive
    a plain Python loop (``naive_loop`` below, in its own interpreter): per
    contact the message built with the standard ``email`` package (the same
    text, HTML and four calendar files, the salutation put in with
    ``str.format``), sent with ``smtplib`` over one reused connection.
nodemailer
    ``bench/nodemailer_send.js``: what a Node user picks, nodemailer with a
    pooled transport of P connections, each message built anew by
    ``transporter.sendMail`` (nodemailer's MailComposer) from the invitation's
    subject, headers, text part, HTML part and four calendar files, only the
    recipient changed per message. nodemailer is installed by this script into
    ``bench/.cache/`` (``npm install --no-save``), never into the repository.
send-due
    ``invite-mailer send-due`` of the invitation to N generated contacts with
    the shipped ``config/settings.toml``: default connections (P), no
    composing workers, the organiser's summary on; only transport, host, port
    and TLS are set through ``INVITE_MAILER_*`` variables. Each shape of the
    invitation rendered once and the recipient's values filled in, MIME,
    calendar files, the ledger written for every mail. Its rate counts the
    invitations only (not the summary).

The sample invitation is written by ``invite-mailer preview invitation``; the
mean size of invite-mailer's mails comes from an outbox run of 200 contacts.
Each rate is messages divided by the wall time of the whole command (start-up
included). Usage::

    .venv/bin/python bench/throughput.py                  # N=10000, 3 rounds
    .venv/bin/python bench/throughput.py --contacts 2000 --rounds 2
    .venv/bin/python bench/throughput.py --baseline OTHER-VENV/bin/invite-mailer
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import smtplib
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from email import message_from_bytes, policy
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from pathlib import Path
from typing import Any

import common

SENDER = "transferreihe@example.org"
BENCH = Path(__file__).resolve().parent
NODE_DRIVER = BENCH / "nodemailer_send.js"
NODE_CACHE = BENCH / ".cache" / "node"
NODEMAILER = "nodemailer@10.6.1"
# The targets: send-due's rate over each other contender's, at least.
TARGETS = {"smtp-source": 0.40, "naive": 10.0, "nodemailer": 4.0}
# Headers nodemailer writes itself from the fields it is given.
STRUCTURAL = {
    "from",
    "to",
    "reply-to",
    "subject",
    "date",
    "message-id",
    "mime-version",
    "content-type",
    "content-transfer-encoding",
}


# --- the mail every contender sends ------------------------------------------------------


def preview_invitation(workspace: common.Workspace, out: Path) -> Path:
    """The invitation as invite-mailer sends it, written by its own ``preview`` command."""
    args = workspace.invoke("preview", "invitation", "--now", common.INVITATION_NOW)
    subprocess.run(
        [*args, "--out", str(out)],
        env=workspace.env(),
        cwd=workspace.root,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    (eml,) = sorted(out.glob("*.eml"))
    return eml


def outbox_mean_size(root: Path, count: int = 200) -> float:
    """Mean size of invite-mailer's invitations to *count* contacts, from an outbox run."""
    workspace = common.make_default_workspace(root, count, port=1)
    env = {**workspace.env(), "INVITE_MAILER_TRANSPORT__KIND": "outbox"}
    args = workspace.invoke("send-due", "--now", common.INVITATION_NOW, "--json")
    subprocess.run(args, env=env, cwd=workspace.root, check=True, stdout=subprocess.DEVNULL)
    mails = [p.read_bytes() for p in (workspace.root / "outbox").rglob("*.eml")]
    # The organiser's summary lands there too; only the invitations count.
    sizes = [len(mail) for mail in mails if b"\nX-Invite-Mailer-Kind: invitation\r" in mail]
    if len(sizes) != count:
        raise SystemExit(f"outbox run wrote {len(sizes)} invitations, expected {count}")
    return statistics.mean(sizes)


def parts(sample: Path) -> tuple[EmailMessage, str, str, list[EmailMessage]]:
    """The sample's message, text part, HTML part and calendar attachments."""
    message = message_from_bytes(sample.read_bytes(), policy=policy.default)
    assert isinstance(message, EmailMessage)
    text_part = message.get_body(("plain",))
    html_part = message.get_body(("html",))
    assert isinstance(text_part, EmailMessage) and isinstance(html_part, EmailMessage)
    calendars = [
        part
        for part in message.iter_attachments()
        if isinstance(part, EmailMessage) and part.get_content_type() == "text/calendar"
    ]
    return message, text_part.get_content(), html_part.get_content(), calendars


def nodemailer_spec(sample: Path, out: Path) -> Path:
    """The sample taken apart as JSON for ``nodemailer_send.js``."""
    message, text, html, calendars = parts(sample)
    to = message["To"].addresses[0]
    spec = {
        "from": str(message["From"]),
        "to_name": to.display_name,
        "reply_to": str(message["Reply-To"]),
        "subject": str(message["Subject"]),
        "text": text,
        "html": html,
        "headers": {k: str(v) for k, v in message.items() if k.lower() not in STRUCTURAL},
        "attachments": [
            {
                "filename": part.get_filename(),
                "content": part.get_content(),
                "content_type": part["Content-Type"],
            }
            for part in calendars
        ],
    }
    if len(spec["attachments"]) != 4:
        raise SystemExit(f"the sample invitation has {len(calendars)} calendar files, not 4")
    out.write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    return out


def install_nodemailer(package: str) -> dict[str, str]:
    """nodemailer in the gitignored cache folder; the environment that finds it."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        raise SystemExit("node and npm are needed for the nodemailer contender")
    NODE_CACHE.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["npm", "install", "--no-save", "--no-audit", "--no-fund", "--prefix", str(NODE_CACHE)]
        + [package],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return {**os.environ, "NODE_PATH": str(NODE_CACHE / "node_modules")}


def node_version(env: dict[str, str]) -> str:
    script = (
        "process.stdout.write(process.version + ' nodemailer ' + "
        "require('nodemailer/package.json').version)"
    )
    return subprocess.run(
        ["node", "-e", script], env=env, capture_output=True, text=True, check=True
    ).stdout


# --- the naive loop ----------------------------------------------------------------------


def naive_builder(sample: Path) -> Callable[[int], EmailMessage]:
    """The baseline's message: what one would write with the standard library alone.

    Text, HTML and calendar files come from invite-mailer's own invitation,
    with the salutation filled in by ``str.format``.
    """
    reference, text, html, calendar_parts = parts(sample)
    first_line = text.splitlines()[0]

    def template(body: str) -> str:
        body = body.replace(first_line, "\0", 1).replace("{", "{{").replace("}", "}}")
        return body.replace("\0", "{salutation}")

    text, html = template(text), template(html)
    calendars = [(part.get_filename(), part.get_content()) for part in calendar_parts]
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


# --- contenders --------------------------------------------------------------------------


@dataclass(frozen=True)
class Contender:
    """One way of sending: its command, how many mails it sends, how to check its claim."""

    name: str
    args: list[str]
    messages: int  # the mails its rate is counted on
    env: dict[str, str] | None = None
    cwd: Path | None = None
    before: Callable[[], None] | None = None
    # From its stdout: how many messages the sink must have received.
    claimed: Callable[[str], int] | None = None


def node_claim(stdout: str) -> int:
    """The driver's own count of recipients its relay accepted."""
    return int(json.loads(stdout)["sent"])


def children_cpu() -> float:
    """CPU seconds of every finished child process and their descendants so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_contender(contender: Contender, sink: common.Sink) -> tuple[float, float]:
    """Wall time and CPU time of one run; stops if the sink did not receive its mails.

    CPU time is the contender's processes together (a composing worker
    included), as the kernel accounts them: less sensitive than wall time to
    other work on the machine.
    """
    if contender.before:
        contender.before()
    received = sink.received()
    cpu = children_cpu()
    started = time.perf_counter()
    done = subprocess.run(
        contender.args,
        env=contender.env,
        cwd=contender.cwd,
        capture_output=True,
        text=True,
        check=False,
    )
    seconds = time.perf_counter() - started
    cpu = children_cpu() - cpu
    if done.returncode != 0:
        raise SystemExit(f"{contender.name} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    expected = contender.claimed(done.stdout) if contender.claimed else contender.messages
    # The last counter line is written when the final "." arrives, before the reply.
    got = sink.received() - received
    if got != expected:
        raise SystemExit(f"{contender.name}: smtp-sink received {got} messages, not {expected}")
    return seconds, cpu


def contenders(
    options: argparse.Namespace, root: Path, port: int, connections: int
) -> tuple[list[Contender], dict[str, Any]]:
    """Every contender of this run, and what describes their mails."""
    n = options.contacts
    workspace = common.make_default_workspace(root / "ws", n, port=port)
    sample = preview_invitation(workspace, root / "preview")
    # smtp-source -F reads lines and sends each with CRLF.
    lf = root / "invitation-lf.eml"
    lf.write_bytes(sample.read_bytes().replace(b"\r\n", b"\n"))
    node_env = install_nodemailer(options.nodemailer)
    spec = nodemailer_spec(sample, root / "invitation.json")
    node_bytes = json.loads(
        subprocess.run(
            ["node", str(NODE_DRIVER), "size", str(spec)],
            env=node_env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )["bytes"]
    source = [common.SMTP_SOURCE, "-d", "-s", str(connections), "-m", str(n), "-F", str(lf)]
    source += ["-f", SENDER, "-t", "kontakt@bench.example.org", f"{common.LOOPBACK}:{port}"]
    naive = [sys.executable, __file__, "--naive-child", str(port), str(options.naive_count)]
    node = ["node", str(NODE_DRIVER), "send", str(spec), str(port)]
    node += [str(options.nodemailer_count), str(connections)]
    invite = workspace.invoke("send-due", "--now", common.INVITATION_NOW, "--json")
    env = workspace.env()
    if options.connections is not None:
        env["INVITE_MAILER_SMTP__MAX_CONNECTIONS"] = str(connections)

    def reset() -> None:
        common.reset_state(workspace)

    claim = common.send_due_claim(n)
    found = [
        Contender("smtp-source", source, n),
        Contender("naive", [*naive, str(sample)], options.naive_count),
        Contender("nodemailer", node, options.nodemailer_count, node_env, claimed=node_claim),
        Contender("send-due", invite, n, env, workspace.root, reset, claim),
    ]
    if options.baseline:
        other = [str(options.baseline), *invite[1:]]
        found.append(Contender("baseline", other, n, env, workspace.root, reset, claim))
    sizes = {
        "message_bytes": round(outbox_mean_size(root / "sizes")),
        "sample_bytes": sample.stat().st_size,
        "naive_message_bytes": naive_size(sample),
        "nodemailer_message_bytes": node_bytes,
        "node": node_version(node_env),
    }
    return found, sizes


# --- figures -----------------------------------------------------------------------------


def spread(values: list[float]) -> dict[str, float]:
    return {"median": common.median(values), "min": min(values), "max": max(values)}


def ratios(rates: dict[str, list[float]], rounds: int) -> dict[str, Any]:
    """send-due over every other contender: per round, and median over median."""
    ours = rates["send-due"]
    out: dict[str, Any] = {}
    for name, theirs in rates.items():
        if name == "send-due":
            continue
        per_round = [ours[r] / theirs[r] for r in range(rounds)]
        out[name] = {
            "per_round": per_round,
            "of_medians": common.median(ours) / common.median(theirs),
            **{f"round_{k}": v for k, v in spread(per_round).items()},
        }
    return out


def targets(ratio: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, decided on the ratio of medians; the worst round beside it."""
    return [
        {
            "against": name,
            "at_least": limit,
            "measured": ratio[name]["of_medians"],
            "worst_round": ratio[name]["round_min"],
            "met": ratio[name]["of_medians"] >= limit,
            "met_every_round": ratio[name]["round_min"] >= limit,
        }
        for name, limit in TARGETS.items()
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contacts", type=int, default=10_000, help="N: send-due, smtp-source")
    parser.add_argument("--rounds", "--runs", dest="rounds", type=int, default=3)
    parser.add_argument("--naive-count", type=int, default=2_000, help="mails per naive run")
    parser.add_argument("--nodemailer-count", type=int, help="mails per nodemailer run (N)")
    parser.add_argument("--nodemailer", default=NODEMAILER, help="npm package spec to install")
    parser.add_argument(
        "--connections",
        type=int,
        help="parallel connections for all (default: send-due's shipped default)",
    )
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument(
        "--baseline",
        type=Path,
        metavar="EXECUTABLE",
        help="another invite-mailer executable (e.g. an older build in its own venv), "
        "timed in the same rounds, interleaved, for a paired comparison",
    )
    options = parser.parse_args()
    options.nodemailer_count = options.nodemailer_count or options.contacts
    # Imported here: the naive loop's interpreter (this file too) needs none of it.
    from support.smtp import free_port

    common.require(common.SMTP_SINK, common.SMTP_SOURCE)
    connections = options.connections or int(str(common.shipped_setting("smtp", "max_connections")))
    port = options.port or free_port()

    with tempfile.TemporaryDirectory(prefix="invite-mailer-bench-") as tmp:
        found, sizes = contenders(options, Path(tmp), port, connections)
        rates: dict[str, list[float]] = {c.name: [] for c in found}
        cpu_ms: dict[str, list[float]] = {c.name: [] for c in found}
        orders: list[list[str]] = []
        loads: list[list[float]] = []
        with common.smtp_sink(port) as sink:
            for round_ in range(options.rounds):
                order = found if round_ % 2 == 0 else found[::-1]
                orders.append([c.name for c in order])
                before = os.getloadavg()[0]
                for contender in order:
                    seconds, cpu = run_contender(contender, sink)
                    rates[contender.name].append(contender.messages / seconds)
                    cpu_ms[contender.name].append(1000 * cpu / contender.messages)
                # Other work on the machine: a 1-minute load above the core count slows all.
                loads.append([round(before, 2), round(os.getloadavg()[0], 2)])
                mine = rates["send-due"][-1]
                others = [(k, v[-1]) for k, v in rates.items() if k != "send-due"]
                print(
                    f"round {round_ + 1}: "
                    + ", ".join(f"{c.name} {rates[c.name][-1]:,.0f}/s" for c in order)
                    + " | send-due ÷ "
                    + ", ".join(f"{k} {mine / v:.2f}" for k, v in others),
                    flush=True,
                )
    ratio = ratios(rates, options.rounds)
    result = {
        "machine": common.machine(),
        "command": common.public_command("bench/throughput.py", sys.argv[1:]),
        "contacts": options.contacts,
        "connections": connections,
        "connections_default": options.connections is None,
        "rounds": options.rounds,
        "orders": orders,
        "load_1min": loads,
        "counts": {c.name: c.messages for c in found},
        **sizes,
        "rates": rates,
        "spread": {k: spread(v) for k, v in rates.items()},
        "cpu_ms_per_mail": cpu_ms,
        "ratios": ratio,
        "targets": targets(ratio),
    }
    if options.baseline:
        result["baseline_version"] = common.version_of(options.baseline)
    name = "throughput" if options.connections is None else f"throughput-p{connections}"
    path = common.save(name, result)
    print(json.dumps({k: result[k] for k in ("spread", "targets")}, indent=2))
    print(f"written to {path}")
    plot(result)


def plot(result: dict[str, Any]) -> None:
    """docs/throughput.png: messages per second of every contender, every round shown."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (pip install -e '.[bench]'): no plot")
        return
    rates: dict[str, list[float]] = result["rates"]
    p = result["connections"]
    labels = {
        "naive": "naive loop\n(email + smtplib, 1 connection)",
        "nodemailer": f"nodemailer\n(pool, {p} connections)",
        "baseline": f"baseline send-due\n({p} connections)",
        "send-due": f"invite-mailer send-due\n(defaults, {p} connections)",
        "smtp-source": f"smtp-source -d\n({p} connections)",
    }
    names = [n for n in labels if n in rates]
    medians = [common.median(rates[n]) for n in names]
    figure, axes = plt.subplots(figsize=(8, 0.8 + 0.8 * len(names)))
    colours = {"send-due": "#1f6f8b", "smtp-source": "#52606d"}
    axes.barh(range(len(names)), medians, color=[colours.get(n, "#9aa5b1") for n in names])
    for row, name in enumerate(names):
        axes.plot(rates[name], [row] * len(rates[name]), "k|", markersize=14)
        axes.text(medians[row], row, f"  {medians[row]:,.0f}/s", va="center")
    axes.set_yticks(range(len(names)), [labels[n] for n in names])
    axes.set_xscale("log")
    axes.set_xlabel("messages per second (median; ticks: single rounds), log scale")
    axes.set_title(
        f"{result['contacts']:,} invitations of {result['message_bytes']:,} bytes to smtp-sink"
    )
    axes.set_xlim(right=max(medians) * 4)
    figure.tight_layout()
    path = common.DOCS / "throughput.png"
    figure.savefig(path, dpi=110)
    print(f"plot: {path}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--naive-child":
        naive_loop(int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))
    else:
        main()
