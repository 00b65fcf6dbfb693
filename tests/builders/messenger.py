"""A `command` builder that, in BUILD, uses the token its handler gave it: it sends a
message as its agent, then tries what a builder must not do, and records each HTTP status in
the JSON file named by SHIPYARD_TEST_OUT. It also writes the deliverables so the run passes."""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path


def call(method: str, path: str, body: object = None) -> int:
    request = urllib.request.Request(
        os.environ["SHIPYARD_URL"] + path,
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={
            "Authorization": f"Bearer {os.environ['SHIPYARD_TOKEN']}",
            "Content-Type": "application/json",
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


def main() -> int:
    phase = sys.argv[1]
    work = Path.cwd()
    if phase != "build":
        print(f"{phase}: nothing to do", flush=True)
        return 0
    (work / "README.md").write_text("# Messenger\n")
    (work / "hello.txt").write_text("hello\n")
    agent = os.environ["SHIPYARD_AGENT"]
    task = os.environ["SHIPYARD_TASK_ID"]
    message = {"sender": agent, "recipient": "openclaw", "type": "comment", "body": "built it"}
    results = {
        "agent": agent,
        "token": os.environ["SHIPYARD_TOKEN"],
        "url": os.environ["SHIPYARD_URL"],
        "admin_token_leaked": "SHIPYARD_ADMIN_TOKEN" in os.environ,
        "send_as_self": call("POST", "/api/messages", message),
        "send_as_other": call("POST", "/api/messages", {**message, "sender": "openclaw"}),
        "dispatch": call("POST", "/api/dispatch", {"request_type": "queue"}),
        "cancel": call("POST", f"/api/tasks/{task}/cancel", {}),
        "escalate": call("POST", f"/api/tasks/{task}/escalate", {"to": "x"}),
        "other_inbox": call("GET", "/api/inbox/openclaw"),
        "own_inbox": call("GET", f"/api/inbox/{agent}"),
    }
    Path(os.environ["SHIPYARD_TEST_OUT"]).write_text(json.dumps(results))
    print("done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
