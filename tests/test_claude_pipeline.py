"""The handler driving the real Claude Code CLI through the eight phases, against a loopback
stand-in for the Anthropic Messages API that the tests script."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from shipyard.events.commands import Commands
from shipyard.events.log import EventLog
from shipyard.events.types import Phase, PhaseStatus, TaskState
from shipyard.handler.service import Handler
from shipyard.settings import AgentSettings, HandlerSettings, Settings
from tests import handlers as h
from tests.fakes.anthropic_api import FakeAnthropic, Turn
from tests.fakes.claude_cli import claude_env, require_claude
from tests.test_handler import _gone, body, phases
from tests.test_handler import history as task_history


@pytest.fixture
def api() -> Iterator[FakeAnthropic]:
    with FakeAnthropic() as fake:
        yield fake


@pytest.fixture
async def claude_handler(
    tmp_path: Path, api: FakeAnthropic, event_log: EventLog
) -> AsyncIterator[Handler]:
    """A handler whose `claude` agent is the real CLI, pointed at the stand-in."""
    binary = require_claude()
    env = claude_env(api.url, tmp_path / "home", {"CLAUDE_CODE_MAX_RETRIES": "0"})
    (tmp_path / "work").mkdir()
    cfg = Settings(
        data_dir=tmp_path / "data",
        handler=HandlerSettings(
            workdir_roots=[tmp_path / "work"],
            default_agent="claude",
            heartbeat_interval=0.5,
            stale_after=3.0,
            failed_after=5.0,
            max_attempts=1,
            kill_grace=1.0,
            max_heal_rounds=2,
        ),
        agents={"claude": AgentSettings(kind="claude", binary=binary, env=env)},
    )
    handler = Handler(event_log, cfg, handler_id="claude-handler")
    await handler.start()
    yield handler
    await handler.stop()


def write(path: Path, content: str) -> Turn:
    return Turn.tool("Write", {"file_path": str(path), "content": content})


async def dispatch(
    log: EventLog, tmp: Path, name: str, test: str = "", **extra: Any
) -> tuple[str, Path]:
    b = body(tmp, name, agent="claude", test=test, **extra)
    result = await Commands(log).dispatch(b)
    return result.task_id, tmp / "work" / name


async def test_plan_then_build_with_real_tool_use(
    tmp_path: Path, api: FakeAnthropic, event_log: EventLog, claude_handler: Handler
) -> None:
    """PLAN runs Claude Code in plan mode and stores its plan; BUILD resumes that session and
    the CLI really writes the files; VALIDATE passes and HEAL is skipped."""
    work = tmp_path / "work" / "plan"
    api.script(
        Turn.text("1. Write README.md explaining the greeting\n2. Write hello.txt saying hello"),
        write(work / "README.md", "# Greeting\n\nSays hello.\n"),
        write(work / "hello.txt", "hello\n"),
        Turn.text("Both files are written."),
    )
    task_id, _ = await dispatch(event_log, tmp_path, "plan", test="grep -q hello hello.txt")
    done = await h.wait_for(event_log, h.finished(task_id), timeout=60)
    assert done.data.outcome == TaskState.SUCCEEDED, done.data.reason

    events = await task_history(event_log, task_id)
    plan = next(e.data for e in events if e.type == "plan_recorded")
    assert plan.source == "builder"
    assert plan.steps == ["Write README.md explaining the greeting", "Write hello.txt saying hello"]
    assert plan.session_id
    assert (work / "hello.txt").read_text() == "hello\n"
    assert (work / "README.md").exists()
    seen = phases(events)
    assert seen[Phase.HEAL] == [PhaseStatus.SKIPPED]
    assert seen[Phase.VALIDATE][-1] == PhaseStatus.SUCCEEDED
    # The PLAN call ran in plan mode; BUILD resumed it, so the model saw the plan again.
    build_request = api.main_requests[1]
    assert "Write hello.txt saying hello" in str(build_request.messages)
    report = next(e.data for e in events if e.type == "report_written")
    assert report.turns > 0
    assert report.cost_usd > 0
    assert "+ hello.txt" in report.files_changed
    progress = [e.data for e in events if e.type == "work_progress"]
    assert progress[-1].percent == 100
    assert max(p.turns for p in progress) > 0


async def test_a_validation_failure_is_healed_by_resuming_the_session(
    tmp_path: Path, api: FakeAnthropic, event_log: EventLog, claude_handler: Handler
) -> None:
    """VALIDATE fails; HEAL resumes the builder with the failure output; it fixes the file and
    VALIDATE passes in the second round."""
    work = tmp_path / "work" / "heal"
    api.script(
        Turn.text("1. Write README.md\n2. Write hello.txt"),
        write(work / "README.md", "# Greeting\n"),
        write(work / "hello.txt", "bye\n"),
        Turn.text("Done."),
        write(work / "hello.txt", "hello\n"),
        Turn.text("Fixed."),
    )
    task_id, _ = await dispatch(event_log, tmp_path, "heal", test="grep -q hello hello.txt")
    done = await h.wait_for(event_log, h.finished(task_id), timeout=60)
    assert done.data.outcome == TaskState.SUCCEEDED, done.data.reason
    events = await task_history(event_log, task_id)
    checks = [(e.data.round, e.data.passed) for e in events if e.type == "validation_checked"]
    assert checks == [(0, False), (1, True)]
    heal_request = api.main_requests[3]
    assert "validation failed" in heal_request.text() or "grep -q hello" in str(
        heal_request.messages
    )
    assert phases(events)[Phase.HEAL] == [PhaseStatus.STARTED, PhaseStatus.SUCCEEDED]


async def test_max_turns_fails_the_run_as_such(
    tmp_path: Path, api: FakeAnthropic, event_log: EventLog, claude_handler: Handler
) -> None:
    """A builder that keeps calling tools past max_turns fails BUILD with reason max_turns."""
    work = tmp_path / "work" / "turns"
    api.script(Turn.text("1. Loop"))
    api.fallback = Turn.tool("Bash", {"command": f"ls {work}"})
    b = body(tmp_path, "turns", agent="claude")
    b["payload"]["max_turns"] = 2
    task_id = (await Commands(event_log).dispatch(b)).task_id
    done = await h.wait_for(event_log, h.finished(task_id), timeout=60)
    assert done.data.outcome == TaskState.FAILED
    assert done.data.reason == "max_turns"
    ended = next(e.data for e in await task_history(event_log, task_id) if e.type == "run_finished")
    assert ended.phase == Phase.BUILD
    assert "turn limit" in ended.error


@pytest.mark.parametrize("status", [401, 529])
async def test_an_api_error_fails_the_run_with_the_error(
    tmp_path: Path, api: FakeAnthropic, event_log: EventLog, claude_handler: Handler, status: int
) -> None:
    """An API error (which Claude Code still calls subtype success) fails the run, by is_error."""
    api.script(Turn.error(status))
    api.fallback = Turn.error(status)
    task_id, _ = await dispatch(event_log, tmp_path, f"err{status}")
    done = await h.wait_for(event_log, h.finished(task_id), timeout=60)
    assert done.data.outcome == TaskState.FAILED
    assert done.data.reason == "builder_error"
    ended = next(e.data for e in await task_history(event_log, task_id) if e.type == "run_finished")
    assert ended.phase == Phase.PLAN
    assert f"API error {status}" in ended.error


async def test_a_builder_that_goes_silent_is_failed_and_killed(
    tmp_path: Path, api: FakeAnthropic, event_log: EventLog, claude_handler: Handler
) -> None:
    """The model stops answering mid-BUILD: the run goes STALE, then FAILED (agent_silent), and
    the CLI's process group is killed."""
    api.script(Turn.text("1. Wait"), Turn.hang())
    task_id, _ = await dispatch(event_log, tmp_path, "silent")
    build = await h.wait_for(
        event_log,
        lambda e: h.of_type(task_id, "builder_started")(e) and e.data.phase == Phase.BUILD,
        timeout=60,
    )
    stale = await h.wait_for(event_log, h.of_type(task_id, "run_stale"), timeout=30)
    assert stale.data.silent_for >= 3.0
    done = await h.wait_for(event_log, h.finished(task_id), timeout=30)
    assert done.data.outcome == TaskState.FAILED
    assert done.data.reason == "agent_silent"
    assert await _gone(build.data.pid), "the silent CLI was not killed"
