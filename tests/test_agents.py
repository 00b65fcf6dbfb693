"""The agent integrations: `shipyard init claude` / `init openclaw`, the SessionStart inbox
hook, the MCP server over stdio (driven by the `mcp` client library), and the builder-role
token a handler gives each builder — all against a real `shipyard up`."""

from __future__ import annotations

import json
import os
import shlex
import stat
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mcp.client.session import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client

from tests.conftest import Up, up_with_agent
from tests.samples import dispatch_body, hello_body

MESSENGER = str(Path(__file__).parent / "builders" / "messenger.py")


def run_cli(data: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SHIPYARD_DATA_DIR": str(data)}
    return subprocess.run(
        [sys.executable, "-m", "shipyard.cli", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def shipyard(tmp_path: Path) -> Iterator[Up]:
    """`shipyard up` whose `messenger` agent reports what its builder token may do."""
    running = up_with_agent(
        tmp_path,
        "messenger",
        [sys.executable, MESSENGER, "{phase}"],
        agent_env={"SHIPYARD_TEST_OUT": str(tmp_path / "messenger.json")},
        env={"SHIPYARD_ADMIN_TOKEN": "sy_admin-token-for-the-test-only"},
    )
    yield running
    running.stop()


def http(url: str, token: str, method: str = "GET", body: Any = None) -> tuple[int, Any]:
    request = urllib.request.Request(
        url,
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def gateway_url(up: Up) -> str:
    info = json.loads((up.data_dir / "instance.json").read_text())
    return str(info["gateway_url"])


# --- init claude ---------------------------------------------------------------------------


def test_init_claude_merges_into_a_project_and_keeps_what_was_there(tmp_path: Path) -> None:
    """`init claude` adds its CLAUDE.md block, SessionStart hook and MCP server next to the
    user's own content; running it twice changes nothing more; the token stays out of the
    project, readable by its owner only."""
    project, data = tmp_path / "project", tmp_path / "data"
    (project / ".claude").mkdir(parents=True)
    (project / "CLAUDE.md").write_text("# My project\n\nUse tabs.\n")
    theirs = {
        "permissions": {"allow": ["Bash(ls:*)"]},
        "hooks": {"SessionStart": [{"hooks": [{"type": "command", "command": "echo hi"}]}]},
    }
    (project / ".claude" / "settings.json").write_text(json.dumps(theirs))
    (project / ".mcp.json").write_text(json.dumps({"mcpServers": {"other": {"command": "x"}}}))

    for _ in range(2):
        result = run_cli(data, "init", "claude", str(project), "--agent", "builder-a")
        assert result.returncode == 0, result.stderr

    claude_md = (project / "CLAUDE.md").read_text()
    assert claude_md.startswith("# My project\n\nUse tabs.\n")
    assert claude_md.count("<!-- shipyard:begin") == 1
    for words in ("## Task", "## Requirements", "## Environment", "## Deliverables", "README.md"):
        assert words in claude_md
    assert "You are agent `builder-a`" in claude_md

    settings = json.loads((project / ".claude" / "settings.json").read_text())
    assert settings["permissions"] == theirs["permissions"]
    commands = [h["command"] for e in settings["hooks"]["SessionStart"] for h in e["hooks"]]
    assert commands[0] == "echo hi"
    assert len(commands) == 2
    assert shlex.split(commands[1])[-6:] == [
        "inbox",
        "--agent",
        "builder-a",
        "--hook",
        "--data-dir",
        str(data),
    ]

    servers = json.loads((project / ".mcp.json").read_text())["mcpServers"]
    assert servers["other"] == {"command": "x"}
    ours = [servers["shipyard"]["command"], *servers["shipyard"]["args"]]
    assert ours[-5:] == ["mcp", "--agent", "builder-a", "--data-dir", str(data)]

    token_file = data / "agents" / "builder-a.token"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    token = token_file.read_text().strip()
    assert token not in "".join(p.read_text() for p in project.rglob("*") if p.is_file())


def test_init_claude_refuses_a_settings_file_it_cannot_read(tmp_path: Path) -> None:
    """A .claude/settings.json that is not JSON is reported and left exactly as it was."""
    project = tmp_path / "project"
    (project / ".claude").mkdir(parents=True)
    broken = '{"hooks": {,}'
    (project / ".claude" / "settings.json").write_text(broken)
    result = run_cli(tmp_path / "data", "init", "claude", str(project))
    assert result.returncode == 1
    assert "settings.json is not valid JSON" in result.stderr
    assert (project / ".claude" / "settings.json").read_text() == broken


def test_init_openclaw_writes_a_skill_with_front_matter(tmp_path: Path) -> None:
    """`init openclaw DIR` writes DIR/shipyard/SKILL.md with name, description and the
    `shipyard` binary under metadata.openclaw.requires.bins, and teaches the four sections."""
    result = run_cli(tmp_path / "data", "init", "openclaw", str(tmp_path / "skills"))
    assert result.returncode == 0, result.stderr
    text = (tmp_path / "skills" / "shipyard" / "SKILL.md").read_text()
    front, body = text.split("---\n")[1], text.split("---\n", 2)[2]
    lines = front.splitlines()
    assert "name: shipyard" in lines
    assert any(line.startswith("description: ") and len(line) > 40 for line in lines)
    start = lines.index("metadata:")
    assert lines[start + 1 : start + 5] == [
        "  openclaw:",
        '    emoji: "🏗️"',
        "    requires:",
        "      bins:",
    ]
    assert lines[start + 5] == "        - shipyard"
    for words in ("## Task", "## Requirements", "## Environment", "## Deliverables"):
        assert words in body
    for command in ("shipyard dispatch", "shipyard status", "shipyard inbox", "shipyard escalate"):
        assert command in body
    assert '"dispatcher": "openclaw"' in body
    assert f"--data-dir {tmp_path / 'data'}" in body


# --- with a running shipyard ---------------------------------------------------------------


def test_session_start_hook_puts_unread_messages_into_context_once(
    shipyard: Up, tmp_path: Path
) -> None:
    """The hook command that `init claude` writes prints the agent's unread messages as
    SessionStart context and marks them read, so the next session does not see them again."""
    project = tmp_path / "project"
    project.mkdir()
    assert shipyard.cli("init", "claude", str(project)).returncode == 0
    sent = shipyard.cli(
        "send", "--from", "openclaw", "--to", "claude", "--type", "directive", "Ship on Friday."
    )
    assert sent.returncode == 0, sent.stderr
    settings = json.loads((project / ".claude" / "settings.json").read_text())
    command = settings["hooks"]["SessionStart"][-1]["hooks"][0]["command"]

    def hook() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            shlex.split(command), env=shipyard.env, capture_output=True, text=True, timeout=60
        )

    first = hook()
    assert first.returncode == 0, first.stderr
    output = json.loads(first.stdout)["hookSpecificOutput"]
    assert output["hookEventName"] == "SessionStart"
    assert "[directive] from openclaw" in output["additionalContext"]
    assert "Ship on Friday." in output["additionalContext"]
    again = hook()
    assert (again.returncode, again.stdout) == (0, "")


def test_session_start_hook_never_fails_the_session(tmp_path: Path) -> None:
    """With no Shipyard running, the hook says why on stderr and still exits 0."""
    result = run_cli(tmp_path / "data", "inbox", "--agent", "claude", "--hook")
    assert result.returncode == 0
    assert result.stdout == ""
    assert "no Shipyard is running" in result.stderr


async def test_mcp_server_over_stdio(shipyard: Up, tmp_path: Path) -> None:
    """The MCP client lists the tools, sends and reads messages, replies in the thread,
    checks a task; `dispatch` is refused with a builder token and works with a dispatcher's."""
    assert shipyard.cli("init", "claude", str(tmp_path), "--agent", "claude").returncode == 0
    asked = shipyard.cli(
        "send", "--from", "openclaw", "--to", "claude", "--type", "question", "Which port?"
    )
    assert asked.returncode == 0, asked.stderr
    env = {"SHIPYARD_DATA_DIR": str(shipyard.data_dir), "PATH": os.environ["PATH"]}
    params = StdioServerParameters(
        command=sys.executable, args=["-m", "shipyard.cli", "mcp", "--agent", "claude"], env=env
    )
    async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
        await session.initialize()
        names = {tool.name for tool in (await session.list_tools()).tools}
        assert names >= {"send_message", "read_inbox", "reply", "task_status", "dispatch"}

        inbox = await session.call_tool("read_inbox", {})
        assert not inbox.is_error, inbox.content
        messages = inbox.structured_content["messages"]
        question = next(m for m in messages if m["body"] == "Which port?")
        answered = await session.call_tool(
            "reply", {"message_id": question["message_id"], "body": "7780"}
        )
        assert not answered.is_error, answered.content
        assert answered.structured_content["thread_id"] == question["thread_id"]

        sent = await session.call_tool(
            "send_message", {"to": "codex", "body": "Your turn.", "type": "directive"}
        )
        assert not sent.is_error, sent.content

        refused = await session.call_tool("dispatch", {"request": dispatch_body()})
        assert refused.is_error
        assert "not allowed with this agent's token" in refused.content[0].text

        again = await session.call_tool("read_inbox", {})
        assert not any(m["body"] == "Which port?" for m in again.structured_content["messages"])

    thread = json.loads(shipyard.cli("thread", question["thread_id"], "--json").stdout)
    reply = thread[-1]
    assert (reply["sender"], reply["recipient"], reply["body"]) == ("claude", "openclaw", "7780")
    assert reply["reply_to"] == question["message_id"]
    assert reply["read_by"] == [] and "claude" in thread[0]["read_by"]

    dispatcher = shipyard.cli("token", "create", "--role", "dispatcher", "--name", "planner")
    env["SHIPYARD_TOKEN"] = dispatcher.stdout.strip()
    params = StdioServerParameters(
        command=sys.executable, args=["-m", "shipyard.cli", "mcp", "--agent", "planner"], env=env
    )
    workdir = str(tmp_path / "work" / "mcp")
    async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
        await session.initialize()
        made = await session.call_tool("dispatch", {"request": dispatch_body(workdir=workdir)})
        assert not made.is_error, made.content
        task_id = made.structured_content["task_id"]
        status = await session.call_tool("task_status", {"task_id": task_id})
        assert not status.is_error, status.content
        assert status.structured_content["task_id"] == task_id
        assert status.structured_content["title"] == "Add a health endpoint"
        missing = await session.call_tool("task_status", {"task_id": "t-nosuchtask"})
        assert missing.is_error and "no task" in missing.content[0].text.lower()


def test_a_builder_gets_a_run_scoped_builder_token(shipyard: Up, tmp_path: Path) -> None:
    """The handler gives each builder its agent's name, the gateway URL and a builder-role
    token: it may message as itself and read its own inbox, but not speak for others,
    dispatch, cancel, escalate or read another inbox; the handler's own secrets are not in its
    environment; and the token stops working when the run ends."""
    body = hello_body(str(tmp_path / "work" / "msg"))
    task_id = shipyard.cli("dispatch", "-", stdin=json.dumps(body)).stdout.strip()
    line = shipyard.wait_finished(task_id)
    assert "task succeeded" in line

    seen = json.loads((tmp_path / "messenger.json").read_text())
    assert seen["agent"] == "messenger"
    assert seen["url"] == gateway_url(shipyard)
    assert not seen["admin_token_leaked"]
    assert (seen["send_as_self"], seen["own_inbox"]) == (201, 200)
    for forbidden in ("send_as_other", "dispatch", "cancel", "escalate", "other_inbox"):
        assert seen[forbidden] == 403, forbidden
    # The same over NATS, with the agent's own NATS user and the `shipyard` CLI.
    nats = seen["nats"]
    assert seen["nats_user"] == "builder-messenger"
    assert nats["send_as_self"]["exit"] == 0, nats["send_as_self"]
    assert nats["own_inbox"]["exit"] == 0, nats["own_inbox"]
    assert json.loads(nats["own_inbox"]["said"])["agent"] == "messenger"
    for forbidden in ("send_as_other", "other_inbox", "dispatch", "cancel", "events"):
        assert nats[forbidden]["exit"] != 0, forbidden
        assert "Traceback" not in nats[forbidden]["said"], nats[forbidden]
    assert "may not use sy.cmd.send.openclaw" in nats["send_as_other"]["said"]
    assert "may not use sy.qry.inbox.openclaw" in nats["other_inbox"]["said"]
    assert "may not use sy.cmd.dispatch" in nats["dispatch"]["said"]
    status, _ = http(gateway_url(shipyard) + "/api/status", seen["token"])
    assert status == 401, "the run's token outlived the run"
    inbox = json.loads(shipyard.cli("inbox", "--agent", "openclaw", "--json").stdout)
    assert any(m["sender"] == "messenger" and m["body"] == "built it" for m in inbox["messages"])
    assert any(m["sender"] == "messenger" and m["body"] == "over NATS" for m in inbox["messages"])
    assert not any(m["body"] == "spoofed" for m in inbox["messages"])
