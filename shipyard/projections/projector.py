"""The projector: follows the event log into the DuckDB read models.

It reads from its checkpoint + 1 with an ordered consumer, applies events in batches — each
batch and the new checkpoint in one transaction, so a crash loses and doubles nothing — and
says how far behind it is while it catches up. DuckDB lets one process open a file, so the
projector and every query share one connection, used from one thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import duckdb

from shipyard.errors import StorageError
from shipyard.events.envelope import Event, decode
from shipyard.events.log import EventLog
from shipyard.projections import sql
from shipyard.projections.fold import KEYS, Batch, utc

log = logging.getLogger(__name__)

NAME = "readmodels"
DB_FILE = "readmodels.duckdb"  # under the data dir
MAX_BATCH = 5000  # events applied in one transaction
REPLAY_BATCH = 25_000  # the same for build(): each batch costs a load and an upsert per table
QUEUE_SIZE = 20_000  # decoded events waiting to be applied
# Seconds between the starts of two transactions while events keep coming. A transaction
# has a fixed cost (a look-up per table, an appender per table, the checkpoint) of several
# milliseconds: one per event would take a core at a hundred events a second. An event
# after a quiet spell is applied at once.
APPLY_EVERY = 0.05
T = TypeVar("T")


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


class ReadModels:
    """One DuckDB database of read models, used from a single worker thread."""

    def __init__(self, path: Path | str) -> None:
        self.path = str(path)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="duckdb")
        self.con: duckdb.DuckDBPyConnection | None = None
        self.columns: dict[str, list[str]] = {}

    def open_sync(self) -> None:
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self.con = duckdb.connect(self.path)
        if self._schema_changed(self.con):
            # Read models are derived: a file made with another schema is rebuilt from the log.
            log.info(
                "read models in %s have an older layout; rebuilding them from the event log",
                self.path,
                extra={"action": "schema_rebuild"},
            )
            self.con.close()
            for suffix in ("", ".wal"):
                Path(self.path + suffix).unlink(missing_ok=True)
            self.con = duckdb.connect(self.path)
        self.con.execute(sql.schema())
        self.con.execute("CREATE TABLE IF NOT EXISTS schema_info (fingerprint VARCHAR NOT NULL)")
        self.con.execute("DELETE FROM schema_info")
        self.con.execute("INSERT INTO schema_info VALUES (?)", [sql.fingerprint()])
        for table in [*KEYS, "activity"]:
            cols = self.con.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_name = ? "
                "ORDER BY ordinal_position",
                [table],
            ).fetchall()
            self.columns[table] = [c[0] for c in cols]

    def _schema_changed(self, con: duckdb.DuckDBPyConnection) -> bool:
        tables = {r[0] for r in con.execute("SELECT table_name FROM duckdb_tables()").fetchall()}
        if not tables:
            return False
        if "schema_info" not in tables:
            return True
        row = con.execute("SELECT fingerprint FROM schema_info").fetchone()
        return row is None or row[0] != sql.fingerprint()

    async def open(self) -> None:
        try:
            await self.run(self.open_sync)
        except duckdb.IOException as e:  # a full or read-only disk, mostly
            raise StorageError(
                f"cannot open the read models {self.path}: {e}. Free some space or fix the "
                "permissions of its directory, or pass another --data-dir."
            ) from e

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on the database thread."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def checkpoint_sync(self) -> int:
        assert self.con is not None
        row = self.con.execute("SELECT seq FROM checkpoints WHERE projector = ?", [NAME]).fetchone()
        return int(row[0]) if row else 0

    def apply_sync(self, events: list[Event[Any]]) -> int:
        """Apply a batch and its checkpoint in one transaction; return the new checkpoint."""
        assert self.con is not None
        con = self.con
        con.execute("BEGIN")
        try:
            batch = Batch(con, self.columns)
            batch.preload(events)
            for event in events:
                batch.apply(event)
            batch.write()
            con.execute(
                "INSERT OR REPLACE INTO checkpoints VALUES (?, ?, ?)",
                [NAME, batch.last_seq, _naive(batch.last_time)],
            )
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
        return batch.last_seq

    def digests_sync(self) -> dict[str, str]:
        """A digest of each table's content, ordered by key: equal digests, equal tables."""
        assert self.con is not None
        out = {}
        for table in [*KEYS, "activity", "checkpoints"]:
            order = ", ".join(KEYS.get(table, ("seq",) if table == "activity" else ("projector",)))
            agg = f"string_agg(t::VARCHAR, '\n' ORDER BY {order})"
            row = self.con.execute(
                f"SELECT count(*), coalesce(md5({agg}), '') FROM {table} t"
            ).fetchone()
            assert row is not None
            out[table] = f"{row[0]}:{row[1]}"
        return out

    def close_sync(self) -> None:
        if self.con is not None:
            self.con.close()
            self.con = None

    async def close(self) -> None:
        await self.run(self.close_sync)
        self._pool.shutdown(wait=True)


def _naive(value: Any) -> Any:
    return utc(value) if value is not None else None


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


async def build(events: EventLog, path: Path | str, *, stop: int | None = None) -> ReadModels:
    """Project the log from sequence 1 up to ``stop`` (default: its end now) into a new
    database at ``path``, and return it open."""
    models = ReadModels(path)
    await models.open()
    if stop is None:
        stop = await events.stream_last_seq()
    batch: list[Event[Any]] = []
    if stop > 0:
        async for event in events.read(start=1, stop=stop):
            batch.append(event)
            if len(batch) >= REPLAY_BATCH:
                await models.run(models.apply_sync, batch)
                batch = []
        if batch:
            await models.run(models.apply_sync, batch)
    return models
