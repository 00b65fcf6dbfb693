"""A `command` builder for the hostile-input tests: hostile.py PHASE PROMPT [MODE].

It records its argv as JSON in the file named by SHIPYARD_TEST_ARGV (one line per launch),
prints every secret listed in the JSON file named by SHIPYARD_TEST_SECRETS, and the value of
each secret-looking variable it can see, on stdout and stderr; prints the HTML in
SHIPYARD_TEST_HTML; then writes README.md and hello.txt. MODE `fail` exits 1 in BUILD.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def main() -> int:
    phase = sys.argv[1]
    mode = sys.argv[3] if len(sys.argv) > 3 else "ok"
    record = os.environ.get("SHIPYARD_TEST_ARGV")
    if record:
        with open(record, "a") as f:
            f.write(json.dumps(sys.argv) + "\n")
    secrets_file = os.environ.get("SHIPYARD_TEST_SECRETS")
    if secrets_file:
        for value in json.loads(Path(secrets_file).read_text()):
            print(f"the secret is {value}", flush=True)
            print(f"the secret is {value}", file=sys.stderr, flush=True)
    for name, value in sorted(os.environ.items()):
        if any(word in name for word in ("KEY", "TOKEN", "SECRET")):
            print(f"{name}={value}", flush=True)
    html = os.environ.get("SHIPYARD_TEST_HTML")
    if html:
        print(html, flush=True)
        print(html, file=sys.stderr, flush=True)
    if phase == "build":
        (Path.cwd() / "README.md").write_text("# Built\n")
        (Path.cwd() / "hello.txt").write_text("hello\n")
        if mode == "fail":
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
