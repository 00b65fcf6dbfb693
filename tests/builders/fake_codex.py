#!/usr/bin/env python3
"""A stand-in for `codex exec --json` that prints the documented JSONL event shapes and does
the work of a tiny build: README.md and hello.txt in its working directory."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def emit(event: dict[str, object]) -> None:
    print(json.dumps(event), flush=True)


def main(argv: list[str]) -> int:
    if argv[:1] != ["exec"] or "--json" not in argv:
        print("usage: codex exec [resume ID] --json PROMPT", file=sys.stderr)
        return 2
    thread = argv[2] if argv[1:2] == ["resume"] else "0199-fake-thread"
    emit({"type": "thread.started", "thread_id": thread})
    emit({"type": "turn.started"})
    items = [
        {"text": "Write README.md", "completed": False},
        {"text": "Write hello.txt", "completed": False},
    ]
    emit({"type": "item.started", "item": {"id": "item_0", "type": "todo_list", "items": items}})
    command = {"id": "item_1", "type": "command_execution", "command": "touch hello.txt"}
    emit({"type": "item.started", "item": {**command, "status": "in_progress"}})
    Path("README.md").write_text("# Greeting\n")
    Path("hello.txt").write_text("hello\n")
    emit({"type": "item.completed", "item": {**command, "status": "completed", "exit_code": 0}})
    done = [{**i, "completed": True} for i in items]
    emit({"type": "item.updated", "item": {"id": "item_0", "type": "todo_list", "items": done}})
    emit(
        {
            "type": "item.completed",
            "item": {"id": "item_2", "type": "agent_message", "text": "Done."},
        }
    )
    emit(
        {
            "type": "turn.completed",
            "usage": {"input_tokens": 1200, "cached_input_tokens": 0, "output_tokens": 80},
        }
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
