"""Read-model queries with typed results: everything the CLI and the gateway show.

The gateway runs no SQL of its own; it calls these. Each takes a connection and runs on the
database thread (:meth:`ReadModels.run`).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, TypeVar

import duckdb
import msgspec

from shipyard.projections import sql

S = TypeVar("S", bound=msgspec.Struct)


class HistoryRow(msgspec.Struct, frozen=True):
    run_id: str
    task_id: str
    title: str
    agent: str
    group: str
    attempt: int
    outcome: str
    reason: str
    phase_results: list[str]
    started_at: datetime
    ended_at: datetime
    duration_s: float
    turns: int
    cost_usd: float
    heal_rounds: int


class HistoryPage(msgspec.Struct, frozen=True):
    rows: list[HistoryRow]
    total: int
    next_before: str  # run id to pass as ``before`` for the next page; "" at the end


class LiveRun(msgspec.Struct, frozen=True):
    run_id: str
    task_id: str
    title: str
    group: str
    attempt: int
    handler: str
    agent: str
    state: str
    stale: bool
    phase: str
    percent: int
    action: str
    turns: int
    tool_calls: int
    tokens_in: int
    tokens_out: int
    cost_usd: float
    last_tool: str
    blockers: list[str]
    started_at: datetime
    last_heartbeat: datetime


class PhaseRow(msgspec.Struct, frozen=True):
    phase: str
    position: int
    status: str
    started_at: datetime | None
    ended_at: datetime | None
    action: str
    result: str


class ValidationRow(msgspec.Struct, frozen=True):
    round: int
    passed: bool
    missing: list[str]
    command: str
    exit_code: int | None
    output: str
    at: datetime


class RunDetail(msgspec.Struct, frozen=True):
    run_id: str
    task_id: str
    title: str
    group: str
    attempt: int
    handler: str
    agent: str
    state: str
    stale: bool
    phase: str
    percent: int
    action: str
    turns: int
    tool_calls: int
    tokens_in: int
    tokens_out: int
    cost_usd: float
    last_tool: str
    blockers: list[str]
    heal_rounds: int
    reason: str
    error: str
    failed_phase: str
    summary: str
    report_path: str
    plan_steps: list[str]
    plan_source: str
    files_changed: list[str]
    started_at: datetime
    last_heartbeat: datetime
    ended_at: datetime | None
    phases: list[PhaseRow] = []
    validations: list[ValidationRow] = []


class TaskRow(msgspec.Struct, frozen=True):
    task_id: str
    title: str
    dispatcher: str
    priority: str
    task_type: str
    agent: str
    group: str
    after: list[str]
    working_dir: str
    escalated_from: str
    escalated_to: str
    rework: bool
    state: str
    attempt: int
    run_id: str
    reason: str
    cancel_requested: bool
    created_at: datetime
    updated_at: datetime


class TaskDetail(msgspec.Struct, frozen=True):
    task: TaskRow
    runs: list[RunDetail]


class ActivityRow(msgspec.Struct, frozen=True):
    seq: int
    at: datetime
    task_id: str
    run_id: str
    kind: str
    actor: str
    text: str


class Card(msgspec.Struct, frozen=True):
    card_id: str
    task_id: str
    run_id: str
    kind: str
    title: str
    column: str
    position: int
    priority_rank: int
    priority: str
    group: str
    agent: str
    updated_at: datetime
    parent: str


class GroupCard(msgspec.Struct, frozen=True):
    """Tasks run in parallel under one ``group``: progress while running, then the outcome."""

    group: str
    state: str  # running, passed, failed
    total: int
    succeeded: int
    failed: int
    running: int
    failed_tasks: list[str]
    tasks: list[str]
    started_at: datetime
    finished_at: datetime | None


class AgentRow(msgspec.Struct, frozen=True):
    name: str
    current_runs: list[str]
    runs_total: int
    succeeded: int
    failed: int
    last_seen: datetime


class HandlerRow(msgspec.Struct, frozen=True):
    handler_id: str
    host: str
    pid: int
    capacity: int
    runs: list[str]
    last_seen: datetime


class Summary(msgspec.Struct, frozen=True):
    queue_depth: dict[str, int]
    tasks_by_state: dict[str, int]
    runs_by_state: dict[str, int]
    stale_runs: int
    live: list[LiveRun]


class Message(msgspec.Struct, frozen=True):
    message_id: str
    thread_id: str
    reply_to: str
    sender: str
    recipient: str
    type: str
    body: str
    priority: str
    task_id: str
    sent_at: datetime
    read: bool = False


class ThreadMessage(msgspec.Struct, frozen=True):
    message_id: str
    thread_id: str
    reply_to: str
    sender: str
    recipient: str
    type: str
    body: str
    priority: str
    task_id: str
    sent_at: datetime
    read_by: list[str]


class ThreadRow(msgspec.Struct, frozen=True):
    thread_id: str
    started_by: str
    first_body: str
    task_id: str
    participants: list[str]
    messages: int
    started_at: datetime
    last_at: datetime


KANBAN_COLUMNS = ("queued", "blocked", "in_progress", "validating", "done", "failed")


def _aware(value: Any) -> Any:
    if isinstance(value, datetime) and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def _rows(
    con: duckdb.DuckDBPyConnection, name: str, params: dict[str, Any], cls: type[S]
) -> list[S]:
    result = con.execute(sql.query(name), params).fetchall()
    return [cls(*(_aware(v) for v in row)) for row in result]


def history(
    con: duckdb.DuckDBPyConnection,
    *,
    limit: int = 50,
    before: str = "",
    outcome: str = "",
    agent: str = "",
    search: str = "",
) -> HistoryPage:
    """Finished runs, newest first, ``limit`` a page; ``before`` is the last run id seen."""
    limit = max(1, min(limit, 500))
    cursor = 0
    if before:
        found = con.execute(sql.query("history_cursor"), {"run_id": before}).fetchone()
        cursor = int(found[0]) if found else 0
    filters = {"outcome": outcome, "agent": agent, "search": search}
    rows = _rows(con, "history", {**filters, "before": cursor, "limit": limit + 1}, HistoryRow)
    total_row = con.execute(sql.query("history_count"), filters).fetchone()
    more = len(rows) > limit
    rows = rows[:limit]
    return HistoryPage(
        rows=rows,
        total=int(total_row[0]) if total_row else 0,
        next_before=rows[-1].run_id if more and rows else "",
    )


def live_runs(con: duckdb.DuckDBPyConnection) -> list[LiveRun]:
    return _rows(con, "live_runs", {}, LiveRun)


def run(con: duckdb.DuckDBPyConnection, run_id: str) -> RunDetail | None:
    found = _rows(con, "run", {"run_id": run_id}, RunDetail)
    if not found:
        return None
    phases = _rows(con, "run_phases", {"run_id": run_id}, PhaseRow)
    validations = _rows(con, "run_validations", {"run_id": run_id}, ValidationRow)
    return msgspec.structs.replace(found[0], phases=phases, validations=validations)


def task(con: duckdb.DuckDBPyConnection, task_id: str) -> TaskDetail | None:
    found = _rows(con, "task", {"task_id": task_id}, TaskRow)
    if not found:
        return None
    run_ids = [r[0] for r in con.execute(sql.query("task_runs"), {"task_id": task_id}).fetchall()]
    runs = [r for r in (run(con, rid) for rid in run_ids) if r is not None]
    return TaskDetail(task=found[0], runs=runs)


def tasks(con: duckdb.DuckDBPyConnection, *, state: str = "", limit: int = 200) -> list[TaskRow]:
    rows = _rows(con, "tasks", {"state": state, "limit": max(1, min(limit, 1000))}, TaskRow)
    return [r for r in rows if not state or r.state == state]


def activity(
    con: duckdb.DuckDBPyConnection, *, limit: int = 100, before: int = 0, task_id: str = ""
) -> list[ActivityRow]:
    params = {"limit": max(1, min(limit, 1000)), "before": before, "task_id": task_id}
    return _rows(con, "activity", params, ActivityRow)


def kanban(con: duckdb.DuckDBPyConnection, *, since: datetime | None = None) -> list[Card]:
    """Every open task's card (and finished ones since ``since``), each with its plan steps."""
    floor = since or datetime(1970, 1, 1)
    if floor.tzinfo is not None:
        floor = floor.astimezone(UTC).replace(tzinfo=None)
    return _rows(con, "kanban", {"since": floor}, Card)


def groups(
    con: duckdb.DuckDBPyConnection, *, since: datetime | None = None, limit: int = 50
) -> list[GroupCard]:
    """Running groups and those finished since ``since``, running first, newest first."""
    floor = since or datetime(1970, 1, 1)
    if floor.tzinfo is not None:
        floor = floor.astimezone(UTC).replace(tzinfo=None)
    return _rows(con, "groups", {"since": floor, "limit": max(1, min(limit, 500))}, GroupCard)


def agents(con: duckdb.DuckDBPyConnection) -> list[AgentRow]:
    return _rows(con, "agents", {}, AgentRow)


def handlers(con: duckdb.DuckDBPyConnection) -> list[HandlerRow]:
    return _rows(con, "handlers", {}, HandlerRow)


def summary(con: duckdb.DuckDBPyConnection) -> Summary:
    depth = {p: 0 for p in ("urgent", "high", "normal", "low")}
    depth.update({k: int(v) for k, v in con.execute(sql.query("queue_depth")).fetchall()})
    by_state = {k: int(v) for k, v in con.execute(sql.query("tasks_by_state")).fetchall()}
    runs_by_state: dict[str, int] = {}
    stale = 0
    for state, count, stale_count in con.execute(sql.query("runs_by_state")).fetchall():
        runs_by_state[state] = int(count)
        stale += int(stale_count)
    return Summary(
        queue_depth=depth,
        tasks_by_state=by_state,
        runs_by_state=runs_by_state,
        stale_runs=stale,
        live=live_runs(con),
    )


def inbox(
    con: duckdb.DuckDBPyConnection, agent: str, *, unread: bool = False, limit: int = 200
) -> list[Message]:
    """Messages to ``agent`` (or to everyone, from others), oldest first."""
    params = {"agent": agent, "unread": unread, "limit": max(1, min(limit, 1000))}
    return _rows(con, "inbox", params, Message)


def unread_counts(con: duckdb.DuckDBPyConnection) -> dict[str, int]:
    return {a: int(n) for a, n in con.execute(sql.query("unread_counts")).fetchall()}


def thread(con: duckdb.DuckDBPyConnection, thread_id: str) -> list[ThreadMessage]:
    return _rows(con, "thread", {"thread_id": thread_id}, ThreadMessage)


def threads(
    con: duckdb.DuckDBPyConnection, *, agent: str = "", limit: int = 100
) -> list[ThreadRow]:
    return _rows(con, "threads", {"agent": agent, "limit": max(1, min(limit, 1000))}, ThreadRow)
