"""Fixtures: a real nats-server from the wheel on a random loopback port, per test."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from nats.aio.client import Client as NATS

from shipyard import access
from shipyard.access import Role
from shipyard.embedded import EmbeddedNats
from shipyard.events.log import EventLog, connect
from shipyard.handler.service import Handler
from shipyard.projections.projector import Projector, ReadModels


def alive(pid: int) -> bool:
    """Whether a process with this id exists (a zombie counts until it is reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[EmbeddedNats]:
    """A fresh nats-server with JetStream; its store lives in the test's tmp dir."""
    server = EmbeddedNats(tmp_path / "nats")
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def nc(nats_server: EmbeddedNats) -> AsyncIterator[NATS]:
    conn = await connect([nats_server.url], name="test")
    yield conn
    await conn.close()


@pytest.fixture
async def event_log(nc: NATS) -> EventLog:
    log = EventLog(nc)
    await log.ensure_stream()
    return log


@pytest.fixture
async def handlers(event_log: EventLog) -> AsyncIterator[list[Handler]]:
    """Handlers a test starts are stopped after it."""
    running: list[Handler] = []
    yield running
    for handler in running:
        await handler.stop()


@pytest.fixture
async def projector(tmp_path: Path, event_log: EventLog) -> AsyncIterator[Projector]:
    """A projector following the test's log into a DuckDB file of its own."""
    models = ReadModels(tmp_path / "readmodels.duckdb")
    await models.open()
    proj = Projector(event_log, models)
    await proj.start()
    yield proj
    await proj.stop()
    await models.close()


class Up:
    """A `shipyard up` process, started as a user would."""

    def __init__(self, data_dir: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir
        self.env = {**os.environ, "SHIPYARD_DATA_DIR": str(data_dir), "SHIPYARD_PORT": "0"}
        self.env.update(env or {})
        self.env.pop("SHIPYARD_NATS_URL", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "shipyard.cli", "up", *args],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.banner: list[str] = []
        self.output = ""
        self.errors = ""

    def wait_ready(self) -> None:
        """Block until the banner's first line says it is up (or it exits)."""
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if "is up" not in line:
            self.proc.wait(10)
            err = self.proc.stderr.read() if self.proc.stderr else ""
            raise AssertionError(f"shipyard up did not start: {line!r} {err}")
        self.banner.append(line)
        while not self.banner[-1].lstrip().startswith("dispatch:"):
            self.banner.append(self.proc.stdout.readline())

    def cli(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "shipyard.cli", *args],
            env=self.env,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=60,
        )

    def wait_finished(self, task_id: str) -> str:
        """Follow the task's events (`shipyard events --follow`) until it finishes; return
        the line that says how."""
        follow = subprocess.Popen(
            [sys.executable, "-m", "shipyard.cli", "events", "--follow", "--task", task_id],
            env=self.env,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert follow.stdout is not None
        found = ""
        for line in follow.stdout:
            if "task_finished" in line:
                found = line
                break
        follow.terminate()
        follow.communicate(timeout=10)
        return found

    async def connect(self, role: Role = "admin", agent: str = "", name: str = "test") -> NATS:
        """A NATS connection to its embedded server as the given role's user."""
        info = json.loads((self.data_dir / "instance.json").read_text())
        users = access.Users.load(access.nats_dir(self.data_dir))
        return await connect(
            info["nats_url"], name=name, credentials=users.credentials(role, agent)
        )

    def stop(self) -> int:
        """SIGTERM it, collect what it printed (``output``, ``errors``), return its status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        out, err = self.proc.communicate(timeout=30)
        self.output = "".join(self.banner) + out
        self.errors = err
        return self.proc.returncode


def up_with_agent(
    tmp_path: Path,
    agent: str,
    argv: list[str],
    *,
    agent_env: dict[str, str] | None = None,
    handler: dict[str, int | float] | None = None,
    env: dict[str, str] | None = None,
) -> Up:
    """`shipyard up`, ready, whose default agent is the `command` builder ``argv``, with work
    directories confined to ``tmp_path/work``."""
    data = tmp_path / "data"
    data.mkdir()
    (tmp_path / "work").mkdir()
    q = json.dumps
    options = "".join(f"{key} = {q(value)}\n" for key, value in (handler or {}).items())
    agent_env_line = (
        "env = {" + ", ".join(f"{k} = {q(v)}" for k, v in agent_env.items()) + "}\n"
        if agent_env
        else ""
    )
    (data / "shipyard.toml").write_text(
        f"[handler]\ndefault_agent = {q(agent)}\nworkdir_roots = [{q(str(tmp_path / 'work'))}]\n"
        f'{options}\n[agents.{agent}]\nkind = "command"\n'
        f"command = [{', '.join(q(a) for a in argv)}]\n{agent_env_line}"
    )
    running = Up(data, env=env)
    running.wait_ready()
    return running


@pytest.fixture
def up(tmp_path: Path) -> Iterator[Up]:
    """`shipyard up` on the embedded default, in a data dir of the test's own."""
    running = Up(tmp_path / "data")
    running.wait_ready()
    yield running
    running.stop()
