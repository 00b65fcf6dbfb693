"""Helpers for handler tests: settings with `command` builders, waiting on events."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from shipyard.events.envelope import Event
from shipyard.events.log import EventLog
from shipyard.settings import AgentSettings, HandlerSettings, Settings

SCRIPTED = str(Path(__file__).parent / "builders" / "scripted.py")
MODES = ("ok", "heal-once", "fail", "silent", "slow")


def settings(tmp: Path, **handler: Any) -> Settings:
    """Settings whose agents are the scripted builder in each mode, confined to ``tmp``."""
    launches = str(tmp / "launches.txt")
    agents = {
        mode: AgentSettings(
            kind="command",
            command=[sys.executable, SCRIPTED, "{phase}", mode],
            env={"SHIPYARD_TEST_LAUNCHES": launches},
            concurrency=50,
        )
        for mode in MODES
    }
    options: dict[str, Any] = {
        "workdir_roots": [tmp / "work"],
        "default_agent": "ok",
        "heartbeat_interval": 5.0,
        "stale_after": 30.0,
        "failed_after": 60.0,
        "max_attempts": 1,
        "retry_backoff": 0.0,
        "kill_grace": 1.0,
    }
    options.update(handler)
    (tmp / "work").mkdir(exist_ok=True)
    return Settings(data_dir=tmp / "data", handler=HandlerSettings(**options), agents=agents)


def launches(tmp: Path) -> list[tuple[str, str, int]]:
    path = tmp / "launches.txt"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        task, phase, pid = line.split()
        out.append((task, phase, int(pid)))
    return out


async def wait_for(
    log: EventLog,
    match: Callable[[Event[Any]], bool],
    *,
    timeout: float = 30.0,
    start: int = 1,
) -> Event[Any]:
    """The first event from ``start`` on that ``match`` accepts, as soon as it lands."""

    async def scan() -> Event[Any]:
        async for event in log.follow(start=start):
            if match(event):
                return event
        raise AssertionError("the event stream ended")

    return await asyncio.wait_for(scan(), timeout)


def finished(task_id: str) -> Callable[[Event[Any]], bool]:
    return lambda e: e.aggregate_id == task_id and e.type == "task_finished"


def of_type(task_id: str, type_name: str) -> Callable[[Event[Any]], bool]:
    return lambda e: e.aggregate_id == task_id and e.type == type_name
