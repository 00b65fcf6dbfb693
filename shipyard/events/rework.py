"""Rework: the dispatch protocol's ``Fix:`` request, written from a failed run.

``shipyard rework RUN_ID`` prints a dispatch in the seed's rework shape — Task, Current State
(Broken), Requirements, Environment, Deliverables — with the broken state filled in from the
run's events (its phase, reason, error, failed validation and the tail of the builder's
output), for a person or an agent to edit and send with ``shipyard dispatch``.
"""

from __future__ import annotations

from typing import Any

from shipyard.errors import CommandRejected
from shipyard.events import dispatch
from shipyard.events import types as t
from shipyard.events.envelope import Event

MAX_OUTPUT = 3000  # characters of error or validation output quoted in the dispatch


def run_of(history: list[Event[Any]], run_id: str) -> list[Event[Any]]:
    """The events of one run (``run_id``), or of the task's last run when it is empty."""
    claims = [e for e in history if isinstance(e.data, t.TaskClaimed)]
    if not claims:
        raise CommandRejected("that task never ran; there is nothing to rework", code="conflict")
    wanted = run_id or claims[-1].data.run_id
    events = [e for e in history if getattr(e.data, "run_id", None) == wanted]
    if not events:
        raise CommandRejected(f"no run {wanted} in this task", code="not_found")
    return events


def fix_dispatch(history: list[Event[Any]], run_id: str = "") -> dict[str, Any]:
    """A ``Fix:`` dispatch for the run ``run_id`` of the task whose ``history`` this is."""
    spec: t.TaskDispatched = history[0].data
    task_id = history[0].aggregate_id
    events = run_of(history, run_id)
    run_id = events[0].data.run_id
    finished = next((e.data for e in events if isinstance(e.data, t.RunFinished)), None)
    if finished is None:
        raise CommandRejected(f"run {run_id} has not finished yet", code="conflict")
    if finished.outcome == t.TaskState.SUCCEEDED:
        raise CommandRejected(
            f"run {run_id} succeeded; rework is for a run that failed", code="conflict"
        )
    failed_checks = [
        e.data for e in events if isinstance(e.data, t.ValidationChecked) and not e.data.passed
    ]
    report = next((e.data.path for e in events if isinstance(e.data, t.ReportWritten)), "")
    sections = dispatch.split_sections(spec.prompt)
    title = spec.title.removeprefix("Fix:").strip()
    where = f" in {finished.phase.label}" if finished.phase else ""
    what = finished.reason or "no reason recorded"

    broken = [f"Run {run_id} of task {task_id} ended {finished.outcome}{where}: {what}."]
    if finished.error:
        broken += ["", "Error:", _fence(finished.error)]
    if failed_checks:
        last = failed_checks[-1]
        if last.missing:
            broken += ["", f"Deliverables missing: {', '.join(last.missing)}"]
        if last.command:
            broken += [
                "",
                f"Validation `{last.command}` exited {last.exit_code}:",
                _fence(last.output),
            ]
    if finished.log_tail:
        broken += ["", "Last lines of the builder's output:", _fence(finished.log_tail)]

    requirements = sections.get("Requirements") or "- Do what the original task asked."
    requirements += "\n- Everything under Deliverables exists and validation passes."
    if spec.validation_command:
        requirements += f"\n- `{spec.validation_command}` exits 0."
    environment = [
        f"- Working directory: {spec.working_dir}",
        "- Existing codebase — read README.md first",
        f"- Error log: the run's report {report}" if report else f"- Error log: run {run_id}",
    ]
    if spec.validation_command:
        environment.append(f"- Validation command: `{spec.validation_command}`")
    deliverables = ["Fixed feature, passing validation", "Updated README.md"]
    deliverables += [d for d in spec.deliverables if "readme" not in d.lower()]
    deliverables.append("HTML report with before/after")
    prompt = "\n\n".join(
        [
            f"## Task\nFix what broke in {title} (task {task_id}): {what}.",
            "## Current State (Broken)\n" + "\n".join(broken),
            "## Requirements\n" + requirements,
            "## Environment\n" + "\n".join(environment),
            "## Deliverables\n" + "\n".join(f"{i}. {d}" for i, d in enumerate(deliverables, 1)),
        ]
    )
    name = f"Fix: {title}"[:200]
    extra = {"agent": spec.agent} if spec.agent else {}
    return {
        **extra,
        "request_type": "queue",
        "action": "create",
        "task_type": spec.task_type,
        "action_name": name,
        "priority": "high",
        "payload": {
            "prompt": prompt,
            "dispatcher": spec.dispatcher,
            "task_title": name,
            "max_turns": spec.max_turns,
        },
    }


def _fence(text: str) -> str:
    body = text.strip()[-MAX_OUTPUT:].replace("```", "'''")
    return f"```\n{body}\n```"
