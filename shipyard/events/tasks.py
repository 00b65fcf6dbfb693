"""The state of tasks, folded from their events.

Commands, handlers and the watchdog all decide from this fold, and guard what they append
with the task's ``last_seq``, so two deciders acting on the same state cannot both win.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from shipyard.events import types as t
from shipyard.events.envelope import Event

_RUN_EVENTS = (
    t.BuilderStarted,
    t.PhaseChanged,
    t.WorkProgress,
    t.PlanRecorded,
    t.CardAdded,
    t.CardMoved,
    t.ValidationChecked,
    t.ReportWritten,
)


@dataclass
class Task:
    id: str
    spec: t.TaskDispatched
    created: datetime
    created_seq: int
    last_seq: int
    state: t.TaskState = t.TaskState.QUEUED
    attempt: int = 1
    run_id: str = ""
    handler: str = ""
    agent: str = ""
    run_started: datetime | None = None
    last_activity: datetime | None = None  # time of the current run's latest event
    stale: bool = False
    run_open: bool = False  # a run is claimed and has not finished
    phase: t.Phase | None = None
    percent: int = 0
    cancel_requested: bool = False
    not_before: datetime | None = None
    reason: str = ""
    pgids: dict[str, int] = field(default_factory=dict)  # host -> builder process group
    summary: str = ""  # the last run's summary, handed to the tasks that wait for this one
    files_changed: list[str] = field(default_factory=list)
    report: str = ""  # path of the last run's HTML report
    escalated_to: str = ""  # the task this one was escalated to

    @property
    def priority_key(self) -> tuple[int, int]:
        """Most urgent first, then oldest first."""
        return (self.spec.priority.rank, self.created_seq)


class TaskBook:
    """Every task and handler the log has mentioned, kept current by :meth:`apply`."""

    def __init__(self) -> None:
        self.tasks: dict[str, Task] = {}
        self.handlers: dict[str, datetime] = {}
        self.queued: dict[str, Task] = {}  # tasks in state QUEUED, the only claimable ones
        self.groups: dict[str, list[str]] = {}  # group name -> its task ids, in dispatch order
        self.finished_groups: set[str] = set()  # groups whose outcome is recorded
        self.last_seq = 0

    def apply(self, event: Event[Any]) -> Task | None:
        """Fold one event in; return the task it touched, if any."""
        task = self._apply(event)
        if task is not None:
            if task.state == t.TaskState.QUEUED:
                self.queued[task.id] = task
            else:
                self.queued.pop(task.id, None)
        return task

    def _apply(self, event: Event[Any]) -> Task | None:
        self.last_seq = max(self.last_seq, event.seq)
        data = event.data
        if isinstance(data, t.HandlerHeartbeat):
            self.handlers[event.aggregate_id] = event.time
            return None
        if isinstance(data, t.GroupFinished):
            self.finished_groups.add(data.group)
            return None
        if event.aggregate != "task":
            return None
        if isinstance(data, t.TaskDispatched):
            if data.group:
                self.groups.setdefault(data.group, []).append(event.aggregate_id)
            task = Task(
                id=event.aggregate_id,
                spec=data,
                created=event.time,
                created_seq=event.seq,
                last_seq=event.seq,
            )
            self.tasks[task.id] = task
            return task
        found = self.tasks.get(event.aggregate_id)
        if found is None:
            return None
        task = found
        task.last_seq = event.seq
        if isinstance(data, t.TaskClaimed):
            task.state = t.TaskState.RUNNING
            task.run_id = data.run_id
            task.handler = data.handler
            task.agent = data.agent
            task.attempt = data.attempt
            task.run_started = task.last_activity = event.time
            task.run_open = True
            task.stale = False
            task.phase = None
            task.percent = 0
            task.pgids = {}
        elif isinstance(data, _RUN_EVENTS):
            if data.run_id == task.run_id and task.run_open:
                task.last_activity = event.time
                task.stale = False
                if isinstance(data, t.WorkProgress):
                    task.phase = data.phase
                    task.percent = data.percent
                elif isinstance(data, t.PhaseChanged):
                    task.phase = data.phase
                elif isinstance(data, t.BuilderStarted):
                    task.pgids[data.host] = data.pgid
                elif isinstance(data, t.ReportWritten):
                    task.files_changed = data.files_changed
                    task.report = data.path
        elif isinstance(data, t.RunStale):
            if data.run_id == task.run_id and task.run_open:
                task.stale = True
        elif isinstance(data, t.RunFinished):
            if data.run_id == task.run_id:
                task.run_open = False
                task.reason = data.reason
                task.summary = data.summary
        elif isinstance(data, t.TaskEscalated):
            task.escalated_to = data.task_id
        elif isinstance(data, t.TaskFinished):
            task.state = data.outcome
            task.reason = data.reason
            task.run_open = False
        elif isinstance(data, t.TaskRequeued):
            task.state = t.TaskState.QUEUED
            task.attempt = data.attempt
            task.not_before = data.not_before
            task.run_id = ""
            task.run_open = False
            task.stale = False
            task.cancel_requested = False
            task.reason = data.reason
        elif isinstance(data, t.TaskCancelRequested):
            task.cancel_requested = True
        return task

    # --- questions ----------------------------------------------------------------------

    def waiting_for(self, task: Task) -> list[str]:
        """Prerequisites that have not succeeded yet."""
        return [
            tid
            for tid in task.spec.after
            if (dep := self.tasks.get(tid)) is None or dep.state != t.TaskState.SUCCEEDED
        ]

    def failed_prerequisite(self, task: Task) -> Task | None:
        """A prerequisite that ended without success (and was not retried), if any."""
        for tid in task.spec.after:
            dep = self.tasks.get(tid)
            if dep is not None and dep.state in (t.TaskState.FAILED, t.TaskState.CANCELLED):
                return dep
        return None

    def effective_state(self, task: Task) -> t.TaskState:
        if task.state == t.TaskState.QUEUED and self.waiting_for(task):
            return t.TaskState.BLOCKED
        return task.state

    def claimable(self, now: datetime) -> list[Task]:
        """Queued tasks whose prerequisites all succeeded, most urgent and oldest first."""
        ready = [
            task
            for task in self.queued.values()
            if task.state == t.TaskState.QUEUED
            and not task.cancel_requested
            and (task.not_before is None or task.not_before <= now)
            and not self.waiting_for(task)
        ]
        return sorted(ready, key=lambda task: task.priority_key)

    def group_outcome(self, group: str) -> t.GroupFinished | None:
        """The group's merged outcome if every task in it has finished — and, when a
        dispatch gave its ``group_size``, once that many have been dispatched — else None."""
        members = [self.tasks[tid] for tid in self.groups.get(group, ())]
        if not members or not all(task.state.finished for task in members):
            return None
        if len(members) < max(task.spec.group_size for task in members):
            return None  # more are coming: a fast first task must not close the group

        def ids(state: t.TaskState) -> list[str]:
            return [task.id for task in members if task.state == state]

        return t.GroupFinished(
            group=group,
            tasks=[task.id for task in members],
            succeeded=ids(t.TaskState.SUCCEEDED),
            failed=ids(t.TaskState.FAILED),
            cancelled=ids(t.TaskState.CANCELLED),
        )

    def escalation_chain(self, task: Task) -> list[Task]:
        """``task`` and the tasks it was escalated from, newest first."""
        chain, seen = [task], {task.id}
        while (source := self.tasks.get(chain[-1].spec.escalated_from)) and source.id not in seen:
            chain.append(source)
            seen.add(source.id)
        return chain

    def running(self) -> list[Task]:
        return [task for task in self.tasks.values() if task.run_open]
