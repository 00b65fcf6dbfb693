"""Claude Code, headless: ``claude -p PROMPT --output-format stream-json --verbose``.

Failure is judged by ``is_error`` on the final ``result`` line: an API or login error still
says ``subtype: success``. ``error_max_turns`` is reported as such.
"""

from __future__ import annotations

from typing import Any

from shipyard.events.types import Phase
from shipyard.handler.runners.base import (
    Invocation,
    Outcome,
    Parser,
    Runner,
    Todo,
    Update,
    is_root,
    json_line,
    last_lines,
)

PLAN_TOOL = "ExitPlanMode"
TODO_TOOL = "TodoWrite"


class ClaudeRunner(Runner):
    kind = "claude"
    default_binary = "claude"
    can_plan = True

    def permission_mode(self, inv: Invocation) -> str:
        return "plan" if inv.phase == Phase.PLAN else self.settings.permission_mode

    def argv(self, inv: Invocation) -> list[str]:
        argv = [
            self.binary,
            "-p",
            inv.prompt,
            "--output-format",
            "stream-json",
            "--verbose",
            "--max-turns",
            str(inv.max_turns),
            "--permission-mode",
            self.permission_mode(inv),
        ]
        if inv.session_id:
            argv += ["--resume", inv.session_id]
        if self.settings.model:
            argv += ["--model", self.settings.model]
        if self.settings.allowed_tools:
            argv += ["--allowedTools", ",".join(self.settings.allowed_tools)]
        return argv

    def env(self, inv: Invocation, base: dict[str, str]) -> dict[str, str]:
        env = super().env(inv, base)
        if is_root() and self.permission_mode(inv) == "bypassPermissions":
            env.setdefault("IS_SANDBOX", "1")  # Claude Code refuses bypass as root without it
        return env

    def parser(self, inv: Invocation) -> Parser:
        return ClaudeParser()


class ClaudeParser(Parser):
    def __init__(self) -> None:
        super().__init__()
        self._messages: set[str] = set()  # assistant message ids already counted
        self._tasks: dict[str, Todo] = {}  # TaskCreate / TaskUpdate checklist, by task id

    def feed(self, line: str) -> list[Update]:
        msg = json_line(line)
        if msg is None:
            return [Update("activity")] if line.strip() else []
        kind = msg.get("type")
        out = self.outcome
        updates: list[Update] = []
        if msg.get("session_id") and msg["session_id"] != out.session_id:
            out.session_id = str(msg["session_id"])
            updates.append(Update("session", session_id=out.session_id))
        if kind == "assistant":
            message = msg.get("message") or {}
            for block in message.get("content") or []:
                updates.extend(self._block(block))
            # One line per content block, each repeating its message's usage: count it once.
            mid = str(message.get("id") or "")
            if mid and mid not in self._messages:
                self._messages.add(mid)
                usage = message.get("usage") or {}
                out.tokens_in += int(usage.get("input_tokens") or 0)
                out.tokens_out += int(usage.get("output_tokens") or 0)
                updates.append(Update("usage"))
        elif kind == "user":
            updates.extend(self._tool_results(msg))
        elif kind == "result":
            self._result(msg)
            updates.append(Update("usage"))
        elif kind == "rate_limit_event" or (
            kind == "system" and str(msg.get("subtype")) in ("api_retry", "rate_limit")
        ):
            updates.append(Update("retry", text=_retry_text(msg)))
        else:
            updates.append(Update("activity"))
        return updates

    def _block(self, block: dict[str, Any]) -> list[Update]:
        btype = block.get("type")
        if btype == "text":
            text = str(block.get("text") or "")
            return [Update("text", text=text)]
        if btype != "tool_use":
            return [Update("activity")]
        name = str(block.get("name") or "")
        tool_input = block.get("input") or {}
        self.outcome.tool_calls += 1
        updates = [Update("tool", tool=name)]
        if name == TODO_TOOL:
            todos = tuple(
                Todo(str(t.get("content") or ""), str(t.get("status") or "pending"))
                for t in tool_input.get("todos") or []
                if isinstance(t, dict)
            )
            updates.append(Update("todos", todos=todos))
        elif name == PLAN_TOOL and isinstance(tool_input.get("plan"), str):
            self.outcome.plan = tool_input["plan"]
        elif name == "TaskUpdate" and tool_input.get("taskId") in self._tasks:
            tid = str(tool_input["taskId"])
            status = str(tool_input.get("status") or self._tasks[tid].status)
            self._tasks[tid] = Todo(self._tasks[tid].title, status)
            updates.append(Update("todos", todos=tuple(self._tasks.values())))
        return updates

    def _tool_results(self, msg: dict[str, Any]) -> list[Update]:
        """A created task (TaskCreate's result names its id) joins the checklist."""
        result = msg.get("tool_use_result")
        if isinstance(result, dict) and isinstance(result.get("task"), dict):
            task = result["task"]
            tid, subject = str(task.get("id") or ""), str(task.get("subject") or "")
            if tid and subject:
                self._tasks[tid] = Todo(subject, "pending")
                return [Update("todos", todos=tuple(self._tasks.values()))]
        return [Update("activity")]

    def _result(self, msg: dict[str, Any]) -> None:
        """Every result line overwrites the last: with subagents there can be two."""
        out = self.outcome
        out.permission_denials = []
        out.result_seen = True
        out.subtype = str(msg.get("subtype") or "")
        is_error = bool(msg.get("is_error"))
        out.ok = not is_error and out.subtype == "success"
        out.result = str(msg.get("result") or "")
        out.turns = int(msg.get("num_turns") or 0)
        out.cost_usd = float(msg.get("total_cost_usd") or 0.0)
        usage = msg.get("usage") or {}
        if usage:
            out.tokens_in = int(usage.get("input_tokens") or 0) + int(
                usage.get("cache_read_input_tokens") or 0
            )
            out.tokens_out = int(usage.get("output_tokens") or 0)
        for denial in msg.get("permission_denials") or []:
            if isinstance(denial, dict):
                name = str(denial.get("tool_name") or "")
                out.permission_denials.append(name)
                tool_input = denial.get("tool_input") or {}
                if name == PLAN_TOOL and isinstance(tool_input.get("plan"), str):
                    out.plan = out.plan or tool_input["plan"]
        errors = [str(e) for e in msg.get("errors") or []]
        if out.subtype == "error_max_turns":
            out.error = f"reached the turn limit ({out.turns} turns)"
        elif is_error:
            status = msg.get("api_error_status")
            prefix = f"API error {status}: " if status else ""
            out.error = prefix + (out.result or "; ".join(errors) or out.subtype or "error")
        elif not out.ok:
            out.error = "; ".join(errors) or out.subtype
        else:
            out.error = ""

    def finish(self, exit_code: int, stderr_tail: list[str]) -> Outcome:
        out = self.outcome
        out.exit_code = exit_code
        if not out.result_seen:
            out.ok = False
            out.error = f"claude exited with status {exit_code} without a result" + (
                f":\n{last_lines(stderr_tail)}" if stderr_tail else ""
            )
        elif out.ok and exit_code != 0:
            out.ok = False
            out.error = f"claude reported success but exited with status {exit_code}"
        if not out.plan and out.ok:
            out.plan = out.result
        return out


def _retry_text(msg: dict[str, Any]) -> str:
    parts = [
        str(msg.get(k)) for k in ("error", "status", "retry_delay_ms", "message") if msg.get(k)
    ]
    return "API retry: " + (", ".join(parts) or str(msg.get("subtype") or msg.get("type")))
