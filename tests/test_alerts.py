"""Alert derivation, rendering and splitting, without a network."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import pytest

from shipyard.events import types as t
from shipyard.events.envelope import Event, make
from shipyard.gateway import alerts
from tests.fakes.telegram_api import plain_text, utf16_len

T0 = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
TASK = "t-alerts0001"


def event(data: t.EventData, seq: int, *, seconds: float = 0) -> Event[Any]:
    made = make(data, aggregate_id=TASK, actor="test", at=T0 + timedelta(seconds=seconds))
    return msgspec.structs.replace(made, seq=seq)


def dispatched(title: str = "Add a health endpoint") -> Event[Any]:
    data = t.TaskDispatched(title=title, prompt="…", dispatcher="openclaw")
    return event(data, 1)


def valid(text: str) -> str:
    """The text Telegram shows, after checking it would accept the HTML."""
    shown, problem = plain_text(text)
    assert not problem, f"{problem}: {text!r}"
    return shown


FAILED_RUN = t.RunFinished(run_id="r-1", outcome=t.TaskState.FAILED, reason="builder_failed")


@pytest.mark.parametrize(
    ("data", "kind"),
    [
        (t.TaskClaimed(run_id="r-1", handler="h", agent="claude"), t.AlertKind.STARTED),
        (t.RunFinished(run_id="r-1", outcome=t.TaskState.SUCCEEDED), t.AlertKind.SUCCEEDED),
        (FAILED_RUN, t.AlertKind.FAILED),
        (
            t.RunFinished(run_id="r-1", outcome=t.TaskState.FAILED, reason="agent_silent"),
            t.AlertKind.WATCHDOG,
        ),
        (
            t.RunFinished(run_id="r-1", outcome=t.TaskState.FAILED, reason="handler_lost"),
            t.AlertKind.WATCHDOG,
        ),
        (t.RunFinished(run_id="r-1", outcome=t.TaskState.CANCELLED), None),
        (
            t.TaskFinished(outcome=t.TaskState.FAILED, reason="prerequisite failed"),
            t.AlertKind.FAILED,
        ),
        (t.TaskFinished(outcome=t.TaskState.FAILED, run_id="r-1"), None),
        (t.TaskFinished(outcome=t.TaskState.SUCCEEDED, run_id="r-1"), None),
        (t.RunStale(run_id="r-1", silent_for=601, detected_by="h"), t.AlertKind.STALE),
        (t.TaskEscalated(task_id="t-2", to_agent="codex"), t.AlertKind.ESCALATED),
        (t.GroupFinished(group="g", tasks=["t-1"]), t.AlertKind.GROUP),
        (
            t.PhaseChanged(run_id="r-1", phase=t.Phase.PLAN, status=t.PhaseStatus.SUCCEEDED),
            t.AlertKind.PHASE,
        ),
        (t.PhaseChanged(run_id="r-1", phase=t.Phase.PLAN, status=t.PhaseStatus.STARTED), None),
        (t.WorkProgress(run_id="r-1", phase=t.Phase.BUILD, percent=40), None),
    ],
    ids=lambda v: getattr(v, "TYPE", str(v)),
)
def test_which_events_call_for_which_alert(data: t.EventData, kind: t.AlertKind | None) -> None:
    """Each alert-worthy event maps to one kind; a failed run's task_finished maps to none."""
    assert alerts.kind_of(event(data, 5)) == kind


def test_a_success_reports_duration_turns_and_cost_from_progress_without_a_report() -> None:
    """With no report, a succeeded run's figures come from its claim time and last progress."""
    history = [
        dispatched(),
        event(t.TaskClaimed(run_id="r-1", handler="h", agent="claude"), 2),
        event(
            t.WorkProgress(run_id="r-1", phase=t.Phase.BUILD, percent=90, turns=7, cost_usd=1.234),
            3,
        ),
    ]
    done = event(t.RunFinished(run_id="r-1", outcome=t.TaskState.SUCCEEDED), 4, seconds=3725)
    alert = alerts.render(
        done, t.AlertKind.SUCCEEDED, history=[*history, done], base_url="http://x"
    )
    shown = valid(alert.text)
    assert "Build succeeded · Add a health endpoint" in shown
    assert "1h 02m · 7 turns · $1.23" in shown
    assert alert.link == "http://x/#/?run=r-1"
    assert not alert.actions


def test_agent_text_is_escaped_everywhere() -> None:
    """Titles, reasons, error output and notes from agents cannot inject markup."""
    nasty = "<b>bold</b> & <a href='x'>link</a> </pre>"
    history = [dispatched(title=nasty)]
    failed = event(
        t.RunFinished(
            run_id="r-1", outcome=t.TaskState.FAILED, reason=nasty, phase=t.Phase.HEAL, error=nasty
        ),
        2,
    )
    alert = alerts.render(failed, t.AlertKind.FAILED, history=[*history, failed])
    shown = valid(alert.text)
    assert shown.count(nasty) == 3
    assert alert.actions and alert.task_id == TASK


def test_a_long_error_shows_its_last_lines_each_cut_short() -> None:
    """A failure shows the last lines of its error, long lines clipped, and says how many
    earlier lines were left out."""
    error = "\n".join(f"{i} " + "x" * 1000 for i in range(50))
    failed = event(t.RunFinished(run_id="r-1", outcome=t.TaskState.FAILED, error=error), 2)
    shown = valid(alerts.render(failed, t.AlertKind.FAILED, history=[dispatched()]).text)
    assert "… 38 earlier lines" in shown
    assert "49 xxx" in shown and "\n37 xxx" not in shown
    assert max(len(line) for line in shown.splitlines()) <= alerts.LINE_CHARS
    assert utf16_len(shown) < alerts.LIMIT


def test_short_text_is_one_message() -> None:
    """Text within the limit is sent as it is."""
    assert alerts.split("<b>hi</b>") == ["<b>hi</b>"]


def test_long_text_is_split_at_line_ends_with_tags_kept_whole() -> None:
    """Over 4096 characters, text is cut at line ends into valid parts; a block open at a
    cut is closed and opened again, and nothing is lost."""
    lines = [f"<b>row {i}</b> " + "é" * 60 for i in range(60)]
    block = "<pre>" + "\n".join(f"trace {i} " + "&lt;x&gt;" * 10 for i in range(80)) + "</pre>"
    text = "\n".join(lines) + "\n" + block + "\nthe end 🚢"
    parts = alerts.split(text)
    assert len(parts) >= 3
    for part in parts:
        assert alerts.size(part) <= alerts.LIMIT
        valid(part)
    assert "".join(valid(p) for p in parts) == valid(text)
    assert all(p.endswith(("\n", "\n</pre>")) for p in parts[:-1])
    assert parts[-1].endswith("the end 🚢")
    assert any(p.startswith("<pre>trace") for p in parts[1:])


def test_a_line_longer_than_the_limit_is_cut_inside() -> None:
    """A single enormous line is cut wherever needed, never inside an entity."""
    text = "<code>" + "&amp;" * 3000 + "</code>"
    parts = alerts.split(text, limit=1000)
    assert len(parts) > 1
    for part in parts:
        assert alerts.size(part) <= 1000
        valid(part)
    assert "".join(valid(p) for p in parts) == "&" * 3000


@pytest.mark.parametrize(
    ("seconds", "shown"), [(0, "0s"), (59.4, "59s"), (61, "1m 01s"), (3600, "1h 00m")]
)
def test_durations_read_like_a_clock(seconds: float, shown: str) -> None:
    """Durations are short: seconds, minutes and seconds, or hours and minutes."""
    assert alerts.duration(seconds) == shown
