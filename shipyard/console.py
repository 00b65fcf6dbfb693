"""Plain-text views for the terminal: Build History, status, and a task's audit trail."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from shipyard.events import text
from shipyard.events import types as t
from shipyard.events.envelope import Event

DOTS = {"succeeded": "●", "failed": "✕", "skipped": "○", "started": "◐", "": "·"}


def dots(results: list[str]) -> str:
    return "".join(DOTS.get(r, "?") for r in results)


def _when(value: str | datetime) -> str:
    if isinstance(value, str):
        value = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return value.strftime("%Y-%m-%d %H:%M")


def history(page: dict[str, Any]) -> str:
    rows = page["rows"]
    if not rows:
        return "No finished builds yet."
    lines = [
        f"{'ended':16}  {'outcome':9}  {'phases':8}  {'duration':>8}  {'turns':>5}  "
        f"{'cost':>8}  title"
    ]
    for r in rows:
        lines.append(
            f"{_when(r['ended_at']):16}  {r['outcome']:9}  {dots(r['phase_results']):8}  "
            f"{r['duration_s']:7.1f}s  {r['turns']:5}  ${r['cost_usd']:7.4f}  "
            f"{r['title']}  ({r['task_id']})"
        )
    shown = len(rows)
    lines.append(f"\n{shown} of {page['total']} finished runs.  ● passed  ✕ failed  ○ skipped")
    if page.get("next_before"):
        lines.append(f"Older: shipyard history --before {page['next_before']}")
    return "\n".join(lines)


def status(result: dict[str, Any]) -> str:
    proj = result["projection"]
    s = result["summary"]
    lines = []
    if not proj["caught_up"]:
        lines.append(
            f"Catching up with the event log: {proj['percent']}% "
            f"({proj['applied_seq']:,} of {proj['target_seq']:,} events); figures may lag."
        )
    depth = s["queue_depth"]
    queued = sum(depth.values())
    lines.append(
        f"Queue: {queued} waiting (urgent {depth['urgent']}, high {depth['high']}, "
        f"normal {depth['normal']}, low {depth['low']})"
    )
    states = s["tasks_by_state"]
    lines.append(
        "Tasks: " + (", ".join(f"{k} {v}" for k, v in sorted(states.items())) or "none yet")
    )
    live = s["live"]
    if not live:
        lines.append("Running: nothing — idle.")
    else:
        lines.append(
            f"Running: {len(live)}" + (f" ({s['stale_runs']} STALE)" if s["stale_runs"] else "")
        )
        for run in live:
            phase = t.Phase(run["phase"]).label if run["phase"] else "CLAIMED"
            badge = "  STALE" if run["stale"] else ""
            lines.append(
                f"  {run['task_id']}  {phase:10} {run['percent']:3}%  turns {run['turns']}  "
                f"${run['cost_usd']:.4f}  {run['title']}{badge}"
            )
            if run["action"]:
                lines.append(f"      {run['action'][:100]}")
    return "\n".join(lines)


def audit(task_id: str, events: list[Event[Any]]) -> str:
    """Every event of a task, grouped by run and phase, with actor and time."""
    if not events:
        return f"No events for {task_id}."
    first = events[0].data
    lines = []
    if isinstance(first, t.TaskDispatched):
        lines.append(f"Task {task_id}: {first.title}")
        lines.append(f"  working dir {first.working_dir}, priority {first.priority}")
    headed: set[tuple[str, t.Phase]] = set()
    for event in events:
        d = event.data
        stamp = event.time.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
        if isinstance(d, t.TaskClaimed):
            lines.append(f"\nRun {d.run_id} (attempt {d.attempt}) — {d.agent} on {d.handler}")
        if isinstance(d, t.PhaseChanged) and (d.run_id, d.phase) not in headed:
            headed.add((d.run_id, d.phase))
            lines.append(f"  {d.phase.position + 1}. {d.phase.label}")
        indent = "     " if not isinstance(d, t.TaskDispatched | t.TaskClaimed) else "  "
        lines.append(
            f"{indent}{stamp}  #{event.seq:<6} {event.type:22} {event.actor:28} "
            f"{text.summary(event)}".rstrip()
        )
    return "\n".join(lines)


def _message_line(m: dict[str, Any]) -> str:
    about = f" [{m['task_id']}]" if m["task_id"] else ""
    reply = f" ↪ {m['reply_to']}" if m["reply_to"] else ""
    return (
        f"{_when(m['sent_at'])}  {m['type']:15} {m['sender']} → {m['recipient']}{about}{reply}\n"
        f"    {m['body']}\n    ({m['message_id']} in {m['thread_id']})"
    )


def inbox(agent: str, result: dict[str, Any]) -> str:
    messages = result["messages"]
    if not messages:
        return f"No messages for {agent}."
    lines = [f"{agent}: {result['unread']} unread"]
    for m in messages:
        mark = "  " if m["read"] else "• "
        lines.append(mark + _message_line(m))
    return "\n".join(lines)


def thread(messages: list[dict[str, Any]]) -> str:
    lines = []
    for m in messages:
        readers = ", ".join(m["read_by"]) or "nobody yet"
        lines.append(_message_line(m) + f"\n    read by {readers}")
    return "\n".join(lines)


def inbox_context(agent: str, messages: list[dict[str, Any]]) -> str:
    """Unread messages as context for an agent's session, with how to answer them."""
    lines = [f"Shipyard: {len(messages)} unread message(s) for {agent} (now marked read)."]
    for m in messages:
        about = f" about task {m['task_id']}" if m.get("task_id") else ""
        lines.append(
            f"- [{m['type']}] from {m['sender']}{about} (message {m['message_id']}, "
            f"thread {m['thread_id']}): {m['body']}"
        )
    lines.append(
        f"Answer with: shipyard send --from {agent} --to SENDER --type comment "
        '--thread THREAD --reply-to MESSAGE "…" (or the shipyard MCP tool `reply`). '
        "Directives are instructions from whoever dispatched your work; questions want an answer."
    )
    return "\n".join(lines)
