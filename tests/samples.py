"""Sample inputs shared by the tests."""

from __future__ import annotations

from typing import Any

PROMPT = """## Task
Add a /health endpoint to the service.

## Requirements
- GET /health answers 200 with {"ok": true}
- Documented in the README

## Environment
- Working directory: {workdir}
- Test: python -m pytest -q

## Deliverables
1. app/health.py
2. README.md
"""


def dispatch_body(workdir: str = "/srv/app", **overrides: Any) -> dict[str, Any]:
    """A valid dispatch in the seed's format; ``overrides`` replace top-level fields."""
    body: dict[str, Any] = {
        "request_type": "queue",
        "action": "create",
        "task_type": "build",
        "action_name": "Add a health endpoint",
        "priority": "normal",
        "payload": {
            "prompt": PROMPT.replace("{workdir}", workdir),
            "dispatcher": "openclaw",
            "task_title": "Add a health endpoint",
            "max_turns": 40,
        },
    }
    body.update(overrides)
    return body


def hello_body(workdir: str) -> dict[str, Any]:
    """A dispatch the scripted builder fulfils: its deliverable is hello.txt, and the test
    command checks that it exists."""
    body = dispatch_body(workdir=workdir)
    prompt = body["payload"]["prompt"].replace("app/health.py", "hello.txt")
    body["payload"]["prompt"] = prompt.replace("python -m pytest -q", "test -f hello.txt")
    return body
