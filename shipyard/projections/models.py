"""The read-model database: one DuckDB file, its schema, batches applied to it with their
checkpoint, and digests of its tables.

DuckDB lets one process open a file, so the projector and every query share one connection,
used from one thread.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import duckdb

from shipyard.errors import StorageError
from shipyard.events.envelope import Event
from shipyard.projections import sql
from shipyard.projections.fold import KEYS, Batch, utc

log = logging.getLogger(__name__)

NAME = "readmodels"  # the projector's name in the checkpoints table
DB_FILE = "readmodels.duckdb"  # under the data dir
T = TypeVar("T")


class ReadModels:
    """One DuckDB database of read models, used from a single worker thread."""

    def __init__(self, path: Path | str) -> None:
        self.path = str(path)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="duckdb")
        self.con: duckdb.DuckDBPyConnection | None = None
        self.columns: dict[str, tuple[str, ...]] = {}

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
            self.columns[table] = tuple(c[0] for c in cols)

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
            self.save_checkpoint_sync(batch)
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
        return batch.last_seq

    def save_checkpoint_sync(self, batch: Batch) -> None:
        """Record ``batch``'s last event as applied (inside the caller's transaction)."""
        assert self.con is not None
        self.con.execute(
            "INSERT OR REPLACE INTO checkpoints VALUES (?, ?, ?)",
            [NAME, batch.last_seq, _naive(batch.last_time)],
        )

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
