"""Alerts: which events the operator hears about, and the message each one becomes.

Pure functions, no network and no clock, so every alert can be checked without a bot:
:func:`kind_of` picks the events worth an alert, :func:`render` turns one (with its task's
history) into Telegram HTML, and :func:`split` cuts text to Telegram's 4096-character limit
without breaking a tag.

One failure, one alert: a failed run is told by its ``run_finished`` (which says whether the
task will be retried); its ``task_finished`` adds nothing. Only a task that fails without a
run ending it — a dependant whose prerequisite failed — is told by ``task_finished``. A run
the watchdog failed (``agent_silent``, ``handler_lost``) gets the watchdog alert instead of
the generic failure.
"""

from __future__ import annotations

import html
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from shipyard.events import types as t
from shipyard.events.envelope import Event

LIMIT = 4096  # characters in one Telegram message
WATCHDOG_REASONS = frozenset({"agent_silent", "handler_lost"})
ERROR_LINES = 12  # last lines of a failure's output shown in its alert
LINE_CHARS = 300  # longest line of agent output shown as is
FIELD_CHARS = 600  # longest summary, note or result shown as is
GROUP_ROWS = 20  # tasks of a group listed by name

ICONS = {
    t.AlertKind.STARTED: "▶️",
    t.AlertKind.SUCCEEDED: "✅",
    t.AlertKind.FAILED: "❌",
    t.AlertKind.STALE: "⚠️",
    t.AlertKind.WATCHDOG: "⛔",
    t.AlertKind.ESCALATED: "⤴️",
    t.AlertKind.GROUP: "🧩",
    t.AlertKind.PHASE: "•",
}
WATCHDOG_WHY = {
    "agent_silent": "the builder printed nothing; its process group was killed",
    "handler_lost": "its handler stopped sending heartbeats",
}


@dataclass(frozen=True, kw_only=True)
class Alert:
    """One message to send: Telegram HTML, and what it is about."""

    kind: t.AlertKind
    source_event: str  # the event id it was derived from: the key of "sent once"
    text: str
    task_id: str = ""
    link: str = ""  # the dashboard page it is about
    actions: bool = False  # offer Retry and Cancel buttons


def kind_of(event: Event[Any]) -> t.AlertKind | None:
    """The kind of alert ``event`` calls for, or None."""
    d = event.data
    if isinstance(d, t.TaskClaimed):
        return t.AlertKind.STARTED
    if isinstance(d, t.RunFinished):
        if d.outcome == t.TaskState.SUCCEEDED:
            return t.AlertKind.SUCCEEDED
        if d.outcome == t.TaskState.FAILED:
            return t.AlertKind.WATCHDOG if d.reason in WATCHDOG_REASONS else t.AlertKind.FAILED
        return None
    if isinstance(d, t.TaskFinished):
        if d.outcome == t.TaskState.FAILED and not d.run_id:
            return t.AlertKind.FAILED
        return None
    if isinstance(d, t.RunStale):
        return t.AlertKind.STALE
    if isinstance(d, t.TaskEscalated):
        return t.AlertKind.ESCALATED
    if isinstance(d, t.GroupFinished):
        return t.AlertKind.GROUP
    if isinstance(d, t.PhaseChanged) and d.status != t.PhaseStatus.STARTED:
        return t.AlertKind.PHASE
    return None


# --- dashboard links ------------------------------------------------------------------------


def run_link(base: str, run_id: str) -> str:
    """The Command Center with the run's breakdown open (the UI's hash route)."""
    return f"{base}/#/?run={run_id}"


def task_link(base: str, task_id: str) -> str:
    return f"{base}/#/?task={task_id}"


# --- rendering ------------------------------------------------------------------------------


def esc(value: object) -> str:
    """Text from agents and people, safe inside Telegram HTML."""
    return html.escape(str(value), quote=False)


def plain(text: str) -> str:
    """Telegram HTML as plain text: what a message falls back to if its markup is refused."""
    return html.unescape(_ANY_TAG.sub("", text))


def clip(value: str, limit: int = FIELD_CHARS) -> str:
    value = value.strip()
    return value if len(value) <= limit else value[: limit - 1].rstrip() + "…"


def last_lines(text: str, count: int = ERROR_LINES) -> str:
    """The end of some output, where the error usually is, with long lines cut."""
    lines = [line.rstrip() for line in text.strip().splitlines() if line.strip()]
    shown = [clip(line, LINE_CHARS) for line in lines[-count:]]
    if len(lines) > count:
        shown.insert(0, f"… {len(lines) - count} earlier lines")
    return "\n".join(shown)


def duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, secs = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"


def _anchor(url: str, label: str) -> str:
    return f'<a href="{html.escape(url, quote=True)}">{esc(label)}</a>' if url else ""


class _Story:
    """What a task's history says about one run, read up to the event being told."""

    def __init__(self, history: Sequence[Event[Any]], run_id: str, upto: int) -> None:
        self.title = ""
        self.agent = ""
        self.attempt = 1
        self.claimed: Event[Any] | None = None
        self.report: t.ReportWritten | None = None
        self.progress: t.WorkProgress | None = None
        self.fate: t.TaskRequeued | t.TaskFinished | None = None
        for event in history:
            d = event.data
            if isinstance(d, t.TaskDispatched):
                self.title = d.title
            if event.seq > upto:
                # Only the run's fate is read past the event: it lands in the same batch.
                if self.fate is None and isinstance(d, t.TaskRequeued | t.TaskFinished):
                    self.fate = d
                continue
            if getattr(d, "run_id", None) != run_id:
                continue
            if isinstance(d, t.TaskClaimed):
                self.claimed, self.agent, self.attempt = event, d.agent, d.attempt
            elif isinstance(d, t.ReportWritten):
                self.report = d
            elif isinstance(d, t.WorkProgress):
                self.progress = d

    @property
    def fate_line(self) -> str:
        if isinstance(self.fate, t.TaskRequeued):
            return f"Retrying as attempt {self.fate.attempt}."
        if isinstance(self.fate, t.TaskFinished):
            tries = f" after {self.attempt} attempts" if self.attempt > 1 else ""
            return f"The task has failed{tries}."
        return ""


def render(
    event: Event[Any],
    kind: t.AlertKind,
    *,
    history: Sequence[Event[Any]] = (),
    titles: Mapping[str, str] | None = None,
    base_url: str = "",
) -> Alert:
    """The alert for ``event``; ``history`` is its task's events (any order of reading, in
    sequence order), ``titles`` the titles of other tasks it names."""
    d = event.data
    titles = titles or {}
    run_id = str(getattr(d, "run_id", "") or "")
    story = _Story(history, run_id, event.seq)
    title = story.title or titles.get(event.aggregate_id, "") or event.aggregate_id
    task_id = event.aggregate_id if event.aggregate == "task" else ""
    link = run_link(base_url, run_id) if run_id else task_link(base_url, task_id)
    head = f"{ICONS[kind]} <b>{{}}</b> · {esc(clip(title, 200))}"
    body: list[str] = []
    actions = False

    if isinstance(d, t.TaskClaimed):
        head = head.format("Build started")
        tries = f" · attempt {d.attempt}" if d.attempt > 1 else ""
        body.append(f"{esc(d.agent)} on {esc(d.handler)}{tries}")
    elif isinstance(d, t.RunFinished) and kind == t.AlertKind.SUCCEEDED:
        head = head.format("Build succeeded")
        body.append(_figures(event, story))
        if story.report is not None:
            # The run's summary repeats the figures; the report adds what changed.
            changed = len(story.report.files_changed)
            heal = story.report.heal_rounds
            body.append(
                f"{changed} file{'s' if changed != 1 else ''} changed"
                + (f" · healed in {heal} round{'s' if heal != 1 else ''}" if heal else "")
            )
    elif isinstance(d, t.RunFinished) and kind == t.AlertKind.WATCHDOG:
        head = head.format("FAILED by the watchdog")
        where = f" in {d.phase.label}" if d.phase else ""
        why = WATCHDOG_WHY.get(d.reason, d.reason)
        body.append(f"<b>{esc(d.reason)}</b>{where}: {esc(why)}")
        if d.summary:
            body.append(esc(clip(d.summary)))
        body.append(story.fate_line)
        actions = True
    elif isinstance(d, t.RunFinished):
        head = head.format("Build failed")
        where = f"in <b>{d.phase.label}</b>" if d.phase else "before its first phase"
        body.append(f"{where}: {esc(clip(d.reason or 'failed', 200))}")
        output = last_lines(d.error)
        if output:
            body.append(f"<pre>{esc(output)}</pre>")
        body.append(story.fate_line)
        actions = True
    elif isinstance(d, t.TaskFinished):
        head = head.format("Task failed")
        body.append(f"without running: {esc(clip(d.reason or 'failed'))}")
        actions = True
    elif isinstance(d, t.RunStale):
        head = head.format("STALE")
        where = ""
        if story.progress is not None:
            where = f" in {story.progress.phase.label} at {story.progress.percent}%"
        body.append(
            f"No heartbeat for {duration(d.silent_for)}{where}. Nothing is killed yet; "
            "the watchdog fails the run if it stays silent."
        )
    elif isinstance(d, t.TaskEscalated):
        head = head.format("Escalated")
        new_title = titles.get(d.task_id, "")
        how = "by the escalation policy" if d.automatic else "by hand"
        from_agent = f" from {esc(d.from_agent)}" if d.from_agent else ""
        body.append(f"{how}{from_agent} to <b>{esc(d.to_agent)}</b>")
        body.append(
            f"new task <code>{esc(d.task_id)}</code>"
            + (f": {esc(clip(new_title, 200))}" if new_title else "")
        )
        if d.note:
            body.append(esc(clip(d.note)))
        link = task_link(base_url, d.task_id)
    elif isinstance(d, t.GroupFinished):
        verdict = "passed" if d.passed else "did not pass"
        head = f"{ICONS[kind]} <b>Group {verdict}</b> · {esc(clip(d.group, 200))}"
        body.extend(_group_lines(d, titles))
        link = f"{base_url}/#/"
        task_id = ""
    elif isinstance(d, t.PhaseChanged):
        head = f"{ICONS[kind]} <b>{d.phase.label} {d.status}</b> · {esc(clip(title, 200))}"
        if d.result:
            body.append(esc(clip(d.result, 300)))
    else:
        raise ValueError(f"no alert for {event.type}")

    if task_id:
        body.append(f"<code>{esc(task_id)}</code> · {_anchor(link, 'open')}")
    else:
        body.append(_anchor(link, "open the dashboard"))
    text = "\n".join([head, *(line for line in body if line)])
    return Alert(
        kind=kind,
        source_event=event.id,
        text=text,
        task_id=task_id,
        link=link,
        actions=actions,
    )


def _figures(event: Event[Any], story: _Story) -> str:
    """Duration, turns and cost of a finished run: the report's figures when there is one."""
    if story.report is not None:
        seconds, turns, cost = story.report.duration_s, story.report.turns, story.report.cost_usd
    else:
        started = story.claimed.time if story.claimed else event.time
        seconds = (event.time - started).total_seconds()
        turns = story.progress.turns if story.progress else 0
        cost = story.progress.cost_usd if story.progress else 0.0
    return f"{duration(seconds)} · {turns} turns · ${cost:.2f}"


def _group_lines(d: t.GroupFinished, titles: Mapping[str, str]) -> list[str]:
    outcomes = (("succeeded", d.succeeded), ("failed", d.failed), ("cancelled", d.cancelled))
    counts = [f"{len(ids)} {word}" for word, ids in outcomes if ids]
    lines = [f"{len(d.tasks)} tasks: " + ", ".join(counts)]
    mark = {**{i: "✕" for i in d.failed}, **{i: "–" for i in d.cancelled}}
    for task_id in d.tasks[:GROUP_ROWS]:
        name = titles.get(task_id, "")
        shown = f" {esc(clip(name, 120))}" if name else ""
        lines.append(f"{mark.get(task_id, '✓')}{shown} <code>{esc(task_id)}</code>")
    if len(d.tasks) > GROUP_ROWS:
        lines.append(f"… and {len(d.tasks) - GROUP_ROWS} more")
    return lines


# --- splitting ------------------------------------------------------------------------------

_ANY_TAG = re.compile(r"<[^>]*>")
_TOKEN = re.compile(r"<[^>]*>|&[#\w]+;|[^<&\n]+|\n|[<&]")
_TAG_NAME = re.compile(r"</?\s*([a-zA-Z][\w-]*)")


def size(text: str) -> int:
    """Telegram counts UTF-16 code units; counting the markup too errs on the safe side."""
    return len(text.encode("utf-16-le")) // 2


def split(text: str, limit: int = LIMIT) -> list[str]:
    """Cut Telegram HTML into messages of at most ``limit``, preferably at line ends.

    Tags open at a cut are closed at the end of one part and opened again at the start of
    the next, so every part is valid on its own and a ``<pre>`` block stays a block.
    """
    if size(text) <= limit:
        return [text]
    parts: list[str] = []
    open_tags: list[tuple[str, str]] = []  # (name, the opening tag as written)
    current = ""
    line_end = 0  # where in ``current`` the last whole line ends
    line_tags: list[tuple[str, str]] = []  # the tags open there

    def closing(tags: list[tuple[str, str]]) -> str:
        return "".join(f"</{name}>" for name, _ in reversed(tags))

    def reopening() -> str:
        return "".join(tag for _, tag in open_tags)

    def flush() -> None:
        nonlocal current, line_end
        if current.strip() and current != reopening():
            parts.append(current + closing(open_tags))
        current, line_end = reopening(), 0

    for piece in _pieces(text, limit):
        name = _tag(piece)
        after = list(open_tags)
        if name and piece.startswith("</"):
            if after and after[-1][0] == name:
                after.pop()
        elif name and not piece.endswith("/>"):
            after.append((name, piece))
        if size(current + piece + closing(after)) > limit:
            if line_end and line_tags == open_tags:
                # Cut at the last line end, and carry the rest of the line over.
                rest = current[line_end:]
                current = current[:line_end]
                flush()
                current += rest
            if size(current + piece + closing(after)) > limit:
                flush()
        current += piece
        open_tags[:] = after
        if piece == "\n":
            line_end, line_tags = len(current), list(open_tags)
    flush()
    return parts


def _pieces(text: str, limit: int) -> list[str]:
    """Tags, entities, line ends, and runs of text short enough to always fit."""
    pieces: list[str] = []
    step = max(1, limit // 4)
    for token in _TOKEN.findall(text):
        if token[0] in "<&" and len(token) > 1:
            pieces.append(token)
        else:
            pieces.extend(token[i : i + step] for i in range(0, len(token), step))
    return pieces


def _tag(piece: str) -> str:
    if not piece.startswith("<") or len(piece) < 3:
        return ""
    found = _TAG_NAME.match(piece)
    return found.group(1).lower() if found else ""
