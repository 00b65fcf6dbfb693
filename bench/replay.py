"""Benchmark: how fast Shipyard rebuilds its read models from the log.

A fresh embedded server is filled with N workload events (:mod:`bench.workload`; the
writing is not measured) and restarted as ``shipyard up`` runs it. Then:

1. **raw ordered consumer** (msg/s) — the baseline: nats-py
   ``js.subscribe(ordered_consumer=True, cb=…)`` from sequence 1 with a callback that only
   counts, until all N messages arrived: what NATS and its Python client deliver to one
   process. **EventLog.follow_raw** (msg/s) is Shipyard's own ordered consumer over the
   first ``follow_sample`` messages: what ``build()`` and every other reader sit on.
2. **replay** (events/s) — :func:`shipyard.projections.projector.build` from sequence 1 to N
   into a new DuckDB file, as ``shipyard replay`` does; ratio = replay / raw, target ≥ 0.6
   at a million events. **Peak RSS**: this process's high-water mark during the replay
   (``VmHWM``, reset just before it through ``/proc/self/clear_refs``).

Below the table, where the replay's time went: inside ``ReadModels.apply_sync`` (fold and
DuckDB, on the database thread; timed by wrapping the method), in ``envelope.decode``
(timed alone on 50,000 of the payloads: a lower bound), and the rest (receiving through
``follow_raw``, the async generators above it, batching).

With two cores the nats-server, the event loop and the database thread compete, and other
load shows up directly in the rates. ``python -m bench replay`` runs it in the suite.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig, DeliverPolicy

from bench import _common as c
from bench import workload
from shipyard.events.envelope import Event, decode
from shipyard.events.log import ALL_EVENTS, STREAM, EventLog, connect
from shipyard.projections.projector import ReadModels, build

RATIO_TARGET = 0.6  # replay / raw ordered consumer, at least
DECODE_SAMPLE = 50_000  # payloads kept from the raw pass to time decoding alone


@dataclass(frozen=True)
class Sizes:
    events: int  # N: events written and replayed
    follow_sample: int  # messages read through EventLog.follow_raw
    days: float  # the span of event times in the written workload


QUICK = Sizes(events=20_000, follow_sample=20_000, days=3.0)
FULL = Sizes(events=1_000_000, follow_sample=100_000, days=30.0)


Curve = list[tuple[float, int]]  # (seconds since the start, messages or events done)


async def raw_rate(log: EventLog, count: int, keep: int) -> tuple[float, list[bytes], Curve]:
    """Messages per second of a bare nats-py ordered consumer receiving ``count`` messages
    from sequence 1; also the first ``keep`` payloads, and its progress over time."""
    done = asyncio.Event()
    kept: list[bytes] = []
    received = 0
    curve: Curve = [(0.0, 0)]
    every = max(1, count // 50)

    async def on_message(msg: Msg) -> None:
        nonlocal received
        received += 1
        if len(kept) < keep:
            kept.append(msg.data)
        if received % every == 0 or received >= count:
            curve.append((time.perf_counter() - started, received))
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
    return count / elapsed, kept, curve


async def follow_raw_rate(log: EventLog, count: int) -> float:
    """Messages per second of ``EventLog.follow_raw`` over the first ``count`` messages."""
    started = time.perf_counter()
    async for seq, _ in log.follow_raw(start=1):
        if seq >= count:
            break
    return count / (time.perf_counter() - started)


def decode_seconds(payloads: Sequence[bytes]) -> float:
    """Seconds per event of :func:`shipyard.events.envelope.decode` alone."""
    started = time.perf_counter()
    for i, payload in enumerate(payloads, start=1):
        decode(payload, seq=i)
    return (time.perf_counter() - started) / max(1, len(payloads))


@dataclass
class ApplyClock:
    """Time spent in ``ReadModels.apply_sync`` (on the database thread) during a replay."""

    seconds: float = 0.0
    batches: int = 0
    done: list[tuple[float, int]] = field(default_factory=list)  # (perf_counter, events)


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
            ended = time.perf_counter()
            clock.seconds += ended - started
            clock.batches += 1
            clock.done.append((ended, len(events)))

    ReadModels.apply_sync = timed  # type: ignore[method-assign]
    try:
        yield clock
    finally:
        ReadModels.apply_sync = original  # type: ignore[method-assign]


def status_mb(field: str) -> float:
    """A ``/proc/self/status`` figure (VmRSS, VmHWM) in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux ≥ 4.0); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


async def measure(quick: bool, parent: str | None) -> dict[str, Any]:
    sizes = QUICK if quick else FULL
    async with (
        workload.stored(parent, "replay", sizes.events, sizes.days) as (root, server),
        contextlib.AsyncExitStack() as stack,
    ):
        nc = await connect([server.url], name="bench-replay")
        stack.push_async_callback(nc.close)
        log = EventLog(nc)
        n = await log.stream_last_seq()

        raw, payloads, raw_curve = await raw_rate(log, n, DECODE_SAMPLE)
        c.note(f"raw ordered consumer, {n:,} messages: {raw:,.0f} msg/s")
        follow_n = min(n, sizes.follow_sample)
        follow = await follow_raw_rate(log, follow_n)
        c.note(f"EventLog.follow_raw, {follow_n:,} messages: {follow:,.0f} msg/s")
        decode_s = decode_seconds(payloads)
        del payloads

        c.note(f"replay: build() of {n:,} events into a new DuckDB file")
        path = root / "replay" / "readmodels.duckdb"
        rss_before = status_mb("VmRSS")
        exact_peak = reset_peak_rss()
        with timing_apply() as clock:
            started = time.perf_counter()
            models = await build(log, path, stop=n)
            elapsed = time.perf_counter() - started
        stack.push_async_callback(models.close)
        peak = status_mb("VmHWM")
        replay_curve: Curve = [(0.0, 0)]
        for ended, events in clock.done:
            replay_curve.append((ended - started, replay_curve[-1][1] + events))
        rate = n / elapsed
        c.note(f"  {rate:,.0f} ev/s, peak RSS {peak:,.0f} MB")
        checkpoint = await models.run(models.checkpoint_sync)
        if checkpoint != n:
            raise c.BenchError(f"the replay stopped at {checkpoint:,}, not {n:,}")

    apply_share = clock.seconds / elapsed
    decode_share = min(1.0 - apply_share, decode_s * n / elapsed)
    peak_note = "" if exact_peak else " (the process's: VmHWM could not be reset)"
    figures = [
        c.Figure("raw ordered consumer", "msg/s", raw),
        c.at_most("EventLog.follow_raw", "msg/s", follow, None, raw),
        c.at_least_ratio("replay: build()", "ev/s", rate, raw, RATIO_TARGET, "msg/s"),
        c.at_most("replay: peak RSS", "MB", peak, None),
    ]
    return {
        "sizes": vars(sizes),
        "figures": figures,
        "replay": {
            "events": n,
            "seconds": elapsed,
            "events_per_s": rate,
            "raw_msg_per_s": raw,
            "follow_raw_msg_per_s": follow,
            "apply_share": apply_share,
            "decode_share": decode_share,
        },
        "curves": {"raw": raw_curve, "replay": replay_curve},
        "details": [
            "",
            f"N = {n:,} events. Baseline: a bare nats-py ordered consumer (a callback that",
            f"counts) over the same N. replay / EventLog.follow_raw = {rate / follow:.2f}.",
            f"where the replay's {elapsed:.1f}s went ({elapsed * 1e6 / n:.1f} µs per event):",
            f"  ReadModels.apply_sync (fold + DuckDB)  {100 * apply_share:5.1f} %  "
            f"({clock.batches} batches)",
            f"  envelope.decode (timed alone)          {100 * decode_share:5.1f} %",
            f"  receiving and the rest                 "
            f"{100 * max(0.0, 1 - apply_share - decode_share):5.1f} %",
            f"memory: RSS {rss_before:,.0f} MB before, peak {peak:,.0f} MB{peak_note}",
        ],
    }


def main(argv: Sequence[str] | None = None) -> int:
    return c.main(
        "replay",
        "Replay of the event log into DuckDB against a bare ordered consumer on the same stream.",
        measure,
        argv,
    )


if __name__ == "__main__":
    sys.exit(main())
