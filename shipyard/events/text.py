"""Events as lines a person reads: the audit trail ``shipyard events`` prints."""

from __future__ import annotations

from typing import Any

from shipyard.events import types as t
from shipyard.events.envelope import Event


def summary(event: Event[Any]) -> str:
    """A short description of what the event says."""
    d = event.data
    if isinstance(d, t.TaskDispatched):
        extra = [f"priority={d.priority}"]
        if d.after:
            extra.append("after=" + ",".join(d.after))
        if d.group:
            extra.append(f"group={d.group}")
        if d.agent:
            extra.append(f"agent={d.agent}")
        if d.escalated_from:
            extra.append(f"escalated_from={d.escalated_from}")
        return f"{d.title!r} in {d.working_dir} " + " ".join(extra)
    if isinstance(d, t.DispatchRejected):
        first = d.problems[0] if d.problems else ""
        more = f" (+{len(d.problems) - 1} more)" if len(d.problems) > 1 else ""
        return f"{d.command} refused: {first}{more}"
    if isinstance(d, t.TaskClaimed):
        return f"run {d.run_id} attempt {d.attempt} by {d.handler} with {d.agent}"
    if isinstance(d, t.PhaseChanged):
        tail = f": {d.result}" if d.result else (f": {d.action}" if d.action else "")
        return f"{d.phase.label} {d.status}{tail}"
    if isinstance(d, t.WorkProgress):
        return (
            f"{d.phase.label} {d.percent}% {d.action} turns={d.turns} cost=${d.cost_usd:.4f}"
        ).strip()
    if isinstance(d, t.RunFinished):
        return f"run {d.run_id} {d.outcome}" + (f": {d.reason}" if d.reason else "")
    if isinstance(d, t.TaskRequeued):
        return f"attempt {d.attempt} queued" + (f": {d.reason}" if d.reason else "")
    if isinstance(d, t.TaskCancelRequested):
        return "cancel requested" + (f": {d.reason}" if d.reason else "")
    if isinstance(d, t.TaskFinished):
        return f"task {d.outcome}" + (f": {d.reason}" if d.reason else "")
    if isinstance(d, t.RunStale):
        return f"run {d.run_id} STALE: no heartbeat for {d.silent_for:.0f}s"
    if isinstance(d, t.PlanRecorded):
        return f"plan of {len(d.steps)} steps ({d.source})"
    if isinstance(d, t.ValidationChecked):
        verdict = "passed" if d.passed else "failed"
        detail = f", missing {', '.join(d.missing)}" if d.missing else ""
        code = f", `{d.command}` exited {d.exit_code}" if d.command else ""
        return f"validation round {d.round} {verdict}{detail}{code}"
    if isinstance(d, t.ReportWritten):
        return d.summary
    if isinstance(d, t.BuilderStarted):
        return f"{d.phase.label}: started {d.program} (pid {d.pid}) on {d.host}"
    if isinstance(d, t.CardAdded):
        return f"card {d.card_id}: {d.title}"
    if isinstance(d, t.CardMoved):
        return f"card {d.card_id} to {d.column}"
    if isinstance(d, t.MessageSent):
        about = f" about {d.task_id}" if d.task_id else ""
        return f"{d.type} {d.sender} → {d.recipient}{about}: {d.body[:120]}"
    if isinstance(d, t.MessageRead):
        return f"{d.reader} read {d.message_id}"
    if isinstance(d, t.AlertDelivered):
        return f"{d.kind} alert on {d.channel} to {d.target}, about event {d.source_event}"
    if isinstance(d, t.HandlerHeartbeat):
        return f"{d.host} pid {d.pid}, {len(d.runs)} run(s)"
    return ""


def line(event: Event[Any]) -> str:
    stamp = event.time.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
    return (
        f"#{event.seq:<6} {stamp}  {event.aggregate} {event.aggregate_id}  "
        f"{event.type}  by {event.actor}  {summary(event)}"
    ).rstrip()
