"""A ``send-due`` killed with SIGKILL in the middle of 2,000 mails loses none and resends few.

The ledger claims each mail (``sending``) before it goes to the relay and
records the answer in a batch soon after, never with more than
``limits.max_in_flight`` mails claimed without a recorded answer (by default
twice the connections). So after a hard kill only those mails are in doubt:
``status`` lists them, the next run sends them again, and nothing else
arrives twice.

On both ledgers, but for the test of the state lock (an fcntl lock on the
SQLite file, which PostgreSQL nodes do without).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from invite_mailer.delivery.ledger import state_lock
from invite_mailer.delivery.window import default_size
from support.cli import run_process, start_process, status_json, wait_for
from support.contacts import write_contacts
from support.mails import ORGANISER, duplicates, mails, split
from support.postgres import end_leases, query
from support.project import copy_project, keep_only_first_event, ledger_of, use_state_url
from support.smtp import SmtpServer, smtp_env

CONTACTS = 2000
CONNECTIONS = 4
# The documented bound on mails in doubt after a crash (limits.max_in_flight unset).
IN_FLIGHT = default_size(CONNECTIONS)
NOW = "2024-10-24T10:05"


@pytest.fixture
def project(project: Path) -> Path:
    keep_only_first_event(project / "config")
    write_contacts(
        project / "config" / "contacts.csv",
        (
            (
                f"person{n:04d}@example.org",
                ("Frau", "Herr", "")[n % 3],
                f"Vorname{n}",
                f"Nachname{n}",
                "",
            )
            for n in range(CONTACTS)
        ),
    )
    return project


def descendants(pid: int) -> set[int]:
    """The processes below *pid* (Linux /proc), e.g. the composing workers."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found: set[int] = set()
    todo = [pid]
    while todo:
        current = todo.pop()
        children = {child for child, parent in parents.items() if parent == current}
        todo.extend(children - found)
        found |= children
    return found


def running(pid: int) -> bool:
    """Whether *pid* is still a live process (a zombie waiting to be reaped is not)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[0] != "Z"


def sent_in_ledger(project: Path) -> set[str]:
    rows = query(
        ledger_of(project),
        "SELECT email FROM deliveries WHERE kind = 'invitation' AND state = 'sent'",
    )
    return {row[0] for row in rows}


def kill_when(process: subprocess.Popen[str], condition: Callable[[], bool], what: str) -> set[int]:
    """SIGKILL *process* as soon as *condition* holds; it must still be running then.

    Returns the processes it had started (the composing workers), once they ended too.
    """
    try:
        wait_for(lambda: condition() or process.poll() is not None, timeout=60, what=what)
        assert process.poll() is None, f"send-due finished before {what}"
        helpers = descendants(process.pid)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        assert process.stdout is not None
        process.stdout.close()
    assert process.returncode == -signal.SIGKILL
    wait_for(
        lambda: not any(running(pid) for pid in helpers),
        timeout=15,
        what=f"the worker processes {sorted(helpers)} to end after the kill",
    )
    return helpers


@pytest.mark.both_ledgers
@pytest.mark.slow
def test_sigkill_mid_run_loses_nothing_and_resends_only_the_mails_in_flight(
    project: Path, smtp_server: SmtpServer
) -> None:
    everyone = {f"person{n:04d}@example.org" for n in range(CONTACTS)}
    smtp_server.behaviour.data_delay = 0.003
    # A composing worker on (the default is none): it must not outlive the kill.
    env = smtp_env(smtp_server.port, smtp__max_connections=CONNECTIONS, limits__compose_workers=1)
    kill_after = random.Random(20241114).randint(200, CONTACTS - 400)

    process = start_process(["send-due", "--now", NOW], env, project, stderr=project / "first.log")
    helpers = kill_when(
        process, lambda: len(smtp_server.received) >= kill_after, f"{kill_after} mails to arrive"
    )
    if Path("/proc/self/stat").exists():
        # 2,000 mails: a worker process composed ahead; it did not outlive us.
        assert helpers, "send-due started no worker process"
    wait_for(
        lambda: smtp_server.open_connections == 0, timeout=5, what="the server to see the kill"
    )
    first = [m.to for m in split(mails(smtp_server.received))[0]]
    assert not duplicates(first)
    assert kill_after <= len(first) < CONTACTS

    # Only the mails in flight are in doubt, and status says which.
    status = status_json(env, "--now", NOW)
    uncertain = {d["email"] for d in status["uncertain"]}
    assert len(uncertain) <= IN_FLIGHT, status["uncertain"]
    assert all(d["state"] == "sending" for d in status["uncertain"])
    sent = sent_in_ledger(project)
    # Whatever the ledger calls sent did arrive; whatever arrived without being
    # recorded as sent is one of the uncertain ones.
    assert sent <= set(first)
    assert set(first) - sent <= uncertain
    invitation = next(m for m in status["mailings"] if m["id"] == "invitation:series")
    assert invitation["sent"] == len(sent)

    end_leases(ledger_of(project))  # the killed run beats no more
    second = run_process(["send-due", "--now", NOW], env, project)
    assert second.returncode == 0, second.stderr
    for address in uncertain:
        assert f"to {address} was in flight" in second.stderr
    assert f"{CONTACTS - len(sent)} sent (+1 report to the organiser), 0 failed" in second.stdout, (
        second.stdout
    )

    to_contacts, summaries = split(mails(smtp_server.received))
    got = [m.to for m in to_contacts]
    assert set(got) == everyone
    twice = duplicates(got)
    assert set(twice) <= uncertain and all(n == 2 for n in twice.values())
    assert [s.to for s in summaries] == [ORGANISER]
    # A mail sent again is the same mail: same Message-ID.
    for address in twice:
        assert len({m.message_id for m in to_contacts if m.to == address}) == 1

    after = status_json(env, "--now", NOW)
    assert after["uncertain"] == [] and after["failed"] == []
    invitation = next(m for m in after["mailings"] if m["id"] == "invitation:series")
    assert (invitation["sent"], invitation["outstanding"]) == (CONTACTS, 0)


@pytest.mark.both_ledgers
@pytest.mark.slow
def test_two_send_due_runs_at_once_never_send_a_mail_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, smtp_server: SmtpServer, state_url: str | None
) -> None:
    copy_project(tmp_path)
    if state_url is not None:
        use_state_url(tmp_path, state_url)
    monkeypatch.chdir(tmp_path)
    # Slow enough that the two runs overlap: 12 mails on 4 connections take over a second.
    smtp_server.behaviour.data_delay = 0.4
    env = smtp_env(smtp_server.port)
    runs = [start_process(["send-due", "--now", NOW, "--json"], env, tmp_path) for _ in range(2)]
    outputs = [run.communicate(timeout=60) for run in runs]
    codes = sorted(run.returncode for run in runs)

    got, summaries = split(mails(smtp_server.received))
    assert len(got) == 12 and not duplicates(m.to for m in got)
    if state_url is not None:
        # PostgreSQL: two nodes share the ledger and the mailing, row by row.
        assert codes == [0, 0], outputs
        assert sum(json.loads(out)["sent"] for out, _ in outputs) == 12
        # The run that finished last found the other's part in the ledger.
        assert len(summaries) == 1
        again = run_process(["send-due", "--now", NOW], env, tmp_path)
        assert again.returncode == 0, again.stderr
        assert len(split(mails(smtp_server.received))[1]) == 1
        return
    assert len(summaries) == 1
    if codes == [0, 1]:
        # The second one saw the first at work and said so.
        (stderr,) = [
            err for (_, err), run in zip(outputs, runs, strict=True) if run.returncode == 1
        ]
        assert "another invite-mailer" in stderr and "state database" in stderr, stderr
    else:
        # The machine was too slow to overlap them: the second found nothing to do.
        assert codes == [0, 0], outputs
        assert sorted(json.loads(out)["sent"] for out, _ in outputs) == [0, 12]


@pytest.mark.slow
def test_send_due_while_another_process_holds_the_state_refuses_and_sends_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, smtp_server: SmtpServer
) -> None:
    copy_project(tmp_path)
    monkeypatch.chdir(tmp_path)
    env = smtp_env(smtp_server.port)
    database = tmp_path / "state" / "invite-mailer.db"
    with state_lock(database):  # as a running daemon holds it
        blocked = run_process(["send-due", "--now", NOW], env, tmp_path)
    assert blocked.returncode == 1
    assert "another invite-mailer" in blocked.stderr
    assert f"(process {os.getpid()})" in blocked.stderr
    assert smtp_server.received == []
    assert not database.exists()

    after = run_process(["send-due", "--now", NOW], env, tmp_path)
    assert after.returncode == 0, after.stderr
    assert "12 sent" in after.stdout


KILLS = 10


def in_doubt_in_ledger(project: Path) -> dict[str, str]:
    """Email → state of every invitation a crash left in doubt (as status reads them)."""
    rows = query(
        ledger_of(project),
        "SELECT email, state FROM deliveries WHERE kind = 'invitation' "
        "AND state IN ('sending', 'uncertain')",
    )
    return dict(rows)


@pytest.mark.both_ledgers
@pytest.mark.slow
def test_sigkill_at_random_moments_loses_nothing_and_resends_within_the_bound(
    project: Path, smtp_server: SmtpServer
) -> None:
    # Random moments, reproducible: the seed is printed (shown on failure) and
    # CRASH_TEST_SEED=<seed> replays a run.
    seed = int(os.environ.get("CRASH_TEST_SEED") or random.randrange(2**32))
    print(f"CRASH_TEST_SEED={seed}")
    rng = random.Random(seed)
    everyone = {f"person{n:04d}@example.org" for n in range(CONTACTS)}
    smtp_server.behaviour.data_delay = 0.001
    # One process: the kills land anywhere, the start-up included, and the
    # subject here is the ledger (the composing worker's end after a kill is
    # the single-kill test's).
    env = smtp_env(smtp_server.port, smtp__max_connections=CONNECTIONS, limits__compose_workers=0)

    def arrived() -> list[str]:
        return [m.to for m in split(mails(smtp_server.received))[0]]

    in_doubt: list[set[str]] = []  # after each kill, what status listed as uncertain
    claimed: list[set[str]] = []  # ... and of those, what the killed run had claimed
    for kill in range(KILLS):
        before = len(smtp_server.received)
        # Anywhere from the first mails of a run to well into it; ten kills
        # stay within the 2,000 mails, so each lands mid-pass.
        after = rng.randint(1, 150)
        log = project / f"run{kill}.log"  # cut off by the kill; kept for a failure's reader
        process = start_process(["send-due", "--now", NOW], env, project, stderr=log)
        kill_when(
            process,
            lambda target=before + after: len(smtp_server.received) >= target,
            f"kill {kill + 1} of {KILLS} after {after} more mails (seed {seed})",
        )
        wait_for(
            lambda: smtp_server.open_connections == 0, timeout=5, what="the server to see the kill"
        )
        # Before any rerun, status lists exactly the mails in doubt: those the
        # killed run had claimed (within the bound), and those its predecessor
        # left in doubt that it had not come to yet.
        status = status_json(env, "--now", NOW)
        listed = {d["email"] for d in status["uncertain"]}
        rows = in_doubt_in_ledger(project)
        assert listed == set(rows), (seed, kill)
        sending = {email for email, state in rows.items() if state == "sending"}
        assert len(sending) <= IN_FLIGHT, (seed, kill, status["uncertain"])
        assert listed - sending <= (in_doubt[-1] if in_doubt else set()), (seed, kill)
        # Whatever arrived without being recorded as sent is among them.
        got, sent = set(arrived()), sent_in_ledger(project)
        assert sent <= got, (seed, kill)
        assert got - sent <= listed, (seed, kill)
        assert len(got) < CONTACTS, f"kill {kill + 1} came after the last mail (seed {seed})"
        in_doubt.append(listed)
        claimed.append(sending)
        end_leases(ledger_of(project))  # the killed run beats no more

    final = run_process(["send-due", "--now", NOW], env, project)
    assert final.returncode == 0, final.stderr
    # The last run reports what the last kill left in flight, and sends it again.
    for address in claimed[-1]:
        assert f"to {address} was in flight" in final.stderr

    got = arrived()
    assert set(got) == everyone, f"lost {sorted(everyone - set(got))[:5]} (seed {seed})"
    # Only mails a killed run had claimed came twice, once more per such kill
    # at most: at most IN_FLIGHT duplicates per kill.
    twice = duplicates(got)
    for address, count in twice.items():
        kills_in_flight = sum(address in sending for sending in claimed)
        assert count - 1 <= kills_in_flight, (seed, address, count)
    assert sum(n - 1 for n in twice.values()) <= sum(len(sending) for sending in claimed)
    print(f"{len(twice)} mail(s) arrived twice after {KILLS} kills: {sorted(twice)}")
    to_contacts, summaries = split(mails(smtp_server.received))
    assert [s.to for s in summaries] == [ORGANISER]
    for address in twice:  # a mail sent again is the same mail
        assert len({m.message_id for m in to_contacts if m.to == address}) == 1

    after = status_json(env, "--now", NOW)
    assert after["uncertain"] == [] and after["failed"] == []
    invitation = next(m for m in after["mailings"] if m["id"] == "invitation:series")
    assert (invitation["sent"], invitation["outstanding"]) == (CONTACTS, 0)
