"""Faults survived: the embedded nats-server killed with SIGKILL in the middle of a burst of
dispatches, and the whole thing restarted."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from pathlib import Path

from shipyard.events import commands
from shipyard.events.log import EventLog
from tests.conftest import Up
from tests.samples import dispatch_body

BURST = 1000
KILL_AFTER = 250  # acknowledged dispatches before the server is killed
IN_FLIGHT = 40


async def test_kill_9_of_nats_during_a_burst_loses_no_acknowledged_dispatch(
    tmp_path: Path,
) -> None:
    """Of 1,000 dispatches sent while the embedded nats-server is killed with SIGKILL, every
    one acknowledged to its caller is in the log after a restart, every other one was reported
    to its caller as failed, and the restarted read models equal a fresh replay."""
    data = tmp_path / "data"
    first = Up(data, "--roles", "commands,projector,gateway")
    first.wait_ready()
    nats_pid = int((data / "nats" / "nats.pid").read_text())

    acked: dict[int, str] = {}  # request number -> task id
    failed: dict[int, str] = {}  # request number -> what the caller was told
    killed = asyncio.Event()
    nc = await first.connect("dispatcher", name="burst")
    gate = asyncio.Semaphore(IN_FLIGHT)

    async def one(n: int) -> None:
        body = dispatch_body(workdir=f"/srv/app-{n}", idempotency_key=f"burst-{n}")
        async with gate:
            try:
                result = await commands.call(nc, "dispatch", body, timeout=1.5)
            except Exception as e:  # whatever the caller sees, it is told it failed
                failed[n] = f"{type(e).__name__}: {e}"
                return
        acked[n] = result["task_id"]
        if len(acked) >= KILL_AFTER and not killed.is_set():
            os.kill(nats_pid, signal.SIGKILL)
            killed.set()

    try:
        await asyncio.gather(*(one(n) for n in range(BURST)))
    finally:
        with contextlib.suppress(OSError):  # its server is gone
            await nc.close()
        first.stop()
    assert killed.is_set()
    assert len(acked) + len(failed) == BURST
    assert len(acked) >= KILL_AFTER and failed, "the kill landed outside the burst"

    second = Up(data)
    second.wait_ready()
    try:
        nc = await second.connect(name="check")
        try:
            log = EventLog(nc)
            missing = [
                (n, task_id)
                for n, task_id in acked.items()
                if not await log.last_seq("task", task_id)
            ]
            assert missing == [], f"acknowledged but not in the log: {missing[:5]}"
            dispatched = {e.aggregate_id async for e in log.read() if e.type == "task_dispatched"}
            # A dispatch whose caller timed out may still have landed: only those may add to
            # what was acknowledged, and none is there twice (idempotency keys).
            assert set(acked.values()) <= dispatched
            assert len(dispatched) <= BURST
        finally:
            await nc.close()
        verify = second.cli("replay", "--verify")
        assert verify.returncode == 0, verify.stdout + verify.stderr
    finally:
        second.stop()
