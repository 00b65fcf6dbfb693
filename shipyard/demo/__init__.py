"""``shipyard demo``: sample tasks for the built-in ``demo`` agent — a sequential pair, a
parallel group, one that heals and one that fails — so all eight phases can be watched with
no API key."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from shipyard.settings import AgentSettings

AGENT = "demo"


def agent_settings() -> AgentSettings:
    return AgentSettings(
        kind="command",
        command=[sys.executable, "-m", "shipyard.demo.builder", "{phase}"],
        concurrency=4,
    )


def _prompt(title: str, workdir: Path, files: list[str], mode: str) -> str:
    deliver = "\n".join(f"{i + 1}. {f}" for i, f in enumerate([*files, "README.md"]))
    checks = " && ".join(f"test -f {f}" for f in [*files, "README.md"])
    return (
        f"## Task\n{title}\n\n"
        f"## Requirements\n- Write {', '.join(files)}\n- Explain it in README.md\n\n"
        f"## Environment\n- Working directory: {workdir}\n- Demo mode: {mode}\n"
        f"- Test: {checks}\n\n"
        f"## Deliverables\n{deliver}\n"
    )


def tasks(root: Path) -> list[dict[str, Any]]:
    """The demo dispatches; ``after`` names are resolved to task ids by the caller."""

    def one(
        key: str, title: str, files: list[str], mode: str = "ok", **extra: Any
    ) -> dict[str, Any]:
        body = {
            "request_type": "queue",
            "action": "create",
            "task_type": "build",
            "action_name": title,
            "priority": extra.pop("priority", "normal"),
            "agent": AGENT,
            "payload": {
                "prompt": _prompt(title, root / key, files, mode),
                "dispatcher": "demo",
                "task_title": title,
                "max_turns": 10,
            },
        }
        body.update(extra)
        return {"key": key, "body": body}

    return [
        one("schema", "Design the orders schema", ["schema.sql"], priority="high"),
        one("api", "Build the orders API on the schema", ["api.py"], after=["schema"]),
        one("docs", "Write the user guide", ["guide.md"], group="launch"),
        one("site", "Build the landing page", ["index.html"], group="launch"),
        one("heal", "Add input validation", ["validate.py"], mode="heal"),
        one("broken", "Upgrade the payment client", ["payments.py"], mode="fail"),
    ]
