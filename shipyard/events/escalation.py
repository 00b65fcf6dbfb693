"""Escalation: hand a failed task to another agent, carrying what went wrong.

Escalating task A to agent Y appends, in one atomic batch, ``task_escalated`` on A (guarded
by A's last sequence) and a new task B — A's dispatch with ``agent=Y`` and
``escalated_from=A``. B's id is derived from A's, so a task is escalated at most once
however many people, handlers and policies try at the same moment; to go further, escalate B.

The history B's builder is told about at CONTEXT — attempts, errors, validation output and
the tail of the builder's log — is read from A's events by :func:`failure_history`.
"""

from __future__ import annotations

import msgspec

from shipyard.errors import CommandRejected
from shipyard.events import dispatch
from shipyard.events import types as t
from shipyard.events.envelope import Event, make, valid_id
from shipyard.events.log import EventLog
from shipyard.events.tasks import Task

MAX_NOTE = 4000  # characters
ESCALATABLE = (t.TaskState.FAILED, t.TaskState.CANCELLED)


def escalation_key(task_id: str) -> str:
    """The idempotency key of the task that ``task_id`` escalates to."""
    return f"escalation-of-{task_id}"


def check(task: Task, to_agent: str, note: str) -> list[str]:
    """Why ``task`` cannot be escalated to ``to_agent``; empty if it can."""
    problems = []
    if not to_agent or not valid_id(to_agent):
        problems.append(f"to: {to_agent!r} is not an agent name (letters, digits, - and _)")
    elif to_agent == (task.agent or task.spec.agent):
        problems.append(f"to: task {task.id} already ran on {to_agent}; name another agent")
    if len(note) > MAX_NOTE:
        problems.append(f"note: {len(note)} characters; keep it under {MAX_NOTE}")
    if task.escalated_to:
        problems.append(
            f"task {task.id} was already escalated to {task.escalated_to}; escalate that one"
        )
    elif task.state not in ESCALATABLE:
        problems.append(
            f"task {task.id} is {task.state}; only a failed or cancelled task can be escalated "
            "(cancel it first)"
        )
    return problems


def events_for(
    task: Task, to_agent: str, *, note: str = "", automatic: bool = False, actor: str
) -> tuple[Event[t.TaskEscalated], Event[t.TaskDispatched]]:
    """The two events that escalate ``task``: the record on it and the new task."""
    spec = msgspec.structs.replace(
        task.spec,
        agent=to_agent,
        escalated_from=task.id,
        idempotency_key=escalation_key(task.id),
        after=[],  # its prerequisites were met for the original
        group="",  # the group's outcome was decided by the original
    )
    new_id = dispatch.task_id_for(spec.dispatcher, spec.idempotency_key)
    record = t.TaskEscalated(
        task_id=new_id,
        to_agent=to_agent,
        from_agent=task.agent or task.spec.agent,
        note=note,
        automatic=automatic,
        run_id=task.run_id,
    )
    return make(record, aggregate_id=task.id, actor=actor), make(
        spec, aggregate_id=new_id, actor=actor
    )


async def escalate(
    events: EventLog,
    task: Task,
    to_agent: str,
    *,
    note: str = "",
    automatic: bool = False,
    actor: str = "",
) -> dict[str, str]:
    """Escalate ``task`` (as folded up to its ``last_seq``). Raises
    :class:`CommandRejected` when it cannot be, :class:`ConcurrencyConflict` when the task
    changed meanwhile (fold again and retry)."""
    problems = check(task, to_agent, note)
    if problems:
        raise CommandRejected(
            f"cannot escalate {task.id}: {problems[0]}",
            problems,
            code="conflict" if task.escalated_to or task.state not in ESCALATABLE else "invalid",
        )
    record, new = events_for(
        task, to_agent, note=note, automatic=automatic, actor=actor or "commands"
    )
    await events.append_batch([record, new], expect=task.last_seq)
    return {"task_id": task.id, "escalated_to": new.aggregate_id, "agent": to_agent}


async def failure_history(events: EventLog, task_id: str, for_task: str = "") -> str:
    """What went wrong with ``task_id``, as told to the builder that takes it over."""
    history = await events.history("task", task_id)
    if not history:
        return f"Task {task_id}: no history found."
    spec = history[0].data
    lines = [f"Task {task_id} ({spec.title}) was handed on after it failed."]
    if spec.escalated_from:
        lines.append(f"It had itself been escalated from task {spec.escalated_from}.")
    runs: dict[str, str] = {}  # run id -> agent
    last_validation: t.ValidationChecked | None = None
    note = ""
    for event in history:
        data = event.data
        if isinstance(data, t.TaskClaimed):
            runs[data.run_id] = data.agent
        elif isinstance(data, t.ValidationChecked) and not data.passed:
            last_validation = data
        elif isinstance(data, t.RunFinished):
            where = f" in {data.phase.label}" if data.phase else ""
            lines.append(
                f"- Attempt on {runs.get(data.run_id, 'an agent')} ({data.run_id}): "
                f"{data.outcome}{where}, {data.reason or 'no reason recorded'}"
            )
            if data.error:
                lines += ["  Error:", _indent(data.error[-1500:])]
            if data.log_tail:
                lines += ["  Last lines of the builder's output:", _indent(data.log_tail[-2500:])]
        elif isinstance(data, t.TaskEscalated) and (not for_task or data.task_id == for_task):
            note = data.note
    if last_validation is not None:
        lines.append("- The last failed validation:")
        if last_validation.missing:
            lines.append(f"  Missing deliverables: {', '.join(last_validation.missing)}")
        if last_validation.command:
            lines.append(
                f"  `{last_validation.command}` exited {last_validation.exit_code}; output:"
            )
            lines.append(_indent(last_validation.output[-2000:]))
    if note:
        lines += ["", f"Note from whoever escalated it: {note}"]
    return "\n".join(lines)


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.rstrip().splitlines())
