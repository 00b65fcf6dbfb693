"""Benchmark: how fast the dashboard's live stream (``GET /api/events``) delivers events.

One run starts a fresh embedded nats-server (:class:`shipyard.embedded.EmbeddedNats`, the
configuration ``shipyard up`` uses: every write synced to disk) in a temporary directory and
one gateway as its own process, ``shipyard up --roles projector,gateway --nats URL``
(``SHIPYARD_DATA_DIR`` in the temporary directory, ``SHIPYARD_PORT=0``; the bench reads the
port and the admin token from the ``dashboard:`` line it prints). A subprocess rather than
an in-process :class:`~shipyard.gateway.server.GatewayService`, so that the bench's clients
do not share the gateway's event loop — which would slow the gateway down and hide its own
queueing — and so that its CPU time can be read from ``/proc/<pid>/stat``. The projector
runs in it too (the gateway role needs it), so the gateway is measured as it is deployed.

Four phases, one after another, each with the same schedule: ``--warmup`` events (not
timed; they also prove every receiver is subscribed), then M timed events, one started every
``--interval`` ms, each a ``WorkProgress`` event on an aggregate of its own, appended through
:meth:`EventLog.append <shipyard.events.log.EventLog.append>` on the bench's own connection.
An append is started on schedule whether or not the previous one is acknowledged, so the
offered rate does not depend on the disk. Every event's send stamp is
``time.perf_counter_ns()`` just before ``append`` is called (so the synced write is part of
every figure), filed under the sequence ``append`` returns; its ``action`` field carries
the same stamp. Each receiver stamps every event on arrival, before decoding anything,
with the same clock; latency is arrival − send, per (event, receiver). The phases:

1. **core** — N plain NATS core subscriptions on ``sy.ev.>``, all on one connection of the
   bench's: the wire floor (they get a message as the server routes it, before it is
   stored and synced, so they beat the write's acknowledgement).
2. **ordered** — the baseline: N ordered JetStream consumers, each Shipyard's own
   :meth:`EventLog.follow_raw` from the phase's first sequence, all on one connection of the
   bench's — exactly what the gateway runs per SSE client, minus HTTP. Both baselines run
   before the gateway is started: NATS and the bench alone, nothing else following the log.
3. **projector** — the gateway is started (and has caught up); no receiver: the phase ends
   once its projector has applied the last event (``/api/status``). This is the gateway's
   cost with no client, all of it projecting.
4. **sse** — N SSE clients (aiohttp, one connection each, ``Authorization: Bearer`` with
   the admin token) on ``/api/events?after=<last sequence before the phase>``. A client
   only stamps and keeps each chunk as it arrives; the stream is parsed after the phase
   (an event arrived with the chunk that completes it), so parsing costs the bench nothing
   while it measures.

The ratio is SSE / ordered at the same percentile (lower is better): 1.0 would mean the
gateway — its own ordered consumer per client, the queue, sse-starlette, uvicorn, TCP, the
bench's aiohttp client, and the projector the gateway role runs beside them — adds nothing.
The target is SSE p99 ≤ 50 ms.

Correctness, checked over every phase's whole stream (warm-up included): each receiver must
get every event of the phase exactly once, in order, and each event's payload must be the
one appended with that sequence (its id; for SSE also the ``"seq"`` the gateway appends).
Gaps (missing), duplicates, out-of-order arrivals, unexpected sequences and payload
mismatches are counted; all must be 0.

Also reported (below the table), per phase: latency of the first and of the last receiver
of each event and their spread (the fan-out), the append's acknowledgement, how late
appends started against the schedule, the offered rate and the deliveries per second
achieved, and the CPU of the gateway, the nats-server, the bench process and *every other
process on the machine* during the timed part, in % of one core (from ``/proc``; if other
processes were busy, the latencies say more about them than about Shipyard). From the CPU
figures: what the gateway's projector costs per event (the projector phase) and what one
(event, SSE client) delivery costs the gateway's event loop (its main thread, from
``/proc/<pid>/task/<pid>/stat``) beyond that — the projector's DuckDB work runs on other
threads. ``--profile FILE`` runs ``py-spy record`` (``pip install py-spy``) on the gateway
during the timed SSE phase, writes the collapsed stacks to FILE and prints where the
gateway's time went.

Sizing: N receivers at R events/s are N × R deliveries per second for every path, and
every receiver lives in the bench process: 100 ordered consumers at 100 events/s take it
about 60 % of a core (~60 µs per message in nats-py), 100 aiohttp SSE clients about 75 %
once the gateway keeps up. At 200 events/s (5 ms apart) the baseline alone would need more
than a core, and the ratio would measure the bench. The default, 10 ms apart (100 events/s,
10,000 deliveries/s), is the most a 2-core machine can offer all three processes;
``--interval 5`` is the harder case, ``--interval 20`` / ``50`` show where the gateway copes.

Run from the repository root::

    python -m bench.sse            # 100 clients, 200 events 10 ms apart: well under 2 minutes
    python -m bench.sse --quick    # 10 clients, 100 events: a smoke run of a few seconds
    python -m bench.sse --json     # one JSON object on stdout (progress goes to stderr)
    python -m bench.sse --interval 5 --profile /tmp/gateway.txt
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import dataclasses
import json
import math
import os
import platform
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import metadata
from itertools import pairwise
from pathlib import Path
from typing import Any

import aiohttp
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from shipyard.embedded import EmbeddedNats, binary
from shipyard.events.envelope import Event, make, new_id
from shipyard.events.log import ALL_EVENTS, EventLog, connect
from shipyard.events.types import Phase, WorkProgress

P99_TARGET_MS = 50.0  # append → SSE client has it, at most
NOISY_PCT = 25.0  # other processes' CPU (% of a core) above which the table says so
ACTOR = "handler:bench"

GATEWAY_START_TIMEOUT = 60.0
GATEWAY_STOP_TIMEOUT = 15.0
RECEIVE_TIMEOUT = 30.0  # seconds after the last append for every receiver to have it all
CATCH_UP_TIMEOUT = 30.0  # seconds for the gateway's projector to apply the earlier phases
PROJECTED_POLL = 0.02  # seconds between two looks at /api/status while waiting for it
CLK_TCK = os.sysconf("SC_CLK_TCK")
ID_AT = slice(7, 7 + 26)  # an encoded event starts with {"id":"<26 characters>"
DASHBOARD = re.compile(rb"dashboard:\s+(http://\S+?)/\?token=(\S+)")
BLOCK_END = re.compile(rb"\r?\n\r?\n")  # what ends one SSE message
_PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(None, use_errno=True)  # loaded here: the child must not dlopen after fork


class BenchError(Exception):
    """The bench could not measure: the gateway did not start, events never arrived, ..."""


@dataclass(frozen=True)
class Sizes:
    clients: int  # N: receivers per phase (SSE clients, ordered consumers, core subs)
    events: int  # M: timed events per phase
    warmup: int  # events per phase before the timed ones
    interval_ms: float  # between the starts of two appends


QUICK = Sizes(clients=10, events=100, warmup=10, interval_ms=10.0)
FULL = Sizes(clients=100, events=200, warmup=20, interval_ms=10.0)


@dataclass
class Figure:
    name: str
    unit: str
    value: float
    baseline: float | None = None
    ratio: float | None = None
    target: str = ""
    passed: bool | None = None


def note(text: str) -> None:
    """Progress, on stderr so that stdout holds only the result."""
    print(text, file=sys.stderr, flush=True)


def percentile(samples: Sequence[float], p: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(p / 100.0 * len(ordered)) - 1)]


def spread(samples: Sequence[float]) -> dict[str, float]:
    if not samples:
        return {}
    return {
        "p50": percentile(samples, 50),
        "p90": percentile(samples, 90),
        "p99": percentile(samples, 99),
        "max": max(samples),
        "mean": statistics.fmean(samples),
        "n": len(samples),
    }


def proc_cpu_seconds(pid: int, tid: int | None = None) -> float:
    """``utime + stime`` of one process (all its threads), without its children's; or of
    one of its threads, ``tid`` (the main thread's is the pid)."""
    where = f"/proc/{pid}/task/{tid}/stat" if tid is not None else f"/proc/{pid}/stat"
    stat = Path(where).read_text()
    fields = stat[stat.rindex(")") + 2 :].split()  # fields[0] is field 3, "state"
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15


def machine_cpu_seconds() -> float:
    """Busy CPU time of the whole machine, all cores (``/proc/stat``)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def self_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it if the bench dies, however it dies."""
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


# --- the gateway process ----------------------------------------------------------------


class GatewayProcess:
    """``shipyard up --roles projector,gateway --nats URL``; stdout drained, stderr in a file."""

    def __init__(self, nats_url: str, root: Path) -> None:
        self.nats_url = nats_url
        self.root = root
        self.stderr_path = root / "gateway.stderr"
        self.url = ""
        self.token = ""
        self.proc: asyncio.subprocess.Process | None = None
        self._drain: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stderr_tail(self, lines: int = 20) -> str:
        try:
            text = self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def warnings(self) -> list[str]:
        try:
            text = self.stderr_path.read_text(errors="replace")
        except OSError:
            return []
        return [line for line in text.splitlines() if " WARNING " in line or " ERROR " in line]

    async def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SHIPYARD_")}
        env["SHIPYARD_DATA_DIR"] = str(self.root / "data")
        env["SHIPYARD_PORT"] = "0"
        argv = ["-m", "shipyard.cli", "up", "--roles", "projector,gateway", "--nats", self.nats_url]
        with self.stderr_path.open("wb") as err:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=err,
                env=env,
                cwd=self.root,
                preexec_fn=_die_with_parent,
            )
        assert self.proc.stdout is not None
        deadline = time.monotonic() + GATEWAY_START_TIMEOUT
        while True:
            remaining = deadline - time.monotonic()
            try:
                line = await asyncio.wait_for(self.proc.stdout.readline(), max(0.0, remaining))
            except TimeoutError:
                line = b""
            if not line:
                await self.stop()
                raise BenchError(
                    "the gateway did not come up; its last lines:\n" + self.stderr_tail()
                )
            found = DASHBOARD.search(line)
            if found:
                self.url = found.group(1).decode()
                self.token = found.group(2).decode()
                break
        self._drain = asyncio.create_task(self._drain_stdout())

    async def _drain_stdout(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        while await self.proc.stdout.readline():
            pass

    async def stop(self) -> None:
        """SIGTERM (``shipyard up`` stops its roles and exits), SIGKILL if it hangs."""
        proc = self.proc
        if proc is None:
            return
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), GATEWAY_STOP_TIMEOUT)
            except TimeoutError:
                note("the gateway did not stop in time; killing it")
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        if self._drain is not None:
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(self._drain, 5)

    async def wait_projected(self, session: aiohttp.ClientSession, seq: int) -> None:
        """Until the gateway's projector has applied every event up to ``seq``."""
        deadline = time.monotonic() + CATCH_UP_TIMEOUT
        headers = {"Authorization": f"Bearer {self.token}"}
        while True:
            async with session.get(self.url + "/api/status", headers=headers) as r:
                body = await r.json()
            if r.status == 200 and body["projection"]["applied_seq"] >= seq:
                return
            if time.monotonic() > deadline:
                raise BenchError(f"the gateway's projector did not reach {seq}: {body}")
            await asyncio.sleep(PROJECTED_POLL)


# --- receivers --------------------------------------------------------------------------


@dataclass
class Receiver:
    """What one client / consumer / subscriber received: sequence, arrival, payload."""

    index: int
    seqs: list[int] = field(default_factory=list)
    arrivals: list[int] = field(default_factory=list)  # perf_counter_ns on arrival
    payloads: list[bytes] = field(default_factory=list)
    chunks: list[tuple[int, bytes]] = field(default_factory=list)  # SSE: (arrival, bytes)
    highest: int = 0
    scanned: int = 0  # SSE: chunks already searched for the end marker
    tail: bytes = b""  # SSE: the end of the last chunk searched
    error: str = ""

    def got(self, seq: int, arrived: int, payload: bytes) -> None:
        self.seqs.append(seq)
        self.arrivals.append(arrived)
        self.payloads.append(payload)
        self.highest = max(self.highest, seq)


class Transport:
    """One way of receiving the log: N receivers from a sequence on."""

    name = ""
    receivers = True  # False: the phase has none (only the gateway's own CPU is measured)

    async def start(self, receivers: list[Receiver], after: int) -> None:
        raise NotImplementedError

    async def drained(self, last: int) -> None:
        """After every receiver has ``last``: wait for whatever else the phase times."""

    def reached(self, rx: Receiver, last: int, count: int) -> bool:
        """Whether ``rx`` has the event at ``last`` (the ``count``-th of the phase)."""
        return rx.highest >= last

    async def stop(self) -> None:
        raise NotImplementedError

    def finish(self, receivers: list[Receiver], sent: Sent) -> None:
        """After the phase: fill in what the hot path left out."""


class ProjectorOnly(Transport):
    """No receiver: the gateway's projector alone follows the events, and the phase ends
    once it has applied the last one. Measures what projecting costs the gateway."""

    name = "projector"
    receivers = False

    def __init__(self, session: aiohttp.ClientSession, gateway: GatewayProcess) -> None:
        self.session = session
        self.gateway = gateway

    async def start(self, receivers: list[Receiver], after: int) -> None:
        pass

    async def drained(self, last: int) -> None:
        await self.gateway.wait_projected(self.session, last)

    async def stop(self) -> None:
        pass


class CoreSubscribers(Transport):
    """N core subscriptions on ``sy.ev.>``, one connection. They see no sequence: it is
    looked up afterwards from the event id at the start of the payload."""

    name = "core"

    def __init__(self, nc: NATS) -> None:
        self.nc = nc
        self.subs: list[Any] = []

    async def start(self, receivers: list[Receiver], after: int) -> None:
        for rx in receivers:

            async def on_msg(msg: Msg, rx: Receiver = rx) -> None:
                rx.arrivals.append(time.perf_counter_ns())
                rx.payloads.append(msg.data)

            self.subs.append(await self.nc.subscribe(ALL_EVENTS, cb=on_msg))
        # Twice: nats-py (2.16) writes flush()'s PING straight to the socket, ahead of SUBs
        # still queued for its flusher task, so one PONG does not prove the server has them
        # all (and the first event would miss some subscribers). By the first PONG the
        # flusher has written them; the second PONG comes after the server processed them.
        await self.nc.flush()
        await self.nc.flush()

    def reached(self, rx: Receiver, last: int, count: int) -> bool:
        return len(rx.arrivals) >= count

    async def stop(self) -> None:
        for sub in self.subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        self.subs = []

    def finish(self, receivers: list[Receiver], sent: Sent) -> None:
        by_id = {event_id: seq for seq, event_id in sent.ids.items()}
        for rx in receivers:
            rx.seqs = [by_id.get(p[ID_AT].decode("ascii", "replace"), -1) for p in rx.payloads]


class OrderedConsumers(Transport):
    """N :meth:`EventLog.follow_raw` loops on one connection: the gateway's own reader."""

    name = "ordered"

    def __init__(self, nc: NATS) -> None:
        self.log = EventLog(nc)
        self.tasks: list[asyncio.Task[None]] = []

    async def start(self, receivers: list[Receiver], after: int) -> None:
        async def follow(rx: Receiver) -> None:
            try:
                async for seq, payload in self.log.follow_raw(start=after + 1):
                    rx.got(seq, time.perf_counter_ns(), payload)
            except Exception as e:
                rx.error = f"{type(e).__name__}: {e}"
                raise

        self.tasks = [
            asyncio.create_task(follow(rx), name=f"bench-ordered-{rx.index}") for rx in receivers
        ]

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.tasks = []


class SseClients(Transport):
    """N aiohttp clients on ``/api/events?after=``, each on its own HTTP connection.

    The hot path only stamps and keeps each chunk as it arrives; the stream is parsed after
    the phase (an event's arrival is that of the chunk that completes it), so parsing costs
    the bench nothing while it measures. Completion is found by searching new chunks for
    the last event's ``id:`` line."""

    name = "sse"

    def __init__(self, session: aiohttp.ClientSession, gateway: GatewayProcess) -> None:
        self.session = session
        self.gateway = gateway
        self.tasks: list[asyncio.Task[None]] = []

    async def start(self, receivers: list[Receiver], after: int) -> None:
        loop = asyncio.get_running_loop()
        opened = [loop.create_future() for _ in receivers]
        self.tasks = [
            asyncio.create_task(self._read(rx, after, fut), name=f"bench-sse-{rx.index}")
            for rx, fut in zip(receivers, opened, strict=True)
        ]
        try:
            statuses = await asyncio.wait_for(asyncio.gather(*opened), GATEWAY_START_TIMEOUT)
        except (TimeoutError, aiohttp.ClientError, OSError) as e:
            raise BenchError(f"could not open /api/events: {type(e).__name__}: {e}") from e
        bad = Counter(s for s in statuses if s != 200)
        if bad:
            raise BenchError(f"/api/events answered {dict(bad)} to some clients")

    async def _read(self, rx: Receiver, after: int, opened: asyncio.Future[int]) -> None:
        url = f"{self.gateway.url}/api/events?after={after}"
        headers = {"Authorization": f"Bearer {self.gateway.token}", "Accept": "text/event-stream"}
        chunks = rx.chunks
        try:
            async with self.session.get(url, headers=headers) as r:
                opened.set_result(r.status)
                if r.status != 200:
                    return
                async for chunk in r.content.iter_any():
                    chunks.append((time.perf_counter_ns(), chunk))
                rx.error = rx.error or "the gateway ended the stream"
        except Exception as e:
            rx.error = f"{type(e).__name__}: {e}"
            if not opened.done():
                opened.set_exception(e)
            raise

    def reached(self, rx: Receiver, last: int, count: int) -> bool:
        if rx.highest >= last:
            return True
        new = rx.chunks[rx.scanned :]
        if not new:
            return False
        rx.scanned += len(new)
        text = rx.tail + b"".join(chunk for _, chunk in new)
        rx.tail = text[-64:]
        if re.search(rb"(?:^|\n)id: %d\r?\n" % last, text):
            rx.highest = last
            return True
        return False

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.tasks = []

    def finish(self, receivers: list[Receiver], sent: Sent) -> None:
        for rx in receivers:
            rx.highest = 0
            buf = b""
            for arrived, chunk in rx.chunks:
                buf += chunk
                *blocks, buf = BLOCK_END.split(buf)
                for block in blocks:
                    seq, data = _sse_message(block)
                    if seq is not None:
                        rx.got(seq, arrived, data)
            rx.chunks = []


def _sse_message(block: bytes) -> tuple[int | None, bytes]:
    """The id and the data of one SSE message (``None``: a comment, such as a ping)."""
    seq: int | None = None
    data: list[bytes] = []
    for line in block.split(b"\n"):
        line = line.rstrip(b"\r")
        if line.startswith(b"id: "):
            seq = int(line[4:])
        elif line.startswith(b"data: "):
            data.append(line[6:])
    return seq, b"\n".join(data)


# --- one phase --------------------------------------------------------------------------


def progress_event(n: int, stamp_ns: int) -> Event[WorkProgress]:
    data = WorkProgress(
        run_id=new_id("r-"),
        phase=Phase.BUILD,
        percent=n % 101,
        action=f"bench sent_ns={stamp_ns}",
        turns=n,
        tool_calls=2 * n,
        tokens_in=1000 * n,
        tokens_out=100 * n,
        cost_usd=0.01 * n,
        last_tool="Bash",
    )
    return make(data, aggregate_id=new_id("t-"), actor=ACTOR)


@dataclass
class Sent:
    sent_ns: dict[int, int] = field(default_factory=dict)  # timed events: seq → send stamp
    ids: dict[int, str] = field(default_factory=dict)  # every event of the phase: seq → id
    ack_ms: list[float] = field(default_factory=list)  # timed appends' own duration
    lateness_ms: list[float] = field(default_factory=list)  # actual start − scheduled start
    span_s: float = 0.0  # first timed append's start → last one's start


async def append_paced(
    log: EventLog, count: int, interval_s: float, sent: Sent, timed: bool
) -> int:
    """Start an append every ``interval_s``, whether or not earlier ones are acknowledged
    (so the offered rate does not depend on the write's latency); return the last seq."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    t0 = time.perf_counter_ns()

    async def one(i: int, stamp: int, event: Event[WorkProgress]) -> int:
        seq = await log.append(event)
        sent.ids[seq] = event.id
        if timed:
            sent.ack_ms.append((time.perf_counter_ns() - stamp) / 1e6)
            sent.sent_ns[seq] = stamp
        return seq

    tasks: list[asyncio.Task[int]] = []
    stamp = t0
    for i in range(count):
        due = start + i * interval_s
        delay = due - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        event = progress_event(i, time.perf_counter_ns())
        stamp = time.perf_counter_ns()  # the event is built: only the append is timed
        if timed:
            sent.lateness_ms.append(max(0.0, (loop.time() - due) * 1000.0))
        tasks.append(asyncio.create_task(one(i, stamp, event)))
        await asyncio.sleep(0)  # let it write its request now, in order
    if timed:
        sent.span_s = (stamp - t0) / 1e9
    seqs = await asyncio.gather(*tasks)
    if seqs != sorted(seqs):
        note("warning: the appends were stored out of their start order")
    return max(seqs)


async def wait_all(
    transport: Transport, receivers: Sequence[Receiver], last: int, count: int, what: str
) -> None:
    """Until every receiver has the event at ``last``, polling every millisecond or so."""
    deadline = time.monotonic() + RECEIVE_TIMEOUT
    waiting = list(receivers)
    while True:
        waiting = [rx for rx in waiting if not transport.reached(rx, last, count)]
        if not waiting:
            return
        if time.monotonic() > deadline:
            errors = Counter(rx.error for rx in waiting if rx.error)
            got = sorted(len(rx.arrivals) or len(rx.chunks) for rx in waiting)
            raise BenchError(
                f"{len(waiting)} of {len(receivers)} {transport.name} receivers did not get "
                f"{what} (up to seq {last}, the {count}th) within {RECEIVE_TIMEOUT:.0f}s; "
                f"they have {got[0]}..{got[-1]} events (SSE: chunks); errors: "
                f"{dict(errors) or 'none'}"
            )
        await asyncio.sleep(0.001)


@dataclass
class PhaseResult:
    name: str
    first: int  # first sequence of the phase
    last: int
    sent: Sent
    receivers: list[Receiver]
    wall_s: float  # the timed part: first timed append → every receiver has the last one
    cpu: dict[str, float]  # % of one core in the timed part, per process

    def latencies(self) -> list[float]:
        sent = self.sent.sent_ns
        out: list[float] = []
        for rx in self.receivers:
            for seq, arrived in zip(rx.seqs, rx.arrivals, strict=True):
                stamp = sent.get(seq)
                if stamp is not None:
                    out.append((arrived - stamp) / 1e6)
        return out

    def fan_out(self) -> tuple[list[float], list[float], list[float]]:
        """Per timed event, in order: first receiver's latency, last receiver's, spread."""
        first: dict[int, int] = {}
        last: dict[int, int] = {}
        for rx in self.receivers:
            for seq, arrived in zip(rx.seqs, rx.arrivals, strict=True):
                if seq in self.sent.sent_ns:
                    first[seq] = min(first.get(seq, arrived), arrived)
                    last[seq] = max(last.get(seq, arrived), arrived)
        sent = self.sent.sent_ns
        order = sorted(first)
        return (
            [(first[s] - sent[s]) / 1e6 for s in order],
            [(last[s] - sent[s]) / 1e6 for s in order],
            [(last[s] - first[s]) / 1e6 for s in order],
        )

    def rates(self) -> dict[str, float]:
        timed = len(self.sent.sent_ns)
        delivered = sum(1 for rx in self.receivers for s in rx.seqs if s in self.sent.sent_ns)
        return {
            "offered_events_per_s": (timed - 1) / self.sent.span_s if self.sent.span_s else 0.0,
            "delivered_per_s": delivered / self.wall_s,
            # the gateway's CPU per timed event, where it runs: all of it, its event loop
            "gateway_cpu_ms_per_event": (
                self.cpu.get("gateway", 0.0) * self.wall_s / 100.0 / timed * 1e3
            ),
            "gateway_loop_cpu_ms_per_event": (
                self.cpu.get("gateway event loop", 0.0) * self.wall_s / 100.0 / timed * 1e3
            ),
        }

    def check(self) -> dict[str, int]:
        """Every receiver got every event of the phase exactly once, in order, intact."""
        expected = list(range(self.first, self.last + 1))
        wanted = set(expected)
        totals = Counter(missing=0, duplicates=0, out_of_order=0, unexpected=0, payload_mismatch=0)
        for rx in self.receivers:
            got = rx.seqs
            seen = set(got)
            totals["missing"] += len(wanted - seen)
            totals["duplicates"] += len(got) - len(seen)
            totals["out_of_order"] += sum(1 for a, b in pairwise(got) if b < a)
            totals["unexpected"] += len(seen - wanted)
            for seq, payload in zip(got, rx.payloads, strict=True):
                event_id = self.sent.ids.get(seq)
                if event_id is None:
                    continue
                ok = payload[ID_AT] == event_id.encode()
                if self.name == "sse":
                    ok = ok and payload.endswith(b',"seq":%d}' % seq)
                totals["payload_mismatch"] += not ok
        totals["receivers_short"] = sum(1 for rx in self.receivers if not wanted <= set(rx.seqs))
        return dict(totals)


class Profiler:
    """``py-spy record`` on one process, collapsed stacks written to a file."""

    def __init__(self, pid: int, out: Path) -> None:
        self.pid = pid
        self.out = out
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        argv = [exe, "record", "--pid", str(self.pid), "--format", "raw", "--rate", "250"]
        argv += ["--nonblocking", "--output", str(self.out)]
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
            )
        except OSError as e:
            raise BenchError(f"could not run py-spy ({e}): pip install py-spy") from e
        await asyncio.sleep(0.5)  # let it attach before the timed part starts

    async def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            await asyncio.wait_for(self.proc.wait(), 20)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()


async def run_phase(
    transport: Transport,
    log: EventLog,
    sizes: Sizes,
    pids: dict[str, int],
    profiler: Profiler | None = None,
) -> PhaseResult:
    receivers = [Receiver(i) for i in range(sizes.clients if transport.receivers else 0)]
    after = await log.stream_last_seq()
    sent = Sent()
    interval = sizes.interval_ms / 1000.0
    await transport.start(receivers, after)
    try:
        last = await append_paced(log, sizes.warmup, interval, sent, timed=False)
        await wait_all(transport, receivers, last, sizes.warmup, "the warm-up events")
        await transport.drained(last)
        if profiler is not None:
            await profiler.start()
        cpu0 = {name: proc_cpu_seconds(pid) for name, pid in pids.items()}
        loop0 = proc_cpu_seconds(pids["gateway"], pids["gateway"]) if "gateway" in pids else 0.0
        bench0, machine0, w0 = self_cpu_seconds(), machine_cpu_seconds(), time.perf_counter()
        last = await append_paced(log, sizes.events, interval, sent, timed=True)
        total = sizes.warmup + sizes.events
        await wait_all(transport, receivers, last, total, "the timed events")
        await transport.drained(last)
        wall = time.perf_counter() - w0
        cpu = {
            name: 100.0 * (proc_cpu_seconds(pid) - cpu0[name]) / wall for name, pid in pids.items()
        }
        cpu["bench"] = 100.0 * (self_cpu_seconds() - bench0) / wall
        machine = 100.0 * (machine_cpu_seconds() - machine0) / wall
        cpu["other processes"] = max(0.0, machine - sum(cpu.values()))
        if "gateway" in pids:  # of which its main thread: the event loop (NATS, HTTP, SSE)
            loop = proc_cpu_seconds(pids["gateway"], pids["gateway"]) - loop0
            cpu = {"gateway": cpu.pop("gateway"), "gateway event loop": 100.0 * loop / wall, **cpu}
        if profiler is not None:
            await profiler.stop()
        await asyncio.sleep(0.2)  # anything extra (a duplicate) would arrive now
    finally:
        await transport.stop()
    transport.finish(receivers, sent)
    return PhaseResult(transport.name, after + 1, last, sent, receivers, wall, cpu)


# --- the profile ------------------------------------------------------------------------


def summarize_profile(path: Path, top: int = 25) -> dict[str, Any]:
    """From py-spy's collapsed stacks: the share of samples each function is on the stack
    (inclusive) and on top of it (self), busiest first; idle samples are left out."""
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = idle = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_frame(f) for f in stack.split(";")]
        if frames and frames[0].startswith("process "):
            frames = frames[1:]
        if frames and frames[0].startswith("thread "):
            frames = frames[1:]
        total += count
        if frames and frames[-1].split(" ")[0] in IDLE_FRAMES:
            idle += count
            continue
        for name in set(frames):
            inclusive[name] += count
        if frames:
            own[frames[-1]] += count
    busy = max(1, total - idle)
    return {
        "samples": total,
        "idle_samples": idle,
        "inclusive_pct": [(n, round(100.0 * c / busy, 1)) for n, c in inclusive.most_common(top)],
        "self_pct": [(n, round(100.0 * c / busy, 1)) for n, c in own.most_common(top)],
    }


IDLE_FRAMES = {"select", "poll", "epoll_wait", "wait", "_worker", "run_once"}


def _frame(raw: str) -> str:
    # py-spy raw frames read "function (file.py:line)": keep function and file, not the line
    name, _, where = raw.partition(" (")
    where = where.rstrip(")").rsplit(":", 1)[0]
    return f"{name} ({Path(where).name})" if where else name


# --- the run ----------------------------------------------------------------------------


async def run(sizes: Sizes, store_parent: str | None, profile: Path | None) -> dict[str, Any]:
    """:func:`measure`, cleaning up on SIGTERM as on Ctrl-C."""
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        return await measure(sizes, store_parent, profile)
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


async def measure(sizes: Sizes, store_parent: str | None, profile: Path | None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="shipyard-bench-sse-", dir=store_parent) as tmp:
        root = Path(tmp)
        server = EmbeddedNats(root / "nats")
        url = await asyncio.to_thread(server.start)
        try:
            assert server.pid is not None
            return await measure_on(url, sizes, root, server.pid, server.store_dir, profile)
        finally:
            await asyncio.to_thread(server.stop)


async def measure_on(
    url: str, sizes: Sizes, root: Path, server_pid: int, store_dir: Path, profile: Path | None
) -> dict[str, Any]:
    async with contextlib.AsyncExitStack() as stack:
        nc = await connect([url], name="bench-appender")
        stack.push_async_callback(nc.close)
        rx_nc = await connect([url], name="bench-receivers")
        stack.push_async_callback(rx_nc.close)
        log = EventLog(nc)
        await log.ensure_stream()

        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
        )
        stack.push_async_callback(session.close)
        gateway = GatewayProcess(url, root)
        pids = {"nats-server": server_pid}
        phases: dict[str, PhaseResult] = {}

        async def phase(transport: Transport, profiler: Profiler | None = None) -> None:
            who = f"{sizes.clients} receivers" if transport.receivers else "no receiver"
            note(
                f"{transport.name}: {who}, {sizes.warmup} warm-up + {sizes.events} timed "
                f"events every {sizes.interval_ms:g} ms"
            )
            try:
                result = await run_phase(transport, log, sizes, pids, profiler)
            except BenchError as e:
                if gateway.proc is None:
                    raise
                tail = gateway.stderr_tail() or "(nothing)"
                raise BenchError(f"{e}\nthe gateway logged last:\n{tail}") from None
            phases[transport.name] = result
            lat, rates = result.latencies(), result.rates()
            shown = ""
            if lat:
                shown = f"p50 {percentile(lat, 50):.2f} ms, p99 {percentile(lat, 99):.2f} ms; "
            note(
                f"  {shown}{rates['offered_events_per_s']:.0f} events/s offered, "
                f"{rates['delivered_per_s']:,.0f} deliveries/s; CPU "
                + ", ".join(f"{k} {v:.0f} %" for k, v in result.cpu.items())
            )

        # The baselines first, with no gateway running: NATS and the bench alone.
        await phase(CoreSubscribers(rx_nc))
        await phase(OrderedConsumers(rx_nc))

        note("starting the gateway: shipyard up --roles projector,gateway")
        await gateway.start()
        stack.push_async_callback(gateway.stop)
        note(f"  gateway pid {gateway.pid} at {gateway.url}, nats-server pid {server_pid}")
        pids["gateway"] = gateway.pid
        await gateway.wait_projected(session, await log.stream_last_seq())  # catch up
        await phase(ProjectorOnly(session, gateway))
        profiler = Profiler(gateway.pid, profile) if profile is not None else None
        await phase(SseClients(session, gateway), profiler)
        warnings = gateway.warnings()
        stored = await log.stream_last_seq()

    return report(sizes, phases, store_dir, stored, warnings, profile)


def report(
    sizes: Sizes,
    phases: dict[str, PhaseResult],
    store_dir: Path,
    stored: int,
    warnings: list[str],
    profile: Path | None,
) -> dict[str, Any]:
    lat = {name: phase.latencies() for name, phase in phases.items()}
    checks = {name: phase.check() for name, phase in phases.items()}
    sse, ordered = lat["sse"], lat["ordered"]
    wrong_sse = sum(v for k, v in checks["sse"].items() if k != "receivers_short")
    wrong_raw = sum(
        v for name in ("core", "ordered") for k, v in checks[name].items() if k != "receivers_short"
    )
    figures = [
        latency_figure("SSE append → received p50", 50, sse, ordered, None),
        latency_figure("SSE append → received p90", 90, sse, ordered, None),
        latency_figure("SSE append → received p99", 99, sse, ordered, P99_TARGET_MS),
        Figure(
            "SSE gaps + duplicates + disorder",
            "events",
            wrong_sse,
            target="= 0",
            passed=wrong_sse == 0,
        ),
        Figure(
            "baselines' gaps + duplicates + disorder",
            "events",
            wrong_raw,
            target="= 0",
            passed=wrong_raw == 0,
        ),
    ]
    paths: dict[str, Any] = {}
    for name, phase in phases.items():
        first, last, fan = phase.fan_out()
        paths[name] = {
            "latency_ms": spread(lat[name]),
            "first_receiver_ms": spread(first),
            "last_receiver_ms": spread(last),
            "fan_out_spread_ms": spread(fan),
            "append_ack_ms": spread(phase.sent.ack_ms),
            "append_late_ms": spread(phase.sent.lateness_ms),
            **phase.rates(),
            "first_receiver_series_ms": [round(v, 2) for v in first],
            "last_receiver_series_ms": [round(v, 2) for v in last],
            "timed_wall_s": phase.wall_s,
            "cpu_pct": phase.cpu,
            "events": phase.last - phase.first + 1,
            "check": checks[name],
        }
    # What one (event, client) delivery costs the gateway beyond projecting the event. The
    # projector's transactions run on other threads than the event loop, and grow (so cost
    # less per event) when the loop is busy: so a delivery's cost is counted on the loop.
    projector, sse_path = paths["projector"], paths["sse"]
    projector_ms = projector["gateway_cpu_ms_per_event"]
    projector_loop_ms = projector["gateway_loop_cpu_ms_per_event"]
    delivery_us = (
        1000.0 * (sse_path["gateway_loop_cpu_ms_per_event"] - projector_loop_ms) / sizes.clients
    )
    figures += [
        Figure("gateway CPU per event, projector", "ms", projector_ms),
        Figure("gateway loop CPU per SSE delivery", "µs", delivery_us),
    ]
    sound = wrong_sse == 0 and wrong_raw == 0
    result: dict[str, Any] = {
        "sizes": dataclasses.asdict(sizes),
        "gateway": {
            "how": "subprocess: shipyard up --roles projector,gateway --nats URL",
            "warnings": warnings[:50],
            "warning_count": len(warnings),
        },
        "baseline": "ordered JetStream consumers (EventLog.follow_raw) on one bench connection, "
        "before the gateway runs",
        "environment": environment(store_dir),
        "stream_messages": stored,
        "figures": [dataclasses.asdict(f) for f in figures],
        "paths": paths,
        "gateway_cost": {
            "projector_cpu_ms_per_event": projector_ms,
            "projector_loop_cpu_ms_per_event": projector_loop_ms,
            "sse_cpu_us_per_delivery": delivery_us,
        },
        "sound": sound,
        "passed": sound and all(f.passed is not False for f in figures),
    }
    if profile is not None and profile.is_file():
        result["profile"] = {"file": str(profile), **summarize_profile(profile)}
    return result


def latency_figure(
    name: str, p: float, samples: list[float], baseline: list[float], target: float | None
) -> Figure:
    value = percentile(samples, p)
    base = percentile(baseline, p)
    return Figure(
        name,
        "ms",
        value,
        baseline=base,
        ratio=value / base if base > 0 else None,
        target=f"≤ {target:g} ms" if target is not None else "",
        passed=value <= target if target is not None else None,
    )


def environment(store_dir: Path) -> dict[str, Any]:
    try:
        server = subprocess.run(
            [binary(), "--version"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        server = "unknown"
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "nats_server": server,
        "nats_py": metadata.version("nats-py"),
        "aiohttp": metadata.version("aiohttp"),
        "uvicorn": metadata.version("uvicorn"),
        "sse_starlette": metadata.version("sse-starlette"),
        "store": str(store_dir),
    }


# --- output -----------------------------------------------------------------------------


def _number(value: float | None, unit: str = "") -> str:
    if value is None:
        return "—"
    if unit == "ms":
        return f"{value:.2f} ms"
    if unit == "events":
        return f"{value:.0f}"
    if unit == "µs":
        return f"{value:.0f} µs"
    return f"{value:.2f}"


def table(result: dict[str, Any]) -> str:
    headers = ("figure", "value", "baseline", "ratio", "target", "result")
    rows = []
    for f in result["figures"]:
        verdict = {True: "pass", False: "MISS", None: "—"}[f["passed"]]
        rows.append(
            (
                f["name"],
                _number(f["value"], f["unit"]),
                _number(f["baseline"], f["unit"]),
                _number(f["ratio"]),
                f["target"] or "—",
                verdict,
            )
        )
    widths = [max(len(str(r[i])) for r in (headers, *rows)) for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        left = cells[0].ljust(widths[0])
        rest = [c.rjust(w) for c, w in zip(cells[1:4], widths[1:4], strict=True)]
        tail = [c.ljust(w) for c, w in zip(cells[4:], widths[4:], strict=True)]
        return "  ".join([left, *rest, *tail]).rstrip()

    sizes, env, paths = result["sizes"], result["environment"], result["paths"]

    def ms(d: dict[str, float]) -> str:
        if not d:
            return "—"
        return f"{d['p50']:7.2f} {d['p90']:7.2f} {d['p99']:7.2f} {d['max']:7.2f}"

    out = [
        f"Shipyard SSE benchmark — {env['nats_server']}, nats-py {env['nats_py']}, "
        f"uvicorn {env['uvicorn']}, sse-starlette {env['sse_starlette']}, "
        f"Python {env['python']}, {env['cpus']} CPUs",
        f"gateway: {result['gateway']['how']}",
        f"N={sizes['clients']} receivers per path; M={sizes['events']} timed events "
        f"(+{sizes['warmup']} warm-up), one every {sizes['interval_ms']:g} ms; "
        f"store {env['store']}",
        "",
        line(headers),
        line(["-" * w for w in widths]),
        *(line(r) for r in rows),
        "",
        f"baseline: {result['baseline']};",
        "ratio: SSE / baseline at the same percentile (lower is better). Latency: from",
        "perf_counter_ns before EventLog.append to the receiver having the event.",
        "",
        "per path, ms                        p50     p90     p99     max",
    ]
    labels = {
        "core": "core subscribers (wire floor; no gateway running yet)",
        "ordered": "ordered consumers (baseline; no gateway running yet)",
        "projector": "gateway started, no receiver (its projector alone follows the events)",
        "sse": "SSE clients via the gateway",
    }
    for name, p in paths.items():
        if name == "projector":
            out += [
                labels[name],
                f"  append acknowledged          {ms(p['append_ack_ms'])}",
                "  CPU in the timed part: "
                + ", ".join(f"{k} {v:.0f} %" for k, v in p["cpu_pct"].items())
                + f" of a core ({p['timed_wall_s']:.1f}s, until it applied the last event)",
            ]
            continue
        out += [
            f"{labels.get(name, name)}",
            f"  every (event, receiver)      {ms(p['latency_ms'])}",
            f"  first receiver per event     {ms(p['first_receiver_ms'])}",
            f"  last receiver per event      {ms(p['last_receiver_ms'])}",
            f"  fan-out spread (last−first)  {ms(p['fan_out_spread_ms'])}",
            f"  append acknowledged          {ms(p['append_ack_ms'])}",
            f"  append started late          {ms(p['append_late_ms'])}",
            f"  {p['offered_events_per_s']:.0f} events/s offered, "
            f"{p['delivered_per_s']:,.0f} (event, receiver) deliveries/s until the last",
            "  CPU in the timed part: "
            + ", ".join(f"{k} {v:.0f} %" for k, v in p["cpu_pct"].items())
            + f" of a core ({p['timed_wall_s']:.1f}s)",
        ]
    out.append("")
    for name, p in paths.items():
        c = p["check"]
        if name == "projector":
            continue
        out.append(
            f"check {name}: {p['events']} events × {sizes['clients']} receivers; "
            + ", ".join(f"{k} {v}" for k, v in c.items())
        )
    gw, cost = result["gateway"], result["gateway_cost"]
    out += [
        f"gateway CPU: {cost['projector_cpu_ms_per_event']:.2f} ms per event for its projector "
        f"(projector phase; {cost['projector_loop_cpu_ms_per_event']:.2f} ms of it on the "
        "event loop),",
        f"  and {cost['sse_cpu_us_per_delivery']:.0f} µs of event-loop CPU per (event, SSE "
        "client) delivery (SSE phase, beyond the projector's)",
        f"gateway warnings logged: {gw['warning_count']}",
    ]
    if "profile" in result:
        prof = result["profile"]
        busy = prof["samples"] - prof["idle_samples"]
        out += [
            "",
            f"gateway profile ({prof['file']}): {prof['samples']} samples, {busy} busy; "
            "% of busy samples",
            "  inclusive:",
            *(f"    {pct:5.1f}  {name}" for name, pct in prof["inclusive_pct"][:20]),
            "  self:",
            *(f"    {pct:5.1f}  {name}" for name, pct in prof["self_pct"][:15]),
        ]
    busy = {n: p["cpu_pct"]["other processes"] for n, p in paths.items()}
    if max(busy.values()) > NOISY_PCT:
        out += [
            "",
            "NOTE: other processes on this machine used "
            + ", ".join(f"{v:.0f} %" for v in busy.values())
            + " of a core during the timed phases: the latencies are inflated by them.",
        ]
    if not result["sound"]:
        out += ["", "NOT SOUND: some receiver missed, repeated or reordered events (see checks)"]
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.sse",
        description="Measure the gateway's live event stream (GET /api/events, SSE) with many "
        "clients: append-to-received latency against raw NATS consumers, and that every "
        "client gets every event once, in order, on a fresh embedded server.",
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run with small sizes")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--clients", type=int, help="N, receivers per path")
    parser.add_argument("--events", type=int, help="M, timed events per path")
    parser.add_argument("--warmup", type=int, help="warm-up events per path")
    parser.add_argument("--interval", type=float, help="ms between the starts of two appends")
    parser.add_argument(
        "--profile", type=Path, help="py-spy the gateway during the SSE phase into FILE"
    )
    parser.add_argument("--dir", help="where to create the temporary store (default: $TMPDIR)")
    args = parser.parse_args(argv)

    sizes = QUICK if args.quick else FULL
    overrides = {
        "clients": args.clients,
        "events": args.events,
        "warmup": args.warmup,
        "interval_ms": args.interval,
    }
    sizes = dataclasses.replace(sizes, **{k: v for k, v in overrides.items() if v is not None})
    if min(sizes.clients, sizes.events, sizes.warmup) < 1 or sizes.interval_ms < 0:
        parser.error("sizes must be at least 1, the interval not negative")

    started = time.perf_counter()
    try:
        result = asyncio.run(run(sizes, args.dir, args.profile))
    except BenchError as e:
        print(f"bench/sse.py: {e}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("bench/sse.py: interrupted; everything it started is stopped", file=sys.stderr)
        return 130
    result["seconds"] = round(time.perf_counter() - started, 2)
    if args.json:
        print(json.dumps(result, indent=2, ensure_ascii=False))
    else:
        print(table(result))
        print(f"\n(finished in {result['seconds']:.1f}s)")
    return 0 if result["sound"] else 1


if __name__ == "__main__":
    sys.exit(main())
