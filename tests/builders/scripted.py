"""A `command` builder whose behaviour the tests choose: scripted.py PHASE MODE.

Modes: ok (writes README.md and hello.txt), heal-once (forgets hello.txt until HEAL),
fail (exits 1 in BUILD), silent (prints once, then hangs with a child in its group),
slow (prints a line every 0.1 s for a minute). Each launch is appended to the file named by
SHIPYARD_TEST_LAUNCHES, with the builder's pid.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path


def main() -> int:
    phase, mode = sys.argv[1], sys.argv[2]
    launches = os.environ.get("SHIPYARD_TEST_LAUNCHES")
    if launches:
        with open(launches, "a") as f:
            f.write(f"{os.environ['SHIPYARD_TASK_ID']} {phase} {os.getpid()}\n")
        prompt_file = Path(f"{launches}.{os.environ['SHIPYARD_TASK_ID']}.{phase}.prompt")
        prompt_file.write_text(os.environ.get("SHIPYARD_PROMPT", ""))
    work = Path.cwd()
    print(f"{mode}: {phase} in {work}", flush=True)
    if mode == "silent":
        child = subprocess.Popen(["sleep", "300"])
        Path(os.environ["SHIPYARD_TEST_LAUNCHES"] + ".child").write_text(str(child.pid))
        time.sleep(300)
        return 0
    if mode == "slow":
        for i in range(600):
            print(f"working {i}", flush=True)
            time.sleep(0.1)
        return 0
    if mode == "fail" and phase == "build":
        print("something broke", file=sys.stderr, flush=True)
        return 1
    if phase == "build":
        (work / "README.md").write_text("# Demo\n\nBuilt by the scripted builder.\n")
        if mode != "heal-once":
            (work / "hello.txt").write_text("hello\n")
    if phase == "heal":
        (work / "hello.txt").write_text("hello, healed\n")
    print("done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
