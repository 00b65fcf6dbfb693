"""Roles spread over processes: a second gateway, in a process and data dir of its own, joins
a running Shipyard with the `service` user that `shipyard nats-user` prints, and keeps its own
read models of the same log."""

from __future__ import annotations

import json
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from tests.conftest import Up, up_with_agent
from tests.samples import hello_body

SCRIPTED = str(Path(__file__).parent / "builders" / "scripted.py")


def get(up: Up, path: str) -> Any:
    info = json.loads((up.data_dir / "instance.json").read_text())
    token = (up.data_dir / "admin.token").read_text().strip()
    request = urllib.request.Request(
        info["gateway_url"] + path, headers={"Authorization": f"Bearer {token}"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def wait_history(up: Up, task_id: str, deadline: float) -> dict[str, Any]:
    """Re-read the gateway's Build History until it lists the task's finished run (the
    projection follows the log asynchronously), or fail at ``deadline``."""
    while True:
        page = get(up, "/api/history?limit=50")
        for row in page["rows"]:
            if row["task_id"] == task_id:
                return dict(row)
        assert time.monotonic() < deadline, f"{task_id} never reached {up.data_dir}'s history"
        get(up, "/api/status")  # one round trip per look, no fixed sleep


def test_a_second_gateway_keeps_its_own_projection(tmp_path: Path) -> None:
    """A build run by the first process appears, succeeded, in the Build History of both
    gateways; the second one's read models are a separate DuckDB file in its own data dir,
    and it reached the embedded server with the printed `service` credentials."""
    first = up_with_agent(tmp_path, "scripted", [sys.executable, SCRIPTED, "{phase}", "ok"])
    second: Up | None = None
    try:
        printed = first.cli("nats-user", "service")
        assert printed.returncode == 0, printed.stderr
        env = dict(line.split("=", 1) for line in printed.stdout.splitlines())
        url = env.pop("SHIPYARD_NATS_URL")
        second = Up(tmp_path / "second", "--nats", url, "--roles", "projector,gateway", env=env)
        second.wait_ready()
        assert url in "".join(second.banner)

        task_id = first.cli(
            "dispatch", "-", stdin=json.dumps(hello_body(str(tmp_path / "work" / "one")))
        ).stdout.strip()
        assert "task succeeded" in first.wait_finished(task_id)
        deadline = time.monotonic() + 60
        for up in (first, second):
            row = wait_history(up, task_id, deadline)
            assert row["outcome"] == "succeeded", up.data_dir
        assert (tmp_path / "second" / "readmodels.duckdb").is_file()
        assert (first.data_dir / "readmodels.duckdb").is_file()
    finally:
        if second is not None:
            second.stop()
        first.stop()
