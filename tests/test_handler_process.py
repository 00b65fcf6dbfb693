"""Handlers as separate processes, the way they run on several hosts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from shipyard.embedded import EmbeddedNats
from shipyard.events.commands import Commands
from shipyard.events.log import EventLog
from shipyard.events.types import TaskState
from shipyard.handler.service import Handler
from tests import handlers as h
from tests.test_handler import _gone, body

TOML = """
[handler]
workdir_roots = [{root}]
default_agent = "slow"
heartbeat_interval = 0.2
stale_after = 1.0
failed_after = 2.0
max_attempts = 2
retry_backoff = 0.0
kill_grace = 1.0

[agents.slow]
kind = "command"
command = [{python}, {script}, "{{phase}}", "slow"]
env = {{ SHIPYARD_TEST_LAUNCHES = {launches} }}

[agents.ok]
kind = "command"
command = [{python}, {script}, "{{phase}}", "ok"]
env = {{ SHIPYARD_TEST_LAUNCHES = {launches} }}
concurrency = 4
"""


def start_handler_process(tmp: Path, url: str, name: str) -> subprocess.Popen[str]:
    config = tmp / f"{name}.toml"
    q = json.dumps
    config.write_text(
        TOML.format(
            root=q(str(tmp / "work")),
            python=q(sys.executable),
            script=q(h.SCRIPTED),
            launches=q(str(tmp / "launches.txt")),
        )
    )
    (tmp / "work").mkdir(exist_ok=True)
    env = {**os.environ, "SHIPYARD_DATA_DIR": str(tmp / name)}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "shipyard.cli",
            "up",
            "--roles",
            "handler",
            "--nats",
            url,
            "--config",
            str(config),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert "is up (handler)" in line, line + (proc.stderr.read() if proc.stderr else "")
    return proc


async def test_kill_9_of_a_handler_mid_build(
    tmp_path: Path, nats_server: EmbeddedNats, event_log: EventLog
) -> None:
    """kill -9 a handler process mid-build: its builder group dies with it, the run goes
    STALE then FAILED (handler_lost), and another handler runs the retry."""
    log = event_log
    doomed = start_handler_process(tmp_path, nats_server.url, "doomed")
    try:
        task_id = (await Commands(log).dispatch(body(tmp_path, "k9", agent="slow"))).task_id
        started = await h.wait_for(log, h.of_type(task_id, "builder_started"))
        doomed.send_signal(signal.SIGKILL)
        doomed.communicate(timeout=10)
        assert await _gone(started.data.pid), "the builder outlived its killed handler"

        cfg = h.settings(
            tmp_path,
            default_agent="slow",
            heartbeat_interval=0.2,
            stale_after=1.0,
            failed_after=2.0,
            max_attempts=2,
        )
        survivor = Handler(log, cfg, handler_id="survivor")
        await survivor.start()
        try:
            stale = await h.wait_for(log, h.of_type(task_id, "run_stale"), timeout=15)
            assert stale.data.detected_by == "survivor"
            ended = await h.wait_for(log, h.of_type(task_id, "run_finished"), timeout=15)
            assert ended.seq > stale.seq
            assert ended.data.reason == "handler_lost"
            assert ended.data.outcome == TaskState.FAILED
            retry = await h.wait_for(
                log,
                lambda e: h.of_type(task_id, "task_claimed")(e) and e.data.attempt == 2,
                timeout=15,
            )
            assert retry.data.handler == "survivor"
        finally:
            await survivor.stop()
    finally:
        if doomed.poll() is None:
            doomed.kill()
            doomed.communicate(timeout=10)


async def test_a_restarted_handler_reconciles_the_runs_it_owned(
    tmp_path: Path, nats_server: EmbeddedNats, event_log: EventLog
) -> None:
    """A handler killed mid-build and started again on the same data dir ends its old run at
    once (handler_restarted) and runs the retry itself, without waiting for the watchdog."""
    first = start_handler_process(tmp_path, nats_server.url, "same")
    try:
        task_id = (await Commands(event_log).dispatch(body(tmp_path, "re", agent="slow"))).task_id
        claim = await h.wait_for(event_log, h.of_type(task_id, "task_claimed"))
        await h.wait_for(event_log, h.of_type(task_id, "builder_started"))
        first.send_signal(signal.SIGKILL)
        first.communicate(timeout=10)
        second = start_handler_process(tmp_path, nats_server.url, "same")
        try:
            ended = await h.wait_for(event_log, h.of_type(task_id, "run_finished"), timeout=10)
            assert ended.data.reason == "handler_restarted"
            retry = await h.wait_for(
                event_log,
                lambda e: h.of_type(task_id, "task_claimed")(e) and e.data.attempt == 2,
                timeout=10,
            )
            assert retry.data.handler == claim.data.handler
            assert not any(e.type == "run_stale" for e in await event_log.history("task", task_id))
        finally:
            second.send_signal(signal.SIGTERM)
            second.communicate(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
            first.communicate(timeout=10)


async def test_two_handler_processes_run_thirty_tasks_exactly_once(
    tmp_path: Path, nats_server: EmbeddedNats, event_log: EventLog
) -> None:
    """Two `shipyard up --roles handler` processes and 30 queued tasks: every builder is
    launched exactly once, and both handlers take a share."""
    commands = Commands(event_log)
    ids = [
        (await commands.dispatch(body(tmp_path, f"p{i}", agent="ok"))).task_id for i in range(30)
    ]
    procs = [start_handler_process(tmp_path, nats_server.url, name) for name in ("h1", "h2")]
    try:
        claims = []
        for task_id in ids:
            done = await h.wait_for(event_log, h.finished(task_id), timeout=120)
            assert done.data.outcome == TaskState.SUCCEEDED
        async for event in event_log.read():
            if event.type == "task_claimed":
                claims.append(event.data.handler)
        assert len(claims) == 30
        assert len(set(claims)) == 2
        builds = [task for task, phase, _ in h.launches(tmp_path) if phase == "build"]
        assert sorted(builds) == sorted(ids)
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            assert proc.wait(30) == 0
            proc.communicate(timeout=10)
