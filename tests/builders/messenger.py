"""A `command` builder that, in BUILD, uses the token and the NATS user its handler gave it:
it sends a message as its agent, then tries what a builder must not do, over HTTP and with
the `shipyard` CLI over NATS, and records each HTTP status and CLI exit status (with what the
CLI said) in the JSON file named by SHIPYARD_TEST_OUT. It also writes the deliverables so the
run passes."""

from __future__ import annotations

import json
import os
import subprocess
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


def cli(*args: str, stdin: str = "") -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, "-m", "shipyard.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return {"exit": done.returncode, "said": (done.stdout + done.stderr).strip()[-500:]}


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
        "nats_user": os.environ.get("SHIPYARD_NATS_USER", ""),
        "nats": {
            "send_as_self": cli(
                "send", "--from", agent, "--to", "openclaw", "--type", "comment", "over NATS"
            ),
            "send_as_other": cli(
                "send", "--from", "openclaw", "--to", agent, "--type", "comment", "spoofed"
            ),
            "own_inbox": cli("inbox", "--agent", agent, "--json"),
            "other_inbox": cli("inbox", "--agent", "openclaw", "--json"),
            "dispatch": cli("dispatch", "-", stdin=json.dumps({"request_type": "queue"})),
            "cancel": cli("cancel", task),
            "events": cli("events", "--task", task),
        },
    }
    Path(os.environ["SHIPYARD_TEST_OUT"]).write_text(json.dumps(results))
    print("done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
