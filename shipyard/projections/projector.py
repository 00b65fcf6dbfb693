"""The projector: follows the event log into the DuckDB read models.

It reads from its checkpoint + 1 with an ordered consumer, applies events in batches — each
batch and the new checkpoint in one transaction, so a crash loses and doubles nothing — and
says how far behind it is while it catches up. DuckDB lets one process open a file, so the
projector and every query share one connection, used from one thread. :func:`build` makes
a new database from the log, with a second process for the fold when the log is long.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shipyard.events.envelope import Event, decode
from shipyard.events.log import EventLog
from shipyard.events.types import REGISTRY
from shipyard.projections import rebuild
from shipyard.projections.models import DB_FILE as DB_FILE
from shipyard.projections.models import ReadModels as ReadModels

log = logging.getLogger(__name__)

MAX_BATCH = 5000  # events applied in one transaction
REPLAY_BATCH = 25_000  # the same for build(): each batch costs a load and an upsert per table
# From this many events on, build() folds in a second process (see rebuild.py); below it,
# starting that process would cost more than it saves.
REBUILD_MIN = 20_000
QUEUE_SIZE = 20_000  # decoded events waiting to be applied
# Seconds between the starts of two transactions while events keep coming. A transaction
# has a fixed cost (a look-up per table, an appender per table, the checkpoint) of several
# milliseconds: one per event would take a core at a hundred events a second. An event
# after a quiet spell is applied at once.
APPLY_EVERY = 0.05


@dataclass(frozen=True)
class Status:
    applied_seq: int
    target_seq: int  # the stream's end when last looked at
    caught_up: bool

    @property
    def lag(self) -> int:
        return max(0, self.target_seq - self.applied_seq)

    @property
    def percent(self) -> float:
        if self.target_seq <= 0:
            return 100.0
        return round(100.0 * min(self.applied_seq, self.target_seq) / self.target_seq, 1)


class Projector:
    """Keeps a :class:`ReadModels` database current with the log."""

    def __init__(self, events: EventLog, models: ReadModels) -> None:
        self.events = events
        self.models = models
        self.applied = 0
        self.target = 0
        self._caught_up = asyncio.Event()
        self._changed = asyncio.Condition()
        self._tasks: list[asyncio.Task[None]] = []
        self.listeners: list[Callable[[Status], Awaitable[None]]] = []  # told each checkpoint

    @property
    def status(self) -> Status:
        return Status(self.applied, max(self.target, self.applied), self._caught_up.is_set())

    async def start(self) -> None:
        self.applied = await self.models.run(self.models.checkpoint_sync)
        self.target = await self.events.stream_last_seq()
        if self.applied >= self.target:
            self._caught_up.set()
        queue: asyncio.Queue[Event[Any]] = asyncio.Queue(QUEUE_SIZE)
        self._tasks = [
            asyncio.create_task(self._read(queue), name="projector-read"),
            asyncio.create_task(self._apply(queue), name="projector-apply"),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)  # never hang a shutdown on a consumer

    async def wait_caught_up(self) -> None:
        await self._caught_up.wait()

    async def wait_for(self, seq: int) -> None:
        """Until every event up to ``seq`` is applied."""
        async with self._changed:
            await self._changed.wait_for(lambda: self.applied >= seq)

    async def _read(self, queue: asyncio.Queue[Event[Any]]) -> None:
        registry = self.events.registry
        async for seq, payload in self.events.follow_raw(start=self.applied + 1):
            await queue.put(decode(payload, seq=seq, registry=registry))

    async def _apply(self, queue: asyncio.Queue[Event[Any]]) -> None:
        loop = asyncio.get_running_loop()
        last = 0.0
        while True:
            first = await queue.get()
            wait = last + APPLY_EVERY - loop.time()
            if wait > 0 and queue.qsize() < MAX_BATCH:
                await asyncio.sleep(wait)
            last = loop.time()
            batch = [first]
            while len(batch) < MAX_BATCH:
                try:
                    batch.append(queue.get_nowait())
                except asyncio.QueueEmpty:
                    break
            try:
                self.applied = await self.models.run(self.models.apply_sync, batch)
            except Exception:
                log.exception("projecting events up to %d failed", batch[-1].seq)
                raise
            if not self._caught_up.is_set():
                if self.applied >= self.target:
                    self._caught_up.set()
                elif queue.empty():
                    with contextlib.suppress(Exception):
                        self.target = await self.events.stream_last_seq()
            else:
                self.target = max(self.target, self.applied)
            async with self._changed:
                self._changed.notify_all()
            for listener in self.listeners:
                await listener(self.status)


async def build(
    events: EventLog,
    path: Path | str,
    *,
    stop: int | None = None,
    worker: bool | None = None,
    progress: Callable[[int], None] | None = None,
) -> ReadModels:
    """Project the log from sequence 1 up to ``stop`` (default: its end now) into a new
    database at ``path``, and return it open.

    ``worker``: fold in a second process while this one receives (default: for
    :data:`REBUILD_MIN` events or more). A log read with a registry of its own (upcasters
    defined at run time) is always folded here, where that registry lives. ``progress`` is
    told the last sequence applied here, or handed to the worker, every few thousand.
    """
    if stop is None:
        stop = await events.stream_last_seq()
    if worker is None:
        worker = stop >= REBUILD_MIN
    if worker and stop > 0 and events.registry is REGISTRY:
        report = await rebuild.rebuild(events, path, stop, progress=progress)
        log.info(
            "rebuilt the read models from %d events in a worker process (%.1f s CPU, "
            "peak memory %.0f MB)",
            report.seq,
            report.cpu_s,
            report.peak_mb,
            extra={"action": "rebuilt", "worker": report},
        )
        models = ReadModels(path)
        await models.open()
        return models
    models = ReadModels(path)
    await models.open()
    batch: list[Event[Any]] = []
    if stop > 0:
        async for event in events.read(start=1, stop=stop):
            batch.append(event)
            if len(batch) >= REPLAY_BATCH:
                applied = await models.run(models.apply_sync, batch)
                batch = []
                if progress is not None:
                    progress(applied)
        if batch:
            applied = await models.run(models.apply_sync, batch)
            if progress is not None:
                progress(applied)
    return models
