"""REPORT: a self-contained HTML page per run — what was asked, each phase, what changed, and
the validation output before and after HEAL."""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from shipyard.events.types import Phase


@dataclass
class PhaseLine:
    phase: Phase
    status: str
    started: datetime | None = None
    ended: datetime | None = None
    action: str = ""
    result: str = ""


@dataclass
class ReportData:
    task_id: str
    run_id: str
    title: str
    agent: str
    attempt: int
    outcome: str
    reason: str
    workdir: str
    started: datetime
    ended: datetime
    turns: int
    cost_usd: float
    tokens_in: int
    tokens_out: int
    heal_rounds: int
    plan_steps: list[str]
    phases: list[PhaseLine]
    files_changed: list[str]
    validations: list[tuple[int, bool, str, str]] = field(default_factory=list)
    summary: str = ""


_STYLE = """
body{font:15px/1.5 system-ui,sans-serif;margin:2rem auto;max-width:980px;padding:0 1rem;
color:#1c2430;background:#fbfcfd}
h1{font-size:1.5rem;margin:0 0 .25rem}h2{font-size:1.1rem;margin-top:2rem}
.meta{color:#5b6675}.ok{color:#137333}.bad{color:#b3261e}.skip{color:#7a8593}
table{border-collapse:collapse;width:100%}td,th{text-align:left;padding:.35rem .5rem;
border-bottom:1px solid #e3e7ec;vertical-align:top}
pre{background:#0f1720;color:#e6edf3;padding:1rem;border-radius:6px;overflow:auto;
max-height:28rem;font-size:13px}
.cols{display:grid;grid-template-columns:1fr 1fr;gap:1rem}
@media (prefers-color-scheme:dark){body{background:#0d1117;color:#e6edf3}
td,th{border-color:#30363d}.meta{color:#8b949e}}
"""


def _t(value: datetime | None) -> str:
    return value.strftime("%H:%M:%S") if value else ""


def render(data: ReportData) -> str:
    e = html.escape
    status_class = {"succeeded": "ok", "failed": "bad", "skipped": "skip"}
    phase_rows = "".join(
        f"<tr><td>{e(p.phase.label)}</td><td class='{status_class.get(p.status, '')}'>"
        f"{e(p.status)}</td><td>{_t(p.started)}</td><td>{_t(p.ended)}</td>"
        f"<td>{e(p.action)}</td><td>{e(p.result)}</td></tr>"
        for p in data.phases
    )
    changed = "".join(f"<li><code>{e(f)}</code></li>" for f in data.files_changed) or (
        "<li>No files changed.</li>"
    )
    steps = "".join(f"<li>{e(s)}</li>" for s in data.plan_steps)
    before = next((v for v in data.validations if v[0] == 0), None)
    after = data.validations[-1] if len(data.validations) > 1 else None

    def block(title: str, v: tuple[int, bool, str, str] | None) -> str:
        if v is None:
            return f"<div><h3>{e(title)}</h3><p class='meta'>—</p></div>"
        verdict = "passed" if v[1] else "failed"
        return (
            f"<div><h3>{e(title)} — <span class='{'ok' if v[1] else 'bad'}'>{verdict}</span></h3>"
            f"<p class='meta'>{e(v[2])}</p><pre>{e(v[3]) or '(no output)'}</pre></div>"
        )

    duration = (data.ended - data.started).total_seconds()
    outcome_class = "ok" if data.outcome == "succeeded" else "bad"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width,initial-scale=1">
<title>{e(data.title)} — Shipyard run {e(data.run_id)}</title><style>{_STYLE}</style></head>
<body>
<h1>{e(data.title)}</h1>
<p class="meta">Task {e(data.task_id)} · run {e(data.run_id)} · attempt {data.attempt} ·
agent {e(data.agent)} · <code>{e(data.workdir)}</code></p>
<p><strong class="{outcome_class}">{e(data.outcome.upper())}</strong>
{(" — " + e(data.reason)) if data.reason else ""}</p>
<p>{e(data.summary)}</p>
<table><tr><th>Duration</th><th>Turns</th><th>Cost</th><th>Tokens in/out</th>
<th>HEAL rounds</th></tr><tr><td>{duration:.1f} s</td><td>{data.turns}</td>
<td>${data.cost_usd:.4f}</td><td>{data.tokens_in:,} / {data.tokens_out:,}</td>
<td>{data.heal_rounds}</td></tr></table>
<h2>Phases</h2>
<table><tr><th>Phase</th><th>Status</th><th>Started</th><th>Ended</th><th>Action</th>
<th>Result</th></tr>{phase_rows}</table>
<h2>Plan</h2><ol>{steps}</ol>
<h2>Files changed</h2><ul>{changed}</ul>
<h2>Validation: before and after HEAL</h2>
<div class="cols">{block("First VALIDATE", before)}{block("After HEAL", after)}</div>
<p class="meta">Generated {e(data.ended.isoformat())}</p>
</body></html>
"""


def write(directory: Path, data: ReportData) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{data.run_id}.html"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(render(data), encoding="utf-8")
    tmp.replace(path)
    return path
