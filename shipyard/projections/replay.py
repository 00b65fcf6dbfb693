"""``shipyard replay``: rebuild the read models from sequence 1, or verify the live ones.

A replay reads nothing but the log, and every time in the tables comes from event times, so a
replay up to the same sequence always gives the same tables: ``--verify`` compares a digest
of each table with the live database's.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from nats.aio.client import Client as NATS

from shipyard import access, instance
from shipyard.access import Users
from shipyard.embedded import EmbeddedNats
from shipyard.errors import ShipyardError
from shipyard.events.log import EventLog, connect
from shipyard.projections.projector import DB_FILE, ReadModels, build
from shipyard.projections.service import ask
from shipyard.settings import Settings

Print = Callable[[str], None]


@contextlib.asynccontextmanager
async def _nats(cfg: Settings, running: dict[str, object] | None) -> AsyncIterator[NATS]:
    """A connection to the log: the running instance's, the configured one, or an embedded
    server started (under the data-dir lock) just for this."""
    lock = server = None
    if cfg.nats_url:
        urls = list(cfg.nats_url)
        credentials = access.credentials_for(cfg, "admin")
    elif running is not None:
        urls = list(running["nats_url"])  # type: ignore[call-overload]
        credentials = access.credentials_for(cfg, "admin")
    else:
        lock = instance.InstanceLock(cfg.data_dir)
        lock.acquire()
        users = Users.ensure(access.nats_dir(cfg.data_dir), list(cfg.agents))
        server = EmbeddedNats(access.nats_dir(cfg.data_dir), users=users)
        urls = [server.start()]
        credentials = users.credentials("admin")
    try:
        nc = await connect(urls, name="shipyard-replay", credentials=credentials)
        try:
            yield nc
        finally:
            await nc.close()
    finally:
        if server is not None:
            server.stop()
        if lock is not None:
            lock.release()


def _table(out: Print, live: dict[str, str], fresh: dict[str, str]) -> bool:
    same = True
    out(f"{'table':12} {'rows':>8}  {'live':34} {'replay':34}")
    for table in sorted(set(live) | set(fresh)):
        a, b = live.get(table, "-"), fresh.get(table, "-")
        rows = a.split(":", 1)[0]
        mark = "" if a == b else "  DIFFERS"
        same = same and a == b
        out(f"{table:12} {rows:>8}  {a.split(':')[-1]:34} {b.split(':')[-1]:34}{mark}")
    return same


async def _fresh_digests(events: EventLog, seq: int, workdir: Path) -> dict[str, str]:
    models = await build(events, workdir / "replay.duckdb", stop=seq)
    try:
        return await models.run(models.digests_sync)
    finally:
        await models.close()


def _swap(new: Path, live: Path) -> None:
    # The old database's write-ahead log must not be replayed onto the new file.
    Path(f"{live}.wal").unlink(missing_ok=True)
    os.replace(new, live)


async def run(cfg: Settings, *, verify: bool, out: Print) -> int:
    running = instance.read_info(cfg.data_dir)
    live_path = cfg.data_dir / DB_FILE
    if running is not None and not verify:
        raise ShipyardError(
            f"Shipyard is running on {cfg.data_dir} and its read models are in use: stop it "
            "first to replace them, or run `shipyard replay --verify` to compare"
        )
    async with _nats(cfg, running) as nc:
        events = EventLog(nc)
        if not verify:
            target = await events.stream_last_seq()
            new_path = live_path.with_name(live_path.name + ".replay")
            for leftover in (new_path, Path(f"{new_path}.wal")):
                leftover.unlink(missing_ok=True)
            models = await build(events, new_path, stop=target)
            digests = await models.run(models.digests_sync)
            await models.close()
            _swap(new_path, live_path)
            out(f"Rebuilt the read models from {target:,} events into {live_path}.")
            for table, digest in sorted(digests.items()):
                out(f"  {table:12} {digest}")
            return 0
        if running is not None:
            result = await ask(nc, "digests")
            seq, live = int(result["seq"]), dict(result["digests"])
        else:
            if not live_path.exists():
                raise ShipyardError(f"no read models at {live_path} to verify yet")
            models = ReadModels(live_path)
            await models.open()
            seq = await models.run(models.checkpoint_sync)
            live = await models.run(models.digests_sync)
            await models.close()
        with tempfile.TemporaryDirectory(prefix="shipyard-replay-") as tmp:
            fresh = await _fresh_digests(events, seq, Path(tmp))
        out(f"Replayed events 1–{seq:,} beside the live read models:")
        same = _table(out, live, fresh)
        out("Identical." if same else "The read models differ from a fresh replay.")
        return 0 if same else 1
