"""``/metrics`` in the Prometheus text format."""

from __future__ import annotations

from typing import Any

from shipyard.projections.queries import Summary


def render(summary: Summary, projection: dict[str, Any], stream_last_seq: int) -> str:
    lines = [
        "# HELP shipyard_queue_depth Tasks waiting to be claimed, by priority.",
        "# TYPE shipyard_queue_depth gauge",
    ]
    for priority, n in summary.queue_depth.items():
        lines.append(f'shipyard_queue_depth{{priority="{priority}"}} {n}')
    lines += [
        "# HELP shipyard_runs Runs by state.",
        "# TYPE shipyard_runs gauge",
    ]
    for state, n in sorted(summary.runs_by_state.items()):
        lines.append(f'shipyard_runs{{state="{state}"}} {n}')
    lines += [
        "# HELP shipyard_tasks Tasks by state.",
        "# TYPE shipyard_tasks gauge",
    ]
    for state, n in sorted(summary.tasks_by_state.items()):
        lines.append(f'shipyard_tasks{{state="{state}"}} {n}')
    lag = max(0, stream_last_seq - int(projection["applied_seq"]))
    lines += [
        "# HELP shipyard_stale_runs Running runs without a heartbeat for stale_after.",
        "# TYPE shipyard_stale_runs gauge",
        f"shipyard_stale_runs {summary.stale_runs}",
        "# HELP shipyard_events_appended_total Events in the log (its last sequence).",
        "# TYPE shipyard_events_appended_total counter",
        f"shipyard_events_appended_total {stream_last_seq}",
        "# HELP shipyard_projection_lag Events in the log not yet in the read models.",
        "# TYPE shipyard_projection_lag gauge",
        f"shipyard_projection_lag {lag}",
    ]
    return "\n".join(lines) + "\n"
