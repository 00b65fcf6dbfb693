"""Benchmark: how fast Shipyard rebuilds its read models from the log.

A fresh embedded server is filled with N workload events (:mod:`bench.workload`; the
writing is not measured) and restarted as ``shipyard up`` runs it. Then:

1. **raw ordered consumer** (msg/s) — the baseline: nats-py
   ``js.subscribe(ordered_consumer=True, cb=…)`` from sequence 1 with a callback that only
   counts, until all N messages arrived: what NATS and its Python client deliver to one
   process. **EventLog.follow_raw** (msg/s) is Shipyard's own ordered consumer over the
   first ``follow_sample`` messages: what ``build()`` and every other reader sit on.
2. **replay** (events/s) — :func:`shipyard.projections.projector.build` from sequence 1 to N
   into a new DuckDB file, as ``shipyard replay`` does: this process receives while a worker
   process (:mod:`shipyard.projections.worker`) decodes, folds and writes; ratio = replay /
   raw, target ≥ 0.6 at a million events. **Peak RSS**: this process's high-water mark
   during the replay (``VmHWM``, reset just before it through ``/proc/self/clear_refs``),
   and the worker's.

Below the table, where the CPU went, in the baseline and in the replay: this process
(receiving, and handing events on), the worker (decode, fold, DuckDB) and nats-server. The
replay's progress curve counts the events handed to the worker; the worker trails it by
what the pipe and the send buffer hold, and writes its tables once all have arrived.

With two cores the nats-server, the event loop and the database thread compete, and other
load shows up directly in the rates. ``python -m bench replay`` runs it in the suite.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig, DeliverPolicy

from bench import _common as c
from bench import workload
from shipyard.events.log import ALL_EVENTS, STREAM, EventLog, connect
from shipyard.projections import projector, rebuild
from shipyard.projections.projector import build

RATIO_TARGET = 0.6  # replay / raw ordered consumer, at least


@dataclass(frozen=True)
class Sizes:
    events: int  # N: events written and replayed
    follow_sample: int  # messages read through EventLog.follow_raw
    days: float  # the span of event times in the written workload


QUICK = Sizes(events=20_000, follow_sample=20_000, days=3.0)
FULL = Sizes(events=1_000_000, follow_sample=100_000, days=30.0)


Curve = list[tuple[float, int]]  # (seconds since the start, messages or events done)


async def raw_rate(log: EventLog, count: int) -> tuple[float, Curve]:
    """Messages per second of a bare nats-py ordered consumer receiving ``count`` messages
    from sequence 1, and its progress over time."""
    done = asyncio.Event()
    received = 0
    curve: Curve = [(0.0, 0)]
    every = max(1, count // 50)

    async def on_message(msg: Msg) -> None:
        nonlocal received
        received += 1
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
    return count / elapsed, curve


async def follow_raw_rate(log: EventLog, count: int) -> float:
    """Messages per second of ``EventLog.follow_raw`` over the first ``count`` messages."""
    started = time.perf_counter()
    async for seq, _ in log.follow_raw(start=1):
        if seq >= count:
            break
    return count / (time.perf_counter() - started)


class RebuildWatch(logging.Handler):
    """What a replay's rebuild did: events handed to the worker over time, and the
    worker's report, from the record ``build()`` logs when it is done."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.sent: list[tuple[float, int]] = []  # (perf_counter, last sequence handed on)
        self.report: rebuild.Report | None = None

    def progress(self, seq: int) -> None:
        self.sent.append((time.perf_counter(), seq))

    def emit(self, record: logging.LogRecord) -> None:
        report = getattr(record, "worker", None)
        if isinstance(report, rebuild.Report):
            self.report = report


@contextlib.contextmanager
def watching_rebuild() -> Iterator[RebuildWatch]:
    watch = RebuildWatch()
    logger = logging.getLogger(projector.__name__)
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(watch)
    try:
        yield watch
    finally:
        logger.removeHandler(watch)
        logger.setLevel(level)


@dataclass
class Cpu:
    """CPU seconds of this process and of nats-server over a stretch of time."""

    server_pid: int
    here: float = 0.0
    server: float = 0.0

    @contextlib.contextmanager
    def measuring(self) -> Iterator[None]:
        here, server = c.self_cpu_seconds(), c.proc_cpu_seconds(self.server_pid)
        try:
            yield
        finally:
            self.here = c.self_cpu_seconds() - here
            self.server = c.proc_cpu_seconds(self.server_pid) - server


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

        assert server.pid is not None
        raw_cpu = Cpu(server.pid)
        with raw_cpu.measuring():
            raw, raw_curve = await raw_rate(log, n)
        c.note(f"raw ordered consumer, {n:,} messages: {raw:,.0f} msg/s")
        follow_n = min(n, sizes.follow_sample)
        follow = await follow_raw_rate(log, follow_n)
        c.note(f"EventLog.follow_raw, {follow_n:,} messages: {follow:,.0f} msg/s")

        c.note(f"replay: build() of {n:,} events into a new DuckDB file")
        path = root / "replay" / "readmodels.duckdb"
        rss_before = status_mb("VmRSS")
        exact_peak = reset_peak_rss()
        replay_cpu = Cpu(server.pid)
        with watching_rebuild() as watch, replay_cpu.measuring():
            started = time.perf_counter()
            models = await build(log, path, stop=n, progress=watch.progress)
            elapsed = time.perf_counter() - started
        stack.push_async_callback(models.close)
        peak = status_mb("VmHWM")
        if watch.report is None:
            raise c.BenchError("build() did not use a worker process")
        worker = watch.report
        replay_curve: Curve = [(0.0, 0)]
        replay_curve += [(at - started, seq) for at, seq in watch.sent]
        replay_curve.append((elapsed, n))
        rate = n / elapsed
        c.note(f"  {rate:,.0f} ev/s, peak RSS {peak:,.0f} MB here, {worker.peak_mb:,.0f} MB worker")
        checkpoint = await models.run(models.checkpoint_sync)
        if checkpoint != n:
            raise c.BenchError(f"the replay stopped at {checkpoint:,}, not {n:,}")

    peak_note = "" if exact_peak else " (the process's: VmHWM could not be reset)"
    raw_s = n / raw

    def per_event(seconds: float) -> str:
        return f"{seconds:6.1f} s  {seconds * 1e6 / n:5.1f} µs/event"

    figures = [
        c.Figure("raw ordered consumer", "msg/s", raw),
        c.at_most("EventLog.follow_raw", "msg/s", follow, None, raw),
        c.at_least_ratio("replay: build()", "ev/s", rate, raw, RATIO_TARGET, "msg/s"),
        c.at_most("replay: peak RSS", "MB", peak, None),
        c.at_most("replay: worker peak RSS", "MB", worker.peak_mb, None),
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
            "raw_cpu_s": {"here": raw_cpu.here, "nats_server": raw_cpu.server},
            "replay_cpu_s": {
                "here": replay_cpu.here,
                "worker": worker.cpu_s,
                "nats_server": replay_cpu.server,
            },
        },
        "curves": {"raw": raw_curve, "replay": replay_curve},
        "details": [
            "",
            f"N = {n:,} events. Baseline: a bare nats-py ordered consumer (a callback that",
            f"counts) over the same N. replay / EventLog.follow_raw = {rate / follow:.2f}.",
            f"CPU, baseline ({raw_s:.1f}s wall, {2 * raw_s:.1f} core-seconds on two cores):",
            f"  receiving (nats-py)                  {per_event(raw_cpu.here)}",
            f"  nats-server                          {per_event(raw_cpu.server)}",
            f"CPU, replay ({elapsed:.1f}s wall, {2 * elapsed:.1f} core-seconds on two cores):",
            f"  receiving, handing on (this process) {per_event(replay_cpu.here)}",
            f"  decode, fold, DuckDB (the worker)    {per_event(worker.cpu_s)}",
            f"  nats-server                          {per_event(replay_cpu.server)}",
            f"memory: RSS {rss_before:,.0f} MB before, peak {peak:,.0f} MB{peak_note}; "
            f"the worker's peak {worker.peak_mb:,.0f} MB",
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
