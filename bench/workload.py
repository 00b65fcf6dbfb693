"""A workload for the benchmarks that read the log: events shaped like a real one, written
to a fresh embedded server.

Tasks are dispatched twenty ahead of the handler and eight runs go at once, their events
interleaved. Per run: ``task_claimed``; each phase started and ended with ``phase_changed``,
each followed by a ``work_progress`` (as the handler posts them); ``builder_started`` for
PLAN, BUILD (and HEAL); ``plan_recorded``; a ``card_added`` per plan step (2–5) and two
``card_moved`` each, with a heartbeat between; ``validation_checked``; ``report_written``;
``run_finished`` and ``task_finished``. One run in ten heals, one in ten fails, one in eight
has a conversation (a question and an answer in a thread, both read). About 55 events per
run, 375 bytes each encoded. Event times are spread over ``days`` days; the stream ends
mid-workload, so some tasks are still queued or running.

A child process makes and encodes the events while this one publishes them (core publishes
with ``Nats-Msg-Id``, every 2,000th a ``publish_async`` whose acknowledgement bounds what is
in flight) to a server started *without* ``sync_interval: always``, which would make writing
a million events take minutes. That server is then stopped and a stock ``EmbeddedNats``
(``shipyard up``'s configuration) started on the same store: what the benchmark measures
runs against that one.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import queue
import random
import tempfile
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from nats.aio.client import Client as NATS

from bench import _common as c
from shipyard.embedded import EmbeddedNats
from shipyard.events import types as t
from shipyard.events.envelope import Event, b32, encode, make, new_id, short_id
from shipyard.events.log import H_MSG_ID, EventLog, connect

BARRIER_EVERY = 2000  # writing: every Nth event waits for an acknowledgement...
BARRIERS_IN_FLIGHT = 4  # ...and at most this many such acknowledgements are outstanding
WRITE_CHUNK = 2000  # events per message from the process that makes them
CONCURRENT_RUNS = 8  # runs whose events interleave, as one handler's would
QUEUED_AHEAD = 20  # tasks dispatched and waiting for a handler
ACTOR_DISPATCHER = "dispatcher:openclaw"
HANDLER_ACTOR = "handler:h-build-1"
# Ids made here start with this digit where new_id() today gives "0": they sort after the
# copies of older runs that bench/queries.py grows its database with.
BASE_DIGIT = "z"

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


async def write_workload(nc: NATS, events: int, days: float) -> int:
    """Publish the workload, made and encoded in a child process meanwhile; return the
    number of events written."""
    js = nc.jetstream(timeout=60.0)
    barriers: deque[asyncio.Future[Any]] = deque()
    written = 0
    started = time.perf_counter()
    context = multiprocessing.get_context("spawn")
    chunks: Any = context.Queue(maxsize=16)
    child = context.Process(target=produce, args=(chunks, events, days), name="bench-workload")
    child.start()

    def next_chunk() -> list[tuple[str, bytes, str]] | None:
        while True:
            try:
                chunk: list[tuple[str, bytes, str]] | None = chunks.get(timeout=1.0)
                return chunk
            except queue.Empty:
                if not child.is_alive():
                    raise c.BenchError(f"the workload process exited ({child.exitcode})") from None

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
                    c.note(f"  {written:,} events written ({rate:,.0f}/s)")
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


@contextlib.asynccontextmanager
async def stored(
    parent: str | None, prefix: str, events: int, days: float
) -> AsyncIterator[tuple[Path, EmbeddedNats]]:
    """A temporary directory whose embedded server holds ``events`` workload events, served
    as ``shipyard up`` serves its store (every write synced)."""
    with tempfile.TemporaryDirectory(prefix=f"shipyard-bench-{prefix}-", dir=parent) as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        c.note(f"writing {events:,} events (unsynced server, not measured)")
        writer = UnsyncedNats(root / "nats")
        url = await asyncio.to_thread(writer.start)
        try:
            nc = await connect([url], name="bench-writer")
            try:
                log = EventLog(nc)
                await log.ensure_stream()
                written = await write_workload(nc, events, days)
                count = await wait_stored(log, written)
            finally:
                await nc.close()
        finally:
            await asyncio.to_thread(writer.stop)
        if count != written:
            raise c.BenchError(f"the stream holds {count:,} events, {written:,} were written")
        c.note(
            f"  {written:,} events in {time.perf_counter() - started:.1f}s; restarting the server"
        )
        async with c.serving(root) as server:
            yield root, server
