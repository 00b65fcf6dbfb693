"""The `shipyard` command as a user runs it, against a real `shipyard up`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from shipyard.cli import build_parser
from tests.conftest import Up, up_with_agent
from tests.handlers import SCRIPTED
from tests.samples import dispatch_body, hello_body

SUBCOMMANDS = sorted(
    name
    for action in build_parser()._subparsers._group_actions  # type: ignore[union-attr]
    for name in getattr(action, "choices", {})
)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shipyard.cli", *args], capture_output=True, text=True, timeout=60
    )


def test_help_lists_every_subcommand() -> None:
    """`shipyard --help` exits 0 and names each sub-command."""
    result = run_cli("--help")
    assert result.returncode == 0
    for name in SUBCOMMANDS:
        assert name in result.stdout


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_every_subcommand_has_help(name: str) -> None:
    """`shipyard NAME --help` exits 0 with a usage line and a description."""
    result = run_cli(name, "--help")
    assert result.returncode == 0
    assert result.stdout.startswith(f"usage: shipyard {name}")
    nested = {"token": ["create"], "init": ["claude", "openclaw"]}.get(name)
    for action in nested or []:
        result = run_cli(name, action, "--help")
        assert result.returncode == 0
        assert result.stdout.startswith(f"usage: shipyard {name} {action}")
        assert "--data-dir" in result.stdout
    if name == "token":
        assert "--role" in result.stdout
    assert "--data-dir" in result.stdout


def test_dispatch_in_a_second_terminal_needs_no_flags(up: Up) -> None:
    """With `up` running, `shipyard dispatch FILE` finds it through the data dir alone."""
    path = up.data_dir.parent / "task.json"
    path.write_text(json.dumps(dispatch_body()))
    result = up.cli("dispatch", str(path))
    assert result.returncode == 0, result.stderr
    task_id = result.stdout.strip()
    assert task_id.startswith("t-")

    trail = up.cli("events", "--task", task_id)
    assert trail.returncode == 0
    assert "task_dispatched" in trail.stdout
    assert "by dispatcher:openclaw" in trail.stdout
    assert "'Add a health endpoint'" in trail.stdout


def test_dispatch_json_prints_the_task_record(up: Up) -> None:
    """`dispatch --json` prints the whole record, including the parsed environment."""
    result = up.cli("dispatch", "-", "--json", stdin=json.dumps(dispatch_body()))
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["task"]["working_dir"] == "/srv/app"
    assert record["task"]["validation_command"] == "python -m pytest -q"
    assert record["duplicate"] is False


def test_rejected_dispatch_exits_1_with_problems_and_template(up: Up) -> None:
    """A bad dispatch exits 1, lists each problem and shows the section template."""
    body = dispatch_body(priority="asap")
    body["payload"]["prompt"] = "## Task\nDo it"
    result = up.cli("dispatch", "-", stdin=json.dumps(body))
    assert result.returncode == 1
    assert "priority: must be one of low, normal, high, urgent" in result.stderr
    assert "missing section `## Requirements`" in result.stderr
    assert "## Deliverables" in result.stderr
    assert "Traceback" not in result.stderr
    trail = up.cli("events", "--json")
    recorded = [json.loads(line) for line in trail.stdout.splitlines()]
    assert [e["type"] for e in recorded if e["aggregate"] != "handler"] == ["dispatch_rejected"]


def test_idempotent_dispatch_prints_the_same_id(up: Up) -> None:
    """Sending a dispatch twice with one idempotency key prints the first task's id."""
    body = json.dumps(dispatch_body(idempotency_key="deploy-42"))
    first = up.cli("dispatch", "-", stdin=body)
    second = up.cli("dispatch", "-", stdin=body)
    assert first.returncode == second.returncode == 0
    assert second.stdout.split()[0] == first.stdout.strip()
    assert "already dispatched" in second.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("dispatch", "/nonexistent/task.json"), "cannot read /nonexistent/task.json"),
        (("events", "--task", "bad.id"), "is not a task id"),
    ],
)
def test_user_mistakes_get_a_sentence_not_a_traceback(
    up: Up, args: tuple[str, ...], message: str
) -> None:
    """Mistakes on the command line exit 1 with one clear line."""
    result = up.cli(*args)
    assert result.returncode == 1
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_commands_without_a_running_instance_say_how_to_start_one(tmp_path: Path) -> None:
    """With nothing running on the data dir, the CLI says to run `shipyard up`."""
    result = run_cli("--version")
    assert result.returncode == 0
    result = subprocess.run(
        [sys.executable, "-m", "shipyard.cli", "events", "--data-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "shipyard up" in result.stderr


def test_unknown_role_is_refused(tmp_path: Path) -> None:
    """`up --roles` with a role that does not exist names the valid ones."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "shipyard.cli",
            "up",
            "--roles",
            "wizard",
            "--data-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "unknown role wizard" in result.stderr


def test_cancel_and_retry_from_the_command_line(tmp_path: Path) -> None:
    """`cancel` ends a queued task, `retry` queues it again, a second cancel of a finished task
    is refused with exit 1."""
    running = Up(tmp_path / "data", "--roles", "commands")
    running.wait_ready()
    try:
        task_id = running.cli("dispatch", "-", stdin=json.dumps(dispatch_body())).stdout.strip()
        first = running.cli("cancel", task_id, "--reason", "not today")
        assert first.returncode == 0, first.stderr
        assert first.stdout.strip() == f"{task_id} cancelled"
        again = running.cli("cancel", task_id)
        assert again.returncode == 1
        assert "already cancelled" in again.stderr
        retried = running.cli("retry", task_id)
        assert retried.returncode == 0, retried.stderr
        assert retried.stdout.strip() == f"{task_id} queued as attempt 2"
        unknown = running.cli("retry", "t-doesnotexist")
        assert unknown.returncode == 1
        assert "no task t-doesnotexist" in unknown.stderr
    finally:
        assert running.stop() == 0


def _up_with_scripted_builder(tmp_path: Path) -> Up:
    return up_with_agent(tmp_path, "scripted", [sys.executable, SCRIPTED, "{phase}", "ok"])


def test_status_history_and_audit_show_a_finished_build(tmp_path: Path) -> None:
    """After a build, `history` lists it with its eight phases, `status` shows an idle
    handler, and `audit` prints every event phase by phase (also as JSON and JSON lines)."""
    running = _up_with_scripted_builder(tmp_path)
    try:
        body = hello_body(str(tmp_path / "work" / "demo"))
        task_id = running.cli("dispatch", "-", stdin=json.dumps(body)).stdout.strip()
        line = running.wait_finished(task_id)
        assert "task succeeded" in line

        # --fresh waits for the projection to reach the log's end: no race with the last batch.
        history = running.cli("history", "--json", "--fresh")
        assert history.returncode == 0, history.stderr
        page = json.loads(history.stdout)
        row = page["rows"][0]
        assert row["task_id"] == task_id
        assert row["outcome"] == "succeeded"
        assert row["phase_results"][5] == "skipped"
        text = running.cli("history").stdout
        assert "●●●●●○●●" in text

        status = running.cli("status", "--fresh")
        assert status.returncode == 0
        assert "Running: nothing" in status.stdout
        assert json.loads(running.cli("status", "--json").stdout)["projection"]["caught_up"]

        audit = running.cli("audit", task_id)
        assert audit.returncode == 0
        for label in ("1. CONTEXT", "4. BUILD", "6. HEAL", "8. CLOSE"):
            assert label in audit.stdout
        as_json = json.loads(running.cli("audit", task_id, "--json").stdout)
        lines = running.cli("audit", task_id, "--jsonl").stdout.splitlines()
        assert len(as_json["events"]) == len(lines)
        assert json.loads(lines[-1])["type"] == "task_finished"

        verify = running.cli("replay", "--verify")
        assert verify.returncode == 0, verify.stdout + verify.stderr
        refused = running.cli("replay")
        assert refused.returncode == 1
        assert "stop it first" in refused.stderr
    finally:
        assert running.stop() == 0
    rebuilt = subprocess.run(
        [sys.executable, "-m", "shipyard.cli", "replay"],
        env=running.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert "Rebuilt the read models" in rebuilt.stdout


def test_send_inbox_and_thread_from_the_command_line(tmp_path: Path) -> None:
    """`send` a question, read it with `inbox --unread --mark-read`, answer it, see the thread."""
    running = Up(tmp_path / "data", "--roles", "projector,commands")
    running.wait_ready()
    try:
        sent = running.cli(
            "send", "--from", "openclaw", "--to", "claude", "--type", "question", "Ready?"
        )
        assert sent.returncode == 0, sent.stderr
        message_id, _, _, thread_id = sent.stdout.split()
        inbox = running.cli("inbox", "--agent", "claude", "--unread", "--mark-read")
        assert inbox.returncode == 0, inbox.stderr
        assert "claude: 1 unread" in inbox.stdout
        assert "Ready?" in inbox.stdout
        after = json.loads(running.cli("inbox", "--agent", "claude", "--unread", "--json").stdout)
        assert after["messages"] == []
        assert after["unread"] == 0
        reply = running.cli(
            "send", "--from", "claude", "--to", "openclaw", "--type", "status_response",
            "--thread", thread_id, "--reply-to", message_id, "Yes.",
        )  # fmt: skip
        assert reply.returncode == 0, reply.stderr
        shown = running.cli("thread", thread_id)
        assert shown.returncode == 0
        assert shown.stdout.index("Ready?") < shown.stdout.index("Yes.")
        assert "read by claude" in shown.stdout
        bad = running.cli("send", "--from", "a", "--to", "b", "--thread", "th-nope", "x")
        assert bad.returncode == 1
        assert "no thread th-nope" in bad.stderr
    finally:
        assert running.stop() == 0


def test_token_create_makes_a_working_token(tmp_path: Path) -> None:
    """`token create --role viewer` prints a token the gateway then accepts as a viewer."""
    from shipyard.gateway.auth import TokenStore

    result = run_cli("token", "create", "--role", "viewer", "--data-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    principal = TokenStore(tmp_path).check(result.stdout.strip())
    assert principal is not None
    assert principal.role == "viewer"
    assert oct((tmp_path / "tokens.json").stat().st_mode & 0o777) == "0o600"


def test_a_taken_gateway_port_is_a_clear_error(tmp_path: Path) -> None:
    """`up` on a port another program holds exits 1, says so, and leaves no server behind."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {**os.environ, "SHIPYARD_DATA_DIR": str(tmp_path), "SHIPYARD_PORT": str(port)}
        result = subprocess.run(
            [sys.executable, "-m", "shipyard.cli", "up"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "nats" / "nats.pid").exists()


def test_rework_writes_a_fix_dispatch_that_dispatches(tmp_path: Path) -> None:
    """`shipyard rework RUN_ID -o FILE` writes the Fix: dispatch for a failed run, quoting
    the real failure; sent as it is, it is accepted; a run id that does not exist is refused."""
    running = up_with_agent(
        tmp_path,
        "broken",
        [sys.executable, SCRIPTED, "{phase}", "fail"],
        handler={"max_attempts": 1},
    )
    try:
        body = dispatch_body(workdir=str(tmp_path / "work" / "rw"))
        task_id = running.cli("dispatch", "-", stdin=json.dumps(body)).stdout.strip()
        assert "task failed" in running.wait_finished(task_id)
        history = json.loads(running.cli("history", "--json", "--fresh").stdout)
        run_id = history["rows"][0]["run_id"]

        out = tmp_path / "fix.json"
        made = running.cli("rework", run_id, "-o", str(out))
        assert made.returncode == 0, made.stderr
        assert f"shipyard dispatch {out}" in made.stdout
        fix = json.loads(out.read_text())
        assert fix["action_name"] == "Fix: Add a health endpoint"
        assert "## Current State (Broken)" in fix["payload"]["prompt"]
        assert "something broke" in fix["payload"]["prompt"]
        sent = running.cli("dispatch", str(out))
        assert sent.returncode == 0, sent.stderr

        missing = running.cli("rework", "r-nosuchrun")
        assert missing.returncode == 1
        assert "no run r-nosuchrun" in missing.stderr
    finally:
        running.stop()


def test_bench_outside_a_clone_says_where_the_benchmarks_live(tmp_path: Path) -> None:
    """`shipyard bench` where there is no bench/ package says so in a sentence, exit 1."""
    result = subprocess.run(
        [sys.executable, "-m", "shipyard.cli", "bench", "--quick"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert result.returncode == 1
    assert "bench/ of the repository" in result.stderr
    assert "Traceback" not in result.stderr
