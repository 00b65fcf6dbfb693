"""The real Claude Code CLI against the loopback Messages API stand-in (tests/fakes).

The stand-in's own wire format is checked with plain HTTP first (no CLI needed). The CLI tests
need the pinned CLI (see tests/fakes/claude_cli.py); without it they skip, or fail when
SHIPYARD_REQUIRE_CLAUDE=1. With SHIPYARD_CAPTURE_SAMPLES=1 the CLI tests also rewrite the
reference samples tests/data/claude-stream-*.jsonl, with the test's tmp paths replaced by stable
ones (project dir /work/project, HOME /root, the CLI's tmp dir /tmp).
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.fakes.anthropic_api import FakeAnthropic, RecordedRequest, Turn
from tests.fakes.claude_cli import (
    ClaudeRun,
    claude_args,
    claude_env,
    require_claude,
    run_claude,
    sanitize,
)

DATA = Path(__file__).parent / "data"
CAPTURE = os.environ.get("SHIPYARD_CAPTURE_SAMPLES") == "1"

PLAN = """# Plan: add a README

## Context
The project has no README; the dispatch requires one.

## Steps
1. Write README.md with the project name and how to run the tests
2. Run the tests

## Verification
`test -f README.md && python -m pytest -q`
"""

#: An MCP server (stdio) whose one tool approves every permission prompt; passed to the CLI as
#: ``--permission-prompt-tool mcp__shipyard__approve``. Its answer format is the CLI's.
APPROVE_ALL_MCP = """
import json
from mcp.server.mcpserver import MCPServer

server = MCPServer("shipyard")


@server.tool(structured_output=False)
def approve(tool_name: str, input: dict, tool_use_id: str | None = None) -> str:
    return json.dumps({"behavior": "allow", "updatedInput": input})


server.run()
"""


# -- fixtures ------------------------------------------------------------------------------


@dataclass
class Box:
    """Where one test's CLI runs: the project dir and a private HOME / config dir."""

    work: Path
    home: Path

    def sanitize(self, text: str) -> str:
        """Stable paths for saved samples: the project, HOME, and the CLI's tmp/runtime dirs."""
        pairs = [
            (str(self.work), "/work/project"),
            (str(self.home / "tmp"), "/tmp"),
            (str(self.home / "run"), "/run/user/0"),
            (str(self.home), "/root"),
        ]
        slug = re.compile(r"[^A-Za-z0-9]")
        return sanitize(text, pairs + [(slug.sub("-", a), slug.sub("-", b)) for a, b in pairs])


@pytest.fixture
def api() -> Iterator[FakeAnthropic]:
    with FakeAnthropic() as fake:
        yield fake


@pytest.fixture
def box(tmp_path: Path) -> Box:
    work = tmp_path / "work"
    work.mkdir()
    return Box(work, tmp_path / "home")


Claude = Callable[..., ClaudeRun]


@pytest.fixture
def claude(api: FakeAnthropic, box: Box) -> Claude:
    """Run the real CLI in ``box`` against ``api``: ``claude(prompt, *flags, env=..., ...)``."""
    binary = require_claude()

    def run(prompt: str, *extra: str, **kwargs: Any) -> ClaudeRun:
        return run_claude(api.url, box.home, box.work, prompt, *extra, binary=binary, **kwargs)

    return run


def save_sample(name: str, run: ClaudeRun, box: Box) -> None:
    """With SHIPYARD_CAPTURE_SAMPLES=1, store the run's stdout as tests/data/claude-stream-NAME."""
    if not CAPTURE:
        return
    text = box.sanitize(run.stdout)
    assert str(box.work.parent) not in text, "a tmp path survived sanitizing"
    assert "pytest-of-" not in text, "a tmp path survived sanitizing"
    DATA.mkdir(exist_ok=True)
    (DATA / f"claude-stream-{name}.jsonl").write_text(text)


def tool_results(run: ClaudeRun) -> list[dict[str, Any]]:
    """Every tool_result block the CLI printed on ``user`` lines."""
    return [
        block
        for line in run.of_type("user")
        for block in line["message"]["content"]
        if isinstance(block, dict) and block.get("type") == "tool_result"
    ]


def tool_uses(run: ClaudeRun, name: str) -> list[dict[str, Any]]:
    return [
        block
        for line in run.of_type("assistant")
        for block in line["message"]["content"]
        if block.get("type") == "tool_use" and block.get("name") == name
    ]


# -- the stand-in on its own ---------------------------------------------------------------


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def _call(
    api: FakeAnthropic,
    path: str,
    body: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
    method: str = "POST",
) -> Reply:
    conn = http.client.HTTPConnection("127.0.0.1", api.port, timeout=10)
    try:
        data = json.dumps(body) if body is not None else None
        conn.request(method, path, data, {"Content-Type": "application/json", **(headers or {})})
        response = conn.getresponse()
        return Reply(response.status, dict(response.getheaders()), response.read())
    finally:
        conn.close()


def _sse(raw: str) -> list[tuple[str, dict[str, Any]]]:
    events = []
    for chunk in raw.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in chunk.splitlines())
        events.append((fields["event"], json.loads(fields["data"])))
    return events


TOOLS = [{"name": "Write", "input_schema": {"type": "object"}}]


def test_streams_tool_use_as_messages_api_sse(api: FakeAnthropic) -> None:
    """A streamed turn is the Messages API's SSE sequence and its JSON deltas rebuild the input."""
    api.script(Turn.tool("Write", {"file_path": "/x/README.md", "content": "é" * 500}, text="Hi"))
    body = {"model": "m", "messages": [{"role": "user", "content": "go"}], "tools": TOOLS}
    response = _call(api, "/v1/messages", {**body, "stream": True})
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/event-stream")
    events = _sse(response.body.decode())
    names = [name for name, _ in events]
    assert names[:2] == ["message_start", "ping"]
    assert names[-2:] == ["message_delta", "message_stop"]
    assert names.count("content_block_start") == names.count("content_block_stop") == 2
    deltas = [data["delta"] for name, data in events if name == "content_block_delta"]
    assert deltas[0] == {"type": "text_delta", "text": "Hi"}
    partial = "".join(d["partial_json"] for d in deltas if d["type"] == "input_json_delta")
    assert json.loads(partial) == {"file_path": "/x/README.md", "content": "é" * 500}
    final = dict(events)["message_delta"]
    assert final["delta"]["stop_reason"] == "tool_use"
    assert final["usage"]["output_tokens"] > 0
    assert api.main_requests[0].body["messages"][0]["content"] == "go"


def test_answers_plain_json_errors_counts_and_probes(api: FakeAnthropic) -> None:
    """Non-streamed turns are JSON messages; errors, count_tokens and probes answer sensibly."""
    api.script(Turn.text("plain"), Turn.error(529))
    body = {"model": "m", "messages": [{"role": "user", "content": "go"}], "tools": TOOLS}
    message = _call(api, "/v1/messages", body).json()
    assert message["type"] == "message"
    assert message["content"] == [{"type": "text", "text": "plain"}]
    assert message["stop_reason"] == "end_turn"
    overloaded = _call(api, "/v1/messages", body)
    assert overloaded.status == 529
    assert overloaded.json() == {
        "type": "error",
        "error": {"type": "overloaded_error", "message": "Overloaded"},
    }
    assert _call(api, "/v1/messages/count_tokens", body).json()["input_tokens"] > 0
    assert _call(api, "/api/hello", method="HEAD").status == 200
    assert _call(api, "/v1/files", {}).status == 404
    assert [r.role for r in api.requests] == ["main", "main", "count_tokens", "other", "other"]


def test_aux_and_subagent_requests_do_not_eat_main_turns(api: FakeAnthropic) -> None:
    """Tool-less requests get aux_turn and agent-id requests the subagent script, never main's."""
    api.script(Turn.text("main turn"))
    api.script(Turn.text("sub turn"), role="subagent")
    plain = {"model": "haiku", "messages": [{"role": "user", "content": "title?"}]}
    aux = _call(api, "/v1/messages", plain).json()
    assert aux["content"][0]["text"] == "Fake auxiliary answer"
    sub = {**plain, "tools": TOOLS}
    answer = _call(api, "/v1/messages", sub, {"x-claude-code-agent-id": "a1"}).json()
    assert answer["content"][0]["text"] == "sub turn"
    assert _call(api, "/v1/messages", sub).json()["content"][0]["text"] == "main turn"
    assert [r.role for r in api.requests] == ["aux", "subagent", "main"]


@pytest.mark.parametrize("path", sorted(DATA.glob("claude-stream-*.jsonl")), ids=lambda p: p.name)
def test_saved_samples_are_stream_json(path: Path) -> None:
    """Each saved sample is JSONL that starts with system/init and ends with a result line."""
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert (lines[0]["type"], lines[0]["subtype"]) == ("system", "init")
    assert lines[-1]["type"] == "result"
    assert "pytest-of-" not in path.read_text()


# -- the real CLI ----------------------------------------------------------------------------


def test_write_tool_creates_readme_and_result_succeeds(
    api: FakeAnthropic, box: Box, claude: Claude
) -> None:
    """The scripted model's Write really creates README.md; the result line reports success."""
    readme = box.work / "README.md"
    api.script(
        Turn.tool("Write", {"file_path": str(readme), "content": "# Demo\n"}, text="Writing it."),
        Turn.text("Created README.md."),
    )
    run = claude("Create README.md")
    save_sample("success", run, box)

    assert run.returncode == 0, run.stderr
    assert readme.read_text() == "# Demo\n"
    result = run.result
    assert result["subtype"] == "success"
    assert result["is_error"] is False
    assert result["session_id"] == run.init["session_id"]
    assert result["num_turns"] == 2
    assert result["total_cost_usd"] > 0
    assert result["result"] == "Created README.md."
    # the tool's outcome went back to "the model"
    (sent,) = api.main_requests[1].tool_results()
    assert sent["tool_use_id"] == tool_uses(run, "Write")[0]["id"]
    assert "File created successfully" in str(sent["content"])
    assert not api.aux_requests


def test_resume_sends_the_earlier_conversation(api: FakeAnthropic, claude: Claude) -> None:
    """--resume <session_id> continues the session: the stand-in sees the earlier messages."""
    api.script(Turn.text("first answer 111"), Turn.text("second answer 222"))
    first = claude("first prompt AAA")
    session = first.result["session_id"]
    second = claude("second prompt BBB", "--resume", session)

    assert second.returncode == 0, second.stderr
    assert second.result["session_id"] == session
    assert second.result["result"] == "second answer 222"
    resumed = api.main_requests[-1].text()
    for earlier in ("first prompt AAA", "first answer 111", "second prompt BBB"):
        assert earlier in resumed
    assert [m["role"] for m in api.main_requests[-1].messages][-2:] == ["assistant", "user"]


def test_401_gives_an_error_result(api: FakeAnthropic, box: Box, claude: Claude) -> None:
    """A 401 (retried once, then given up) ends in a result line with is_error: true."""
    api.fallback = Turn.error(401)
    run = claude("Create README.md", env={"CLAUDE_CODE_MAX_RETRIES": "1"})
    save_sample("401", run, box)

    assert run.returncode == 1
    result = run.result
    assert result["is_error"] is True
    assert result["subtype"] == "success"  # sic: only is_error tells
    assert result["api_error_status"] == 401
    assert result["terminal_reason"] == "api_error"
    (retry,) = [line for line in run.of_type("system") if line.get("subtype") == "api_retry"]
    assert retry["error_status"] == 401
    (error,) = run.of_type("assistant")
    assert error["error"] == "authentication_failed"
    assert error["message"]["model"] == "<synthetic>"
    assert len(api.main_requests) == 2


def test_overloaded_is_retried_with_api_retry_lines(api: FakeAnthropic, claude: Claude) -> None:
    """529s are retried (one system/api_retry line each) and the run then succeeds."""
    api.script(Turn.error(529), Turn.error(529), Turn.text("made it"))
    run = claude("hello", env={"CLAUDE_CODE_MAX_RETRIES": "2"})

    retries = [line for line in run.of_type("system") if line.get("subtype") == "api_retry"]
    assert [(r["attempt"], r["error_status"], r["error"]) for r in retries] == [
        (1, 529, "overloaded"),
        (2, 529, "overloaded"),
    ]
    assert run.result["is_error"] is False
    assert run.result["result"] == "made it"


def test_max_turns_gives_error_max_turns(api: FakeAnthropic, claude: Claude) -> None:
    """--max-turns 1 with a model that keeps calling tools ends in subtype error_max_turns."""
    api.fallback = Turn.tool("Bash", {"command": "echo again"})
    run = claude("Loop forever", "--max-turns", "1")

    assert run.returncode == 1
    assert run.result["subtype"] == "error_max_turns"
    assert run.result["is_error"] is True
    assert run.result["terminal_reason"] == "max_turns"
    assert tool_results(run)[0]["content"] == "again"  # the tool really ran


async def test_hung_api_leaves_the_agent_silent(api: FakeAnthropic, box: Box) -> None:
    """A request the stand-in never answers leaves the CLI running and silent after init."""
    binary = require_claude()
    api.script(Turn.hang())
    proc = await asyncio.create_subprocess_exec(
        *claude_args(binary, "Do it"),
        cwd=box.work,
        env=claude_env(api.url, box.home),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        await asyncio.to_thread(api.wait_for, 1)
        assert proc.stdout is not None
        lines = []
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2):
                while line := await proc.stdout.readline():
                    lines.append(json.loads(line))
        assert proc.returncode is None
        assert [(line["type"], line.get("subtype")) for line in lines] == [("system", "init")]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.communicate()


def _plan_file(request: RecordedRequest) -> str:
    """The plan file path that plan mode's instructions name."""
    match = re.search(r"create your plan at (\S+?\.md)", request.text())
    assert match, "plan mode instructions not found in the request"
    return match.group(1)


def test_plan_mode_plan_in_plan_file_and_result(
    api: FakeAnthropic, box: Box, claude: Claude
) -> None:
    """In -p plan mode the plan lands in the plan file and the result; ExitPlanMode is refused."""
    api.script(
        lambda req: Turn.tool(
            "Write", {"file_path": _plan_file(req), "content": PLAN}, text="Writing the plan."
        ),
        Turn.tool("ExitPlanMode", {"plan": PLAN}),
        Turn.text(PLAN),
    )
    run = claude("Plan a README for this project", permission_mode="plan")
    save_sample("plan", run, box)

    assert run.init["permissionMode"] == "plan"
    assert "ExitPlanMode" not in run.init["tools"]
    (write,) = tool_uses(run, "Write")
    plan_file = Path(write["input"]["file_path"])
    assert plan_file.parent == box.home / ".claude" / "plans"
    assert plan_file.read_text() == PLAN
    (exit_plan,) = tool_uses(run, "ExitPlanMode")
    assert exit_plan["input"]["plan"] == PLAN
    refused = tool_results(run)[-1]
    assert refused["is_error"] is True
    assert "ExitPlanMode is disabled" in refused["content"]
    assert run.result["is_error"] is False
    assert run.result["result"] == PLAN
    assert not (box.work / "README.md").exists()


def test_plan_approved_through_a_permission_prompt_tool(
    api: FakeAnthropic, box: Box, claude: Claude
) -> None:
    """With --permission-prompt-tool, ExitPlanMode works: the CLI puts the plan in its input."""
    api.script(
        lambda req: Turn.tool(
            "Write", {"file_path": _plan_file(req), "content": PLAN}, text="Writing the plan."
        ),
        Turn.tool("ExitPlanMode", {}),  # as 2.1.330 instructs: the plan is in the file
        Turn.tool("Write", {"file_path": str(box.work / "README.md"), "content": "# Demo\n"}),
        Turn.text("README.md written."),
    )
    mcp = {"mcpServers": {"shipyard": {"command": sys.executable, "args": ["-c", APPROVE_ALL_MCP]}}}
    run = claude(
        "Plan a README for this project",
        "--mcp-config",
        json.dumps(mcp),
        "--strict-mcp-config",
        "--permission-prompt-tool",
        "mcp__shipyard__approve",
        permission_mode="plan",
    )
    save_sample("plan-approved", run, box)

    assert "ExitPlanMode" in run.init["tools"]
    (exit_plan,) = tool_uses(run, "ExitPlanMode")
    assert exit_plan["input"]["plan"] == PLAN
    assert exit_plan["input"]["planFilePath"] == tool_uses(run, "Write")[0]["input"]["file_path"]
    modes = [line["permissionMode"] for line in run.of_type("system") if "permissionMode" in line]
    assert modes == ["plan", "default"]  # init, then the status line after approval
    approved = next(r for r in tool_results(run) if r["tool_use_id"] == exit_plan["id"])
    assert "## Approved Plan:\n" + PLAN in approved["content"]
    assert (box.work / "README.md").exists()  # approval lets the same run go on building
    assert run.result["is_error"] is False


def test_todowrite_shows_in_the_stream(api: FakeAnthropic, box: Box, claude: Claude) -> None:
    """TodoWrite (enabled by env) appears as tool_use input.todos and tool_use_result.newTodos."""
    todos = [
        {"content": "Write README.md", "status": "in_progress", "activeForm": "Writing README"},
        {"content": "Run the tests", "status": "pending", "activeForm": "Running the tests"},
    ]
    done = [dict(todo, status="completed") for todo in todos]
    api.script(
        Turn.tool("TodoWrite", {"todos": todos}, text="Two steps."),
        Turn.tool("Write", {"file_path": str(box.work / "README.md"), "content": "# Demo\n"}),
        Turn.tool("TodoWrite", {"todos": done}),
        Turn.text("All done."),
    )
    env = {"CLAUDE_CODE_ENABLE_TASKS": "0", "CLAUDE_CODE_ENABLE_TODO_TOOLS": "1"}
    run = claude("Create README.md and run the tests", env=env)
    save_sample("todowrite", run, box)

    assert "TodoWrite" in run.init["tools"]
    assert [use["input"]["todos"] for use in tool_uses(run, "TodoWrite")] == [todos, done]
    results = [line["tool_use_result"] for line in run.of_type("user")]
    assert results[0] == {"oldTodos": [], "newTodos": todos}
    assert results[2] == {"oldTodos": todos, "newTodos": done}
    assert run.result["is_error"] is False
    assert run.result["num_turns"] == 4


def test_task_tools_show_in_the_stream(api: FakeAnthropic, box: Box, claude: Claude) -> None:
    """With the todo tools on and tasks left on, the checklist is TaskCreate / TaskUpdate."""

    def complete_first(req: RecordedRequest) -> Turn:
        match = re.search(r"#(\w+)", str(req.tool_results()[0]["content"]))
        assert match, req.tool_results()
        return Turn.tool("TaskUpdate", {"taskId": match.group(1), "status": "completed"})

    api.script(
        Turn.tool(
            "TaskCreate",
            {
                "subject": "Write README.md",
                "description": "Title and usage",
                "activeForm": "Writing",
            },
        ),
        complete_first,
        Turn.text("Done."),
    )
    run = claude("Create README.md", env={"CLAUDE_CODE_ENABLE_TODO_TOOLS": "1"})
    save_sample("tasks", run, box)

    assert {"TaskCreate", "TaskUpdate"} <= set(run.init["tools"])
    assert "TodoWrite" not in run.init["tools"]
    created, updated = (line["tool_use_result"] for line in run.of_type("user"))
    assert created["task"]["subject"] == "Write README.md"
    assert updated["success"] is True
    assert updated["statusChange"]["to"] == "completed"
    assert run.result["is_error"] is False


def test_subagent_requests_use_their_own_script(
    api: FakeAnthropic, box: Box, claude: Claude
) -> None:
    """An Agent tool call's subagent is served from the subagent script, not the main one."""
    api.script(
        Turn.tool("Agent", {"description": "Look around", "prompt": "List the files"}),
        Turn.text("Waiting for the helper."),
        Turn.text("The helper found nothing."),
    )
    api.script(Turn.text("No files here."), role="subagent")
    run = claude("Ask a helper what is here")
    save_sample("subagent", run, box)

    assert run.result["is_error"] is False
    assert run.result["result"] == "The helper found nothing."
    (sub,) = api.subagent_requests
    assert "List the files" in sub.text()
    assert "cc_is_subagent=true" in json.dumps(sub.body["system"])
    sub_lines = [line for line in run.lines if line.get("parent_tool_use_id")]
    assert sub_lines and all(line.get("agent_id") for line in sub_lines)
