"""Runners: argv and environment for each kind of builder, and the parsers of their output,
checked against output captured from the real programs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shipyard.events.types import Phase
from shipyard.handler.runners import make_runner
from shipyard.handler.runners.base import Invocation, Outcome, Parser, Update
from shipyard.settings import AgentSettings

DATA = Path(__file__).parent / "data"


def inv(phase: Phase = Phase.BUILD, session: str = "") -> Invocation:
    return Invocation(
        prompt="do it; rm -rf / `echo $HOME`",
        cwd=Path("/work/project"),
        phase=phase,
        max_turns=7,
        task_id="t-1",
        run_id="r-1",
        session_id=session,
    )


def feed(parser: Parser, path: Path, exit_code: int) -> tuple[list[Update], Outcome]:
    updates: list[Update] = []
    for line in path.read_text().splitlines():
        updates.extend(parser.feed(line))
    return updates, parser.finish(exit_code, [])


def claude_parser() -> Parser:
    return make_runner("claude", AgentSettings(kind="claude")).parser(inv())


def test_claude_argv_passes_the_prompt_as_one_argument() -> None:
    """The prompt is one argv element (no shell); BUILD resumes the session; PLAN uses plan mode."""
    runner = make_runner("c", AgentSettings(kind="claude", model="opus", allowed_tools=["Read"]))
    argv = runner.argv(inv(session="s-1"))
    assert argv[:3] == ["claude", "-p", "do it; rm -rf / `echo $HOME`"]
    assert argv[argv.index("--output-format") + 1] == "stream-json"
    assert "--verbose" in argv
    assert argv[argv.index("--max-turns") + 1] == "7"
    assert argv[argv.index("--resume") + 1] == "s-1"
    assert argv[argv.index("--permission-mode") + 1] == "bypassPermissions"
    assert argv[argv.index("--allowedTools") + 1] == "Read"
    plan = runner.argv(inv(Phase.PLAN))
    assert plan[plan.index("--permission-mode") + 1] == "plan"
    assert "--resume" not in plan


def test_claude_env_drops_claudecode_and_adds_the_agent_env() -> None:
    """CLAUDECODE never reaches the builder; the agent's own env does."""
    runner = make_runner("c", AgentSettings(kind="claude", env={"FOO": "bar"}))
    env = runner.env(inv(), {"CLAUDECODE": "1", "PATH": "/bin"})
    assert "CLAUDECODE" not in env
    assert env["FOO"] == "bar"
    assert env["PATH"] == "/bin"
    assert env["SHIPYARD_TASK_ID"] == "t-1"


def test_claude_success_sample() -> None:
    """A successful run: session id, turns, cost and tokens from the result line; the Write
    tool call is reported."""
    updates, out = feed(claude_parser(), DATA / "claude-stream-success.jsonl", 0)
    assert out.ok
    assert out.session_id
    assert out.turns == 2
    assert out.cost_usd == pytest.approx(0.096608)
    assert out.tokens_in > 0
    assert out.tool_calls == 1
    assert [u.tool for u in updates if u.kind == "tool"] == ["Write"]


def test_claude_api_error_is_a_failure_despite_subtype_success() -> None:
    """A 401 says subtype success, but is_error makes it a failure, with the API status."""
    lines = (DATA / "claude-stream-401.jsonl").read_text().splitlines()
    result = json.loads(lines[-1])
    assert result["subtype"] == "success"
    assert result["is_error"] is True
    updates, out = feed(claude_parser(), DATA / "claude-stream-401.jsonl", 1)
    assert not out.ok
    assert out.error.startswith("API error 401")
    assert any(u.kind == "retry" for u in updates)


def test_claude_plan_sample_yields_the_plan_text() -> None:
    """In plan mode the plan is what the model proposed (the final text or ExitPlanMode)."""
    _, out = feed(claude_parser(), DATA / "claude-stream-plan.jsonl", 0)
    assert out.ok
    assert "Write README.md" in out.plan


def test_claude_todowrite_sample_reports_the_checklist() -> None:
    """TodoWrite calls become todo updates with each item's status."""
    updates, _ = feed(claude_parser(), DATA / "claude-stream-todowrite.jsonl", 0)
    todos = [u.todos for u in updates if u.kind == "todos"]
    assert [t.status for t in todos[0]] == ["in_progress", "pending"]
    assert [t.status for t in todos[-1]] == ["completed", "completed"]
    assert todos[0][0].title == "Write README.md"


def test_claude_task_tools_sample_reports_the_checklist() -> None:
    """TaskCreate / TaskUpdate (newer models' checklist) also become todo updates."""
    updates, _ = feed(claude_parser(), DATA / "claude-stream-tasks.jsonl", 0)
    todos = [u.todos for u in updates if u.kind == "todos"]
    assert todos, "no checklist seen"
    assert all(t.title for t in todos[-1])
    assert any(t.status == "completed" for t in todos[-1])


def test_claude_subagent_sample_uses_the_last_result() -> None:
    """With a subagent there are two result lines; the last one counts."""
    parser = claude_parser()
    _, out = feed(parser, DATA / "claude-stream-subagent.jsonl", 0)
    results = [
        json.loads(line)
        for line in (DATA / "claude-stream-subagent.jsonl").read_text().splitlines()
        if '"type":"result"' in line.replace(" ", "")
    ]
    assert len(results) >= 1
    assert out.turns == results[-1]["num_turns"]
    assert out.ok


def test_claude_without_a_result_line_is_a_failure() -> None:
    """A CLI that dies before printing a result fails with its exit status and stderr."""
    parser = claude_parser()
    parser.feed('{"type":"system","subtype":"init","session_id":"s"}')
    out = parser.finish(2, ["Error: something exploded"])
    assert not out.ok
    assert "status 2" in out.error
    assert "something exploded" in out.error


CODEX_LINES = [
    {"type": "thread.started", "thread_id": "th-1"},
    {"type": "turn.started"},
    {
        "type": "item.started",
        "item": {"id": "i1", "type": "command_execution", "command": "ls", "status": "in_progress"},
    },
    {
        "type": "item.updated",
        "item": {
            "id": "i2",
            "type": "todo_list",
            "items": [
                {"text": "write code", "completed": True},
                {"text": "test", "completed": False},
            ],
        },
    },
    {"type": "item.completed", "item": {"id": "i3", "type": "agent_message", "text": "All done"}},
    {"type": "turn.completed", "usage": {"input_tokens": 100, "output_tokens": 20}},
]


def test_codex_jsonl_is_parsed() -> None:
    """codex exec --json: thread id, todo_list, tool items, usage and the last message."""
    runner = make_runner("x", AgentSettings(kind="codex"))
    argv = runner.argv(inv(session="th-0"))
    assert argv[:4] == ["codex", "exec", "resume", "th-0"]
    assert "--json" in argv
    assert argv[-1] == inv().prompt
    parser = runner.parser(inv())
    updates = [u for line in CODEX_LINES for u in parser.feed(json.dumps(line))]
    out = parser.finish(0, [])
    assert out.ok
    assert out.session_id == "th-1"
    assert out.tokens_in == 100
    assert out.result == "All done"
    todos = next(u.todos for u in updates if u.kind == "todos")
    assert [(t.title, t.status) for t in todos] == [
        ("write code", "completed"),
        ("test", "pending"),
    ]
    assert [u.tool for u in updates if u.kind == "tool"] == ["command_execution"]


def test_codex_turn_failed_is_a_failure() -> None:
    """turn.failed ends the call as a failure with its message."""
    parser = make_runner("x", AgentSettings(kind="codex")).parser(inv())
    parser.feed(json.dumps({"type": "turn.failed", "error": {"message": "quota exceeded"}}))
    out = parser.finish(1, [])
    assert not out.ok
    assert out.error == "quota exceeded"


def test_command_runner_fills_placeholders_per_argument() -> None:
    """{prompt} and friends become whole arguments; nothing passes through a shell."""
    runner = make_runner(
        "s", AgentSettings(kind="command", command=["/bin/build", "--phase={phase}", "{prompt}"])
    )
    assert runner.argv(inv()) == ["/bin/build", "--phase=build", inv().prompt]
    assert runner.env(inv(), {})["SHIPYARD_PROMPT"] == inv().prompt
    parser = runner.parser(inv())
    parser.feed("step 1")
    assert parser.finish(0, []).ok
    assert not runner.parser(inv()).finish(3, ["boom"]).ok
