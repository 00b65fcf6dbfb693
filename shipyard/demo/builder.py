"""The demo builder: a `command` agent that needs no API key.

It acts out a build so a newcomer can watch all eight phases: it reads the task from
``SHIPYARD_PROMPT``, prints its progress for a few seconds, and writes README.md and every
file named under Deliverables. ``- Demo mode: heal`` in Environment makes it forget one file
until HEAL; ``- Demo mode: fail`` makes its build break.
"""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

STEP_SECONDS = float(os.environ.get("SHIPYARD_DEMO_STEP", "0.6"))


def deliverable_files(prompt: str) -> list[str]:
    section = prompt.split("## Deliverables", 1)[-1]
    return re.findall(r"\b[\w/-]+\.[A-Za-z]{1,5}\b", section)


def main(argv: list[str]) -> int:
    phase = argv[0] if argv else os.environ.get("SHIPYARD_PHASE", "build")
    prompt = os.environ.get("SHIPYARD_PROMPT", "")
    mode = (re.search(r"Demo mode:\s*(\w+)", prompt) or [None, "ok"])[1]
    work = Path.cwd()
    files = deliverable_files(prompt) or ["README.md"]
    print(f"demo builder: {phase} in {work} ({mode})", flush=True)
    steps = ["reading the task", "sketching the change", "writing the files", "checking"]
    for step in steps:
        print(f"  … {step}", flush=True)
        time.sleep(STEP_SECONDS)
    if mode == "fail" and phase == "build":
        print("error: the build broke: missing dependency `left-pad`", file=sys.stderr)
        return 1
    for name in files:
        if mode == "heal" and phase == "build" and name != "README.md":
            print(f"  (forgot {name})", flush=True)
            continue
        path = work / name
        path.parent.mkdir(parents=True, exist_ok=True)
        title = prompt.split("\n", 2)[1] if "\n" in prompt else "the task"
        path.write_text(f"# {name}\n\nWritten by the demo builder for: {title}\n")
        print(f"  wrote {name}", flush=True)
    print("done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
