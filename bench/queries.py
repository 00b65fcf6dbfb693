"""Benchmark: how fast the read models answer the dashboard's queries with a long history.

A fresh embedded server is filled with a workload (:mod:`bench.workload`), replayed into a
new DuckDB file with :func:`shipyard.projections.projector.build` (neither is measured), and
the database is grown to R finished runs (100,000; see :data:`GROW_SQL`). Then p50 / p99
over up to ``repeats`` calls each, one at a time, directly on the connection, of
:func:`queries.history <shipyard.projections.queries.history>` (first page of 50; a page
half-way down through ``before``; with a ``search`` filter) and
:func:`queries.kanban <shipyard.projections.queries.kanban>` as the gateway calls it: every
open task and those finished in the last day (before the newest event), each with its step
cards. Target: p99 ≤ 50 ms.

The baseline is DuckDB itself: ``SELECT count(*) FROM history`` on the same connection,
the cheapest query that still touches the table, timed the same way. A query is called
fewer times once it has taken ``query_budget`` seconds (at least five times).
``python -m bench queries`` runs it in the suite.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import duckdb

from bench import _common as c
from bench import workload
from shipyard.events.log import EventLog, connect
from shipyard.projections import queries
from shipyard.projections.projector import DB_FILE, ReadModels, build

P99_TARGET_MS = 50.0  # every query, at most
MIN_SAMPLES = 5  # calls of a query, at least, however slow it is
SEARCH = "billing"


@dataclass(frozen=True)
class Sizes:
    events: int  # written and replayed: enough finished runs to copy up to R
    runs: int  # R: finished runs in the database the queries run on
    repeats: int  # calls per query
    query_budget: float  # seconds one query is timed for, at most (after MIN_SAMPLES calls)
    days: float  # the span of event times in the written workload


QUICK = Sizes(events=20_000, runs=5_000, repeats=50, query_budget=1.0, days=3.0)
FULL = Sizes(events=250_000, runs=100_000, repeats=200, query_budget=8.0, days=30.0)


# Growing the replayed database to R finished runs: copy j = 1, 2, … of its finished runs is
# j workload spans *older* (the replayed runs, and the tasks still open, stay the newest, as
# on a live system); stream sequences are kept increasing with time by moving the replayed
# runs' sequences up by (copies × N) and giving copy j (copies − j) × N more than the
# original; ids get the (copies − j + 1)-th Crockford digit where the replayed ones have
# ``z`` (BASE_DIGIT), so ids still sort by time, as new_id() makes them. The partial copy, if
# any, is the oldest and holds the newest runs, so the history has no holes.
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
        raise c.BenchError("the replay produced no finished runs to query")
    extra = max(0, runs - base)
    copies = math.ceil(extra / base)
    if copies > len(COPY_DIGITS):
        raise c.BenchError(
            f"the replay has {base:,} finished runs, too few to grow to {runs:,}: "
            "use more --events or fewer --runs"
        )
    odd = scalar(
        con,
        f"SELECT count(*) FROM history WHERE run_id NOT LIKE 'r-{workload.BASE_DIGIT}%' "
        f"OR task_id NOT LIKE 't-{workload.BASE_DIGIT}%'",
    )
    if extra and odd:
        raise c.BenchError(f"{odd} runs have ids made elsewhere than newest_id()")
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
        (
            "SELECT count(*) FROM history",
            lambda: con.execute("SELECT count(*) FROM history").fetchall(),
        ),
        ("history, first page", lambda: queries.history(con, limit=50)),
        ("history, page half-way", lambda: queries.history(con, limit=50, before=deep)),
        (f"history, search {SEARCH!r}", lambda: queries.history(con, limit=50, search=SEARCH)),
        ("kanban, as served", lambda: queries.kanban(con, since=since)),
    ]
    results = []
    for name, call in calls:
        timed = time_query(name, call, repeats, budget)
        c.note(
            f"  {name}: p50 {c.percentile(timed.samples, 50):.2f} ms, "
            f"p99 {c.percentile(timed.samples, 99):.2f} ms ({len(timed.samples)} calls, "
            f"{timed.rows:,} rows)"
        )
        results.append(timed)
    return results


async def grown(url: str, path: Path, runs: int, days: float) -> tuple[ReadModels, dict[str, int]]:
    """The log at ``url`` replayed into a new DuckDB file at ``path`` and grown to ``runs``
    finished runs (neither measured); the models are left open."""
    nc = await connect([url], name="bench-replay")
    try:
        log = EventLog(nc)
        n = await log.stream_last_seq()
        c.note(f"replaying {n:,} events into a new DuckDB file (not measured)")
        models = await build(log, path, stop=n)
    finally:
        await nc.close()
    assert models.con is not None
    c.note(f"growing the database to {runs:,} finished runs")
    rows = await models.run(grow, models.con, runs, days * 86400.0 + 3600.0, n)
    c.note(f"  {rows['history']:,} runs, {rows['cards']:,} cards")
    return models, rows


async def measure(quick: bool, parent: str | None) -> dict[str, Any]:
    sizes = QUICK if quick else FULL
    async with workload.stored(parent, "queries", sizes.events, sizes.days) as (root, server):
        models, rows = await grown(server.url, root / DB_FILE, sizes.runs, sizes.days)
        try:
            assert models.con is not None
            timed = await models.run(query_latencies, models.con, sizes.repeats, sizes.query_budget)
        finally:
            await models.close()

    base = timed[0]
    figures = []
    for q in timed[1:]:
        figures.append(c.latency(f"{q.name} p50", 50, q.samples, base.samples, None))
        figures.append(c.latency(f"{q.name} p99", 99, q.samples, base.samples, P99_TARGET_MS))
    return {
        "sizes": vars(sizes),
        "figures": figures,
        "database": rows,
        "latency_ms": {q.name: {**c.spread(q.samples), "rows": q.rows} for q in timed},
        "details": [
            "",
            f"R = {rows['history']:,} finished runs, {rows['tasks']:,} tasks, "
            f"{rows['cards']:,} cards. Baseline: {base.name}, same percentile.",
            "calls (rows): " + ", ".join(f"{q.name} {len(q.samples)} ({q.rows:,})" for q in timed),
        ],
    }


def main(argv: Sequence[str] | None = None) -> int:
    return c.main(
        "queries",
        "History and Kanban query latency on read models holding 100,000 runs.",
        measure,
        argv,
    )


if __name__ == "__main__":
    sys.exit(main())
