"""Benchmark: what an idle ``shipyard up`` costs, and how soon it answers.

Each start is ``shipyard up`` with no settings but a new, empty data directory and a free
gateway port: every role it runs by default, the embedded nats-server included. Measured:

1. **cold start → /healthz ready** (s): from just before the process is spawned until
   ``GET /healthz`` (polled every 5 ms) first answers 200. "Cold" as a first start on a new
   data directory: an empty store, no read models, no tokens; the OS's file cache is warm
   (the bench itself imported the same packages). The baseline is the floor any Python
   program that runs nats-server pays: a bare ``python -c pass`` plus a bare nats-server
   (``-js`` with a store of its own) from spawn to its first ``INFO`` line on a connection.
2. **idle RSS** (MB): after ``settle`` seconds with nothing to do, the resident memory of
   the ``shipyard up`` process and of its nats-server child (``/proc/<pid>/statm``); its
   CPU over the same seconds is printed below the table. The baseline: an idle
   ``python -c 'import time; time.sleep(…)'`` plus that bare nats-server, idle as long.

Targets: idle footprint ≤ 150 MB, cold start ≤ 2 s (the median of the starts).
``python -m bench footprint`` runs it in the suite.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from bench import _common as c
from shipyard.embedded import binary

RSS_TARGET_MB = 150.0  # shipyard up + its nats-server, idle, at most
START_TARGET_S = 2.0  # spawn → /healthz 200, at most
POLL_S = 0.005


@dataclass(frozen=True)
class Sizes:
    starts: int  # cold starts of each kind; the median is reported
    settle_s: float  # idle seconds before the memory is read


QUICK = Sizes(starts=1, settle_s=2.0)
FULL = Sizes(starts=5, settle_s=5.0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def healthz_after(started: float, port: int, up: asyncio.Task[None]) -> float:
    """Seconds from ``started`` until ``/healthz`` on ``port`` answers 200."""
    url = f"http://127.0.0.1:{port}/healthz"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
        while not up.done() or up.exception() is None:
            with contextlib.suppress(aiohttp.ClientError, OSError, asyncio.TimeoutError):
                async with session.get(url) as r:
                    if r.status == 200:
                        return time.perf_counter() - started
            await asyncio.sleep(POLL_S)
    await up  # it failed to start: say why
    raise c.BenchError("shipyard up stopped before /healthz answered")


async def shipyard_start(parent: str | None, settle_s: float) -> dict[str, Any]:
    """One cold start of ``shipyard up``: seconds to /healthz, then its idle RSS and CPU."""
    with tempfile.TemporaryDirectory(prefix="shipyard-bench-footprint-", dir=parent) as tmp:
        root = Path(tmp)
        port = free_port()
        env = {"SHIPYARD_DATA_DIR": str(root / "data"), "SHIPYARD_PORT": str(port)}
        up = c.ShipyardUp([], root, env)
        started = time.perf_counter()
        starting = asyncio.create_task(up.start(ready="dashboard:"))
        try:
            ready = await healthz_after(started, port, starting)
            await starting
            pids = [up.pid, *c.children(up.pid)]
            cpu0 = sum(c.proc_cpu_seconds(p) for p in pids)
            await asyncio.sleep(settle_s)
            cpu = sum(c.proc_cpu_seconds(p) for p in pids) - cpu0
            return {
                "ready_s": ready,
                "python_mb": c.rss_mb(up.pid),
                "nats_mb": sum(c.rss_mb(p) for p in pids[1:]),
                "idle_cpu_pct": 100.0 * cpu / settle_s,
                "children": " ".join(sorted(c.command_name(p) for p in pids[1:])),
            }
        finally:
            if not starting.done():
                starting.cancel()
            await asyncio.gather(starting, return_exceptions=True)
            await up.stop()


async def spawn_seconds(*argv: str) -> float:
    started = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(*argv)
    if await proc.wait() != 0:
        raise c.BenchError(f"{' '.join(argv)} failed")
    return time.perf_counter() - started


@contextlib.asynccontextmanager
async def bare_nats(parent: str | None) -> AsyncIterator[tuple[float, int]]:
    """A bare nats-server with JetStream: seconds from spawn to its INFO line, and its pid."""
    with tempfile.TemporaryDirectory(prefix="shipyard-bench-nats-", dir=parent) as tmp:
        port = free_port()
        argv = [binary(), "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", tmp]
        started = time.perf_counter()
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
        )
        try:
            while True:
                try:
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                except OSError:
                    await asyncio.sleep(POLL_S)
                    continue
                line = await asyncio.wait_for(reader.readline(), 10)
                writer.close()
                if line.startswith(b"INFO"):
                    break
            yield time.perf_counter() - started, proc.pid
        finally:
            proc.terminate()
            await proc.wait()


async def baseline(parent: str | None, settle_s: float) -> dict[str, float]:
    """A bare Python start, a bare nats-server start, and both idle RSS."""
    python_s = await spawn_seconds(sys.executable, "-c", "pass")
    sleeper = await asyncio.create_subprocess_exec(
        sys.executable, "-c", f"import time; time.sleep({settle_s + 30})"
    )
    try:
        async with bare_nats(parent) as (nats_s, pid):
            await asyncio.sleep(settle_s)
            nats_mb, python_mb = c.rss_mb(pid), c.rss_mb(sleeper.pid)
    finally:
        sleeper.terminate()
        await sleeper.wait()
    return {"python_s": python_s, "nats_s": nats_s, "python_mb": python_mb, "nats_mb": nats_mb}


async def measure(quick: bool, parent: str | None) -> dict[str, Any]:
    sizes = QUICK if quick else FULL
    starts: list[dict[str, Any]] = []
    bases: list[dict[str, float]] = []
    for i in range(sizes.starts):
        bases.append(await baseline(parent, sizes.settle_s))
        starts.append(await shipyard_start(parent, sizes.settle_s))
        got = starts[-1]
        c.note(
            f"start {i + 1}/{sizes.starts}: /healthz after {got['ready_s']:.2f}s, idle RSS "
            f"{got['python_mb']:.0f} + {got['nats_mb']:.0f} MB (bare: "
            f"{bases[-1]['python_s'] + bases[-1]['nats_s']:.2f}s, "
            f"{bases[-1]['python_mb'] + bases[-1]['nats_mb']:.0f} MB)"
        )

    def median(rows: Sequence[dict[str, Any]], *keys: str) -> float:
        return float(statistics.median(sum(row[k] for k in keys) for row in rows))

    ready = median(starts, "ready_s")
    rss = median(starts, "python_mb", "nats_mb")
    bare_mb = median(bases, "python_mb", "nats_mb")
    bare_s = median(bases, "python_s", "nats_s")
    figures = [
        c.at_most("idle RSS, shipyard up + nats-server", "MB", rss, RSS_TARGET_MB, bare_mb),
        c.at_most("cold start → /healthz 200", "s", ready, START_TARGET_S, bare_s),
    ]
    return {
        "sizes": vars(sizes),
        "figures": figures,
        "starts": starts,
        "baselines": bases,
        "details": [
            "",
            f"median of {sizes.starts} start(s), each on a new data directory, all default roles;",
            f"idle after {sizes.settle_s:g}s: Python {median(starts, 'python_mb'):.0f} MB + "
            f"its children ({starts[0]['children']}) {median(starts, 'nats_mb'):.0f} MB, "
            f"CPU {median(starts, 'idle_cpu_pct'):.2f} % of a core.",
            f"baseline: python -c pass {median(bases, 'python_s') * 1000:.0f} ms + bare "
            f"nats-server -js to INFO {median(bases, 'nats_s') * 1000:.0f} ms; idle RSS "
            f"{median(bases, 'python_mb'):.0f} + {median(bases, 'nats_mb'):.0f} MB.",
        ],
    }


def main(argv: Sequence[str] | None = None) -> int:
    return c.main(
        "footprint",
        "Idle memory of shipyard up and its cold start to /healthz, against bare Python and "
        "a bare nats-server.",
        measure,
        argv,
    )


if __name__ == "__main__":
    sys.exit(main())
