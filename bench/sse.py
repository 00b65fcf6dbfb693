"""Benchmark: how fast the dashboard's live stream (``GET /api/events``) reaches many clients.

A fresh embedded server (``shipyard up``'s configuration: every write synced) and, later,
one gateway as its own process, ``shipyard up --roles projector,gateway --nats URL``: a
subprocess, so that the bench's clients do not share its event loop and its CPU can be
read from ``/proc``. The projector runs in it (the gateway role needs it), as deployed.

Three phases with the same schedule: ``warmup`` events (not timed; they also prove every
receiver is subscribed), then M timed ones, one started every ``interval_ms`` whether or
not the previous one is acknowledged, each a ``WorkProgress`` on an aggregate of its own,
through :meth:`EventLog.append`. An event's send stamp is ``perf_counter_ns`` just before
``append`` (so the synced write is part of every figure); each receiver stamps an event on
arrival, before decoding anything. Latency is arrival − send, per (event, receiver).

1. **ordered** — the baseline, before the gateway runs: N ordered consumers, each
   :meth:`EventLog.follow_raw` from the phase's first sequence, on one connection of the
   bench's: what the gateway reads the log with, minus HTTP.
2. **projector** — the gateway runs, no client; the phase ends once its projector applied
   the last event (``/api/status``): what projecting alone costs the gateway.
3. **sse** — N aiohttp clients, one connection each, on ``/api/events?after=``. A client
   only stamps and keeps each chunk; the stream is parsed after the phase.

The ratio is SSE / ordered at the same percentile (lower is better); the target is SSE
p99 ≤ 50 ms. Every receiver must get every event of its phase exactly once, in order, with
the payload appended under that sequence: gaps, duplicates, disorder and mismatches are
counted, and must be 0. Below the table: the gateway's CPU per event for its projector,
and its event loop's per (event, client) delivery beyond that.

N receivers at R events/s are N × R deliveries per second, all received in the bench
process: 100 clients at 100 events/s (10 ms apart) is about what a 2-core machine can
offer the bench, the gateway and the server at once. ``python -m bench sse`` runs it.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

import aiohttp

from bench import _common as c
from shipyard.events.envelope import Event, make, new_id
from shipyard.events.log import EventLog, connect
from shipyard.events.types import Phase, WorkProgress

P99_TARGET_MS = 50.0  # append → SSE client has it, at most
RECEIVE_TIMEOUT = 30.0  # seconds after the last append for every receiver to have it all
ID_AT = slice(7, 7 + 26)  # an encoded event starts with {"id":"<26 characters>"
BLOCK_END = re.compile(rb"\r?\n\r?\n")  # what ends one SSE message


@dataclass(frozen=True)
class Sizes:
    clients: int  # N: receivers per phase
    events: int  # M: timed events per phase
    warmup: int  # events per phase before the timed ones
    interval_ms: float  # between the starts of two appends


QUICK = Sizes(clients=10, events=100, warmup=10, interval_ms=10.0)
FULL = Sizes(clients=100, events=200, warmup=20, interval_ms=10.0)


# --- sending ----------------------------------------------------------------------------


@dataclass
class Sent:
    stamps: dict[int, int] = field(default_factory=dict)  # timed events: seq → send stamp
    ids: dict[int, str] = field(default_factory=dict)  # every event of the phase: seq → id


def progress_event(n: int) -> Event[WorkProgress]:
    data = WorkProgress(
        run_id=new_id("r-"),
        phase=Phase.BUILD,
        percent=n % 101,
        action="bench",
        turns=n,
        tokens_in=1000 * n,
        last_tool="Bash",
    )
    return make(data, aggregate_id=new_id("t-"), actor="handler:bench")


async def append_paced(
    log: EventLog, count: int, interval_s: float, sent: Sent, timed: bool
) -> int:
    """Start an append every ``interval_s``, acknowledged or not; return the last seq."""
    loop = asyncio.get_running_loop()
    start = loop.time()

    async def one(event: Event[WorkProgress], stamp: int) -> int:
        seq = await log.append(event)
        sent.ids[seq] = event.id
        if timed:
            sent.stamps[seq] = stamp
        return seq

    tasks = []
    for i in range(count):
        delay = start + i * interval_s - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        event = progress_event(i)
        tasks.append(asyncio.create_task(one(event, time.perf_counter_ns())))
        await asyncio.sleep(0)  # let it write its request now, in order
    return max(await asyncio.gather(*tasks))


# --- receiving --------------------------------------------------------------------------


@dataclass
class Receiver:
    seqs: list[int] = field(default_factory=list)
    arrivals: list[int] = field(default_factory=list)  # perf_counter_ns on arrival
    payloads: list[bytes] = field(default_factory=list)
    chunks: list[tuple[int, bytes]] = field(default_factory=list)  # SSE: (arrival, bytes)
    scanned: int = 0  # SSE: chunks already searched for the last event's id
    tail: bytes = b""
    highest: int = 0
    error: str = ""


class Transport:
    """One way of receiving the log: ``clients`` receivers from a sequence on."""

    name = ""
    clients = True

    def __init__(self) -> None:
        self.tasks: list[asyncio.Task[None]] = []

    async def start(self, receivers: list[Receiver], after: int) -> None:
        pass

    def reached(self, rx: Receiver, last: int) -> bool:
        return rx.highest >= last

    async def drained(self, last: int) -> None:
        """After every receiver has ``last``: wait for whatever else the phase times."""

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    def finish(self, receivers: list[Receiver]) -> None:
        """After the phase: fill in what the hot path left out."""


class Ordered(Transport):
    name = "ordered"

    def __init__(self, log: EventLog) -> None:
        super().__init__()
        self.log = log

    async def start(self, receivers: list[Receiver], after: int) -> None:
        async def follow(rx: Receiver) -> None:
            async for seq, payload in self.log.follow_raw(start=after + 1):
                rx.arrivals.append(time.perf_counter_ns())
                rx.seqs.append(seq)
                rx.payloads.append(payload)
                rx.highest = seq

        self.tasks = [asyncio.create_task(follow(rx)) for rx in receivers]


class Gateway(Transport):
    """No client: the phase ends once the gateway's projector has applied the last event."""

    name = "projector"
    clients = False

    def __init__(self, session: aiohttp.ClientSession, up: c.ShipyardUp) -> None:
        super().__init__()
        self.session = session
        self.up = up
        self.auth = {"Authorization": f"Bearer {up.token}"}

    async def drained(self, last: int) -> None:
        deadline = time.monotonic() + RECEIVE_TIMEOUT
        while True:
            async with self.session.get(self.up.url + "/api/status", headers=self.auth) as r:
                body = await r.json()
            if r.status == 200 and body["projection"]["applied_seq"] >= last:
                return
            if time.monotonic() > deadline:
                raise c.BenchError(f"the gateway's projector did not reach {last}: {body}")
            await asyncio.sleep(0.02)


class Sse(Gateway):
    name = "sse"
    clients = True

    async def start(self, receivers: list[Receiver], after: int) -> None:
        opened = [asyncio.get_running_loop().create_future() for _ in receivers]
        self.tasks = [
            asyncio.create_task(self._read(rx, after, fut))
            for rx, fut in zip(receivers, opened, strict=True)
        ]
        statuses = await asyncio.wait_for(asyncio.gather(*opened), RECEIVE_TIMEOUT)
        bad = Counter(s for s in statuses if s != 200)
        if bad:
            raise c.BenchError(f"/api/events answered {dict(bad)} to some clients")

    async def _read(self, rx: Receiver, after: int, opened: asyncio.Future[int]) -> None:
        url = f"{self.up.url}/api/events?after={after}"
        try:
            async with self.session.get(url, headers=self.auth) as r:
                opened.set_result(r.status)
                async for chunk in r.content.iter_any():
                    rx.chunks.append((time.perf_counter_ns(), chunk))
                rx.error = "the gateway ended the stream"
        except Exception as e:
            rx.error = f"{type(e).__name__}: {e}"
            if not opened.done():
                opened.set_exception(e)

    def reached(self, rx: Receiver, last: int) -> bool:
        new = rx.chunks[rx.scanned :]
        if rx.highest >= last or not new:
            return rx.highest >= last
        rx.scanned += len(new)
        text = rx.tail + b"".join(chunk for _, chunk in new)
        rx.tail = text[-64:]
        if re.search(rb"(?:^|\n)id: %d\r?\n" % last, text):
            rx.highest = last
        return rx.highest >= last

    async def drained(self, last: int) -> None:
        pass

    def finish(self, receivers: list[Receiver]) -> None:
        """Each message's arrival is that of the chunk that completed it."""
        for rx in receivers:
            buf = b""
            for arrived, chunk in rx.chunks:
                *blocks, buf = BLOCK_END.split(buf + chunk)
                for block in blocks:
                    lines = [line.rstrip(b"\r") for line in block.split(b"\n")]
                    ids = [int(x[4:]) for x in lines if x.startswith(b"id: ")]
                    if ids:  # not a comment (a ping)
                        rx.seqs.append(ids[0])
                        rx.arrivals.append(arrived)
                        data = [x[6:] for x in lines if x.startswith(b"data: ")]
                        rx.payloads.append(b"\n".join(data))


# --- one phase --------------------------------------------------------------------------


@dataclass
class PhaseResult:
    name: str
    first: int  # first sequence of the phase
    last: int
    sent: Sent
    receivers: list[Receiver]
    wall_s: float  # the timed part: first timed append → every receiver has the last one
    cpu: dict[str, float]  # seconds of CPU in the timed part, per process

    def latencies(self) -> list[float]:
        stamps = self.sent.stamps
        return [
            (arrived - stamps[seq]) / 1e6
            for rx in self.receivers
            for seq, arrived in zip(rx.seqs, rx.arrivals, strict=True)
            if seq in stamps
        ]

    def wrong(self) -> dict[str, int]:
        """Every receiver got every event of the phase exactly once, in order, intact."""
        wanted = set(range(self.first, self.last + 1))
        totals = Counter(missing=0, duplicates=0, out_of_order=0, unexpected=0, mismatch=0)
        for rx in self.receivers:
            seen = set(rx.seqs)
            totals["missing"] += len(wanted - seen)
            totals["duplicates"] += len(rx.seqs) - len(seen)
            totals["out_of_order"] += sum(1 for a, b in pairwise(rx.seqs) if b < a)
            totals["unexpected"] += len(seen - wanted)
            for seq, payload in zip(rx.seqs, rx.payloads, strict=True):
                ok = payload[ID_AT] == self.sent.ids.get(seq, "").encode()
                if self.name == "sse":  # the gateway adds the sequence to the event
                    ok = ok and payload.endswith(b',"seq":%d}' % seq)
                totals["mismatch"] += not ok
        return dict(totals)

    def cpu_ms_per_event(self, who: str) -> float:
        return 1000.0 * self.cpu.get(who, 0.0) / max(1, len(self.sent.stamps))


async def wait_all(transport: Transport, receivers: Sequence[Receiver], last: int) -> None:
    deadline = time.monotonic() + RECEIVE_TIMEOUT
    waiting = list(receivers)
    while waiting:
        waiting = [rx for rx in waiting if not transport.reached(rx, last)]
        if waiting and time.monotonic() > deadline:
            errors = Counter(rx.error for rx in waiting if rx.error)
            raise c.BenchError(
                f"{len(waiting)} of {len(receivers)} {transport.name} receivers did not get "
                f"seq {last} within {RECEIVE_TIMEOUT:.0f}s; errors: {dict(errors) or 'none'}"
            )
        await asyncio.sleep(0.001)


def cpu_now(pids: dict[str, int]) -> dict[str, float]:
    now = {name: c.proc_cpu_seconds(pid) for name, pid in pids.items()}
    if "gateway" in pids:  # its main thread runs the event loop: NATS, HTTP, SSE
        now["gateway event loop"] = c.proc_cpu_seconds(pids["gateway"], pids["gateway"])
    now["bench"] = c.self_cpu_seconds()
    now["machine"] = c.machine_cpu_seconds()
    return now


async def run_phase(
    transport: Transport, log: EventLog, sizes: Sizes, pids: dict[str, int]
) -> PhaseResult:
    receivers = [Receiver() for _ in range(sizes.clients if transport.clients else 0)]
    after = await log.stream_last_seq()
    sent = Sent()
    interval = sizes.interval_ms / 1000.0
    await transport.start(receivers, after)
    try:
        last = await append_paced(log, sizes.warmup, interval, sent, timed=False)
        await wait_all(transport, receivers, last)
        await transport.drained(last)
        cpu0, w0 = cpu_now(pids), time.perf_counter()
        last = await append_paced(log, sizes.events, interval, sent, timed=True)
        await wait_all(transport, receivers, last)
        await transport.drained(last)
        wall = time.perf_counter() - w0
        cpu1 = cpu_now(pids)
        await asyncio.sleep(0.2)  # anything extra (a duplicate) would arrive now
    finally:
        await transport.stop()
    transport.finish(receivers)
    cpu = {name: cpu1[name] - cpu0[name] for name in cpu0}
    cpu["other processes"] = max(
        0.0, cpu.pop("machine") - sum(v for k, v in cpu.items() if k != "gateway event loop")
    )
    return PhaseResult(transport.name, after + 1, last, sent, receivers, wall, cpu)


# --- the run ----------------------------------------------------------------------------


async def measure(quick: bool, parent: str | None) -> dict[str, Any]:
    sizes = QUICK if quick else FULL
    async with (
        c.fresh_server(parent, "sse") as (root, server),
        contextlib.AsyncExitStack() as stack,
    ):
        assert server.pid is not None
        nc = await connect([server.url], name="bench-appender")
        stack.push_async_callback(nc.close)
        rx_nc = await connect([server.url], name="bench-receivers")
        stack.push_async_callback(rx_nc.close)
        log = EventLog(nc)
        await log.ensure_stream()
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
        )
        stack.push_async_callback(session.close)
        pids = {"nats-server": server.pid}
        phases: dict[str, PhaseResult] = {}

        async def phase(transport: Transport) -> None:
            who = f"{sizes.clients} receivers" if transport.clients else "no client"
            c.note(f"{transport.name}: {who}, {sizes.warmup} + {sizes.events} events")
            result = phases[transport.name] = await run_phase(transport, log, sizes, pids)
            lat = result.latencies()
            if lat:
                c.note(f"  p50 {c.percentile(lat, 50):.2f} ms, p99 {c.percentile(lat, 99):.2f} ms")

        await phase(Ordered(EventLog(rx_nc)))

        c.note("starting the gateway: shipyard up --roles projector,gateway")
        env = {"SHIPYARD_DATA_DIR": str(root / "data"), "SHIPYARD_PORT": "0"}
        up = c.ShipyardUp(["--roles", "projector,gateway", "--nats", server.url], root, env)
        await up.start(ready="dashboard:")
        stack.push_async_callback(up.stop)
        pids["gateway"] = up.pid
        try:
            await Gateway(session, up).drained(await log.stream_last_seq())  # caught up
            await phase(Gateway(session, up))
            await phase(Sse(session, up))
        except c.BenchError as e:
            raise c.BenchError(f"{e}\nthe gateway logged last:\n{up.stderr_tail()}") from None
        warnings = up.warnings()
    return report(sizes, phases, warnings)


def report(sizes: Sizes, phases: dict[str, PhaseResult], warnings: list[str]) -> dict[str, Any]:
    sse, ordered, projector = phases["sse"], phases["ordered"], phases["projector"]
    lat, base = sse.latencies(), ordered.latencies()
    wrong = {name: sum(p.wrong().values()) for name, p in phases.items() if p.receivers}
    per_event = projector.cpu_ms_per_event("gateway")
    loop_sse = sse.cpu_ms_per_event("gateway event loop")
    loop_projector = projector.cpu_ms_per_event("gateway event loop")
    delivery_us = 1000.0 * (loop_sse - loop_projector) / sizes.clients
    figures = [
        c.latency("SSE append → received p50", 50, lat, base, None),
        c.latency("SSE append → received p90", 90, lat, base, None),
        c.latency("SSE append → received p99", 99, lat, base, P99_TARGET_MS),
        c.at_most("SSE gaps + duplicates + disorder", "events", wrong["sse"], 0),
        c.at_most("baseline's gaps + duplicates + disorder", "events", wrong["ordered"], 0),
        c.at_most("gateway CPU per event, projector", "ms", per_event, None),
        c.at_most("gateway loop CPU per SSE delivery", "µs", delivery_us, None),
    ]
    if wrong["sse"] or wrong["ordered"]:
        c.note("some receiver missed, repeated or reordered events: " + str(wrong))

    def cpu(p: PhaseResult) -> str:
        return ", ".join(f"{k} {100 * v / p.wall_s:.0f} %" for k, v in p.cpu.items())

    return {
        "sizes": vars(sizes),
        "figures": figures,
        "latency_ms": {name: c.spread(p.latencies()) for name, p in phases.items()},
        "checks": {name: p.wrong() for name, p in phases.items() if p.receivers},
        "cpu_s": {name: p.cpu for name, p in phases.items()},
        "gateway_warnings": warnings[:50],
        "details": [
            "",
            f"{sizes.clients} clients; {sizes.events} timed events (+{sizes.warmup}), one every "
            f"{sizes.interval_ms:g} ms. Baseline: {sizes.clients} ordered consumers",
            "(EventLog.follow_raw) on one bench connection before the gateway runs; ratio:",
            "SSE / baseline at the same percentile (lower is better).",
            *(f"CPU, {name} phase (% of a core): {cpu(p)}" for name, p in phases.items()),
            f"gateway warnings logged: {len(warnings)}",
        ],
    }


def main(argv: Sequence[str] | None = None) -> int:
    return c.main(
        "sse",
        "The gateway's live event stream to many SSE clients against ordered consumers.",
        measure,
        argv,
    )


if __name__ == "__main__":
    sys.exit(main())
