"""Runners: one per kind of builder, one interface (:class:`base.Runner`)."""

from __future__ import annotations

from shipyard.errors import ConfigError
from shipyard.handler.runners.base import Runner
from shipyard.handler.runners.claude import ClaudeRunner
from shipyard.handler.runners.codex import CodexRunner
from shipyard.handler.runners.command import CommandRunner
from shipyard.settings import AgentSettings

KINDS: dict[str, type[Runner]] = {
    "claude": ClaudeRunner,
    "codex": CodexRunner,
    "command": CommandRunner,
}


def make_runner(name: str, settings: AgentSettings) -> Runner:
    try:
        return KINDS[settings.kind](name, settings)
    except KeyError:
        raise ConfigError(f"agent {name!r}: unknown kind {settings.kind!r}") from None
