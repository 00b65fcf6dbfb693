"""Folding a batch of events into read-model rows.

A batch loads the rows its events touch (one query per table), applies the events in order
in memory — so several events on one key collapse to one row, the last one winning — and
writes each table back with one upserting appender. Nothing here reads the clock: every time
comes from an event, so two replays of the same log give the same tables.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from functools import cache
from operator import itemgetter
from typing import Any, Literal

import duckdb

from shipyard.events import text
from shipyard.events import types as t
from shipyard.events.envelope import Event

Row = dict[str, Any]
Action = Literal["insert", "upsert"]  # how an appender writes: upsert replaces by key

KEYS: dict[str, tuple[str, ...]] = {
    "tasks": ("task_id",),
    "runs": ("run_id",),
    "phases": ("run_id", "phase"),
    "validations": ("run_id", "round"),
    "history": ("run_id",),
    "cards": ("card_id",),
    "handlers": ("handler_id",),
    "agents": ("name",),
    "rejections": ("rejection_id",),
    "messages": ("message_id",),
    "message_reads": ("message_id", "reader"),
    "threads": ("thread_id",),
    "groups": ("group_name",),
}
PHASES = list(t.Phase)
POSITION = {phase: phase.position for phase in PHASES}  # the property scans the enum
# Events kept out of the activity timeline: heartbeats, card shuffles, receipts, and the
# record of an alert sent (the alert is about an event the timeline already shows).
QUIET = frozenset(
    {
        "work_progress",
        "handler_heartbeat",
        "card_added",
        "card_moved",
        "message_read",
        "alert_delivered",
    }
)
TEXT_LIMIT = 2000  # characters of free text kept per activity line
# An activity line's columns, in the order the fold makes them: there are many more lines
# than rows of other tables, and none is read back, so they are tuples, not dicts.
ACTIVITY = ("seq", "at_time", "task_id", "run_id", "kind", "actor", "text")


@cache
def _values(columns: tuple[str, ...]) -> Callable[[Row], tuple[Any, ...]]:
    """A row's values in ``columns``' order (every table has several columns)."""
    assert len(columns) > 1
    return itemgetter(*columns)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_NAIVE_EPOCH = datetime(1970, 1, 1)


def utc(value: datetime) -> datetime:
    """Event times as naive UTC, which DuckDB stores as TIMESTAMP."""
    if value.tzinfo is None:
        return value
    # value.astimezone(UTC).replace(tzinfo=None), exactly, in a seventh of the time (this
    # runs for every event)
    return _NAIVE_EPOCH + (value - _EPOCH)


class Batch:
    """The rows one batch of events changes."""

    def __init__(self, con: duckdb.DuckDBPyConnection, columns: dict[str, tuple[str, ...]]):
        self.con = con
        self.columns = columns
        self.rows: dict[str, dict[tuple[Any, ...], Row]] = {table: {} for table in KEYS}
        self.activity: list[tuple[Any, ...]] = []  # lines in ACTIVITY's column order
        self.last_seq = 0
        self.last_time: datetime | None = None

    # --- loading --------------------------------------------------------------------

    def _load(self, table: str, where: str, values: list[Any]) -> None:
        """Load the rows whose ``where`` is one of ``values``. Rows already held are newer
        than the stored ones (a batch can outlive a transaction, see rebuild.py): they stay."""
        if not values:
            return
        cols = self.columns[table]
        result = self.con.execute(
            f"SELECT {', '.join(cols)} FROM {table} WHERE {where} IN (SELECT unnest(?))",
            [values],
        ).fetchall()
        key_cols = KEYS[table]
        held = self.rows[table]
        for values_row in result:
            row = dict(zip(cols, values_row, strict=True))
            held.setdefault(tuple(row[k] for k in key_cols), row)

    def preload(self, events: list[Event[Any]]) -> None:
        # One pass over the batch gathers every key to load.
        task_ids: set[str] = set()
        run_ids: set[str] = set()
        card_ids: set[str] = set()
        agents: set[str] = set()
        handlers: set[str] = set()
        threads: set[str] = set()
        groups: set[str] = set()
        read: set[str] = set()
        for e in events:
            data = e.data
            if e.aggregate == "task":
                task_ids.add(e.aggregate_id)
            run_ids.add(getattr(data, "run_id", ""))
            if isinstance(data, t.CardMoved):
                card_ids.add(data.card_id)
            elif isinstance(data, t.TaskClaimed):
                agents.add(data.agent)
            elif isinstance(data, t.HandlerHeartbeat):
                handlers.add(e.aggregate_id)
            elif isinstance(data, t.MessageSent):
                threads.add(e.aggregate_id)
            elif isinstance(data, t.TaskDispatched | t.GroupFinished):
                groups.add(data.group)
            elif isinstance(data, t.MessageRead):
                read.add(data.message_id)
        self._load("tasks", "task_id", sorted(task_ids))
        tasks = self.rows["tasks"]
        run_ids |= {tasks[(i,)]["run_id"] for i in task_ids if (i,) in tasks}
        run_list = sorted(r for r in run_ids if r)
        self._load("runs", "run_id", run_list)
        self._load("phases", "run_id", run_list)
        self._load("cards", "card_id", sorted(card_ids))
        runs = self.rows["runs"]
        agents |= {runs[(r,)]["agent"] for r in run_list if (r,) in runs}
        self._load("agents", "name", sorted(a for a in agents if a))
        self._load("handlers", "handler_id", sorted(handlers))
        self._load("threads", "thread_id", sorted(threads))
        self._load("groups", "group_name", sorted(g for g in groups if g))
        self._load("message_reads", "message_id", sorted(read))  # the first receipt stands

    def get(self, table: str, *key: Any) -> Row | None:
        return self.rows[table].get(key)

    def put(self, table: str, row: Row) -> Row:
        self.rows[table][tuple(row[k] for k in KEYS[table])] = row
        return row

    # --- writing --------------------------------------------------------------------

    def write(self, action: Action = "upsert") -> None:
        """Write every row held, and the activity lines (see :meth:`write_activity`).
        ``action``: the appenders' — "insert" when the tables cannot hold these keys yet."""
        for table, rows in self.rows.items():
            if not rows:
                continue
            appender = self.con.appender(table, action=action)
            appender.append_rows(list(map(_values(self.columns[table]), rows.values())))
            appender.flush()
        self.write_activity(action)

    def write_activity(self, action: Action = "upsert") -> None:
        """Write the activity lines made so far, and forget them: a line never changes."""
        if self.activity:
            appender = self.con.appender("activity", columns=list(ACTIVITY), action=action)
            appender.append_rows(self.activity)
            appender.flush()
            self.activity = []

    # --- applying -------------------------------------------------------------------

    def apply(self, event: Event[Any]) -> None:
        self.last_seq = max(self.last_seq, event.seq)
        self.last_time = event.time
        at = utc(event.time)
        data = event.data
        kind = type(data)
        try:
            handler = _HANDLERS[kind]
        except KeyError:  # the first event of its class: find the function that applies it
            handler = _HANDLERS[kind] = next((_APPLY[c] for c in kind.__mro__ if c in _APPLY), None)
        if handler is not None:
            handler(self, event, data, at)
        if event.type not in QUIET:
            self._activity(event, at)

    def _activity(self, event: Event[Any], at: datetime) -> None:
        data = event.data
        if isinstance(data, t.PhaseChanged) and data.status == t.PhaseStatus.STARTED:
            body = f"{data.phase.label}: {data.action}" if data.action else data.phase.label
        else:
            body = text.summary(event)
        self.activity.append(
            (
                event.seq,
                at,
                event.aggregate_id if event.aggregate == "task" else "",
                getattr(data, "run_id", ""),
                event.type,
                event.actor,
                body[:TEXT_LIMIT],
            )
        )


def _dispatched(b: Batch, e: Event[Any], d: t.TaskDispatched, at: datetime) -> None:
    b.put(
        "tasks",
        {
            "task_id": e.aggregate_id,
            "title": d.title,
            "dispatcher": d.dispatcher,
            "priority": d.priority.value,
            "priority_rank": d.priority.rank,
            "task_type": d.task_type,
            "agent": d.agent,
            "group_name": d.group,
            "after_ids": list(d.after),
            "working_dir": d.working_dir,
            "escalated_from": d.escalated_from,
            "escalated_to": "",
            "rework": d.rework,
            "state": t.TaskState.QUEUED.value,
            "attempt": 1,
            "run_id": "",
            "reason": "",
            "cancel_requested": False,
            "created_at": at,
            "created_seq": e.seq,
            "updated_at": at,
            "last_seq": e.seq,
        },
    )

    if d.group:
        group = b.get("groups", d.group) or b.put(
            "groups",
            {
                "group_name": d.group,
                "tasks": [],
                "succeeded": [],
                "failed": [],
                "state": "running",
                "started_at": at,
                "finished_at": None,
            },
        )
        group["tasks"] = [*group["tasks"], e.aggregate_id]


def _group_finished(b: Batch, e: Event[Any], d: t.GroupFinished, at: datetime) -> None:
    group = b.get("groups", d.group)
    if group is not None:
        group.update(
            tasks=list(d.tasks),
            succeeded=list(d.succeeded),
            failed=[*d.failed, *d.cancelled],
            state="passed" if d.passed else "failed",
            finished_at=at,
        )


def _escalated(b: Batch, e: Event[Any], d: t.TaskEscalated, at: datetime) -> None:
    task = _task(b, e, at)
    if task is not None:
        task["escalated_to"] = d.task_id


def _task(b: Batch, e: Event[Any], at: datetime) -> Row | None:
    row = b.get("tasks", e.aggregate_id)
    if row is not None:
        row["updated_at"] = at
        row["last_seq"] = e.seq
    return row


def _claimed(b: Batch, e: Event[Any], d: t.TaskClaimed, at: datetime) -> None:
    task = _task(b, e, at)
    if task is None:
        return
    task.update(state=t.TaskState.RUNNING.value, run_id=d.run_id, attempt=d.attempt, reason="")
    b.put(
        "runs",
        {
            "run_id": d.run_id,
            "task_id": e.aggregate_id,
            "title": task["title"],
            "group_name": task["group_name"],
            "attempt": d.attempt,
            "handler": d.handler,
            "agent": d.agent,
            "state": "running",
            "stale": False,
            "phase": "",
            "percent": 0,
            "action": "claimed",
            "turns": 0,
            "tool_calls": 0,
            "tokens_in": 0,
            "tokens_out": 0,
            "cost_usd": 0.0,
            "last_tool": "",
            "blockers": [],
            "heal_rounds": 0,
            "reason": "",
            "error": "",
            "failed_phase": "",
            "summary": "",
            "report_path": "",
            "plan_steps": [],
            "plan_source": "",
            "files_changed": [],
            "started_at": at,
            "last_heartbeat": at,
            "ended_at": None,
        },
    )
    agent = b.get("agents", d.agent) or b.put(
        "agents",
        {
            "name": d.agent,
            "current_runs": [],
            "runs_total": 0,
            "succeeded": 0,
            "failed": 0,
            "last_seen": at,
        },
    )
    agent["current_runs"] = sorted({*agent["current_runs"], d.run_id})
    agent["runs_total"] += 1
    agent["last_seen"] = at


def _run(b: Batch, e: Event[Any], run_id: str, at: datetime) -> Row | None:
    """The run an event is about, if it is still open (late events of a closed run are kept
    out of its row, as the handler's own fold does)."""
    _task(b, e, at)
    run = b.get("runs", run_id)
    if run is None or run["state"] != "running":
        return None
    run["last_heartbeat"] = at
    run["stale"] = False
    return run


def _phase(b: Batch, e: Event[Any], d: t.PhaseChanged, at: datetime) -> None:
    run = _run(b, e, d.run_id, at)
    if run is None:
        return
    row = b.get("phases", d.run_id, d.phase.value) or b.put(
        "phases",
        {
            "run_id": d.run_id,
            "phase": d.phase.value,
            "position": POSITION[d.phase],
            "status": d.status.value,
            "started_at": None,
            "ended_at": None,
            "action": "",
            "result": "",
        },
    )
    row["status"] = d.status.value
    if d.status == t.PhaseStatus.STARTED:
        row["started_at"], row["ended_at"] = at, None
        row["action"] = d.action[:TEXT_LIMIT]
        run["phase"], run["action"] = d.phase.value, d.action[:TEXT_LIMIT]
    else:
        row["started_at"] = row["started_at"] or at
        row["ended_at"] = at
        row["result"] = d.result[:TEXT_LIMIT]
    if d.phase == t.Phase.HEAL and d.status == t.PhaseStatus.STARTED:
        run["heal_rounds"] += 1


def _progress(b: Batch, e: Event[Any], d: t.WorkProgress, at: datetime) -> None:
    run = _run(b, e, d.run_id, at)
    if run is None:
        return
    run.update(
        phase=d.phase.value,
        percent=d.percent,
        action=d.action[:TEXT_LIMIT],
        turns=d.turns,
        tool_calls=d.tool_calls,
        tokens_in=d.tokens_in,
        tokens_out=d.tokens_out,
        cost_usd=d.cost_usd,
        last_tool=d.last_tool,
        blockers=list(d.blockers),
    )


def _touch(b: Batch, e: Event[Any], d: Any, at: datetime) -> None:
    _run(b, e, d.run_id, at)


def _plan(b: Batch, e: Event[Any], d: t.PlanRecorded, at: datetime) -> None:
    run = _run(b, e, d.run_id, at)
    if run is not None:
        run["plan_steps"], run["plan_source"] = list(d.steps), d.source


def _card_added(b: Batch, e: Event[Any], d: t.CardAdded, at: datetime) -> None:
    _run(b, e, d.run_id, at)
    task = b.get("tasks", e.aggregate_id)
    b.put(
        "cards",
        {
            "card_id": d.card_id,
            "task_id": e.aggregate_id,
            "run_id": d.run_id,
            "kind": "step",
            "title": d.title,
            "column_name": d.column,
            "position": d.position,
            "priority_rank": task["priority_rank"] if task else 2,
            "updated_at": at,
        },
    )


def _card_moved(b: Batch, e: Event[Any], d: t.CardMoved, at: datetime) -> None:
    _run(b, e, d.run_id, at)
    card = b.get("cards", d.card_id)
    if card is not None:
        card["column_name"], card["updated_at"] = d.column, at


def _validation(b: Batch, e: Event[Any], d: t.ValidationChecked, at: datetime) -> None:
    _run(b, e, d.run_id, at)
    b.put(
        "validations",
        {
            "run_id": d.run_id,
            "round": d.round,
            "passed": d.passed,
            "missing": list(d.missing),
            "command": d.command,
            "exit_code": d.exit_code,
            "output": d.output,
            "at_time": at,
        },
    )


def _report(b: Batch, e: Event[Any], d: t.ReportWritten, at: datetime) -> None:
    run = _run(b, e, d.run_id, at)
    if run is not None:
        run.update(
            report_path=d.path,
            summary=d.summary,
            files_changed=list(d.files_changed),
            heal_rounds=d.heal_rounds,
        )


def _stale(b: Batch, e: Event[Any], d: t.RunStale, at: datetime) -> None:
    _task(b, e, at)
    run = b.get("runs", d.run_id)
    if run is not None and run["state"] == "running":
        run["stale"] = True


def _run_finished(b: Batch, e: Event[Any], d: t.RunFinished, at: datetime) -> None:
    _task(b, e, at)
    run = b.get("runs", d.run_id)
    if run is None or run["state"] != "running":
        return
    run.update(
        state=d.outcome.value,
        reason=d.reason,
        error=d.error[-TEXT_LIMIT:],
        failed_phase=d.phase.value if d.phase else "",
        summary=d.summary or run["summary"],
        ended_at=at,
        stale=False,
    )
    if d.outcome == t.TaskState.SUCCEEDED:
        run["percent"] = 100
    agent = b.get("agents", run["agent"])
    if agent is not None:
        agent["current_runs"] = [r for r in agent["current_runs"] if r != d.run_id]
        key = "succeeded" if d.outcome == t.TaskState.SUCCEEDED else "failed"
        agent[key] += 1
        agent["last_seen"] = at
    results = []
    for phase in PHASES:
        row = b.get("phases", d.run_id, phase.value)
        results.append(row["status"] if row else "")
    b.put(
        "history",
        {
            "run_id": d.run_id,
            "task_id": run["task_id"],
            "title": run["title"],
            "agent": run["agent"],
            "group_name": run["group_name"],
            "attempt": run["attempt"],
            "outcome": d.outcome.value,
            "reason": d.reason,
            "phase_results": results,
            "started_at": run["started_at"],
            "ended_at": at,
            "duration_s": round((at - run["started_at"]).total_seconds(), 3),
            "turns": run["turns"],
            "cost_usd": run["cost_usd"],
            "heal_rounds": run["heal_rounds"],
            "finished_seq": e.seq,
        },
    )


def _task_finished(b: Batch, e: Event[Any], d: t.TaskFinished, at: datetime) -> None:
    task = _task(b, e, at)
    if task is not None:
        task.update(state=d.outcome.value, reason=d.reason, cancel_requested=False)


def _requeued(b: Batch, e: Event[Any], d: t.TaskRequeued, at: datetime) -> None:
    task = _task(b, e, at)
    if task is not None:
        task.update(
            state=t.TaskState.QUEUED.value,
            attempt=d.attempt,
            reason=d.reason,
            cancel_requested=False,
        )


def _cancel(b: Batch, e: Event[Any], d: t.TaskCancelRequested, at: datetime) -> None:
    task = _task(b, e, at)
    if task is not None:
        task["cancel_requested"] = True


def _heartbeat(b: Batch, e: Event[Any], d: t.HandlerHeartbeat, at: datetime) -> None:
    b.put(
        "handlers",
        {
            "handler_id": e.aggregate_id,
            "host": d.host,
            "pid": d.pid,
            "capacity": d.capacity,
            "runs": list(d.runs),
            "last_seen": at,
        },
    )


def _rejected(b: Batch, e: Event[Any], d: t.DispatchRejected, at: datetime) -> None:
    b.put(
        "rejections",
        {
            "rejection_id": e.aggregate_id,
            "command": d.command,
            "dispatcher": d.dispatcher,
            "problems": list(d.problems),
            "at_time": at,
        },
    )


def _message(b: Batch, e: Event[Any], d: t.MessageSent, at: datetime) -> None:
    b.put(
        "messages",
        {
            "message_id": d.message_id,
            "thread_id": e.aggregate_id,
            "reply_to": d.reply_to,
            "sender": d.sender,
            "recipient": d.recipient,
            "type": d.type.value,
            "body": d.body,
            "priority": d.priority.value,
            "task_id": d.task_id,
            "sent_at": at,
            "seq": e.seq,
        },
    )
    thread = b.get("threads", e.aggregate_id) or b.put(
        "threads",
        {
            "thread_id": e.aggregate_id,
            "started_by": d.sender,
            "first_body": d.body[:TEXT_LIMIT],
            "task_id": d.task_id,
            "participants": [],
            "messages": 0,
            "started_at": at,
            "last_at": at,
        },
    )
    thread["participants"] = sorted({*thread["participants"], d.sender, d.recipient})
    thread["messages"] += 1
    thread["last_at"] = at


def _message_read(b: Batch, e: Event[Any], d: t.MessageRead, at: datetime) -> None:
    if b.get("message_reads", d.message_id, d.reader) is None:
        b.put("message_reads", {"message_id": d.message_id, "reader": d.reader, "read_at": at})


_APPLY: dict[type, Any] = {
    t.TaskDispatched: _dispatched,
    t.TaskClaimed: _claimed,
    t.PhaseChanged: _phase,
    t.WorkProgress: _progress,
    t.BuilderStarted: _touch,
    t.PlanRecorded: _plan,
    t.CardAdded: _card_added,
    t.CardMoved: _card_moved,
    t.ValidationChecked: _validation,
    t.ReportWritten: _report,
    t.RunStale: _stale,
    t.RunFinished: _run_finished,
    t.TaskFinished: _task_finished,
    t.TaskRequeued: _requeued,
    t.TaskCancelRequested: _cancel,
    t.HandlerHeartbeat: _heartbeat,
    t.DispatchRejected: _rejected,
    t.MessageSent: _message,
    t.MessageRead: _message_read,
    t.TaskEscalated: _escalated,
    t.GroupFinished: _group_finished,
}
_HANDLERS: dict[type, Any] = {}  # each event class met so far: its entry in _APPLY, or None
