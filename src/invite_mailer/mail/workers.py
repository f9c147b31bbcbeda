"""Composing ahead: the mails of a delivery pass built in further processes.

Off by default (``limits.compose_workers = 0``): rendering each mail shape
once made composing cheap, and a worker costs some 70 MB for what speed it
adds (measured in ``docs/benchmarks.md``). When it is
on, :class:`WirePipeline` runs a
:class:`~invite_mailer.mail.fastwire.WireComposer` in worker processes,
chunks of mails ahead of the senders, and checks their results against its
own before it uses them; without workers it composes in this process.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import multiprocessing
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from datetime import datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any

from invite_mailer.core.plan import MailRequest
from invite_mailer.inputs.config import Config
from invite_mailer.inputs.contacts import Contact
from invite_mailer.inputs.series import Event, Kind, Series
from invite_mailer.inputs.settings import Settings
from invite_mailer.mail.compose import Composer
from invite_mailer.mail.fastwire import FAST_KINDS, WireComposer
from invite_mailer.mail.mime import Wire, crlf_checked

log = logging.getLogger(__name__)

__all__ = ["MIN_PIPELINE", "Job", "WirePipeline", "pipeline"]


@dataclass(frozen=True, slots=True)
class Job:
    """One mail a pass is going to send, in the order the senders take them."""

    kind: str
    event: str  # "" for mails about the whole series
    contact: Contact
    attended: bool | None = None


def _pack(contact: Contact) -> tuple[Any, ...]:
    # Contacts hold a read-only mapping, which pickle refuses; a dict travels.
    return tuple(
        dict(value) if isinstance(value, MappingProxyType) else value
        for value in (getattr(contact, f.name) for f in fields(Contact) if f.init)
    )


def _unpack(values: tuple[Any, ...]) -> Contact:
    contact = Contact(*values)
    if isinstance(contact.extra, dict):
        contact = replace(contact, extra=MappingProxyType(contact.extra))
    return contact


_worker: WireComposer | None = None


def _start_worker(
    parent: int, settings: Settings, series: Series, templates_dir: Path, config_dir: Path
) -> None:
    """Initialiser of a worker process: the same composer as the parent's.

    *parent* is the pid the parent had when it started the pool, not
    ``os.getppid()`` read here: a parent killed while this process was still
    starting would already have been replaced by init, and the worker would
    follow init forever.
    """
    import signal

    # Ctrl-C and SIGTERM are for the parent, which finishes and then ends us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _follow_parent(parent)
    global _worker
    composer = Composer.load(settings, series, templates_dir=templates_dir, config_dir=config_dir)
    _worker = WireComposer(composer)


def _follow_parent(parent: int, interval: float = 1.0) -> None:
    """End this worker once *parent* is gone.

    A parent killed outright (SIGKILL, the out-of-memory killer) cannot shut
    its pool down, and a worker blocked on its queue would wait forever. The
    worker is re-parented when its parent dies, so a changed parent id tells.
    """

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval)
        os._exit(0)

    threading.Thread(target=watch, name="follow-parent", daemon=True).start()


def _ready() -> bool:
    return _worker is not None


def _compose_chunk(
    jobs: list[tuple[str, str, tuple[Any, ...], bool | None]],
    now: datetime,
    sequences: dict[str, int],
) -> tuple[list[Wire | None], list[str]]:
    """Runs in the worker: the wires of *jobs*, None where composing failed."""
    assert _worker is not None
    series = _worker.composer.series
    wires: list[Wire | None] = []
    for kind, event_id, packed, attended in jobs:
        try:
            event = series.event(event_id) if event_id else None
            wire = _worker.wire(
                kind,
                _unpack(packed),
                event=event,
                now=now,
                attended=attended,
                sequences=sequences,
            )
            # Checked here, in the less busy process (see mime.CrlfBytes).
            wires.append(Wire(wire.message_id, crlf_checked(wire.data)))
        except Exception:  # the parent composes it again and reports the error
            wires.append(None)
    notes, _worker.notes[:] = list(_worker.notes), []
    return wires, notes


class WirePipeline:
    """Composes the mails of a pass in worker processes, ahead of the senders.

    The dispatcher's senders take the mails in the order of *jobs*; the pipeline
    hands chunks of the upcoming ones to the workers and keeps a few chunks
    ahead, so that a sender finds its mail composed. Until the workers are up,
    and for anything not prepared (a retry, a mail skipped ahead to), the mail
    is composed in this process, the same fast way. The first prepared mail of
    each kind and date is compared with this process's own result before any
    is used: a worker that composes differently (a template edited on disk
    since the config was loaded) switches the pipeline off.

    With ``processes=0`` everything is composed in this process.
    """

    CHUNK = 32
    AHEAD = 6  # chunks

    def __init__(
        self,
        composer: Composer,
        jobs: Sequence[Job],
        *,
        sequences: Mapping[str, int],
        clock: Callable[[], datetime],
        settings: Settings,
        config_dir: Path,
        templates_dir: Path,
        processes: int = 1,
    ) -> None:
        self.local = WireComposer(composer)
        self._jobs = list(jobs)
        # Per (kind, date), then per contact key: no tuple per mail to keep.
        self._index: dict[tuple[str, str], dict[str, int]] = {}
        for n, job in enumerate(self._jobs):
            self._index.setdefault((job.kind, job.event), {})[job.contact.key] = n
        self._sequences = dict(sequences)
        self._clock = clock
        self._cursor = -1
        self._moved = asyncio.Event()
        self._chunks: dict[int, asyncio.Future[tuple[datetime, list[Wire | None]]]] = {}
        self._checked: set[tuple[str, str]] = set()
        self._disabled = processes < 1
        self.prepared = 0  # mails taken from the workers
        self.started = asyncio.Event()  # set once the workers take chunks
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None
        self._feeder: asyncio.Task[None] | None = None
        if processes >= 1:
            self._pool = concurrent.futures.ProcessPoolExecutor(
                max_workers=processes,
                # Not fork: this process has threads (the ledger's), and a
                # forked copy of a thread's lock can deadlock.
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_start_worker,
                initargs=(os.getpid(), settings, composer.series, templates_dir, config_dir),
            )
            self._feeder = asyncio.create_task(self._feed())

    async def wire(
        self,
        kind: Kind | str,
        contact: Contact,
        *,
        event: Event | None,
        now: datetime,
        attended: bool | None = None,
        sequences: Mapping[str, int] | None = None,
        previous: Mapping[str, str] | None = None,
    ) -> Wire:
        """Like :meth:`WireComposer.wire`, from the workers when they have it."""
        request = MailRequest(str(kind), contact, event, now, attended, sequences or {}, previous)
        return await self.wire_for(request)

    async def wire_for(self, request: MailRequest) -> Wire:
        """Like :meth:`WireComposer.wire_for`, from the workers when they have it."""
        found = None
        if not self._disabled and request.previous is None:
            found = await self._prepared(request)
        if found is None:
            return self.local.wire_for(request)
        self.prepared += 1
        return found

    async def _prepared(self, request: MailRequest) -> Wire | None:
        kind, contact, event = request.kind, request.contact, request.event
        index = self._index.get((kind, event.id if event else ""), {}).get(contact.key)
        if index is None:
            return None
        job = self._jobs[index]
        if (
            job.contact != contact
            or job.attended != request.attended
            or dict(request.sequences) != self._sequences
        ):
            return None  # not the mail that was prepared (e.g. the config changed)
        if index > self._cursor:
            self._cursor = index
            self._moved.set()
        future = self._chunks.get(index // self.CHUNK)
        if future is None:
            return None
        try:
            stamp, wires = await future
        except Exception as exc:  # a worker died: carry on here
            self._switch_off(f"composing in a second process failed ({exc!r})")
            return None
        found = wires[index % self.CHUNK]
        shape = (kind, job.event)
        if found is not None and shape not in self._checked:
            # Same files, same bytes? Checked once per kind and date.
            self._checked.add(shape)
            if found != self.local.reference(replace(request, now=stamp)):
                self._switch_off("the second process composes differently")
                return None
        return found

    def _switch_off(self, reason: str) -> None:
        if not self._disabled:
            log.warning("%s; composing in this process", reason)
        self._disabled = True

    async def _feed(self) -> None:
        assert self._pool is not None
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._pool, _ready)
        except Exception as exc:
            self._switch_off(f"the second process did not start ({exc!r})")
            return
        self.started.set()
        chunk = self._cursor // self.CHUNK + 1
        count = -(-len(self._jobs) // self.CHUNK)
        while chunk < count and not self._disabled:
            while chunk > self._cursor // self.CHUNK + self.AHEAD:
                self._moved.clear()
                await self._moved.wait()
            for old in [k for k in self._chunks if k < self._cursor // self.CHUNK - 1]:
                del self._chunks[old]  # every sender has moved past these
            if (chunk + 1) * self.CHUNK > self._cursor + 1:
                future = asyncio.ensure_future(self._submit(chunk))
                future.add_done_callback(_retrieve)
                self._chunks[chunk] = future
            chunk += 1

    async def _submit(self, chunk: int) -> tuple[datetime, list[Wire | None]]:
        assert self._pool is not None
        jobs = self._jobs[chunk * self.CHUNK : (chunk + 1) * self.CHUNK]
        packed = [(j.kind, j.event, _pack(j.contact), j.attended) for j in jobs]
        now = self._clock()
        loop = asyncio.get_running_loop()
        wires, notes = await loop.run_in_executor(
            self._pool, _compose_chunk, packed, now, self._sequences
        )
        for note in notes:
            log.warning("%s", note)
        return now, wires

    async def aclose(self) -> None:
        """Stop the workers; mails still being composed are dropped."""
        if self._feeder is not None:
            self._feeder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._feeder
        for future in self._chunks.values():
            future.cancel()
        self._chunks.clear()
        if self._pool is not None:
            # The workers exit once their queue is closed; nothing to wait for.
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


def _retrieve(future: asyncio.Future[Any]) -> None:
    # A chunk nobody waited for (its mails were skipped) must not log
    # "exception was never retrieved"; its mails are composed here if needed.
    if not future.cancelled():
        future.exception()


#: Below this many mails in a pass a second process is not worth starting.
MIN_PIPELINE = 300


def pipeline(
    config: Config,
    composer: Composer,
    mails: Sequence[tuple[str, str, str]],
    *,
    sequences: Mapping[str, int],
    clock: Callable[[], datetime],
) -> WirePipeline:
    """The pipeline for a delivery pass of *mails* (kind, event id, contact key),
    rendering with *composer* (the sending process's; workers build their own)."""
    processes = config.settings.limits.compose_workers
    if len(mails) < MIN_PIPELINE:
        processes = 0
    jobs = []
    names: dict[str, str] = {}  # one string per kind, not one per mail
    for kind, event_id, key in mails if processes else ():
        contact = config.contacts.by_key(key)
        name = names.setdefault(kind, str(kind))
        # A confirmation's dates come from the ledger, which the workers lack.
        if contact is None or name not in FAST_KINDS or name == Kind.CONFIRMATION:
            continue
        attended = None
        if event_id and event_id in config.attendance:
            attended = contact.key in config.attendance[event_id]
        jobs.append(Job(name, event_id, contact, attended))
    return WirePipeline(
        composer,
        jobs,
        sequences=sequences,
        clock=clock,
        settings=config.settings,
        config_dir=config.config_dir,
        templates_dir=config.templates_dir,
        processes=processes,
    )
