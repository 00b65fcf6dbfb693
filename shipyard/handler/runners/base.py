"""What every runner is: how to start a builder and how to read what it prints."""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from shipyard.events.types import Phase
from shipyard.settings import AgentSettings

UpdateKind = Literal["activity", "tool", "todos", "session", "retry", "text", "usage"]


@dataclass(frozen=True)
class Invocation:
    """One call of the builder: plan, build, or heal a run."""

    prompt: str
    cwd: Path
    phase: Phase
    max_turns: int
    task_id: str
    run_id: str
    session_id: str = ""  # resume this session (BUILD resumes PLAN's, HEAL resumes BUILD's)


@dataclass(frozen=True)
class Todo:
    title: str
    status: str  # pending, in_progress, completed


@dataclass(frozen=True)
class Update:
    """Something the builder did, as the handler reports it."""

    kind: UpdateKind
    tool: str = ""
    text: str = ""
    todos: tuple[Todo, ...] = ()
    session_id: str = ""


@dataclass
class Outcome:
    """How one builder call ended."""

    ok: bool
    exit_code: int
    session_id: str = ""
    result: str = ""
    error: str = ""
    subtype: str = ""
    plan: str = ""
    turns: int = 0
    tool_calls: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    cost_usd: float = 0.0
    permission_denials: list[str] = field(default_factory=list)
    result_seen: bool = False


class Parser(ABC):
    """Reads a builder's stdout line by line. ``outcome`` accumulates as lines arrive."""

    def __init__(self) -> None:
        self.outcome = Outcome(ok=False, exit_code=-1)

    @property
    def result_seen(self) -> bool:
        """The builder printed its final result; it should exit now."""
        return self.outcome.result_seen

    @abstractmethod
    def feed(self, line: str) -> list[Update]: ...

    @abstractmethod
    def finish(self, exit_code: int, stderr_tail: list[str]) -> Outcome: ...


def json_line(line: str) -> dict[str, Any] | None:
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        value = json.loads(line)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def last_lines(lines: list[str], n: int = 20) -> str:
    return "\n".join(line for line in lines[-n:] if line.strip())


class Runner(ABC):
    """A kind of builder. Instances are per configured agent."""

    kind: str
    default_binary: str = ""
    can_plan: bool = True

    def __init__(self, name: str, settings: AgentSettings) -> None:
        self.name = name
        self.settings = settings

    @property
    def binary(self) -> str:
        return self.settings.binary or self.default_binary

    @abstractmethod
    def argv(self, inv: Invocation) -> list[str]: ...

    @abstractmethod
    def parser(self, inv: Invocation) -> Parser: ...

    def env(self, inv: Invocation, base: dict[str, str]) -> dict[str, str]:
        """The handler's environment, minus what must not leak in, plus the agent's env."""
        env = {k: v for k, v in base.items() if k != "CLAUDECODE"}
        env.update(self.settings.env)
        env.update(
            SHIPYARD_TASK_ID=inv.task_id,
            SHIPYARD_RUN_ID=inv.run_id,
            SHIPYARD_PHASE=inv.phase.value,
            SHIPYARD_WORKDIR=str(inv.cwd),
        )
        return env


def is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0
