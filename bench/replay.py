"""Benchmark: how fast Shipyard rebuilds its read models from the log, and how fast they answer.

One run starts a fresh embedded nats-server (:class:`shipyard.embedded.EmbeddedNats`) in a
temporary directory, creates the Shipyard stream with :meth:`EventLog.ensure_stream`, and:

0. **writes N events** (not measured), shaped like a real workload: tasks dispatched twenty
   ahead of the handler, eight runs at once with their events interleaved, and per run
   ``task_claimed``; each of the eight phases started and ended with ``phase_changed``, each
   followed by a ``work_progress`` (as the handler posts them); ``builder_started`` for PLAN,
   BUILD (and HEAL); ``plan_recorded``; a ``card_added`` per plan step (2–5) and two
   ``card_moved`` each, with a heartbeat between; ``validation_checked``; ``report_written``;
   ``run_finished`` and ``task_finished``. One run in ten heals, one in ten fails, one in
   eight has a conversation (a question and an answer in a thread, both read). About 55
   events per run, 375 bytes each encoded. Event times are spread over ``--days`` days (one
   tick per event); the stream ends mid-workload, so some tasks are still queued or running.
   A child process makes and encodes the events; this process publishes them (core publishes
   with ``Nats-Msg-Id``, every 2,000th a ``publish_async`` whose acknowledgement bounds what
   is in flight) to the server started *without* ``sync_interval: always``, which would make
   writing a million events take minutes. That server is then stopped and a stock
   ``EmbeddedNats`` (``shipyard up``'s configuration) started on the same store; everything
   below runs against it.
1. **raw ordered consumer** (msg/s) — the baseline: nats-py
   ``js.subscribe(ordered_consumer=True, cb=…)`` from sequence 1 with a callback that only
   counts, until all N messages arrived: what NATS and its Python client deliver to one
   process. **EventLog.follow_raw** (msg/s) is Shipyard's own ordered consumer (``async
   for`` over the subscription's messages, the stream sequence parsed from each) over the
   first ``--follow-sample`` messages: what ``build()`` and every other reader sit on.
2. **replay** (events/s) — :func:`shipyard.projections.projector.build` from sequence 1 to N
   into a new DuckDB file, as ``shipyard replay`` does; ratio = replay / raw, target ≥ 0.6
   at a million events. **Peak RSS**: this process's high-water mark during the replay
   (``VmHWM``, reset just before it through ``/proc/self/clear_refs``). Below the table,
   where the replay's time went: inside ``ReadModels.apply_sync`` (fold and DuckDB, on the
   database thread; timed by wrapping the method during the replay), in
   ``envelope.decode`` (timed alone on 50,000 of the payloads: a lower bound), and the rest
   (receiving through ``follow_raw``, the async generators above it, batching).
3. **query latency** at R finished runs (default 100,000). The replayed database is grown to
   R runs by copying its finished runs' ``history``, ``runs``, ``tasks`` and ``cards`` rows:
   copy k is k workload spans later, at stream sequences k·N later, with ids whose leading
   ``0`` becomes the k-th Crockford digit, so that ids still sort by time, as ``new_id()``
   makes them, and rows lie in the order the fold writes them. Then p50 / p99 over
   ``--repeats`` calls each, one at a time, directly on the connection, of
   :func:`queries.history <shipyard.projections.queries.history>` (first page of 50; a page
   half-way down through ``before``; with a ``search`` filter) and
   :func:`queries.kanban <shipyard.projections.queries.kanban>`, both as the query service
   and the gateway call it (no ``since``: every task ever, finished ones included, with its
   step cards) and with ``since`` a day before the newest event. Target: p99 ≤ 50 ms. A
   query is called fewer times once it has taken ``--query-budget`` seconds (at least five
   times); the table says how many.

Progress goes to stderr; ``--json`` prints one JSON object on stdout. ``--profile FILE``
runs the replay under pyinstrument (``pip install pyinstrument``; it sees this thread, not
the database thread) and writes the call tree to FILE: the replay is then several times
slower, so do not quote that run's rate. ``--keep-db FILE`` keeps the query database.

The machine matters: with two cores the nats-server, the event loop and the database
thread compete, and other load shows up directly in the rates (``--read-rounds`` runs the
two consumers more than once and reports the median).

Run from the repository root::

    python -m bench.replay            # N = 1,000,000 and R = 100,000: about 3–4 minutes
    python -m bench.replay --quick    # N = 20,000 and R = 5,000: about 15 seconds
    python -m bench.replay --events 200000 --runs 20000 --json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import importlib
import json
import math
import multiprocessing
import os
import platform
import queue
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from importlib import metadata
from pathlib import Path
from typing import Any

import duckdb
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig, DeliverPolicy

from shipyard.embedded import EmbeddedNats, binary
from shipyard.events import types as t
from shipyard.events.envelope import Event, b32, decode, encode, make, new_id, short_id
from shipyard.events.log import ALL_EVENTS, H_MSG_ID, STREAM, EventLog, connect
from shipyard.projections import queries
from shipyard.projections.projector import ReadModels, build

RATIO_TARGET = 0.6  # replay / raw ordered consumer, at least
P99_TARGET_MS = 50.0  # every query, at most
MIN_SAMPLES = 5  # calls of a query, at least, however slow it is
BARRIER_EVERY = 2000  # writing: every Nth event waits for an acknowledgement...
BARRIERS_IN_FLIGHT = 4  # ...and at most this many such acknowledgements are outstanding
WRITE_CHUNK = 2000  # events per message from the process that makes them
CONCURRENT_RUNS = 8  # runs whose events interleave, as one handler's would
QUEUED_AHEAD = 20  # tasks dispatched and waiting for a handler
DECODE_SAMPLE = 50_000  # payloads kept from the raw pass to time decoding alone
SEARCH = "billing"
ACTOR_DISPATCHER = "dispatcher:openclaw"
HANDLER_ACTOR = "handler:h-build-1"


@dataclass(frozen=True)
class Sizes:
    events: int  # N: events written and replayed
    runs: int  # R: finished runs in the database the queries run on
    repeats: int  # calls per query
    follow_sample: int  # messages read through EventLog.follow_raw
    days: float  # the span of event times in the written workload
    query_budget: float  # seconds one query is timed for, at most (after MIN_SAMPLES calls)
    read_rounds: int  # passes of the raw consumer and of follow_raw; the median is reported


QUICK = Sizes(
    events=20_000,
    runs=5_000,
    repeats=100,
    follow_sample=20_000,
    days=3.0,
    query_budget=2.0,
    read_rounds=3,
)
FULL = Sizes(
    events=1_000_000,
    runs=100_000,
    repeats=200,
    follow_sample=100_000,
    days=30.0,
    query_budget=10.0,
    read_rounds=1,
)


@dataclass
class Figure:
    name: str
    unit: str
    value: float
    baseline: float | None = None
    ratio: float | None = None
    target: str = ""
    passed: bool | None = None
    samples: int = 0


class BenchError(Exception):
    pass


def note(text: str) -> None:
    """Progress, on stderr so that stdout holds only the result."""
    print(text, file=sys.stderr, flush=True)


# --- the workload -------------------------------------------------------------------------

VERBS = ("Add", "Fix", "Refactor", "Document", "Test", "Speed up", "Remove", "Rename", "Port")
NOUNS = (
    "health endpoint",
    "login form",
    "billing export",
    "search index",
    "rate limiter",
    "webhook retries",
    "CSV importer",
    "audit log",
    "dark mode",
    "cache layer",
    "settings page",
    "email digest",
)
STEPS = (
    "Read the existing code and tests",
    "Write the module",
    "Wire it into the application",
    "Add tests for the new behaviour",
    "Document it in README.md",
    "Run the test suite and fix what fails",
)
AGENTS = ("claude", "claude", "claude", "codex")
GROUPS = ("", "", "backend", "frontend", "infra")
PROMPT = """## Task
{title}.

## Requirements
- The change is covered by tests
- Documented in the README

## Environment
- Working directory: {workdir}
- Test: python -m pytest -q

## Deliverables
1. The code change
2. README.md
"""


@dataclass
class Spec:
    number: int
    task_id: str
    title: str
    agent: str
    group: str


def newest_id(prefix: str) -> str:
    """A task or run id as ``new_id()`` makes it, but with a leading ``z`` for the ``0``
    every id made today starts with: it sorts after the ids of the older runs the query
    database is grown with (see :data:`GROW_SQL`)."""
    return prefix + BASE_DIGIT + new_id()[1:]


def new_spec(number: int, rng: random.Random) -> Spec:
    title = f"{rng.choice(VERBS)} {rng.choice(NOUNS)} ({number})"
    return Spec(number, newest_id("t-"), title, rng.choice(AGENTS), rng.choice(GROUPS))


def dispatched(spec: Spec, rng: random.Random) -> t.TaskDispatched:
    workdir = f"/srv/work/{spec.task_id}"
    return t.TaskDispatched(
        title=spec.title,
        prompt=PROMPT.format(title=spec.title, workdir=workdir),
        dispatcher="openclaw",
        priority=rng.choice((t.Priority.HIGH, t.Priority.NORMAL, t.Priority.NORMAL)),
        max_turns=60,
        working_dir=workdir,
        deliverables=["The code change", "README.md"],
        deliverable_files=["README.md"],
        validation_command="python -m pytest -q",
        group=spec.group,
        agent=spec.agent,
    )


def conversation(spec: Spec) -> Iterator[tuple[str, str, t.EventData]]:
    """The builder asks the dispatcher a question in a new thread and gets an answer, both
    read: ``(thread id, actor, data)``."""
    thread_id = short_id("th-")
    question, answer = new_id("m-"), new_id("m-")
    yield (
        thread_id,
        f"agent:{spec.agent}",
        t.MessageSent(
            message_id=question,
            sender=spec.agent,
            recipient="openclaw",
            type=t.MessageType.QUESTION,
            body=f"{spec.title}: should this also be behind the feature flag?",
            task_id=spec.task_id,
        ),
    )
    yield thread_id, "agent:openclaw", t.MessageRead(message_id=question, reader="openclaw")
    yield (
        thread_id,
        "agent:openclaw",
        t.MessageSent(
            message_id=answer,
            sender="openclaw",
            recipient=spec.agent,
            type=t.MessageType.COMMENT,
            body="No flag; ship it on by default and say so in the README.",
            reply_to=question,
            task_id=spec.task_id,
        ),
    )
    yield thread_id, f"agent:{spec.agent}", t.MessageRead(message_id=answer, reader=spec.agent)


def run_script(
    spec: Spec, rng: random.Random
) -> Iterator[t.EventData | tuple[str, str, t.EventData]]:
    """One run of ``spec`` from its claim to ``task_finished``, as the handler posts it (and,
    for some runs, a conversation in a thread of its own, as ``(thread id, actor, data)``)."""
    run_id = newest_id("r-")
    P, S = t.Phase, t.PhaseStatus
    fails = rng.random() < 0.1
    talks = rng.random() < 0.125
    heals = fails or rng.random() < 0.1
    steps = list(rng.sample(STEPS, rng.randint(2, 5)))
    state = {"turns": 0, "percent": 0}

    def progress(phase: t.Phase, action: str) -> t.WorkProgress:
        state["turns"] += rng.randint(1, 4)
        turns = state["turns"]
        return t.WorkProgress(
            run_id=run_id,
            phase=phase,
            percent=state["percent"],
            action=action,
            turns=turns,
            tool_calls=2 * turns,
            tokens_in=1800 * turns,
            tokens_out=240 * turns,
            cost_usd=round(0.011 * turns, 6),
            last_tool=rng.choice(("Bash", "Edit", "Read", "Write")),
        )

    def phase(
        ph: t.Phase, status: t.PhaseStatus, action: str = "", result: str = ""
    ) -> Iterator[t.EventData]:
        if status == S.STARTED:
            state["percent"] = max(state["percent"], 12 * ph.position)
        yield t.PhaseChanged(run_id=run_id, phase=ph, status=status, action=action, result=result)
        yield progress(ph, action or result)

    def builder(ph: t.Phase) -> t.BuilderStarted:
        pid = rng.randint(1000, 4_000_000)
        return t.BuilderStarted(
            run_id=run_id, phase=ph, host="build-1", pid=pid, pgid=pid, program=spec.agent
        )

    yield t.TaskClaimed(run_id=run_id, handler="h-build-1", agent=spec.agent)
    yield from phase(P.CONTEXT, S.STARTED, "gathering context")
    yield from phase(P.CONTEXT, S.SUCCEEDED, result="5 sections, README.md read, 42 files")
    yield from phase(P.PLAN, S.STARTED, f"{spec.agent} is planning")
    yield builder(P.PLAN)
    yield progress(P.PLAN, "PLAN: Read")
    plan = "\n".join(f"{i + 1}. {s}" for i, s in enumerate(steps))
    yield t.PlanRecorded(run_id=run_id, source="builder", steps=steps, text=plan)
    yield from phase(P.PLAN, S.SUCCEEDED, result=f"{len(steps)} steps (builder)")
    yield from phase(P.TASK_BOARD, S.STARTED, "putting the plan on the board")
    cards = [f"{run_id}-{i + 1}" for i in range(len(steps))]
    for i, card in enumerate(cards):
        yield t.CardAdded(run_id=run_id, card_id=card, title=steps[i], position=i)
    yield from phase(P.TASK_BOARD, S.SUCCEEDED, result=f"{len(cards)} cards")
    yield from phase(P.BUILD, S.STARTED, f"{spec.agent} is building")
    yield builder(P.BUILD)
    if talks:
        yield from conversation(spec)
    for card in cards:
        yield t.CardMoved(run_id=run_id, card_id=card, column="in_progress")
        yield progress(P.BUILD, "BUILD: Edit")
        yield t.CardMoved(run_id=run_id, card_id=card, column="done")
    yield from phase(P.BUILD, S.SUCCEEDED, result=f"{state['turns']} turns")
    yield from phase(P.VALIDATE, S.STARTED, "checking the deliverables")
    failing = "F....\nFAILED tests/test_app.py::test_new - AssertionError\n1 failed, 4 passed"
    yield t.ValidationChecked(
        run_id=run_id,
        round=0,
        passed=not heals,
        command="python -m pytest -q",
        exit_code=1 if heals else 0,
        output=failing if heals else ".....\n5 passed in 0.41s",
    )
    verdict = "`python -m pytest -q` exited 1" if heals else "all deliverables, tests pass"
    yield from phase(P.VALIDATE, S.FAILED if heals else S.SUCCEEDED, result=verdict)
    if heals:
        yield from phase(P.HEAL, S.STARTED, "round 1 of 2")
        yield builder(P.HEAL)
        yield progress(P.HEAL, "HEAL: Edit")
        yield t.ValidationChecked(
            run_id=run_id,
            round=1,
            passed=not fails,
            command="python -m pytest -q",
            exit_code=1 if fails else 0,
            output=failing if fails else ".....\n5 passed in 0.40s",
        )
        healed = "still failing after 1 round" if fails else "validation passed after round 1"
        yield from phase(P.HEAL, S.FAILED if fails else S.SUCCEEDED, result=healed)
    else:
        yield from phase(P.HEAL, S.SKIPPED, result="VALIDATE passed first time")
    outcome = t.TaskState.FAILED if fails else t.TaskState.SUCCEEDED
    reason = "validation_failed" if fails else ""
    summary = f"{spec.title}: {outcome} in 412.0s, {state['turns']} turns"
    yield from phase(P.REPORT, S.STARTED, "writing the report")
    yield t.ReportWritten(
        run_id=run_id,
        path=f"/var/lib/shipyard/reports/{spec.task_id}/{run_id}.md",
        summary=summary,
        files_changed=["README.md", "app/module.py", "tests/test_app.py"],
        duration_s=412.0,
        turns=state["turns"],
        cost_usd=round(0.011 * state["turns"], 6),
        heal_rounds=1 if heals else 0,
    )
    yield from phase(P.REPORT, S.SUCCEEDED, result=f"/var/lib/shipyard/reports/{spec.task_id}")
    column = "failed" if fails else "done"
    yield from phase(P.CLOSE, S.STARTED, f"card to {column}")
    result = f"{outcome}: {reason}" if reason else str(outcome)
    yield t.PhaseChanged(
        run_id=run_id, phase=P.CLOSE, status=S.SUCCEEDED, action=f"card to {column}", result=result
    )
    yield progress(P.CLOSE, "")
    yield t.RunFinished(
        run_id=run_id,
        outcome=outcome,
        reason=reason,
        summary=summary,
        phase=P.HEAL if fails else None,
        error="1 failed, 4 passed" if fails else "",
    )
    yield t.TaskFinished(outcome=outcome, reason=reason, run_id=run_id)


def workload(count: int, *, days: float, seed: int = 1) -> Iterator[Event[Any]]:
    """``count`` events: tasks dispatched ``QUEUED_AHEAD`` ahead of the handler, up to
    ``CONCURRENT_RUNS`` runs at once with their events interleaved. Times run from ``days``
    days ago to now, one tick per event."""
    rng = random.Random(seed)
    tick = timedelta(days=days) / max(1, count)
    clock = datetime.now(UTC) - timedelta(days=days)
    # Event ids as new_id() makes them (26 Crockford characters, sorting by creation), from a
    # counter: new_id()'s pure-Python base32 would be half of the time spent writing.
    id_base = b32(time.time_ns() // 1_000_000, 10)
    queued: deque[Spec] = deque()
    running: list[tuple[Spec, Iterator[t.EventData | tuple[str, str, t.EventData]]]] = []
    made = number = 0

    def stamp(data: t.EventData, aggregate_id: str, actor: str) -> Event[Any]:
        nonlocal clock, made
        clock += tick
        made += 1
        event_id = f"{id_base}{made:016x}"
        return make(data, aggregate_id=aggregate_id, actor=actor, at=clock, event_id=event_id)

    while made < count:
        while len(queued) < QUEUED_AHEAD and made < count:
            number += 1
            spec = new_spec(number, rng)
            queued.append(spec)
            yield stamp(dispatched(spec, rng), spec.task_id, ACTOR_DISPATCHER)
        while len(running) < CONCURRENT_RUNS and queued:
            spec = queued.popleft()
            running.append((spec, run_script(spec, rng)))
        if made >= count:
            return
        i = rng.randrange(len(running))
        spec, script = running[i]
        item = next(script, None)
        if item is None:
            running.pop(i)
        elif isinstance(item, tuple):
            yield stamp(item[2], item[0], item[1])
        else:
            yield stamp(item, spec.task_id, HANDLER_ACTOR)


# --- writing ------------------------------------------------------------------------------


class UnsyncedNats(EmbeddedNats):
    """The embedded server without ``sync_interval: always``: only for writing the workload
    quickly. Its store is then served by a stock :class:`EmbeddedNats`."""

    def write_config(self) -> None:
        super().write_config()
        text = self.config_path.read_text()
        self.config_path.write_text(text.replace("  sync_interval: always\n", ""))


def produce(out: Any, count: int, days: float) -> None:
    """In a child process: the workload, encoded, in chunks of ``(subject, payload, id)``;
    ``None`` at the end."""
    chunk: list[tuple[str, bytes, str]] = []
    for event in workload(count, days=days):
        chunk.append((event.subject, encode(event), event.id))
        if len(chunk) >= WRITE_CHUNK:
            out.put(chunk)
            chunk = []
    out.put(chunk)
    out.put(None)


async def write_workload(nc: NATS, sizes: Sizes) -> int:
    """Publish the workload, made and encoded in a child process meanwhile; return the
    number of events written."""
    js = nc.jetstream(timeout=60.0)
    barriers: deque[asyncio.Future[Any]] = deque()
    written = 0
    started = time.perf_counter()
    context = multiprocessing.get_context("spawn")
    chunks: Any = context.Queue(maxsize=16)
    child = context.Process(
        target=produce, args=(chunks, sizes.events, sizes.days), name="bench-workload"
    )
    child.start()

    def next_chunk() -> list[tuple[str, bytes, str]] | None:
        while True:
            try:
                chunk: list[tuple[str, bytes, str]] | None = chunks.get(timeout=1.0)
                return chunk
            except queue.Empty:
                if not child.is_alive():
                    raise BenchError(f"the workload process exited ({child.exitcode})") from None

    try:
        while (chunk := await asyncio.to_thread(next_chunk)) is not None:
            for subject, payload, event_id in chunk:
                headers = {H_MSG_ID: event_id}
                written += 1
                if written % BARRIER_EVERY:
                    await nc.publish(subject, payload, headers=headers)
                    continue
                barriers.append(await js.publish_async(subject, payload, headers=headers))
                if len(barriers) > BARRIERS_IN_FLIGHT:
                    await barriers.popleft()
                if written % 200_000 == 0:
                    rate = written / (time.perf_counter() - started)
                    note(f"  {written:,} events written ({rate:,.0f}/s)")
        await nc.flush()
        await asyncio.gather(*barriers)
    finally:
        if child.is_alive():
            child.terminate()
        await asyncio.to_thread(child.join)
        chunks.close()
        chunks.join_thread()
    return written


async def wait_stored(log: EventLog, count: int, timeout: float = 60.0) -> int:
    deadline = time.monotonic() + timeout
    while True:
        stored = await log.stream_last_seq()
        if stored >= count or time.monotonic() > deadline:
            return stored
        await asyncio.sleep(0.05)


# --- reading ------------------------------------------------------------------------------


async def raw_rate(log: EventLog, count: int, keep: int) -> tuple[float, list[bytes]]:
    """Messages per second of a bare nats-py ordered consumer receiving ``count`` messages
    from sequence 1; also returns the first ``keep`` payloads."""
    done = asyncio.Event()
    received = 0
    kept: list[bytes] = []

    async def on_message(msg: Msg) -> None:
        nonlocal received
        received += 1
        if len(kept) < keep:
            kept.append(msg.data)
        if received >= count:
            done.set()

    config = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=1)
    started = time.perf_counter()
    sub = await log.js.subscribe(
        ALL_EVENTS, ordered_consumer=True, config=config, stream=STREAM, cb=on_message
    )
    try:
        await done.wait()
        elapsed = time.perf_counter() - started
    finally:
        await sub.unsubscribe()
    return count / elapsed, kept


async def follow_raw_rate(log: EventLog, count: int) -> float:
    """Messages per second of ``EventLog.follow_raw`` over the first ``count`` messages."""
    started = time.perf_counter()
    received = 0
    async for seq, _ in log.follow_raw(start=1):
        received += 1
        if seq >= count:
            break
    if received != count:
        raise BenchError(f"follow_raw delivered {received} messages up to {count}")
    return count / (time.perf_counter() - started)


def decode_seconds(payloads: Sequence[bytes]) -> float:
    """Seconds per event of :func:`shipyard.events.envelope.decode` alone."""
    started = time.perf_counter()
    for i, payload in enumerate(payloads, start=1):
        decode(payload, seq=i)
    return (time.perf_counter() - started) / max(1, len(payloads))


# --- the replay ---------------------------------------------------------------------------


@dataclass
class ApplyClock:
    """Time spent in ``ReadModels.apply_sync`` (on the database thread) during a replay."""

    seconds: float = 0.0
    batches: int = 0
    events: int = 0


@contextlib.contextmanager
def timing_apply() -> Iterator[ApplyClock]:
    clock = ApplyClock()
    original = ReadModels.apply_sync

    @functools.wraps(original)
    def timed(self: ReadModels, events: list[Event[Any]]) -> int:
        started = time.perf_counter()
        try:
            return original(self, events)
        finally:
            clock.seconds += time.perf_counter() - started
            clock.batches += 1
            clock.events += len(events)

    ReadModels.apply_sync = timed  # type: ignore[method-assign]
    try:
        yield clock
    finally:
        ReadModels.apply_sync = original  # type: ignore[method-assign]


def memory_kb(field_name: str) -> int:
    """A ``/proc/self/status`` figure in kB (0 where there is none)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def write_text(path: str, text: str) -> None:
    Path(path).write_text(text)


def file_mb(path: Path) -> float:
    """Size of a DuckDB file and its write-ahead log."""
    files = (path, path.with_name(path.name + ".wal"))
    return sum(p.stat().st_size for p in files if p.exists()) / 2**20


def tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux ≥ 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


async def replay(
    log: EventLog, path: Path, count: int, profile: str | None
) -> tuple[ReadModels, float, ApplyClock, dict[str, Any]]:
    """``build()`` the log into ``path``; the models (open), events/s, the apply clock and
    memory figures."""
    profiler: Any = None
    if profile:
        profiler = importlib.import_module("pyinstrument").Profiler(interval=0.001)
    rss_before = memory_kb("VmRSS")
    exact_peak = reset_peak_rss()
    with timing_apply() as clock:
        if profiler is not None:
            profiler.start()
        started = time.perf_counter()
        models = await build(log, path, stop=count)
        elapsed = time.perf_counter() - started
        if profiler is not None:
            profiler.stop()
    if profiler is not None and profile:
        write_text(profile, profiler.output_text(unicode=True, color=False))
        note(f"  profile written to {profile}")
    memory = {
        "rss_before_mb": rss_before / 1024,
        "peak_rss_mb": memory_kb("VmHWM") / 1024,
        "peak_is_replay_only": exact_peak,
        "rss_after_mb": memory_kb("VmRSS") / 1024,
        "db_file_mb": file_mb(path),
    }
    return models, count / elapsed, clock, memory


# --- the query database -------------------------------------------------------------------

# Growing the replayed database to R finished runs: copy j = 1, 2, … of its finished runs is
# j workload spans *older* (the replayed runs, and the tasks still open, stay the newest, as
# on a live system); stream sequences are kept increasing with time by moving the replayed
# runs' sequences up by (copies × N) and giving copy j (copies − j) × N more than the
# original; ids get the (copies − j + 1)-th Crockford digit where the replayed ones have
# ``z`` (BASE_DIGIT), so ids still sort by time, as new_id() makes them. The partial copy, if
# any, is the oldest and holds the newest runs, so the history has no holes.
BASE_DIGIT = "z"
COPY_DIGITS = "0123456789abcdefghjkmnpqrstvwxy"
GROW_SQL = f"""
CREATE OR REPLACE TEMP MACRO bench_id(id, d) AS
    substr(id, 1, 2) || substr('{COPY_DIGITS}', d::INTEGER, 1) || substr(id, 4);
CREATE OR REPLACE TEMP TABLE bench_base AS
    SELECT run_id, row_number() OVER (ORDER BY finished_seq DESC) AS rn FROM history;
CREATE OR REPLACE TEMP TABLE bench_copies AS
    SELECT b.run_id, c.j, $copies - c.j + 1 AS d,
           -c.j * $span AS shift, ($copies - c.j) * $seqs AS seqs
    FROM bench_base b, range(1, $copies + 1) c(j)
    WHERE (c.j - 1) * $base + b.rn <= $extra;
UPDATE history SET finished_seq = finished_seq + $copies * $seqs;
UPDATE tasks SET created_seq = created_seq + $copies * $seqs,
                 last_seq = last_seq + $copies * $seqs;
INSERT INTO history BY NAME
    SELECT * EXCLUDE (j, d, shift, seqs) REPLACE (
        bench_id(run_id, d) AS run_id, bench_id(task_id, d) AS task_id,
        started_at + to_seconds(shift) AS started_at,
        ended_at + to_seconds(shift) AS ended_at,
        finished_seq - $copies * $seqs + seqs AS finished_seq)
    FROM history JOIN bench_copies USING (run_id) ORDER BY d, history.rowid;
INSERT INTO runs BY NAME
    SELECT * EXCLUDE (j, d, shift, seqs) REPLACE (
        bench_id(run_id, d) AS run_id, bench_id(task_id, d) AS task_id,
        started_at + to_seconds(shift) AS started_at,
        last_heartbeat + to_seconds(shift) AS last_heartbeat,
        ended_at + to_seconds(shift) AS ended_at)
    FROM runs JOIN bench_copies USING (run_id) ORDER BY d, runs.rowid;
INSERT INTO tasks BY NAME
    SELECT * EXCLUDE (j, d, shift, seqs) REPLACE (
        bench_id(task_id, d) AS task_id, bench_id(run_id, d) AS run_id,
        created_at + to_seconds(shift) AS created_at,
        created_seq - $copies * $seqs + seqs AS created_seq,
        updated_at + to_seconds(shift) AS updated_at,
        last_seq - $copies * $seqs + seqs AS last_seq)
    FROM tasks JOIN bench_copies USING (run_id) ORDER BY d, tasks.rowid;
INSERT INTO cards BY NAME
    SELECT * EXCLUDE (j, d, shift, seqs) REPLACE (
        bench_id(card_id, d) AS card_id, bench_id(task_id, d) AS task_id,
        bench_id(run_id, d) AS run_id, updated_at + to_seconds(shift) AS updated_at)
    FROM cards JOIN bench_copies USING (run_id) ORDER BY d, cards.rowid;
DROP TABLE bench_copies;
DROP TABLE bench_base;
DROP MACRO bench_id;
"""


def scalar(con: duckdb.DuckDBPyConnection, query: str, params: Any = None) -> Any:
    row = con.execute(query, params).fetchone()
    assert row is not None
    return row[0]


def grow(con: duckdb.DuckDBPyConnection, runs: int, span_s: float, seqs: int) -> dict[str, int]:
    """Copy the finished runs until ``history`` holds ``runs`` rows (if it holds fewer)."""
    base = int(scalar(con, "SELECT count(*) FROM history"))
    if base == 0:
        raise BenchError("the replay produced no finished runs to query")
    extra = max(0, runs - base)
    copies = math.ceil(extra / base)
    if copies > len(COPY_DIGITS):
        raise BenchError(
            f"the replay has {base:,} finished runs, too few to grow to {runs:,}: "
            "use more --events or fewer --runs"
        )
    odd = scalar(
        con,
        f"SELECT count(*) FROM history WHERE run_id NOT LIKE 'r-{BASE_DIGIT}%' "
        f"OR task_id NOT LIKE 't-{BASE_DIGIT}%'",
    )
    if extra and odd:
        raise BenchError(f"{odd} runs have ids made elsewhere than newest_id()")
    if extra:
        params = {
            "copies": copies,
            "base": base,
            "extra": extra,
            "span": span_s,
            "seqs": seqs,
        }
        con.execute("BEGIN")
        for statement in GROW_SQL.split(";"):
            if statement.strip():
                used = {k: v for k, v in params.items() if f"${k}" in statement}
                con.execute(statement, used or None)
        con.execute("COMMIT")
        con.execute("CHECKPOINT")
    return counts(con, ("history", "runs", "tasks", "cards"))


def counts(con: duckdb.DuckDBPyConnection, tables: Sequence[str]) -> dict[str, int]:
    return {table: int(scalar(con, f"SELECT count(*) FROM {table}")) for table in tables}


@dataclass
class QueryTimes:
    name: str
    samples: list[float] = field(default_factory=list)
    rows: int = 0


def time_query(name: str, call: Callable[[], Any], repeats: int, budget: float) -> QueryTimes:
    """Call ``call`` ``repeats`` times (fewer once that took ``budget`` seconds); in ms."""
    out = QueryTimes(name)
    result = call()  # warm-up, not counted
    out.rows = len(result.rows) if hasattr(result, "rows") else len(result)
    started = time.perf_counter()
    for i in range(repeats):
        t0 = time.perf_counter()
        call()
        out.samples.append((time.perf_counter() - t0) * 1000.0)
        if i + 1 >= MIN_SAMPLES and time.perf_counter() - started > budget:
            break
    return out


def query_latencies(
    con: duckdb.DuckDBPyConnection, repeats: int, budget: float
) -> list[QueryTimes]:
    total = int(scalar(con, "SELECT count(*) FROM history"))
    deep = scalar(
        con,
        "SELECT run_id FROM history ORDER BY finished_seq DESC LIMIT 1 OFFSET ?",
        [max(0, total // 2)],
    )
    newest = scalar(con, "SELECT max(updated_at) FROM tasks")
    since = newest - timedelta(days=1)
    calls: list[tuple[str, Callable[[], Any]]] = [
        ("history, first page", lambda: queries.history(con, limit=50)),
        ("history, page half-way", lambda: queries.history(con, limit=50, before=deep)),
        (f"history, search {SEARCH!r}", lambda: queries.history(con, limit=50, search=SEARCH)),
        ("kanban, as served (all)", lambda: queries.kanban(con)),
        ("kanban, since a day", lambda: queries.kanban(con, since=since)),
    ]
    results = []
    for name, call in calls:
        timed = time_query(name, call, repeats, budget)
        note(
            f"  {name}: p50 {percentile(timed.samples, 50):.2f} ms, "
            f"p99 {percentile(timed.samples, 99):.2f} ms ({len(timed.samples)} calls, "
            f"{timed.rows:,} rows)"
        )
        results.append(timed)
    return results


def percentile(samples: Sequence[float], p: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(p / 100.0 * len(ordered)) - 1)]


# --- the run ------------------------------------------------------------------------------


async def run(
    sizes: Sizes, store_parent: str | None, profile: str | None, keep_db: str | None
) -> dict[str, Any]:
    """:func:`measure`, cleaning up on SIGTERM as on Ctrl-C."""
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        return await measure(sizes, store_parent, profile, keep_db)
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


async def measure(
    sizes: Sizes, store_parent: str | None, profile: str | None, keep_db: str | None
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="shipyard-bench-replay-", dir=store_parent) as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        note(f"writing {sizes.events:,} events (unsynced server, not measured)")
        writer = UnsyncedNats(root / "nats")
        url = await asyncio.to_thread(writer.start)
        try:
            nc = await connect([url], name="bench-writer")
            try:
                log = EventLog(nc)
                await log.ensure_stream()
                written = await write_workload(nc, sizes)
                stored = await wait_stored(log, written)
            finally:
                await nc.close()
        finally:
            await asyncio.to_thread(writer.stop)
        write_s = time.perf_counter() - started
        if stored != written:
            raise BenchError(f"the stream holds {stored:,} events, {written:,} were written")
        note(f"  {written:,} events in {write_s:.1f}s; restarting the server as Shipyard runs it")

        server = EmbeddedNats(root / "nats")
        url = await asyncio.to_thread(server.start)
        try:
            result = await measure_on(url, sizes, root, profile, keep_db)
        finally:
            await asyncio.to_thread(server.stop)
        result["write_s"] = write_s
        result["environment"]["store"] = str(server.store_dir)
        result["stream_bytes"] = tree_bytes(server.store_dir)
        return result


async def measure_on(
    url: str, sizes: Sizes, root: Path, profile: str | None, keep_db: str | None
) -> dict[str, Any]:
    async with contextlib.AsyncExitStack() as stack:
        nc = await connect([url], name="bench-replay")
        stack.push_async_callback(nc.close)
        log = EventLog(nc)
        n = await log.stream_last_seq()
        if n != sizes.events:
            raise BenchError(f"the restarted server holds {n:,} events, not {sizes.events:,}")

        follow_n = min(n, sizes.follow_sample)
        raws: list[float] = []
        follows: list[float] = []
        for _ in range(sizes.read_rounds):
            rate, payloads = await raw_rate(log, n, DECODE_SAMPLE)
            raws.append(rate)
            note(f"raw ordered consumer, {n:,} messages: {rate:,.0f} msg/s")
            follows.append(await follow_raw_rate(log, follow_n))
            note(f"EventLog.follow_raw, {follow_n:,} messages: {follows[-1]:,.0f} msg/s")
        raw, follow = statistics.median(raws), statistics.median(follows)
        decode_s = decode_seconds(payloads)
        del payloads

        note(f"replay: build() of {n:,} events into a new DuckDB file")
        path = root / "replay" / "readmodels.duckdb"
        models, rate, clock, memory = await replay(log, path, n, profile)
        stack.push_async_callback(models.close)
        note(f"  {rate:,.0f} ev/s, peak RSS {memory['peak_rss_mb']:,.0f} MB")
        assert models.con is not None
        con = models.con
        replayed = await models.run(
            counts, con, ("tasks", "runs", "history", "phases", "cards", "messages", "activity")
        )
        replayed["checkpoint"] = await models.run(models.checkpoint_sync)
        if replayed["checkpoint"] != n:
            raise BenchError(f"the replay stopped at {replayed['checkpoint']:,}, not {n:,}")

        note(f"queries: growing the database to {sizes.runs:,} finished runs")
        t0 = time.perf_counter()
        span_s = sizes.days * 86400.0 + 3600.0
        grown = await models.run(grow, con, sizes.runs, span_s, n)
        grow_s = time.perf_counter() - t0
        note(f"  {grown['history']:,} runs, {grown['cards']:,} cards in {grow_s:.1f}s")
        timed = await models.run(query_latencies, con, sizes.repeats, sizes.query_budget)
        if keep_db:
            await models.run(con.execute, "CHECKPOINT")
            await asyncio.to_thread(shutil.copyfile, path, keep_db)
            note(f"  the query database is kept at {keep_db}")

    elapsed = n / rate
    apply_share = clock.seconds / elapsed
    decode_share = min(1.0 - apply_share, decode_s * n / elapsed)
    figures = [
        Figure("raw ordered consumer", "msg/s", raw, samples=n),
        Figure(
            "EventLog.follow_raw",
            "msg/s",
            follow,
            baseline=raw,
            ratio=follow / raw,
            samples=follow_n,
        ),
        Figure(
            "replay: build()",
            "ev/s",
            rate,
            baseline=raw,
            ratio=rate / raw,
            target=f"ratio ≥ {RATIO_TARGET:g}",
            passed=rate / raw >= RATIO_TARGET,
            samples=n,
        ),
        Figure("replay: peak RSS", "MB", memory["peak_rss_mb"]),
    ]
    for q in timed:
        for p in (50, 99):
            value = percentile(q.samples, p)
            target = p == 99
            figures.append(
                Figure(
                    f"{q.name} p{p}",
                    "ms",
                    value,
                    target=f"≤ {P99_TARGET_MS:g} ms" if target else "",
                    passed=value <= P99_TARGET_MS if target else None,
                    samples=len(q.samples),
                )
            )
    return {
        "sizes": dataclasses.asdict(sizes),
        "environment": environment(),
        "stream_messages": n,
        "reads": {"raw_msg_per_s": raws, "follow_raw_msg_per_s": follows},
        "replay": {
            "seconds": elapsed,
            "events_per_s": rate,
            "ratio_to_raw": rate / raw,
            "ratio_to_follow_raw": rate / follow,
            "apply_seconds": clock.seconds,
            "apply_batches": clock.batches,
            "apply_share": apply_share,
            "decode_us_per_event": decode_s * 1e6,
            "decode_share": decode_share,
            "receive_share": max(0.0, 1.0 - apply_share - decode_share),
            "raw_us_per_event": 1e6 / raw,
            "follow_raw_us_per_event": 1e6 / follow,
            "memory": memory,
            "tables": replayed,
        },
        "queries": {
            "database": grown,
            "grow_seconds": grow_s,
            "latency_ms": {
                q.name: {
                    "p50": percentile(q.samples, 50),
                    "p99": percentile(q.samples, 99),
                    "max": max(q.samples),
                    "calls": len(q.samples),
                    "rows": q.rows,
                }
                for q in timed
            },
        },
        "figures": [dataclasses.asdict(f) for f in figures],
        "passed": all(f.passed is not False for f in figures),
    }


def environment() -> dict[str, Any]:
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
        "duckdb": metadata.version("duckdb"),
        "msgspec": metadata.version("msgspec"),
        "store": "",
    }


# --- output -------------------------------------------------------------------------------


def _number(value: float | None, unit: str = "") -> str:
    if value is None:
        return "—"
    if unit == "ms":
        return f"{value:.2f} ms"
    if unit:
        return f"{value:,.0f} {unit}"
    return f"{value:.2f}"


def table(result: dict[str, Any]) -> str:
    headers = ("figure", "value", "baseline", "ratio", "target", "result", "calls")
    rows = []
    for f in result["figures"]:
        verdict = {True: "pass", False: "MISS", None: "—"}[f["passed"]]
        base_unit = "msg/s" if f["unit"] == "ev/s" else f["unit"]
        rows.append(
            (
                f["name"],
                _number(f["value"], f["unit"]),
                _number(f["baseline"], base_unit),
                _number(f["ratio"]),
                f["target"] or "—",
                verdict,
                f"{f['samples']:,}" if f["unit"] == "ms" else "",
            )
        )
    widths = [max(len(str(r[i])) for r in (headers, *rows)) for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        left = cells[0].ljust(widths[0])
        rest = [c.rjust(w) for c, w in zip(cells[1:4], widths[1:4], strict=True)]
        tail = [c.ljust(w) for c, w in zip(cells[4:6], widths[4:6], strict=True)]
        calls = [cells[6].rjust(widths[6])]
        return "  ".join([left, *rest, *tail, *calls]).rstrip()

    sizes, env, rp, qs = result["sizes"], result["environment"], result["replay"], result["queries"]
    mem, tables, db = rp["memory"], rp["tables"], qs["database"]
    peak_note = "" if mem["peak_is_replay_only"] else " (process peak: VmHWM could not be reset)"
    out = [
        f"Shipyard replay benchmark — {env['nats_server']}, nats-py {env['nats_py']}, "
        f"duckdb {env['duckdb']}, Python {env['python']}, {env['cpus']} CPUs",
        f"N={result['stream_messages']:,} events ({result['stream_bytes'] / 2**20:,.0f} MB "
        f"stored, written in {result['write_s']:.1f}s, not measured); queries at "
        f"R={db['history']:,} finished runs; store {env['store']}",
        "",
        line(headers),
        line(["-" * w for w in widths]),
        *(line(r) for r in rows),
        "",
        "baseline: a bare nats-py ordered consumer (callback that counts) over the same N.",
        "ratio: figure / baseline. replay / EventLog.follow_raw = "
        f"{rp['ratio_to_follow_raw']:.2f}.",
        "",
        f"where the replay's {rp['seconds']:.1f}s went "
        f"({rp['seconds'] * 1e6 / sizes['events']:.1f} µs per event):",
        f"  ReadModels.apply_sync (fold + DuckDB)  {100 * rp['apply_share']:5.1f} %   "
        f"{rp['apply_seconds']:.1f}s in {rp['apply_batches']} batches",
        f"  decode (envelope.decode)               {100 * rp['decode_share']:5.1f} %   "
        f"{rp['decode_us_per_event']:.1f} µs/event, timed alone",
        f"  receive (follow_raw) and the rest      {100 * rp['receive_share']:5.1f} %   "
        f"follow_raw alone {rp['follow_raw_us_per_event']:.1f} µs/msg, bare consumer "
        f"{rp['raw_us_per_event']:.1f} µs/msg",
        f"memory: RSS {mem['rss_before_mb']:,.0f} MB before the replay, peak "
        f"{mem['peak_rss_mb']:,.0f} MB{peak_note}, {mem['rss_after_mb']:,.0f} MB after; "
        f"DuckDB file {mem['db_file_mb']:,.0f} MB",
        "replayed: "
        + ", ".join(f"{k} {v:,}" for k, v in tables.items() if k != "checkpoint")
        + f"; checkpoint {tables['checkpoint']:,}",
        f"query database: {db['history']:,} history, {db['runs']:,} runs, {db['tasks']:,} "
        f"tasks, {db['cards']:,} cards (grown from the replay in {qs['grow_seconds']:.1f}s)",
        "rows returned: " + ", ".join(f"{k} {v['rows']:,}" for k, v in qs["latency_ms"].items()),
    ]
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.replay",
        description="Measure how fast Shipyard replays the event log into its DuckDB read "
        "models against a bare ordered consumer, and read-model query latency, on a fresh "
        "embedded server.",
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run with small sizes")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--events", type=int, help="N, events written and replayed")
    parser.add_argument("--runs", type=int, help="R, finished runs for the query latencies")
    parser.add_argument("--repeats", type=int, help="calls per query")
    parser.add_argument(
        "--follow-sample", type=int, help="messages read through EventLog.follow_raw"
    )
    parser.add_argument("--read-rounds", type=int, help="passes of both consumers (median)")
    parser.add_argument("--days", type=float, help="span of the event times, in days")
    parser.add_argument(
        "--query-budget", type=float, help="seconds each query is timed for, at most"
    )
    parser.add_argument("--profile", help="write a pyinstrument profile of the replay here")
    parser.add_argument("--keep-db", help="copy the query database (R runs) here at the end")
    parser.add_argument("--dir", help="where to create the temporary store (default: $TMPDIR)")
    args = parser.parse_args(argv)

    sizes = QUICK if args.quick else FULL
    overrides = {
        "events": args.events,
        "runs": args.runs,
        "repeats": args.repeats,
        "follow_sample": args.follow_sample,
        "days": args.days,
        "query_budget": args.query_budget,
        "read_rounds": args.read_rounds,
    }
    sizes = dataclasses.replace(sizes, **{k: v for k, v in overrides.items() if v is not None})
    if min(sizes.events, sizes.runs, sizes.repeats, sizes.follow_sample, sizes.read_rounds) < 1:
        parser.error("sizes must be at least 1")
    if sizes.days <= 0 or sizes.query_budget <= 0:
        parser.error("--days and --query-budget must be positive")
    if sizes.events < 200:
        parser.error("--events: at least 200, so that some runs finish")

    started = time.perf_counter()
    try:
        result = asyncio.run(run(sizes, args.dir, args.profile, args.keep_db))
    except BenchError as e:
        print(f"bench/replay.py: {e}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("bench/replay.py: interrupted; everything it started is stopped", file=sys.stderr)
        return 130
    result["seconds"] = round(time.perf_counter() - started, 2)
    if args.json:
        print(json.dumps(result, indent=2, ensure_ascii=False, default=str))
    else:
        print(table(result))
        print(f"\n(finished in {result['seconds']:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
