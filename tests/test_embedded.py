"""The embedded nats-server and the one-instance-per-data-dir rule, as `shipyard up` runs them."""

from __future__ import annotations

import asyncio
import os
import select
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from shipyard import instance
from shipyard.embedded import EmbeddedNats
from shipyard.errors import AlreadyRunning
from shipyard.events.envelope import make
from shipyard.events.log import EventLog, connect
from shipyard.events.types import TaskDispatched
from tests.conftest import Up, alive
from tests.samples import dispatch_body


def wait_gone(pid: int, timeout: float = 15) -> bool:
    """Wait for any process (not only a child) to exit; True if it did."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([fd], [], [], timeout)[0])
    finally:
        os.close(fd)


def test_server_is_loopback_only_and_takes_a_free_port(tmp_path: Path) -> None:
    """Two embedded servers (or a user's own NATS) never clash: each gets its own port."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        users_port = taken.getsockname()[1]
    users = EmbeddedNats(tmp_path / "users", port=users_port)
    users.start()
    ours = EmbeddedNats(tmp_path / "ours")
    try:
        url = ours.start()
        assert url.startswith("nats://127.0.0.1:")
        assert int(url.rsplit(":", 1)[1]) != users_port
        config = ours.config_path.read_text()
        assert "sync_interval: always" in config
        assert str(tmp_path / "ours" / "store") in config
    finally:
        ours.stop()
        users.stop()


def test_acknowledged_appends_survive_kill_9(tmp_path: Path) -> None:
    """kill -9 the server after appends were acknowledged: after restart all are there."""
    root = tmp_path / "nats"

    async def write(url: str) -> list[str]:
        nc = await connect([url])
        log = EventLog(nc)
        await log.ensure_stream()
        events = [
            make(
                TaskDispatched(title=f"n{i}", prompt="p", dispatcher="d"),
                aggregate_id=f"t-k{i}",
                actor="tests",
            )
            for i in range(300)
        ]
        await asyncio.gather(*(log.append(e, expect=0) for e in events))
        await nc.close()
        return [e.id for e in events]

    async def read(url: str) -> list[str]:
        nc = await connect([url])
        ids = [e.id async for e in EventLog(nc).read()]
        await nc.close()
        return ids

    server = EmbeddedNats(root)
    acknowledged = asyncio.run(write(server.start()))
    pid = server.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    server.stop()
    restarted = EmbeddedNats(root)
    try:
        stored = asyncio.run(read(restarted.start()))
    finally:
        restarted.stop()
    assert sorted(stored) == sorted(acknowledged)


def test_second_up_on_the_same_data_dir_refuses(up: Up) -> None:
    """A second `shipyard up` on a data dir in use exits 1 with a clear message."""
    second = up.cli("up")
    assert second.returncode == 1
    assert "already running" in second.stderr
    assert str(up.data_dir) in second.stderr
    assert "Traceback" not in second.stderr


def test_lock_is_held_only_while_running(tmp_path: Path) -> None:
    """The lock refuses a second holder and is free again once released."""
    first = instance.InstanceLock(tmp_path)
    first.acquire()
    with pytest.raises(AlreadyRunning):
        instance.InstanceLock(tmp_path).acquire()
    assert instance.is_running(tmp_path)
    first.release()
    assert not instance.is_running(tmp_path)
    with instance.InstanceLock(tmp_path):
        assert instance.is_running(tmp_path)


def test_kill_9_of_up_leaves_no_orphan_and_no_stale_lock(tmp_path: Path) -> None:
    """kill -9 `shipyard up`: its nats-server dies with it, and the next `up` starts."""
    data = tmp_path / "data"
    first = Up(data)
    first.wait_ready()
    nats_pid = int((data / "nats" / "nats.pid").read_text())
    assert alive(nats_pid)
    first.proc.send_signal(signal.SIGKILL)
    first.stop()
    assert wait_gone(nats_pid), "nats-server outlived the killed shipyard up"

    second = Up(data)
    try:
        second.wait_ready()
        result = second.cli("dispatch", "-", stdin=_json(dispatch_body()))
        assert result.returncode == 0, result.stderr
    finally:
        assert second.stop() == 0


def test_sigterm_stops_cleanly(tmp_path: Path) -> None:
    """SIGTERM: `up` stops its server, removes its instance file and exits 0."""
    data = tmp_path / "data"
    running = Up(data)
    running.wait_ready()
    nats_pid = int((data / "nats" / "nats.pid").read_text())
    assert running.stop() == 0
    assert wait_gone(nats_pid, 5)
    assert not (data / "instance.json").exists()
    assert not instance.is_running(data)
    assert "Shipyard stopped." in running.output


def test_up_with_nats_url_uses_that_server_and_spawns_none(tmp_path: Path) -> None:
    """`up --nats URL` runs against an existing server; no embedded server is started."""
    external = EmbeddedNats(tmp_path / "external")
    url = external.start()
    data = tmp_path / "data"
    running = Up(data, "--nats", url)
    try:
        running.wait_ready()
        assert url in running.banner[1]
        assert not (data / "nats").exists()
        result = running.cli("dispatch", "-", stdin=_json(dispatch_body()))
        assert result.returncode == 0, result.stderr
        events = running.cli("events", "--nats", url)
        assert result.stdout.strip() in events.stdout
    finally:
        assert running.stop() == 0
        external.stop()


def test_nats_url_from_the_environment_is_used(tmp_path: Path) -> None:
    """SHIPYARD_NATS_URL points the CLI at a server without any flag; a server that holds no
    Shipyard stream is reported as such, not with a traceback."""
    external = EmbeddedNats(tmp_path / "external")
    url = external.start()
    try:
        env = {**os.environ, "SHIPYARD_NATS_URL": url, "SHIPYARD_DATA_DIR": str(tmp_path / "d")}
        result = subprocess.run(
            [sys.executable, "-m", "shipyard.cli", "events"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 1
        assert "no Shipyard event stream" in result.stderr
        assert "Traceback" not in result.stderr
    finally:
        external.stop()


def _json(body: dict[str, object]) -> str:
    import json

    return json.dumps(body)
