"""Benchmark: what scaling out on a 3-node NATS cluster costs a dispatch, against the embedded
default, both measured in the same run.

Each deployment gets a fresh store in a temporary directory and one handler process,
``shipyard up --roles handler,commands --nats URL[,URL…]`` (as docker-compose.yml runs
handlers), whose builders are bench/handler.py's stamp builder (one bash that writes the
deliverable):

- **embedded**: one nats-server from the wheel as ``shipyard up`` starts it
  (:class:`shipyard.embedded.EmbeddedNats`: every write synced to disk), the stream R1.
- **3-node cluster**: three nats-server nodes routed on loopback (:mod:`bench._cluster`),
  each with JetStream, the stream replicated 3 times (``SHIPYARD_STREAM_REPLICAS=3``);
  the handler and the bench connect with all three URLs.

On each, the same two measurements:

1. **dispatch throughput** (dispatches/s): a burst of N dispatches sent the way a
   dispatcher sends them, ``commands.call(nc, "dispatch", …)`` to the handler process's
   command service, with C awaiting their reply at once; N over the time until the last is
   acknowledged. The handler claims and runs them meanwhile (what a burst costs, with its
   runs' events competing for the same stream); the bench waits for every run to finish
   before going on, and the time from the first dispatch until then is shown below the
   table.
2. **dispatch → claimed** p50 / p99 (ms): bench/handler.py's measurement
   (:func:`bench.handler.latency_phase`): M dispatches one after another, each timed from
   ``Commands.dispatch`` returning until the bench's own follower receives the
   ``task_claimed`` event.

Each cluster figure's baseline is the same figure on the embedded default; the ratio is
cluster / embedded. Replication adds a round trip between nodes to every write, while the
embedded server syncs every write to disk and the cluster's nodes do not (a write is safe
once a majority holds it), so the ratio depends on the disk as much as on the network:
``--dir`` puts the stores on the disk you care about. Three servers, the handler, its
builders and the bench share the machine's cores.

``python -m bench cluster`` runs it in the suite.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import _common as c
from bench import handler as h
from bench._cluster import LoopbackCluster
from shipyard.events import commands
from shipyard.events.commands import Commands
from shipyard.events.log import EventLog, connect

THROUGHPUT_TARGET = 0.5  # the cluster's dispatch throughput, at least this share of embedded
CLAIM_P99_TARGET_MS = 20.0  # dispatch → claimed seen on the cluster, at most
CALL_TIMEOUT = 10.0  # seconds for one dispatch's reply
RUNS_TIMEOUT = 120.0  # seconds for a burst's runs to finish


@dataclass(frozen=True)
class Sizes:
    burst: int  # N: dispatches in the throughput burst
    in_flight: int  # C: awaiting their reply at once
    dispatches: int  # M: timed sequential dispatches
    warmup: int  # sequential dispatches before the timed ones
    capacity: int  # the handler's (and its builder's) concurrency


QUICK = Sizes(burst=30, in_flight=16, dispatches=12, warmup=2, capacity=16)
FULL = Sizes(burst=300, in_flight=32, dispatches=200, warmup=10, capacity=32)


@dataclass
class Measured:
    """One deployment's figures."""

    name: str
    throughput: float  # dispatches acknowledged per second
    burst_s: float  # first dispatch of the burst → its last run finished
    latency: h.LatencySamples


async def burst(nc: Any, tracker: h.Tracker, layout: h.Layout, sizes: Sizes) -> tuple[float, float]:
    """Dispatch ``sizes.burst`` tasks at once; return dispatches/s and the seconds until
    the last of their runs finished."""
    gate = asyncio.Semaphore(sizes.in_flight)

    async def one(i: int) -> str:
        body = h.dispatch_body(layout.work / f"burst-{i:04d}", h.STAMP_AGENT, f"Burst {i}")
        async with gate:
            result = await commands.call(nc, "dispatch", body, timeout=CALL_TIMEOUT)
        return str(result["task_id"])

    started = time.perf_counter()
    ids = await asyncio.gather(*(one(i) for i in range(sizes.burst)))
    acknowledged = time.perf_counter() - started
    await tracker.until(
        tracker.all_seen(ids, "finished"), RUNS_TIMEOUT, f"the {len(ids)} burst runs to finish"
    )
    failed = [t for t in ids if tracker.trace(t).outcome != "succeeded"]
    if failed:
        raise c.BenchError(f"{len(failed)} burst runs did not succeed, e.g. {failed[0]}")
    return sizes.burst / acknowledged, time.perf_counter() - started


async def measure_deployment(
    name: str, urls: list[str], replicas: int, root: Path, sizes: Sizes
) -> Measured:
    layout = h.Layout(root)
    layout.create(sizes.capacity)
    joined = ",".join(urls)
    async with contextlib.AsyncExitStack() as stack:
        nc = await connect(urls, name="bench-dispatcher")
        stack.push_async_callback(nc.close)
        follower_nc = await connect(urls, name="bench-follower")
        stack.push_async_callback(follower_nc.close)
        log = EventLog(nc)
        await log.ensure_stream(replicas=replicas)

        probe = h.RawProbe(nc, follower_nc, h.claim_event_size(), replicas=replicas)
        await probe.start()
        stack.push_async_callback(probe.stop)

        handler = c.ShipyardUp(
            [
                *("--roles", "handler,commands", "--nats", joined),
                *("--data-dir", str(layout.data), "--config", str(layout.config)),
            ],
            root,
            {"SHIPYARD_STREAM_REPLICAS": str(replicas)},
        )
        c.note(f"{name}: starting the handler: shipyard up --roles handler,commands")
        await handler.start(ready=" is up")
        stack.push_async_callback(handler.stop)

        tracker = h.Tracker(EventLog(follower_nc))
        await tracker.start(1)
        stack.push_async_callback(tracker.stop)

        try:
            c.note(f"{name}: a burst of {sizes.burst} dispatches, {sizes.in_flight} in flight")
            throughput, burst_s = await burst(nc, tracker, layout, sizes)
            c.note(f"{name}: {throughput:,.0f} dispatches/s; all runs done after {burst_s:.1f}s")
            c.note(f"{name}: {sizes.warmup} + {sizes.dispatches} sequential dispatches")
            hs = h.Sizes(dispatches=sizes.dispatches, warmup=sizes.warmup, runs=0, window=0, idle=0)
            latency = await h.latency_phase(hs, Commands(log), tracker, probe, layout)
        except c.BenchError as e:
            state = "running" if handler.alive() else "exited"
            tail = handler.stderr_tail() or "(nothing)"
            raise c.BenchError(f"{e}\nthe handler ({state}) logged last:\n{tail}") from None
    if latency.failed:
        raise c.BenchError(f"{name}: runs did not succeed: {latency.failed[:5]}")
    return Measured(name, throughput, burst_s, latency)


@contextlib.asynccontextmanager
async def cluster(parent: str | None) -> AsyncIterator[tuple[Path, LoopbackCluster]]:
    with tempfile.TemporaryDirectory(prefix="shipyard-bench-cluster-", dir=parent) as tmp:
        root = Path(tmp)
        nodes = LoopbackCluster(root / "nodes")
        # Started from this thread: each node is told to die with the thread that started it.
        try:
            nodes.start()
            await nodes.wait_jetstream()
            yield root, nodes
        finally:
            nodes.stop()


async def measure(quick: bool, parent: str | None) -> dict[str, Any]:
    sizes = QUICK if quick else FULL
    async with c.fresh_server(parent, "cluster-embedded") as (root, server):
        embedded = await measure_deployment("embedded", [server.url], 1, root, sizes)
    async with cluster(parent) as (root, nodes):
        c.note(f"3-node cluster on {', '.join(nodes.urls)}")
        clustered = await measure_deployment("cluster", nodes.urls, 3, root, sizes)

    figures = [
        c.at_least_ratio(
            "dispatch throughput, 3-node cluster",
            "disp/s",
            clustered.throughput,
            embedded.throughput,
            THROUGHPUT_TARGET,
        ),
        c.latency(
            "dispatch → claimed p99, 3-node cluster",
            99,
            clustered.latency.claimed,
            embedded.latency.claimed,
            CLAIM_P99_TARGET_MS,
        ),
        c.latency(
            "dispatch → claimed p50, 3-node cluster",
            50,
            clustered.latency.claimed,
            embedded.latency.claimed,
            None,
        ),
    ]

    def line(m: Measured) -> str:
        got = c.spread(m.latency.claimed)
        raw = c.spread(m.latency.raw)
        return (
            f"  {m.name:<9} {m.throughput:7,.0f} disp/s; burst of {sizes.burst} all run in "
            f"{m.burst_s:5.1f}s; claimed p50/p99 {got['p50']:6.2f} / {got['p99']:6.2f} ms; "
            f"raw publish → seen p50/p99 {raw['p50']:5.2f} / {raw['p99']:5.2f} ms"
        )

    details = [
        "",
        "baseline: the same figure on the embedded default, one server syncing every write to",
        "disk; the cluster's nodes do not (NATS's default: a write is safe once a majority",
        "holds it), which is most of the difference on a disk with slow syncs.",
        line(embedded),
        line(clustered),
    ]
    return {
        "sizes": vars(sizes),
        "figures": figures,
        "details": details,
        "deployments": {
            m.name: {
                "throughput": m.throughput,
                "burst_s": m.burst_s,
                "claimed_ms": m.latency.claimed,
                "raw_ms": m.latency.raw,
            }
            for m in (embedded, clustered)
        },
    }


def main(argv: Sequence[str] | None = None) -> int:
    return c.main(
        "cluster",
        "Dispatch throughput and dispatch-to-claim latency on a 3-node NATS cluster with the "
        "stream replicated 3 times, against the embedded default in the same run.",
        measure,
        argv,
    )


if __name__ == "__main__":
    sys.exit(main())
