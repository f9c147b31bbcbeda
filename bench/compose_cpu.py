"""CPU time per mail of the composer: compiled shapes against rendering per recipient.

Both build the exact wire bytes of the shipped mailings for generated
contacts, in this one process (no SMTP, no ledger): ``shapes`` is
``WireComposer`` as it is (each shape rendered once, the recipients' values
filled in); ``per-recipient`` is the same composer with the shapes switched
off, so every mail is rendered by Jinja, its CSS inlined and its text tidied
(the way mails were composed before shapes). The two alternate in blocks of
500 mails so that drift of a shared machine hits both alike; the figure is
the median block, the spread the lowest and highest. Usage::

    .venv/bin/python bench/compose_cpu.py              # 10,000 mails per way
    .venv/bin/python bench/compose_cpu.py --mails 2000
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import common

from invite_mailer.cli.commands import parse_now
from invite_mailer.core.plan import request_for
from invite_mailer.inputs.config import load_config
from invite_mailer.mail.compose import Composer
from invite_mailer.mail.fastwire import WireComposer
from invite_mailer.mail.slots import Analysis
from support.project import shipped_environment

BLOCK = 500
MAILINGS = (("invitation", "", "2024-10-24T10:05"), ("reminder", "allianzen", "2024-11-27T14:00"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mails", type=int, default=10_000, help="mails per way")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, shipped_environment():
        workspace = common.make_workspace(Path(tmp), args.mails, transport="outbox")
        config = load_config(workspace.config, workspace.templates, env_file=None)
        requests = []
        for kind, event_id, now in MAILINGS:
            event = config.series.event(event_id) if event_id else None
            moment = parse_now(now, config)
            for contact in config.contacts.contacts:
                requests.append(request_for(kind, event, contact, moment, attendance={}))
        requests = requests[: args.mails]
        ways = {"shapes": WireComposer(Composer.from_config(config))}
        per_recipient = WireComposer(Composer.from_config(config))
        per_recipient.shapes.analysis = Analysis(frozenset(), "switched off for the comparison")
        ways["per-recipient"] = per_recipient
        blocks: dict[str, list[float]] = {name: [] for name in ways}
        for start in range(0, len(requests), BLOCK):
            chunk = requests[start : start + BLOCK]
            for name, wires in ways.items():
                began = time.process_time()
                for request in chunk:
                    wires.wire_for(request)
                blocks[name].append((time.process_time() - began) / len(chunk) * 1000)
        for name, times in blocks.items():
            counts = dict(ways[name].counts)
            print(
                f"{name:<14} {statistics.median(times):.3f} ms CPU per mail "
                f"(blocks of {BLOCK}: {min(times):.3f}–{max(times):.3f}) {counts}"
            )


if __name__ == "__main__":
    main()
