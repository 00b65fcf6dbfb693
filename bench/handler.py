"""Benchmark: how fast a Shipyard handler reacts to a dispatch, and what watching runs costs.

One run starts a fresh embedded nats-server (:class:`shipyard.embedded.EmbeddedNats`, the
configuration ``shipyard up`` uses: every write synced to disk) in a temporary directory and
one handler as its own process, ``shipyard up --roles handler --nats URL`` — the way a
handler is deployed. A subprocess rather than an in-process :class:`Handler` because (a)
the bench's dispatcher, follower and baseline then do not share the handler's event loop,
which would both slow it down and hide its queueing, and (b) its CPU time can be read from
``/proc/<pid>/stat`` (``utime + stime``: the handler's own threads only; builders and their
guards are other processes, and what they used reaches the handler's ``cutime``/``cstime``
alone, which are not counted). Its builders are ``command`` agents running small bash
scripts (bash starts in about a millisecond, so a builder's own start stamp is not blurred
by its own start-up; only the handler's guard sits in between).

After a warm-up it measures:

1. **dispatch → claimed** p50 / p99 (ms): M dispatches, one after another, each through
   :meth:`Commands.dispatch <shipyard.events.commands.Commands.dispatch>` on the bench's own
   connection, the next only once the previous task has finished. Timed from the moment
   ``dispatch`` *returns* (the dispatched event is stored) until the bench's follower
   (:meth:`EventLog.follow_raw`, an ordered consumer on a connection of its own) receives
   the ``task_claimed`` event, both read with the bench's ``time.perf_counter`` (the
   follower stamps each message on arrival, before decoding it): so it is what any follower
   — a dashboard — sees, the claim's synced write and delivery included. The handler's own
   stamps (``Event.time``, taken when it makes an event, before appending it) split this
   and the next figure into steps, printed below the table (same host, same clock).
2. **dispatch → builder running** p50 / p99 (ms): the same dispatches, until (a) the
   ``builder_started`` event reaches the follower, and (b) the builder process itself gets
   control: its first command writes bash's ``$EPOCHREALTIME`` (wall clock, µs) to a file,
   compared with ``time.time_ns()`` taken when ``dispatch`` returned. (b) is the honest
   one: the handler appends ``builder_started`` as soon as it has forked its guard, before
   the guard's Python has started and exec'd the builder.
3. **the baseline**: before each dispatch, one plain ``JetStreamContext.publish`` of a
   message the size of a ``task_claimed`` event into a stream of the same configuration,
   timed until an ordered consumer on the follower's connection receives it — the physical
   floor of "an event lands and a follower sees it". Every latency figure's ratio is
   figure / baseline at the same percentile.
4. **N concurrent runs** on the one handler (``handler.concurrency`` and the agent's
   concurrency ≥ N), each builder printing a line every second until the bench ends the
   window (a bash loop with a fork-free one-second wait, so builders themselves use next to
   no CPU), with ``heartbeat_interval`` 1 s, ``stale_after`` 3 s, ``failed_after`` 6 s.
   Every ``run_stale`` event and every watchdog verdict (``run_finished`` for
   ``agent_silent`` / ``handler_lost``) is false here, since every builder is alive and
   talking: both must be zero. **Handler CPU per run** is the handler process's
   ``utime + stime`` over a steady window with all N builders running, divided by wall time
   and N, as % of one core; the same over the whole phase (claims, spawns, closes) is shown
   without a target.

The bench process (dispatcher, follower, baseline) is one process, the handler another,
the nats-server a third; builders are the rest. On a 2-core machine they compete, which is
part of what is measured. Use ``--dir`` to put the store on the disk you care about.

``python -m bench handler`` runs it in the suite; ``--dir`` puts the store on the disk
you care about.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nats.aio.client import Client as NATS
from nats.js.api import ConsumerConfig, DeliverPolicy

from bench import _common as c
from shipyard.events.commands import Commands
from shipyard.events.envelope import Event, decode, encode, make, new_id, short_id
from shipyard.events.log import APPEND_TIMEOUT, EventLog, connect, stream_config
from shipyard.events.types import TaskClaimed

CLAIM_P99_TARGET_MS = 10.0  # dispatch → task_claimed seen, at most
START_P99_TARGET_MS = 20.0  # dispatch → builder running, at most
CPU_TARGET_PCT = 0.5  # handler CPU per active run, % of one core, at most

HEARTBEAT_INTERVAL = 1.0  # handler settings for the whole bench, in seconds
STALE_AFTER = 3.0
FAILED_AFTER = 6.0
KILL_GRACE = 1.0
SETTLE = 1.5  # seconds between the last builder starting and the CPU window
MAX_TICKS = 300  # a ticker builder stops by itself after this many seconds, whatever happens
SAMPLE_TIMEOUT = 30.0  # seconds one sequential dispatch may take to finish

RAW_STREAM = "BENCH_RAW"
RAW_SUBJECT = "bench.raw"
KEY_LEN = 26  # new_id() length: the raw payload starts with its key

STAMP_AGENT = "stamp"
TICKER_AGENT = "ticker"

# The latency builder: its very first command records when it got control.
STAMP_SH = """\
printf '%s\\n' "$EPOCHREALTIME" > "$BENCH_STAMPS/$SHIPYARD_TASK_ID"
printf '# bench\\n\\nWritten by the handler benchmark builder.\\n' > README.md
echo built
"""

# The concurrency builder: a line a second until the stop file appears. `read -t 1` on a
# pipe nobody writes to waits a second without forking a `sleep` each time.
TICKER_SH = """\
exec {tick}<> <(:)
i=0
while [ ! -e "$BENCH_STOP" ] && [ "$i" -lt "$BENCH_MAX_TICKS" ]; do
  echo "working $i"
  read -r -t 1 -u "$tick" _ || true
  i=$((i + 1))
done
printf '# bench\\n\\nWritten by the handler benchmark builder.\\n' > README.md
echo "done after $i ticks"
"""


@dataclass(frozen=True)
class Sizes:
    dispatches: int  # M: timed sequential dispatches
    warmup: int  # sequential dispatches before the timed ones
    runs: int  # N: concurrent runs
    window: float  # seconds of steady state in which the handler's CPU is measured
    idle: float  # seconds in which the idle handler's CPU is measured


QUICK = Sizes(dispatches=30, warmup=3, runs=10, window=3.0, idle=1.0)
FULL = Sizes(dispatches=300, warmup=10, runs=200, window=12.0, idle=3.0)


# --- the files the handler gets ---------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    root: Path

    @property
    def work(self) -> Path:
        return self.root / "work"  # the handler's only workdir root

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def stamps(self) -> Path:
        return self.root / "stamps"

    @property
    def stop_file(self) -> Path:
        return self.root / "stop"

    @property
    def config(self) -> Path:
        return self.root / "shipyard.toml"

    def create(self, capacity: int) -> None:
        for d in (self.work, self.data, self.stamps, self.root / "bin"):
            d.mkdir(parents=True, exist_ok=True)
        stamp_sh = self.root / "bin" / "stamp.sh"
        ticker_sh = self.root / "bin" / "ticker.sh"
        stamp_sh.write_text(STAMP_SH)
        ticker_sh.write_text(TICKER_SH)
        self.config.write_text(config_toml(self, stamp_sh, ticker_sh, capacity))

    def stamp_ns(self, task_id: str) -> int:
        """When the builder of ``task_id`` got control (wall clock), from its stamp file."""
        text = (self.stamps / task_id).read_text().strip().replace(",", ".")
        seconds, _, micros = text.partition(".")
        return int(seconds) * 1_000_000_000 + int(micros.ljust(6, "0")[:6]) * 1000


def config_toml(layout: Layout, stamp_sh: Path, ticker_sh: Path, capacity: int) -> str:
    q = json.dumps  # a JSON string is a valid TOML basic string

    def agent(name: str, script: Path, env: dict[str, str]) -> list[str]:
        pairs = ", ".join(f"{k} = {q(v)}" for k, v in env.items())
        return [
            f"[agents.{name}]",
            'kind = "command"',
            f"command = [{q('/bin/bash')}, {q(str(script))}]",
            f"concurrency = {capacity}",
            f"env = {{ {pairs} }}",
            "",
        ]

    lines = [
        "# Written by bench/handler.py",
        "[handler]",
        f"concurrency = {capacity}",
        f"heartbeat_interval = {HEARTBEAT_INTERVAL}",
        f"stale_after = {STALE_AFTER}",
        f"failed_after = {FAILED_AFTER}",
        "max_attempts = 1",
        "retry_backoff = 0.0",
        f"kill_grace = {KILL_GRACE}",
        f"default_agent = {q(STAMP_AGENT)}",
        f"workdir_roots = [{q(str(layout.work))}]",
        "",
        *agent(STAMP_AGENT, stamp_sh, {"BENCH_STAMPS": str(layout.stamps)}),
        *agent(
            TICKER_AGENT,
            ticker_sh,
            {"BENCH_STOP": str(layout.stop_file), "BENCH_MAX_TICKS": str(MAX_TICKS)},
        ),
    ]
    return "\n".join(lines)


def dispatch_body(workdir: Path, agent: str, title: str) -> dict[str, Any]:
    prompt = f"""## Task
{title}: write README.md.

## Requirements
- README.md exists

## Environment
- Working directory: {workdir}

## Deliverables
1. README.md
"""
    return {
        "request_type": "queue",
        "action": "create",
        "task_type": "build",
        "action_name": title,
        "priority": "normal",
        "agent": agent,
        "payload": {"prompt": prompt, "dispatcher": "bench", "max_turns": 5},
    }


# --- watching the log -------------------------------------------------------------------


@dataclass(frozen=True)
class Seen:
    """One event as the bench's follower received it."""

    perf: float  # time.perf_counter() when it arrived
    wall_ns: int  # time.time_ns() at the same moment
    stamped_ns: int  # the event's own time: when its writer made it, before appending


@dataclass
class Trace:
    """What the log said about one task."""

    claimed: Seen | None = None
    build_started: Seen | None = None  # phase_changed BUILD started
    builder_started: Seen | None = None
    finished: Seen | None = None
    outcome: str = ""
    reason: str = ""


VERDICT_REASONS = ("agent_silent", "handler_lost")


class Tracker:
    """Follows the whole stream from the bench's own connection and files what it sees."""

    def __init__(self, log: EventLog) -> None:
        self.log = log
        self.traces: dict[str, Trace] = {}
        self.stale: list[dict[str, Any]] = []  # every run_stale
        self.verdicts: list[dict[str, Any]] = []  # every watchdog failure verdict
        self.events = 0
        self._changed = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None

    def trace(self, task_id: str) -> Trace:
        return self.traces.setdefault(task_id, Trace())

    async def start(self, start: int) -> None:
        self._task = asyncio.create_task(self._follow(start), name="bench-follower")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _follow(self, start: int) -> None:
        async for seq, payload in self.log.follow_raw(start=start):
            perf = time.perf_counter()
            wall = time.time_ns()
            event = decode(payload, seq=seq)
            self.events += 1
            self._apply(event, Seen(perf, wall, round(event.time.timestamp() * 1e9)))
            async with self._changed:
                self._changed.notify_all()

    def _apply(self, event: Event[Any], seen: Seen) -> None:
        if event.aggregate != "task":
            return
        trace = self.trace(event.aggregate_id)
        data = event.data
        if event.type == "task_claimed" and trace.claimed is None:
            trace.claimed = seen
        elif event.type == "phase_changed" and data.phase == "build" and data.status == "started":
            trace.build_started = trace.build_started or seen
        elif event.type == "builder_started" and trace.builder_started is None:
            trace.builder_started = seen
        elif event.type == "task_finished":
            trace.finished = seen
            trace.outcome, trace.reason = str(data.outcome), data.reason
        elif event.type == "run_stale":
            stale = {"task_id": event.aggregate_id, "run_id": data.run_id}
            self.stale.append({**stale, "silent_for": data.silent_for, "seq": event.seq})
        elif event.type == "run_finished" and data.reason in VERDICT_REASONS:
            self.verdicts.append(
                {"task_id": event.aggregate_id, "run_id": data.run_id, "reason": data.reason}
            )

    async def until(self, done: Callable[[], bool], timeout: float, what: str) -> None:
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(done), timeout)
            except TimeoutError:
                raise c.BenchError(f"gave up after {timeout:.0f}s waiting for {what}") from None

    def all_seen(self, task_ids: Sequence[str], attribute: str) -> Callable[[], bool]:
        return lambda: all(getattr(self.trace(t), attribute) is not None for t in task_ids)


# --- the baseline -----------------------------------------------------------------------


class RawProbe:
    """A plain JetStream publish, timed until an ordered consumer receives it."""

    def __init__(self, publisher: NATS, follower: NATS, size: int, replicas: int = 1) -> None:
        self.replicas = replicas
        self.js = publisher.jetstream(timeout=APPEND_TIMEOUT)
        self.follower_js = follower.jetstream(timeout=APPEND_TIMEOUT)
        self.padding = b"x" * max(0, size - KEY_LEN)
        self.waiting: dict[bytes, asyncio.Future[float]] = {}
        self._sub: Any = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        # The Shipyard stream's settings, on subjects of its own.
        config = stream_config(self.replicas)
        config.name = RAW_STREAM
        config.subjects = [f"{RAW_SUBJECT}.>"]
        config.description = "bench/handler.py baseline"
        await self.js.add_stream(config)
        self._sub = await self.follower_js.subscribe(
            f"{RAW_SUBJECT}.>",
            ordered_consumer=True,
            config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL),
            stream=RAW_STREAM,
        )
        self._task = asyncio.create_task(self._receive(), name="bench-raw-consumer")

    async def _receive(self) -> None:
        async for msg in self._sub.messages:
            arrived = time.perf_counter()
            future = self.waiting.pop(msg.data[:KEY_LEN], None)
            if future is not None and not future.done():
                future.set_result(arrived)

    async def sample(self) -> float:
        """Milliseconds from just before the publish until the consumer has the message."""
        key = new_id().encode()
        future: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self.waiting[key] = future
        start = time.perf_counter()
        await self.js.publish(f"{RAW_SUBJECT}.{key.decode()}", key + self.padding)
        arrived = await asyncio.wait_for(future, APPEND_TIMEOUT)
        return (arrived - start) * 1000.0

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()


def claim_event_size() -> int:
    claim = TaskClaimed(run_id=short_id("r-"), handler="host-12345-abcd", agent=STAMP_AGENT)
    return len(encode(make(claim, aggregate_id=short_id("t-"), actor="handler:host-12345-abcd")))


# --- the measurements -------------------------------------------------------------------


@dataclass
class LatencySamples:
    raw: list[float] = field(default_factory=list)  # baseline round trip
    claimed: list[float] = field(default_factory=list)  # from dispatch returning
    claimed_from_call: list[float] = field(default_factory=list)  # from before the call
    dispatch_call: list[float] = field(default_factory=list)  # Commands.dispatch itself
    started_event: list[float] = field(default_factory=list)  # builder_started seen
    started_process: list[float] = field(default_factory=list)  # the builder's own stamp
    # where the time goes, from the handler's own event stamps (all in ms):
    to_claim_made: list[float] = field(default_factory=list)  # dispatch returned → claim made
    claim_write: list[float] = field(default_factory=list)  # claim made → follower has it
    to_build_phase: list[float] = field(default_factory=list)  # claim made → BUILD started
    spawn: list[float] = field(default_factory=list)  # BUILD started → builder_started made
    guard: list[float] = field(default_factory=list)  # builder_started made → builder runs
    finished: list[float] = field(default_factory=list)  # dispatch returned → task_finished
    failed: list[str] = field(default_factory=list)  # tasks that did not succeed


async def latency_phase(
    sizes: Sizes, commands: Commands, tracker: Tracker, probe: RawProbe, layout: Layout
) -> LatencySamples:
    s = LatencySamples()
    total = sizes.warmup + sizes.dispatches
    for i in range(total):
        timed = i >= sizes.warmup
        raw = await probe.sample()
        body = dispatch_body(layout.work / f"seq-{i:04d}", STAMP_AGENT, f"Sequential {i}")
        t_call = time.perf_counter()
        result = await commands.dispatch(body)
        t_ret = time.perf_counter()
        wall_ret = time.time_ns()
        trace = tracker.trace(result.task_id)
        await tracker.until(
            tracker.all_seen([result.task_id], "finished"),
            SAMPLE_TIMEOUT,
            f"task {result.task_id} to finish",
        )
        if not timed:
            continue
        if trace.outcome != "succeeded":
            s.failed.append(f"{result.task_id}: {trace.outcome} {trace.reason}")
        claimed, build, started, finished = (
            trace.claimed,
            trace.build_started,
            trace.builder_started,
            trace.finished,
        )
        if claimed is None or build is None or started is None or finished is None:
            s.failed.append(f"{result.task_id}: its run left no claim or no builder start")
            continue
        stamp = layout.stamp_ns(result.task_id)
        s.raw.append(raw)
        s.dispatch_call.append((t_ret - t_call) * 1000.0)
        s.claimed.append((claimed.perf - t_ret) * 1000.0)
        s.claimed_from_call.append((claimed.perf - t_call) * 1000.0)
        s.started_event.append((started.perf - t_ret) * 1000.0)
        s.started_process.append((stamp - wall_ret) / 1e6)
        s.to_claim_made.append((claimed.stamped_ns - wall_ret) / 1e6)
        s.claim_write.append((claimed.wall_ns - claimed.stamped_ns) / 1e6)
        s.to_build_phase.append((build.stamped_ns - claimed.stamped_ns) / 1e6)
        s.spawn.append((started.stamped_ns - build.stamped_ns) / 1e6)
        s.guard.append((stamp - started.stamped_ns) / 1e6)
        s.finished.append((finished.perf - t_ret) * 1000.0)
        if (i - sizes.warmup + 1) % max(1, sizes.dispatches // 5) == 0:
            c.note(
                f"  {i - sizes.warmup + 1}/{sizes.dispatches}: claimed p50 "
                f"{c.percentile(s.claimed, 50):.2f} ms, builder running p50 "
                f"{c.percentile(s.started_process, 50):.2f} ms"
            )
    return s


@dataclass
class ConcurrentResult:
    runs: int
    all_started_s: float  # first dispatch → the last builder_started seen
    window_s: float
    running_in_window: int
    handler_cpu_s: float  # in the window
    server_cpu_s: float
    bench_cpu_s: float
    phase_s: float  # first dispatch → last task_finished seen
    phase_handler_cpu_s: float
    stale: list[dict[str, Any]]
    verdicts: list[dict[str, Any]]
    outcomes: dict[str, int]
    events: int  # events the follower saw during the phase

    @property
    def cpu_per_run_pct(self) -> float:
        return 100.0 * self.handler_cpu_s / self.window_s / max(1, self.running_in_window)

    @property
    def phase_cpu_per_run_pct(self) -> float:
        return 100.0 * self.phase_handler_cpu_s / self.phase_s / max(1, self.runs)


async def concurrency_phase(
    sizes: Sizes,
    commands: Commands,
    tracker: Tracker,
    handler: c.ShipyardUp,
    server_pid: int,
    layout: Layout,
) -> ConcurrentResult:
    n = sizes.runs
    stale_before, verdicts_before, events_before = (
        len(tracker.stale),
        len(tracker.verdicts),
        tracker.events,
    )
    bodies = [
        dispatch_body(layout.work / f"par-{i:03d}", TICKER_AGENT, f"Concurrent {i}")
        for i in range(n)
    ]
    phase_cpu0 = handler.cpu_seconds()
    t0 = time.perf_counter()
    results = await asyncio.gather(*(commands.dispatch(body) for body in bodies))
    ids = [r.task_id for r in results]
    await tracker.until(
        tracker.all_seen(ids, "builder_started"), 30.0 + n, f"all {n} builders to start"
    )
    all_started = time.perf_counter() - t0
    c.note(f"  all {n} builders started {all_started:.2f}s after the first dispatch")
    await asyncio.sleep(SETTLE)
    cpu0, srv0, bench0, w0 = (
        handler.cpu_seconds(),
        c.proc_cpu_seconds(server_pid),
        c.self_cpu_seconds(),
        time.perf_counter(),
    )
    await asyncio.sleep(sizes.window)
    cpu1, srv1, bench1, w1 = (
        handler.cpu_seconds(),
        c.proc_cpu_seconds(server_pid),
        c.self_cpu_seconds(),
        time.perf_counter(),
    )
    running = sum(1 for t in ids if tracker.trace(t).finished is None)
    layout.stop_file.touch()
    await tracker.until(tracker.all_seen(ids, "finished"), 30.0 + n, f"all {n} runs to finish")
    phase_s = time.perf_counter() - t0
    phase_cpu = handler.cpu_seconds() - phase_cpu0
    outcomes: dict[str, int] = {}
    for t in ids:
        outcome = tracker.trace(t).outcome
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    return ConcurrentResult(
        runs=n,
        all_started_s=all_started,
        window_s=w1 - w0,
        running_in_window=running,
        handler_cpu_s=cpu1 - cpu0,
        server_cpu_s=srv1 - srv0,
        bench_cpu_s=bench1 - bench0,
        phase_s=phase_s,
        phase_handler_cpu_s=phase_cpu,
        stale=tracker.stale[stale_before:],
        verdicts=tracker.verdicts[verdicts_before:],
        outcomes=outcomes,
        events=tracker.events - events_before,
    )


# --- the run ----------------------------------------------------------------------------


async def measure(quick: bool, parent: str | None) -> dict[str, Any]:
    sizes = QUICK if quick else FULL
    async with c.fresh_server(parent, "handler") as (root, server):
        assert server.pid is not None
        return await measure_on(server.url, sizes, Layout(root), server.pid)


async def measure_on(url: str, sizes: Sizes, layout: Layout, server_pid: int) -> dict[str, Any]:
    capacity = max(128, sizes.runs + 8)
    layout.create(capacity)
    async with contextlib.AsyncExitStack() as stack:
        nc = await connect([url], name="bench-dispatcher")
        stack.push_async_callback(nc.close)
        follower_nc = await connect([url], name="bench-follower")
        stack.push_async_callback(follower_nc.close)
        log = EventLog(nc)
        await log.ensure_stream()
        commands = Commands(log)

        probe = RawProbe(nc, follower_nc, claim_event_size())
        await probe.start()
        stack.push_async_callback(probe.stop)

        handler = c.ShipyardUp(
            [
                *("--roles", "handler", "--nats", url),
                *("--data-dir", str(layout.data), "--config", str(layout.config)),
            ],
            layout.root,
        )
        c.note("starting the handler: shipyard up --roles handler")
        await handler.start(ready=" is up")
        stack.push_async_callback(handler.stop)

        tracker = Tracker(EventLog(follower_nc))
        await tracker.start(1)
        stack.push_async_callback(tracker.stop)

        try:
            c.note(f"idle handler: {sizes.idle:.0f}s")
            cpu0, w0 = handler.cpu_seconds(), time.perf_counter()
            await asyncio.sleep(sizes.idle)
            idle_pct = 100.0 * (handler.cpu_seconds() - cpu0) / (time.perf_counter() - w0)

            c.note(f"sequential dispatches: {sizes.warmup} warm-up, {sizes.dispatches} timed")
            latency = await latency_phase(sizes, commands, tracker, probe, layout)

            c.note(f"concurrent runs: {sizes.runs}, CPU window {sizes.window:.0f}s")
            concurrent = await concurrency_phase(
                sizes, commands, tracker, handler, server_pid, layout
            )
        except c.BenchError as e:
            state = "running" if handler.alive() else "exited"
            tail = handler.stderr_tail() or "(nothing)"
            raise c.BenchError(f"{e}\nthe handler ({state}) logged last:\n{tail}") from None
        stale, verdicts = list(tracker.stale), list(tracker.verdicts)
        warnings = handler.warnings()

    n = concurrent.runs
    figures = [
        c.latency("dispatch → claimed p99", 99, latency.claimed, latency.raw, CLAIM_P99_TARGET_MS),
        c.latency(
            "dispatch → builder running p99",
            99,
            latency.started_process,
            latency.raw,
            START_P99_TARGET_MS,
        ),
        c.latency("dispatch → builder running p50", 50, latency.started_process, latency.raw, None),
        c.at_most(f"false STALE, {n} runs, 1 s heartbeats", "events", len(stale), 0),
        c.at_most(f"false watchdog verdicts, {n} runs", "events", len(verdicts), 0),
        c.at_most(
            f"handler CPU per active run ({n} runs)",
            "%",
            concurrent.cpu_per_run_pct,
            CPU_TARGET_PCT,
        ),
    ]
    sound = (
        not latency.failed
        and concurrent.outcomes.get("succeeded", 0) == n
        and concurrent.running_in_window == n
    )
    if not sound:
        raise c.BenchError(
            "some runs did not succeed or ended early: "
            + json.dumps({"failed": latency.failed[:10], "outcomes": concurrent.outcomes})
        )

    def ms(name: str) -> str:
        got = c.spread(getattr(latency, name))
        return f"{got['p50']:7.2f} / {got['p99']:7.2f} ms"

    details = [
        "",
        "baseline: a plain JetStream publish until an ordered consumer has it, same percentile.",
        "where the time goes, p50 / p99 (from the handler's own event stamps):",
        f"  dispatch returned → claim made by handler      {ms('to_claim_made')}",
        f"  claim made → claim seen by the follower        {ms('claim_write')}",
        f"  claim made → BUILD phase started               {ms('to_build_phase')}",
        f"  BUILD started → builder_started (acks, spawn)  {ms('spawn')}",
        f"  builder_started → builder runs (guard)         {ms('guard')}",
        f"{n} concurrent runs: all builders started {concurrent.all_started_s:.2f}s after the "
        f"first dispatch; handler {100 * concurrent.handler_cpu_s / concurrent.window_s:.1f} % "
        f"of a core in the {concurrent.window_s:.0f}s window (idle {idle_pct:.2f} %); "
        f"whole phase {concurrent.phase_cpu_per_run_pct:.3f} % per run; "
        f"{len(warnings)} handler warnings",
    ]
    return {
        "sizes": vars(sizes),
        "figures": figures,
        "details": details,
        "latency_ms": {
            name: getattr(latency, name)
            for name in ("raw", "claimed", "started_event", "started_process")
        },
        "concurrent": {k: v for k, v in vars(concurrent).items() if k not in ("stale", "verdicts")},
        "idle_cpu_pct": idle_pct,
        "stale": stale,
        "verdicts": verdicts,
    }


def main(argv: Sequence[str] | None = None) -> int:
    return c.main(
        "handler",
        "A handler's dispatch-to-claim and dispatch-to-builder latency against raw "
        "JetStream, and its CPU and false STALE verdicts with many runs at once.",
        measure,
        argv,
    )


if __name__ == "__main__":
    sys.exit(main())
