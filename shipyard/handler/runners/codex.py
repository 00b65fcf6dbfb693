"""Codex, headless: ``codex exec --json PROMPT`` prints one JSON event a line.

``thread.started`` names the session; ``item.*`` carry messages, commands and the
``todo_list``; ``turn.completed`` carries usage; ``turn.failed`` and ``error`` end it badly.
"""

from __future__ import annotations

from typing import Any

from shipyard.handler.runners.base import (
    Invocation,
    Outcome,
    Parser,
    Runner,
    Todo,
    Update,
    json_line,
    last_lines,
)


class CodexRunner(Runner):
    kind = "codex"
    default_binary = "codex"
    can_plan = False  # codex exec has no plan mode: the plan comes from the Requirements

    def argv(self, inv: Invocation) -> list[str]:
        argv = [self.binary, "exec"]
        if inv.session_id:
            argv += ["resume", inv.session_id]
        argv += ["--json", "--skip-git-repo-check", "--full-auto"]
        if self.settings.model:
            argv += ["--model", self.settings.model]
        return [*argv, inv.prompt]

    def parser(self, inv: Invocation) -> Parser:
        return CodexParser()


class CodexParser(Parser):
    def __init__(self) -> None:
        super().__init__()
        self.failed = ""
        self.messages: list[str] = []

    def feed(self, line: str) -> list[Update]:
        msg = json_line(line)
        if msg is None:
            return [Update("activity")] if line.strip() else []
        kind = str(msg.get("type") or "")
        out = self.outcome
        if kind == "thread.started":
            out.session_id = str(msg.get("thread_id") or "")
            return [Update("session", session_id=out.session_id)]
        if kind == "turn.completed":
            usage = msg.get("usage") or {}
            out.turns += 1
            out.tokens_in += int(usage.get("input_tokens") or 0)
            out.tokens_out += int(usage.get("output_tokens") or 0)
            out.result_seen = True
            return [Update("usage")]
        if kind == "turn.failed":
            self.failed = str((msg.get("error") or {}).get("message") or "turn failed")
            out.result_seen = True
            return [Update("activity")]
        if kind == "error":
            self.failed = str(msg.get("message") or "error")
            return [Update("retry", text=self.failed)]
        if kind.startswith("item."):
            return self._item(kind, msg.get("item") or {})
        return [Update("activity")]

    def _item(self, kind: str, item: dict[str, Any]) -> list[Update]:
        itype = item.get("type")
        if itype == "todo_list":
            todos = tuple(
                Todo(str(t.get("text") or ""), "completed" if t.get("completed") else "pending")
                for t in item.get("items") or []
                if isinstance(t, dict)
            )
            return [Update("todos", todos=todos)]
        if itype == "agent_message" and kind == "item.completed":
            text = str(item.get("text") or "")
            self.messages.append(text)
            return [Update("text", text=text)]
        tools = ("command_execution", "file_change", "mcp_tool_call", "web_search")
        if itype in tools and kind == "item.started":
            self.outcome.tool_calls += 1
            return [Update("tool", tool=str(itype))]
        return [Update("activity")]

    def finish(self, exit_code: int, stderr_tail: list[str]) -> Outcome:
        out = self.outcome
        out.exit_code = exit_code
        out.result = self.messages[-1] if self.messages else ""
        out.ok = exit_code == 0 and not self.failed
        if self.failed:
            out.error = self.failed
        elif exit_code != 0:
            out.error = f"codex exited with status {exit_code}" + (
                f":\n{last_lines(stderr_tail)}" if stderr_tail else ""
            )
        return out
