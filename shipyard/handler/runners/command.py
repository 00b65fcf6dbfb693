"""Any program as a builder: for scripts, and for a demo that needs no API key.

The argv comes from the agent's ``command``; ``{prompt}``, ``{phase}``, ``{workdir}``,
``{task_id}`` and ``{run_id}`` in it are replaced, each as one whole argument (no shell).
The same values are in the environment as ``SHIPYARD_PROMPT`` and friends. Every line it
prints counts as activity; exit status 0 is success.
"""

from __future__ import annotations

from shipyard.errors import ConfigError
from shipyard.handler.runners.base import Invocation, Outcome, Parser, Runner, Update, last_lines


class CommandRunner(Runner):
    kind = "command"
    can_plan = False

    def argv(self, inv: Invocation) -> list[str]:
        if not self.settings.command:
            raise ConfigError(f"agent {self.name!r} is kind=command but has no `command` argv")
        values = {
            "prompt": inv.prompt,
            "phase": inv.phase.value,
            "workdir": str(inv.cwd),
            "task_id": inv.task_id,
            "run_id": inv.run_id,
        }
        return [arg.format_map(values) if "{" in arg else arg for arg in self.settings.command]

    def env(self, inv: Invocation, base: dict[str, str]) -> dict[str, str]:
        env = super().env(inv, base)
        env["SHIPYARD_PROMPT"] = inv.prompt
        return env

    def parser(self, inv: Invocation) -> Parser:
        return CommandParser()


class CommandParser(Parser):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def feed(self, line: str) -> list[Update]:
        self.lines.append(line)
        if len(self.lines) > 400:
            del self.lines[:200]
        return [Update("activity", text=line)]

    def finish(self, exit_code: int, stderr_tail: list[str]) -> Outcome:
        out = self.outcome
        out.exit_code = exit_code
        out.ok = exit_code == 0
        out.result = last_lines(self.lines, 40)
        out.turns = 1
        if not out.ok:
            out.error = f"exited with status {exit_code}" + (
                f":\n{last_lines(stderr_tail or self.lines)}" if (stderr_tail or self.lines) else ""
            )
        return out
