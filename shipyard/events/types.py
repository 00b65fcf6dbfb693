"""Every event type Shipyard records, and the enums they share.

Each event type is a frozen msgspec Struct with three class attributes: ``TYPE`` (its name
on the wire and the last token of its subject), ``AGGREGATE`` (the kind of thing it is
about) and ``VERSION`` (its schema version). :data:`REGISTRY` lists all of them; when a
type's schema changes, bump ``VERSION`` and register an upcaster in
:mod:`shipyard.events.envelope` for the old shape.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from datetime import datetime
from typing import Any, ClassVar, TypeVar

import msgspec


class Priority(enum.StrEnum):
    """How soon a task should run; ``rank`` orders them, most urgent first."""

    URGENT = "urgent"
    HIGH = "high"
    NORMAL = "normal"
    LOW = "low"

    @property
    def rank(self) -> int:
        return _PRIORITY_RANK[self]


_PRIORITY_RANK = {Priority.URGENT: 0, Priority.HIGH: 1, Priority.NORMAL: 2, Priority.LOW: 3}


class Phase(enum.StrEnum):
    """The eight phases of a run, in order. The handler posts every transition."""

    CONTEXT = "context"
    PLAN = "plan"
    TASK_BOARD = "task_board"
    BUILD = "build"
    VALIDATE = "validate"
    HEAL = "heal"
    REPORT = "report"
    CLOSE = "close"

    @property
    def position(self) -> int:
        return list(Phase).index(self)

    @property
    def label(self) -> str:
        return self.value.replace("_", " ").upper()


class PhaseStatus(enum.StrEnum):
    STARTED = "started"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    SKIPPED = "skipped"


class TaskState(enum.StrEnum):
    """Where a task stands in its life."""

    QUEUED = "queued"
    BLOCKED = "blocked"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (TaskState.SUCCEEDED, TaskState.FAILED, TaskState.CANCELLED)


class MessageType(enum.StrEnum):
    COMMENT = "comment"
    QUESTION = "question"
    STATUS_REQUEST = "status_request"
    STATUS_RESPONSE = "status_response"
    DIRECTIVE = "directive"


class EventData(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=False):
    """Base of every event payload."""

    TYPE: ClassVar[str]
    AGGREGATE: ClassVar[str]
    VERSION: ClassVar[int] = 1


E = TypeVar("E", bound=type[EventData])


class Registry:
    """Maps an event type name to the class that decodes its current version."""

    def __init__(self) -> None:
        self._types: dict[str, type[EventData]] = {}
        self._upcasters: dict[tuple[str, int], Callable[[dict[str, Any]], dict[str, Any]]] = {}

    def register(self, cls: E) -> E:
        assert cls.TYPE.isidentifier(), f"event type {cls.TYPE!r} must be an identifier"
        self._types[cls.TYPE] = cls
        return cls

    def upcaster(
        self, type_name: str, from_version: int
    ) -> Callable[
        [Callable[[dict[str, Any]], dict[str, Any]]], Callable[[dict[str, Any]], dict[str, Any]]
    ]:
        """Register a function that turns ``type_name`` data of ``from_version`` into
        ``from_version + 1``. Chains run until the current version is reached."""

        def decorate(
            fn: Callable[[dict[str, Any]], dict[str, Any]],
        ) -> Callable[[dict[str, Any]], dict[str, Any]]:
            self._upcasters[(type_name, from_version)] = fn
            return fn

        return decorate

    def get(self, type_name: str) -> type[EventData] | None:
        return self._types.get(type_name)

    def upcast(self, type_name: str, version: int, data: dict[str, Any]) -> dict[str, Any]:
        cls = self._types[type_name]
        while version < cls.VERSION:
            step = self._upcasters.get((type_name, version))
            if step is None:
                raise KeyError(f"no upcaster for {type_name} v{version} -> v{version + 1}")
            data = step(data)
            version += 1
        return data

    def names(self) -> list[str]:
        return sorted(self._types)

    def copy(self) -> Registry:
        other = Registry()
        other._types = dict(self._types)
        other._upcasters = dict(self._upcasters)
        return other


REGISTRY = Registry()
register = REGISTRY.register


# --- task: dispatch and queue ------------------------------------------------------------


@register
class TaskDispatched(EventData, frozen=True, kw_only=True):
    """A dispatch was accepted: the task is on the queue (or blocked on ``after``)."""

    TYPE: ClassVar[str] = "task_dispatched"
    AGGREGATE: ClassVar[str] = "task"

    title: str
    prompt: str
    dispatcher: str
    priority: Priority = Priority.NORMAL
    task_type: str = "build"
    max_turns: int = 100
    working_dir: str = ""
    deliverables: list[str] = []
    deliverable_files: list[str] = []
    validation_command: str = ""
    rework: bool = False
    after: list[str] = []
    group: str = ""
    group_size: int = 0  # how many tasks the group will have; 0: those dispatched so far
    agent: str = ""
    idempotency_key: str = ""
    escalated_from: str = ""


@register
class DispatchRejected(EventData, frozen=True, kw_only=True):
    """A dispatch (or another command) was refused; nothing else was recorded."""

    TYPE: ClassVar[str] = "dispatch_rejected"
    AGGREGATE: ClassVar[str] = "rejection"

    command: str
    problems: list[str]
    dispatcher: str = ""
    excerpt: str = ""


@register
class TaskClaimed(EventData, frozen=True, kw_only=True):
    """A handler won the race for a task and will run it as ``run_id``."""

    TYPE: ClassVar[str] = "task_claimed"
    AGGREGATE: ClassVar[str] = "task"

    run_id: str
    handler: str
    agent: str
    attempt: int = 1


@register
class TaskCancelRequested(EventData, frozen=True, kw_only=True):
    TYPE: ClassVar[str] = "task_cancel_requested"
    AGGREGATE: ClassVar[str] = "task"

    reason: str = ""


@register
class TaskRequeued(EventData, frozen=True, kw_only=True):
    """A failed or cancelled task goes back on the queue as a new attempt, not before
    ``not_before`` (a retry's backoff)."""

    TYPE: ClassVar[str] = "task_requeued"
    AGGREGATE: ClassVar[str] = "task"

    attempt: int
    reason: str = ""
    not_before: datetime | None = None


# --- task: the run ------------------------------------------------------------------------


@register
class BuilderStarted(EventData, frozen=True, kw_only=True):
    """The handler started a builder process for a phase; its group is killed as a whole."""

    TYPE: ClassVar[str] = "builder_started"
    AGGREGATE: ClassVar[str] = "task"

    run_id: str
    phase: Phase
    host: str
    pid: int
    pgid: int
    program: str = ""


@register
class PhaseChanged(EventData, frozen=True, kw_only=True):
    """The handler moved a run into, or out of, one of the eight phases."""

    TYPE: ClassVar[str] = "phase_changed"
    AGGREGATE: ClassVar[str] = "task"

    run_id: str
    phase: Phase
    status: PhaseStatus
    action: str = ""
    result: str = ""


@register
class WorkProgress(EventData, frozen=True, kw_only=True):
    """The heartbeat of a run: posted by the handler every interval and at each phase."""

    TYPE: ClassVar[str] = "work_progress"
    AGGREGATE: ClassVar[str] = "task"

    run_id: str
    phase: Phase
    percent: int
    action: str = ""
    turns: int = 0
    tool_calls: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    cost_usd: float = 0.0
    last_tool: str = ""
    blockers: list[str] = []


@register
class PlanRecorded(EventData, frozen=True, kw_only=True):
    """The run's plan: from the builder's planning session, or from the Requirements."""

    TYPE: ClassVar[str] = "plan_recorded"
    AGGREGATE: ClassVar[str] = "task"

    run_id: str
    source: str  # "builder" or "requirements"
    steps: list[str]
    text: str = ""
    session_id: str = ""


@register
class CardAdded(EventData, frozen=True, kw_only=True):
    """A Kanban card for one plan step, under its task."""

    TYPE: ClassVar[str] = "card_added"
    AGGREGATE: ClassVar[str] = "task"

    run_id: str
    card_id: str
    title: str
    position: int
    column: str = "todo"


@register
class CardMoved(EventData, frozen=True, kw_only=True):
    TYPE: ClassVar[str] = "card_moved"
    AGGREGATE: ClassVar[str] = "task"

    run_id: str
    card_id: str
    column: str  # todo, in_progress, done, failed


@register
class ValidationChecked(EventData, frozen=True, kw_only=True):
    """What the handler found when it checked the deliverables itself."""

    TYPE: ClassVar[str] = "validation_checked"
    AGGREGATE: ClassVar[str] = "task"

    run_id: str
    round: int  # 0: the first VALIDATE; n: after HEAL round n
    passed: bool
    missing: list[str] = []
    command: str = ""
    exit_code: int | None = None
    output: str = ""


@register
class RunStale(EventData, frozen=True, kw_only=True):
    """No heartbeat for ``stale_after``: shown as STALE; nothing is killed."""

    TYPE: ClassVar[str] = "run_stale"
    AGGREGATE: ClassVar[str] = "task"

    run_id: str
    silent_for: float
    detected_by: str


@register
class ReportWritten(EventData, frozen=True, kw_only=True):
    TYPE: ClassVar[str] = "report_written"
    AGGREGATE: ClassVar[str] = "task"

    run_id: str
    path: str
    summary: str
    files_changed: list[str] = []
    duration_s: float = 0.0
    turns: int = 0
    cost_usd: float = 0.0
    heal_rounds: int = 0


@register
class RunFinished(EventData, frozen=True, kw_only=True):
    """A run (one attempt) ended: succeeded, failed or cancelled, with the reason.

    Always appended in one batch with the task's fate: :class:`TaskFinished` or
    :class:`TaskRequeued`.
    """

    TYPE: ClassVar[str] = "run_finished"
    AGGREGATE: ClassVar[str] = "task"

    run_id: str
    outcome: TaskState
    reason: str = ""
    summary: str = ""
    phase: Phase | None = None
    error: str = ""
    log_tail: str = ""  # the builder's last output lines, for whoever picks up a failure


@register
class TaskFinished(EventData, frozen=True, kw_only=True):
    """The task is done with: succeeded, failed or cancelled. Retry starts a new attempt."""

    TYPE: ClassVar[str] = "task_finished"
    AGGREGATE: ClassVar[str] = "task"

    outcome: TaskState
    reason: str = ""
    run_id: str = ""


@register
class TaskEscalated(EventData, frozen=True, kw_only=True):
    """The task was handed to another agent: ``task_id`` is the new task, dispatched with
    ``escalated_from`` naming this one."""

    TYPE: ClassVar[str] = "task_escalated"
    AGGREGATE: ClassVar[str] = "task"

    task_id: str
    to_agent: str
    from_agent: str = ""
    note: str = ""
    automatic: bool = False  # by the escalation policy, not by a person
    run_id: str = ""  # the failed run it escalates from


# --- groups: tasks dispatched to run in parallel -----------------------------------------


@register
class GroupFinished(EventData, frozen=True, kw_only=True):
    """Every task of a ``group`` has finished: the group's merged outcome, recorded once."""

    TYPE: ClassVar[str] = "group_finished"
    AGGREGATE: ClassVar[str] = "group"

    group: str
    tasks: list[str]
    succeeded: list[str] = []
    failed: list[str] = []
    cancelled: list[str] = []

    @property
    def passed(self) -> bool:
        return not self.failed and not self.cancelled


# --- alerts: deliveries to the outside world, each recorded once --------------------------


class AlertKind(enum.StrEnum):
    """What an alert tells the operator; settings choose which kinds are sent."""

    STARTED = "started"  # a run was claimed and begins
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    STALE = "stale"
    WATCHDOG = "watchdog"  # the watchdog failed a silent run (agent_silent, handler_lost)
    ESCALATED = "escalated"
    GROUP = "group"  # every task of a parallel group finished
    PHASE = "phase"  # each phase's end: chatty, so off unless asked for


@register
class AlertDelivered(EventData, frozen=True, kw_only=True):
    """An alert about ``source_event`` reached ``target`` on ``channel`` (telegram, webhook).

    The aggregate id is derived from (channel, target, source event), and the append is
    create-only, so an alert is recorded — and therefore sent — once however many
    instances try.
    """

    TYPE: ClassVar[str] = "alert_delivered"
    AGGREGATE: ClassVar[str] = "alert"

    channel: str
    target: str
    source_event: str
    kind: str = ""


# --- agent comms: messages in threads ----------------------------------------------------


EVERYONE = "*"  # the recipient that means every agent


@register
class MessageSent(EventData, frozen=True, kw_only=True):
    """One agent's message to another (or to everyone), in a thread."""

    TYPE: ClassVar[str] = "message_sent"
    AGGREGATE: ClassVar[str] = "thread"

    message_id: str
    sender: str
    recipient: str
    type: MessageType
    body: str
    priority: Priority = Priority.NORMAL
    reply_to: str = ""
    task_id: str = ""


@register
class MessageRead(EventData, frozen=True, kw_only=True):
    """A recipient read a message (a read receipt)."""

    TYPE: ClassVar[str] = "message_read"
    AGGREGATE: ClassVar[str] = "thread"

    message_id: str
    reader: str


# --- handlers ----------------------------------------------------------------------------


@register
class HandlerHeartbeat(EventData, frozen=True, kw_only=True):
    """A handler is alive; the watchdog tells ``handler_lost`` from ``agent_silent`` by it."""

    TYPE: ClassVar[str] = "handler_heartbeat"
    AGGREGATE: ClassVar[str] = "handler"

    host: str
    pid: int
    runs: list[str] = []
    capacity: int = 0
