"""Benchmark: how fast Shipyard records events, against what NATS JetStream itself can do.

One run starts a fresh embedded nats-server (:class:`shipyard.embedded.EmbeddedNats`, the
same configuration ``shipyard up`` uses, so every write is synced to disk) in a temporary
directory, creates the Shipyard stream with :func:`shipyard.events.log.stream_config`, and
measures, after a warm-up:

1. **raw publish_async** (msg/s) — the baseline: nats-py ``JetStreamContext.publish_async``
   of N messages, each an encoded ``work_progress`` event (so exactly the size Shipyard
   writes) on its own ``sy.ev.task.<id>.work_progress`` subject, with at most
   ``--concurrency`` acknowledgements outstanding; every acknowledgement is awaited.
2. **append** (events/s) — N ``WorkProgress`` events, each on a distinct aggregate, through
   :meth:`EventLog.append <shipyard.events.log.EventLog.append>` from ``--concurrency``
   concurrent appenders (the same number in flight as the baseline allows).
   **append expect=** is the same with optimistic concurrency: ``--concurrency`` aggregates,
   each appended to in order by its own appender with ``expect=`` the aggregate's last
   sequence (the guard every state change in Shipyard uses).
3. **dispatch p50 / p99** (ms) — a :class:`~shipyard.events.commands.CommandService` serves
   ``sy.cmd.dispatch`` on its own connection; a client calls
   ``commands.call(nc, "dispatch", body)`` M times, one after another, with a valid dispatch.
   Its baseline is the same percentile of a plain ``JetStreamContext.publish`` (one synced
   write and its acknowledgement) of an event the size of the one a dispatch records,
   sampled interleaved with the dispatches.

Throughput figures are the median over ``--rounds`` rounds; the raw and Shipyard rounds are
interleaved so that both see the same disk and stream size.

Reading the ratio: for throughput it is Shipyard / raw, so 1.0 means Shipyard adds nothing
to what the server and the client library cost anyway, and 0.5 (the target) means Shipyard's
own per-event work — building headers, encoding, a request/reply round trip per event, JSON
decoding of the acknowledgement — costs as much as NATS itself. For latency it is
Shipyard / raw as well, so there *lower* is better: it says how many plain synced writes one
dispatch costs (validation, two extra hops through the command service, and the write).
The absolute target for dispatch is p99 ≤ 10 ms.

The numbers depend on the disk (the server fsyncs every write): ``--dir`` puts the store
on the file system you care about. ``python -m bench append`` runs it in the suite.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import sys
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import Any

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from bench import _common as c
from shipyard.events import commands, dispatch
from shipyard.events.commands import Commands, CommandService
from shipyard.events.envelope import Event, encode, make, new_id, subject_for
from shipyard.events.log import APPEND_TIMEOUT, EventLog, connect
from shipyard.events.types import Phase, WorkProgress

THROUGHPUT_TARGET = 0.5  # Shipyard append / raw publish_async, at least
P99_TARGET_MS = 10.0  # dispatch round trip, at most
ACTOR = "handler:bench"

PROMPT = """## Task
Add a /health endpoint to the service.

## Requirements
- GET /health answers 200 with {"ok": true}
- Documented in the README

## Environment
- Working directory: /tmp/x
- Test: python -m pytest -q

## Deliverables
1. app/health.py
2. README.md
"""


@dataclass(frozen=True)
class Sizes:
    events: int  # N: messages per round, for the baseline and for each append variant
    rounds: int  # throughput rounds; the median is reported
    warmup: int  # messages per variant before the first timed round
    dispatches: int  # M: timed dispatch calls (and as many baseline publishes)
    dispatch_warmup: int
    concurrency: int  # appenders in flight, and the baseline's publish_async window


QUICK = Sizes(events=400, rounds=1, warmup=100, dispatches=60, dispatch_warmup=20, concurrency=64)
FULL = Sizes(
    events=10_000, rounds=3, warmup=1_000, dispatches=1_000, dispatch_warmup=100, concurrency=128
)


# --- inputs -------------------------------------------------------------------------------


def progress_event(aggregate_id: str, n: int) -> Event[WorkProgress]:
    data = WorkProgress(
        run_id="r-" + aggregate_id[2:],
        phase=Phase.BUILD,
        percent=n % 101,
        action="running the test suite",
        turns=n,
        tool_calls=2 * n,
        tokens_in=1000 * n,
        tokens_out=100 * n,
        cost_usd=0.01 * n,
        last_tool="Bash",
    )
    return make(data, aggregate_id=aggregate_id, actor=ACTOR)


def distinct_events(count: int) -> list[Event[WorkProgress]]:
    """``count`` events, each on an aggregate of its own."""
    return [progress_event(new_id("t-"), n) for n in range(count)]


def chained_events(count: int, aggregates: int) -> list[list[Event[WorkProgress]]]:
    """``count`` events spread over ``aggregates`` aggregates, in order within each."""
    per, extra = divmod(count, aggregates)
    chains = []
    for k in range(aggregates):
        aggregate_id = new_id("t-")
        chains.append([progress_event(aggregate_id, n) for n in range(per + (k < extra))])
    return [chain for chain in chains if chain]


def raw_messages(count: int) -> tuple[list[str], bytes]:
    """Subjects shaped like Shipyard's (one per aggregate) and a payload of an event's size."""
    payload = encode(progress_event(new_id("t-"), 50))
    subjects = [subject_for("task", new_id("t-"), WorkProgress.TYPE) for _ in range(count)]
    return subjects, payload


def dispatch_body() -> dict[str, Any]:
    return {
        "request_type": "queue",
        "action": "create",
        "task_type": "build",
        "action_name": "Add a health endpoint",
        "priority": "normal",
        "payload": {
            "prompt": PROMPT,
            "dispatcher": "bench",
            "task_title": "Add a health endpoint",
            "max_turns": 40,
        },
    }


def dispatched_event_bytes(body: dict[str, Any]) -> bytes:
    """The event a dispatch of ``body`` records, encoded: the baseline's payload."""
    _, data = dispatch.parse(body)
    return encode(make(data, aggregate_id=dispatch.task_id_for("bench", ""), actor=ACTOR))


# --- the measurements ---------------------------------------------------------------------


# --- the measurements ----------------------------------------------------------------------


async def raw_round(js: JetStreamContext, subjects: Sequence[str], payload: bytes) -> float:
    """Messages per second of pipelined ``publish_async``, every ack awaited."""
    start = time.perf_counter()
    futures = [await js.publish_async(subject, payload) for subject in subjects]
    await asyncio.gather(*futures)
    return len(subjects) / (time.perf_counter() - start)


async def append_round(
    log: EventLog, events: Sequence[Event[WorkProgress]], concurrency: int
) -> float:
    """Events per second through ``EventLog.append`` from ``concurrency`` appenders."""
    pending = iter(events)

    async def appender() -> None:
        for event in pending:
            await log.append(event)

    start = time.perf_counter()
    await asyncio.gather(*(appender() for _ in range(min(concurrency, len(events)))))
    return len(events) / (time.perf_counter() - start)


async def append_expect_round(log: EventLog, chains: Sequence[Sequence[Event[Any]]]) -> float:
    """Events per second with ``expect=``, one appender per aggregate, in order."""

    async def appender(chain: Sequence[Event[Any]]) -> None:
        last = 0
        for event in chain:
            last = await log.append(event, expect=last)

    start = time.perf_counter()
    await asyncio.gather(*(appender(chain) for chain in chains))
    return sum(len(chain) for chain in chains) / (time.perf_counter() - start)


async def timed(call: Awaitable[Any]) -> float:
    """Milliseconds to await ``call`` (a coroutine does nothing until awaited)."""
    start = time.perf_counter()
    await call
    return (time.perf_counter() - start) * 1000.0


async def dispatch_latencies(
    nc: NATS, js: JetStreamContext, count: int
) -> tuple[list[float], list[float]]:
    """``count`` sequential dispatch round trips and, interleaved, as many plain synced
    publishes of the event a dispatch records; both in milliseconds."""
    body = dispatch_body()
    payload = dispatched_event_bytes(body)
    dispatched: list[float] = []
    raw: list[float] = []
    for _ in range(count):
        subject = subject_for("task", new_id("t-"), "task_dispatched")
        raw.append(await timed(js.publish(subject, payload)))
        dispatched.append(await timed(commands.call(nc, "dispatch", body)))
    return dispatched, raw


async def measure(quick: bool, parent: str | None) -> dict[str, Any]:
    sizes = QUICK if quick else FULL
    async with (
        c.fresh_server(parent, "append") as (_, server),
        contextlib.AsyncExitStack() as stack,
    ):
        nc = await connect([server.url], name="bench-client")
        stack.push_async_callback(nc.close)
        service_nc = await connect([server.url], name="bench-service")
        stack.push_async_callback(service_nc.close)
        log = EventLog(nc)
        await log.ensure_stream()
        js = nc.jetstream(timeout=APPEND_TIMEOUT, publish_async_max_pending=sizes.concurrency)
        n = sizes.concurrency

        c.note(f"warm-up: {sizes.warmup} messages per variant")
        subjects, payload = raw_messages(sizes.warmup)
        await raw_round(js, subjects, payload)
        await append_round(log, distinct_events(sizes.warmup), n)
        await append_expect_round(log, chained_events(sizes.warmup, n))

        raw: list[float] = []
        plain: list[float] = []
        guarded: list[float] = []
        for r in range(1, sizes.rounds + 1):
            subjects, payload = raw_messages(sizes.events)
            events = distinct_events(sizes.events)
            chains = chained_events(sizes.events, n)
            raw.append(await raw_round(js, subjects, payload))
            plain.append(await append_round(log, events, n))
            guarded.append(await append_expect_round(log, chains))
            c.note(
                f"round {r}/{sizes.rounds}: raw {raw[-1]:,.0f} msg/s, append "
                f"{plain[-1]:,.0f} ev/s, append expect= {guarded[-1]:,.0f} ev/s"
            )

        service = CommandService(service_nc, Commands(EventLog(service_nc)))
        await service.start()
        await service_nc.flush()
        try:
            c.note(f"dispatch: {sizes.dispatch_warmup} warm-up, {sizes.dispatches} timed")
            await dispatch_latencies(nc, js, sizes.dispatch_warmup)
            dispatched, raw_latency = await dispatch_latencies(nc, js, sizes.dispatches)
        finally:
            await service.stop()

    raw_rate = statistics.median(raw)
    figures = [
        c.at_least_ratio(
            "append throughput",
            "ev/s",
            statistics.median(plain),
            raw_rate,
            THROUGHPUT_TARGET,
            "msg/s",
        ),
        c.at_least_ratio(
            "append expect= throughput",
            "ev/s",
            statistics.median(guarded),
            raw_rate,
            THROUGHPUT_TARGET,
            "msg/s",
        ),
        c.latency("dispatch round trip p99", 99, dispatched, raw_latency, P99_TARGET_MS),
    ]
    return {
        "sizes": vars(sizes),
        "figures": figures,
        "samples": {"raw": raw, "append": plain, "append_expect": guarded},
        "details": [
            "append: baseline raw publish_async of the same payloads, same window; dispatch:",
            "baseline one plain synced publish of the event a dispatch records, same p99.",
        ],
    }


def main(argv: Sequence[str] | None = None) -> int:
    return c.main(
        "append",
        "Shipyard's event append throughput and dispatch latency against raw JetStream.",
        measure,
        argv,
    )


if __name__ == "__main__":
    sys.exit(main())
