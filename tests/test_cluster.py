"""Scaled out on a 3-node NATS cluster: the stream's leader killed with SIGKILL in the middle
of a burst of dispatches, and every task still runs exactly once.

Everything is a real process, as docker-compose.yml deploys it: three nats-server nodes
routed on loopback with the Shipyard stream replicated three times, two
`shipyard up --roles handler,commands` and one `shipyard up --roles projector,gateway`, each
with its own data directory. Part of the normal suite; it takes about a minute.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from nats.aio.client import Client as NATS

from bench import _common as c
from bench._cluster import LoopbackCluster, stream_leader
from shipyard.errors import CommandRejected, CommandUnavailable
from shipyard.events import commands
from shipyard.events.log import STREAM, EventLog, connect

BURST = 500
KILL_AFTER = 150  # acknowledged dispatches before the stream leader is killed
IN_FLIGHT = 32  # dispatches awaiting their reply at once
CALL_TIMEOUT = 10.0  # seconds a dispatch waits for its reply before it is sent again
RESEND_AFTER = 0.1  # seconds between a dispatch left without a reply and its next try
FINISH_TIMEOUT = 90.0  # seconds for every task to finish after the last dispatch
RUN_EVENTS = ("task_dispatched", "task_claimed", "builder_started", "run_finished", "task_finished")

AGENT = "quick"
# The builder: one bash, which records its launch, writes the deliverable and says so.
BUILDER = (
    'echo "$SHIPYARD_TASK_ID" >> "$LAUNCHES" && '
    "printf '# Built\\n\\nBy the quick builder.\\n' > README.md && echo built"
)

pytestmark = pytest.mark.timeout(240)


@dataclass
class Deployment:
    cluster: LoopbackCluster
    gateway: c.ShipyardUp
    handlers: list[c.ShipyardUp]
    work: Path
    launches: Path


@dataclass
class Folded:
    """What the event log says happened to each task."""

    events: Counter[str] = field(default_factory=Counter)  # event id -> times stored
    per_task: dict[str, Counter[str]] = field(default_factory=dict)  # task -> event type -> n
    outcomes: dict[str, str] = field(default_factory=dict)  # task -> how it finished


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LoopbackCluster]:
    """Three JetStream nodes routed to each other on loopback; all stopped after the test."""
    nodes = LoopbackCluster(tmp_path / "cluster")
    try:
        nodes.start()
        yield nodes
    finally:
        nodes.stop()


def settings_file(root: Path, work: Path, launches: Path) -> Path:
    q = json.dumps
    path = root / "shipyard.toml"
    path.write_text(
        f"[handler]\nconcurrency = 8\ndefault_agent = {q(AGENT)}\n"
        f"workdir_roots = [{q(str(work))}]\n\n"
        f'[agents.{AGENT}]\nkind = "command"\nconcurrency = 8\n'
        f"command = [{q('/bin/bash')}, {q('-c')}, {q(BUILDER)}]\n"
        f"env = {{ LAUNCHES = {q(str(launches))} }}\n"
    )
    return path


@pytest.fixture
async def deployment(tmp_path: Path, cluster: LoopbackCluster) -> AsyncIterator[Deployment]:
    """Two handler processes and a gateway on the cluster; each is stopped (killed if it
    hangs) after the test, whatever happened."""
    await cluster.wait_jetstream()
    work, launches = tmp_path / "work", tmp_path / "launches.txt"
    work.mkdir()
    urls = ",".join(cluster.urls)
    env = {"SHIPYARD_STREAM_REPLICAS": "3", "SHIPYARD_PORT": "0"}

    def up(name: str, roles: str) -> c.ShipyardUp:
        root = tmp_path / name
        (root / "data").mkdir(parents=True)
        config = settings_file(root, work, launches)
        args = ["--roles", roles, "--nats", urls, "--data-dir", str(root / "data")]
        return c.ShipyardUp([*args, "--config", str(config)], root, env)

    gateway = up("gateway", "projector,gateway")
    handlers = [up(f"handler-{i}", "handler,commands") for i in (1, 2)]
    started: list[c.ShipyardUp] = []
    try:
        # The gateway first: it makes the replicated stream, which the handlers then find.
        await gateway.start(ready="dashboard:")
        started.append(gateway)
        for handler in handlers:
            await handler.start(ready=" is up")
            started.append(handler)
        yield Deployment(cluster, gateway, handlers, work, launches)
    finally:
        await asyncio.gather(*(p.stop() for p in reversed(started)), return_exceptions=True)


def quick_body(work: Path, n: int) -> dict[str, Any]:
    prompt = (
        f"## Task\nBuild number {n}\n\n## Requirements\n- README.md says it was built\n\n"
        f"## Environment\n- Working directory: {work / f'task-{n:03d}'}\n\n"
        "## Deliverables\n1. README.md\n"
    )
    return {
        "request_type": "queue",
        "action": "create",
        "task_type": "build",
        "action_name": f"Build {n}",
        "priority": "normal",
        "idempotency_key": f"cluster-burst-{n}",
        "payload": {"prompt": prompt, "dispatcher": "tests", "task_title": f"Build {n}"},
    }


async def dispatch_burst(nc: NATS, deployment: Deployment, leader: str) -> dict[int, str]:
    """Dispatch ``BURST`` tasks over NATS, as a dispatcher does, killing the node named
    ``leader`` once ``KILL_AFTER`` are acknowledged. A dispatch left without a reply is sent
    again: its idempotency key makes sure it is one task however often it is sent."""
    acked: dict[int, str] = {}
    gate = asyncio.Semaphore(IN_FLIGHT)

    async def one(n: int) -> None:
        body = quick_body(deployment.work, n)
        async with gate:
            while True:
                try:
                    result = await commands.call(nc, "dispatch", body, timeout=CALL_TIMEOUT)
                    break
                except CommandUnavailable:
                    pass  # no reply (or no service) in time: its outcome is unknown
                except CommandRejected as e:
                    if e.code != "unavailable":
                        raise  # the service could not store it yet; anything else is wrong
                await asyncio.sleep(RESEND_AFTER)  # a pause before sending it again
        acked[n] = result["task_id"]
        node = deployment.cluster.node(leader)
        if len(acked) >= KILL_AFTER and node.alive:
            node.kill()

    await asyncio.gather(*(one(n) for n in range(BURST)))
    return acked


async def history_total(session: aiohttp.ClientSession, gateway: c.ShipyardUp, **query: str) -> int:
    """How many finished runs the dashboard's Build History counts."""
    async with session.get(
        f"{gateway.url}/api/history",
        params={"limit": "1", **query},
        headers={"Authorization": f"Bearer {gateway.token}"},
    ) as response:
        response.raise_for_status()
        page = await response.json()
    return int(page["total"])


async def until_all_succeeded(gateway: c.ShipyardUp) -> None:
    """Poll the gateway's API (what the dashboard reads) until it counts ``BURST`` succeeded
    runs; fail after ``FINISH_TIMEOUT`` saying how far it got."""
    deadline = time.monotonic() + FINISH_TIMEOUT
    async with aiohttp.ClientSession() as session:
        while (done := await history_total(session, gateway, outcome="succeeded")) < BURST:
            if time.monotonic() > deadline:
                runs = await history_total(session, gateway)
                pytest.fail(f"{done}/{BURST} succeeded runs ({runs} finished) by the deadline")
            await asyncio.sleep(0.25)  # the API offers nothing to wait on; poll it


async def fold(log: EventLog) -> Folded:
    folded = Folded()
    async for event in log.read():
        folded.events[event.id] += 1
        if event.aggregate != "task":
            continue
        folded.per_task.setdefault(event.aggregate_id, Counter())[event.type] += 1
        if event.type == "task_finished":
            folded.outcomes[event.aggregate_id] = str(event.data.outcome)
    return folded


async def build_history_says(gateway: c.ShipyardUp, browser_path: str) -> str:
    """The Build History panel's count, in headless Chromium, once it shows every run."""
    from playwright.async_api import async_playwright, expect

    from tests.test_dashboard import CHROMIUM_ARGS

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=browser_path, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page()
            await page.goto(f"{gateway.url}/?token={gateway.token}")
            meta = page.locator("#history-meta")
            await expect(meta).to_have_text(f"{BURST} runs", timeout=20_000)
            return await meta.inner_text()
        finally:
            await browser.close()


async def test_killing_the_stream_leader_mid_burst_runs_every_task_exactly_once(
    deployment: Deployment,
) -> None:
    """500 tasks dispatched to two handlers while the node leading the replicated stream is
    killed with SIGKILL: the stream gets a new leader; each task is dispatched once, claimed
    once, its builder launched once, its run finished once and succeeded (folded from the
    event log, and counted by the builders themselves); and the gateway's Build History —
    in the API and, where Chromium is installed, on the dashboard — shows all 500."""
    nc = await connect(deployment.cluster.urls, name="cluster-test")
    try:
        leader = await stream_leader(nc, STREAM)
        acked = await dispatch_burst(nc, deployment, leader)
        await until_all_succeeded(deployment.gateway)
        folded = await fold(EventLog(nc))
        new_leader = await stream_leader(nc, STREAM)
    finally:
        with contextlib.suppress(Exception):
            await nc.close()

    assert not deployment.cluster.node(leader).alive
    assert new_leader != leader
    tasks = set(acked.values())
    assert len(tasks) == BURST, "two dispatches were given the same task"
    assert [i for i, n in folded.events.items() if n > 1] == [], "an event was stored twice"
    assert set(folded.per_task) == tasks, "a task that nobody dispatched, or one lost"
    for kind in RUN_EVENTS:
        wrong = {t: n[kind] for t, n in folded.per_task.items() if n[kind] != 1}
        assert wrong == {}, f"{kind} not exactly once: {sorted(wrong.items())[:5]}"
    assert Counter(folded.outcomes.values()) == {"succeeded": BURST}
    launched = Counter(deployment.launches.read_text().split())
    assert launched == dict.fromkeys(tasks, 1), "a builder launched twice, or never"

    from tests.test_dashboard import find_chromium  # needs playwright

    browser_path = find_chromium()
    if browser_path is not None:
        assert await build_history_says(deployment.gateway, browser_path) == f"{BURST} runs"
