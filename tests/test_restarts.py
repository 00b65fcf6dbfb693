"""Faults survived: restarts and bad disks.

The gateway stopped and started again while events keep coming: every SSE client, resuming
the way a browser's EventSource does, sees each event once, in order. The whole of
`shipyard up` stopped (SIGTERM, then SIGKILL) and started again between varied work: the
live read models equal a fresh replay. A data directory or NATS store that is read-only, full
or nearly full at start: `shipyard up` exits 1 at once with a sentence saying which directory
and what to do, never a hang or a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from nats.aio.client import Client as NATS

from shipyard.embedded import EmbeddedNats
from shipyard.errors import StorageError
from shipyard.events import commands
from shipyard.events.commands import Commands
from shipyard.events.log import EventLog
from shipyard.gateway.auth import TokenStore
from shipyard.gateway.sse import RECONNECT_MS
from shipyard.projections.projector import ReadModels
from tests import handlers as h
from tests.conftest import Up
from tests.handlers import SCRIPTED
from tests.samples import dispatch_body, hello_body

START_BOUND = 60  # seconds: a `shipyard up` that has not exited by then hangs


# --- disks that cannot take writes ------------------------------------------------------------


def mount_tmpfs(path: Path, size: str, *, read_only: bool = False) -> None:
    """A tmpfs of ``size`` at ``path``; the test is skipped where mounting is not allowed."""
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        if os.geteuid() != 0 or "permission denied" in done.stderr.lower():
            pytest.skip(f"mounting a tmpfs needs root (EPERM): {done.stderr.strip()}")
        raise AssertionError(f"mount failed: {done.stderr}")


@pytest.fixture
def mounts() -> Iterator[list[Path]]:
    """Mount points a test makes; each is unmounted after it, whatever happened."""
    made: list[Path] = []
    yield made
    for path in reversed(made):
        done = subprocess.run(["umount", str(path)], capture_output=True)
        if done.returncode != 0:  # something still holds it open: detach it anyway
            subprocess.run(["umount", "-l", str(path)], check=True)


def small_disk(mounts: list[Path], path: Path, *, free: int | None, read_only: bool) -> None:
    """A 1 MiB file system at ``path``, read-only, or filled until ``free`` bytes are left
    (``None``: left empty)."""
    mount_tmpfs(path, "1m", read_only=read_only)
    mounts.append(path)
    if free is None:
        return
    st = os.statvfs(path)
    room = st.f_bavail * st.f_frsize - free
    with contextlib.suppress(OSError), (path / "filler").open("wb") as f:
        f.write(b"\0" * room)  # to the last byte, when ``free`` is 0
        f.flush()
        os.fsync(f.fileno())
    st = os.statvfs(path)
    assert st.f_bavail * st.f_frsize <= free


def up_exits(data: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`shipyard up` on ``data``, which must exit by itself within START_BOUND."""
    env = {**os.environ, "SHIPYARD_DATA_DIR": str(data), "SHIPYARD_PORT": "0"}
    env.pop("SHIPYARD_NATS_URL", None)
    try:
        return subprocess.run(
            [sys.executable, "-m", "shipyard.cli", "up", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=START_BOUND,
        )
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"shipyard up hung on a bad disk: {e.stderr!r}") from e


BAD_DISKS = {
    # case: (which directory is on the small disk, bytes left free or None, read-only, says)
    "data dir read-only": ("data", None, True, "read-only file system"),
    "data dir full": ("data", 0, False, "full disk"),
    "data dir with a few KB free": ("data", 8192, False, "KiB free"),
    "NATS store read-only": ("store", None, True, "read-only file system"),
    "NATS store full": ("store", 0, False, "full disk"),
    "NATS store with a few KB free": ("store", 8192, False, "KiB free"),
}


@pytest.mark.parametrize("case", list(BAD_DISKS))
def test_up_on_a_bad_disk_exits_at_once_saying_what_to_fix(
    tmp_path: Path, mounts: list[Path], case: str
) -> None:
    """A data directory or NATS store that is read-only, full, or has a few KB left (a probe
    write fits, JetStream's and DuckDB's first blocks do not): `shipyard up` exits 1 by
    itself, naming the directory and the problem, with no traceback and no server left."""
    where, free, read_only, says = BAD_DISKS[case]
    data = tmp_path / "data"
    disk = data if where == "data" else data / "nats" / "store"
    small_disk(mounts, disk, free=free, read_only=read_only)

    done = up_exits(data)

    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    assert "is up" not in done.stdout
    message = done.stderr.strip()
    assert str(disk) in message
    assert ("NATS store" if where == "store" else "data directory") in message
    assert says in message
    assert not (data / "nats" / "nats.pid").exists(), "a nats-server was left running"


class _StoreUnchecked(EmbeddedNats):
    """A nats-server someone else runs: Shipyard's own start checks do not apply to it."""

    def _check_store_writable(self) -> None:
        return None


def test_up_against_a_nats_whose_store_is_full_says_so(tmp_path: Path, mounts: list[Path]) -> None:
    """`up --nats URL` against a server whose JetStream store has a few KB left: creating
    the stream fails, and `up` says which stream and what to check instead of a traceback."""
    server = _StoreUnchecked(tmp_path / "nats")
    small_disk(mounts, server.store_dir, free=4096, read_only=False)
    url = server.start()
    try:
        done = up_exits(tmp_path / "data", "--nats", url, "--roles", "projector")
    finally:
        server.stop()
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    assert "could not set up the SHIPYARD stream" in done.stderr
    assert "not full" in done.stderr


@pytest.mark.parametrize("read_only", [True, False], ids=["read-only", "full"])
async def test_read_models_on_a_bad_disk_are_a_storage_error(
    tmp_path: Path, mounts: list[Path], read_only: bool
) -> None:
    """DuckDB failing to create the read models file is a StorageError naming the file."""
    disk = tmp_path / "disk"
    small_disk(mounts, disk, free=None if read_only else 0, read_only=read_only)
    models = ReadModels(disk / "readmodels.duckdb")
    with pytest.raises(StorageError, match=r"cannot open the read models .*readmodels\.duckdb"):
        await models.open()
    await models.close()


# --- the gateway restarted under SSE clients ---------------------------------------------------

BROWSER_RETRY_MS = 3000  # what a browser waits before reconnecting when the server says nothing
APPEND_PACE = 0.01  # seconds between two dispatches of the steady trickle
SETTLE = 30.0  # seconds any one condition below may take before the test counts as hung


class Progress:
    """Wakes whoever waits on a condition over the test's state whenever that state moves."""

    def __init__(self) -> None:
        self._changed = asyncio.Condition()

    async def moved(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def until(self, what: str, check: Callable[[], bool]) -> None:
        async def wait() -> None:
            async with self._changed:
                await self._changed.wait_for(check)

        try:
            await asyncio.wait_for(wait(), SETTLE)
        except TimeoutError:
            raise AssertionError(f"never happened: {what}") from None


class EventSourceClient:
    """An SSE client that reconnects as a browser's EventSource does (the WHATWG HTML
    standard's "server-sent events" processing): it keeps the last event id it was given,
    waits the last ``retry:`` the server sent after the stream ends or a connection fails,
    then reconnects sending ``Last-Event-ID``. Events whose block is cut off are dropped."""

    def __init__(self, session: aiohttp.ClientSession, url: str, token: str, on: Progress):
        self.session = session
        self.url = url
        self.token = token
        self.on = on
        self.retry_ms = BROWSER_RETRY_MS
        self.last_event_id = ""
        self.seqs: list[int] = []  # the `seq` of every event delivered, in order
        self.opened = 0  # streams that answered 200
        self.refused: list[int] = []  # any other HTTP status: EventSource would give up
        self.malformed: list[str] = []  # events whose SSE id or name disagree with the event

    async def run(self) -> None:
        while True:
            headers = {"Authorization": f"Bearer {self.token}", "Accept": "text/event-stream"}
            if self.last_event_id:
                headers["Last-Event-ID"] = self.last_event_id
            try:
                async with self.session.get(f"{self.url}/api/events", headers=headers) as r:
                    if r.status != 200:
                        self.refused.append(r.status)
                        await self.on.moved()
                        return
                    self.opened += 1
                    await self.on.moved()
                    await self._read(r.content)
            except (aiohttp.ClientError, ConnectionError):
                pass  # the gateway is down, or went down mid-stream: reconnect, as a browser does
            await asyncio.sleep(self.retry_ms / 1000)  # the reconnection time it was told

    async def _read(self, content: aiohttp.StreamReader) -> None:
        event_type, data, id_buffer = "", "", self.last_event_id
        async for raw in content:
            line = raw.decode().rstrip("\r\n")
            if line == "":  # dispatch the event
                self.last_event_id = id_buffer
                if data and event_type != "ping":
                    await self._deliver(event_type, data)
                event_type, data = "", ""
                continue
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if field == "id":
                id_buffer = value
            elif field == "event":
                event_type = value
            elif field == "data":
                data += value + "\n"
            elif field == "retry" and value.isdigit():
                self.retry_ms = int(value)

    async def _deliver(self, event_type: str, data: str) -> None:
        event = json.loads(data)
        if event["type"] != event_type or str(event["seq"]) != self.last_event_id:
            self.malformed.append(f"{event_type} {self.last_event_id}: {data[:200]}")
        self.seqs.append(event["seq"])
        await self.on.moved()

    @property
    def last_seq(self) -> int:
        return self.seqs[-1] if self.seqs else 0


def gateway(data: Path, nats_url: str, port: int = 0) -> Up:
    """`shipyard up` running just the projector and the gateway against ``nats_url``."""
    roles = ("--roles", "projector,gateway", "--nats", nats_url)
    return Up(data, *roles, env={"SHIPYARD_PORT": str(port)})


def gateway_port(up: Up) -> int:
    line = next(line for line in up.banner if "dashboard:" in line)
    return urllib.parse.urlsplit(line.split("dashboard:", 1)[1].strip()).port or 0


async def test_sse_clients_resume_with_no_gap_across_gateway_restarts(
    tmp_path: Path, nats_server: EmbeddedNats, event_log: EventLog
) -> None:
    """Three SSE clients follow /api/events while dispatches keep landing. The gateway
    (`shipyard up --roles projector,gateway --nats URL`) is stopped with SIGTERM, then
    killed with SIGKILL, each time started again on the same port while events land in
    between. Reconnecting as EventSource does, each client gets every event exactly once,
    in order, from sequence 1 to the last: no gap, no duplicate."""
    data = tmp_path / "data"
    tokens = TokenStore(data)
    viewers = [tokens.create("viewer", f"sse-{n}") for n in range(3)]
    running = gateway(data, nats_server.url)
    running.wait_ready()
    port = gateway_port(running)
    url = f"http://127.0.0.1:{port}"
    appends = Commands(event_log)
    on = Progress()
    appended = 0

    enough = asyncio.Event()

    async def append_until_enough() -> None:
        # Stopped by a flag, not by cancelling: on Python 3.11 a cancel that lands as a NATS
        # reply arrives is lost inside asyncio.wait_for (CPython gh-86296).
        nonlocal appended
        while not enough.is_set():
            await appends.dispatch(dispatch_body(workdir=f"/srv/app-{appended}"))
            appended += 1
            await on.moved()
            await asyncio.sleep(APPEND_PACE)  # a steady trickle, not a flood

    async def appended_more(count: int) -> None:
        goal = appended + count
        await on.until(f"{count} more dispatches", lambda: appended >= goal)

    async def all_resumed(opened: int) -> None:
        """Every client reconnected to the new gateway and got events appended since."""
        goal = await event_log.stream_last_seq() + 5
        await on.until(
            f"every client on stream {opened}, past seq {goal}",
            lambda: all(c.opened >= opened and c.last_seq >= goal for c in clients),
        )

    async with aiohttp.ClientSession() as session:
        clients = [EventSourceClient(session, url, token, on) for token in viewers]
        appender = asyncio.create_task(append_until_enough())
        readers: list[asyncio.Task[None]] = []
        try:
            for client in clients:  # joining one by one, each reads the backlog first
                readers.append(asyncio.create_task(client.run()))
                await appended_more(10)
            await all_resumed(1)

            await asyncio.to_thread(running.stop)  # SIGTERM: its streams end cleanly
            await appended_more(20)
            running = gateway(data, nats_server.url, port)
            await asyncio.to_thread(running.wait_ready)
            await all_resumed(2)

            running.proc.kill()  # SIGKILL: its streams are cut wherever they were
            await asyncio.to_thread(running.stop)
            await appended_more(20)
            running = gateway(data, nats_server.url, port)
            await asyncio.to_thread(running.wait_ready)
            await all_resumed(3)

            enough.set()
            await appender
            last = await event_log.stream_last_seq()
            await on.until(
                f"every client at seq {last}", lambda: all(c.last_seq >= last for c in clients)
            )
        finally:
            enough.set()
            for task in readers:
                task.cancel()
            await asyncio.to_thread(running.stop)  # ends every stream, whatever a reader does
            await asyncio.gather(appender, *readers, return_exceptions=True)

    for client in clients:
        assert client.refused == []
        assert client.malformed == []
        assert client.opened == 3
        assert client.retry_ms == RECONNECT_MS, "the server's retry: was not seen"
        assert client.seqs == list(range(1, last + 1))


# --- the whole of `shipyard up` restarted between varied work ---------------------------------

UP_TOML = """
[handler]
default_agent = "ok"
workdir_roots = [{root}]
max_attempts = 1
kill_grace = 1.0
{agents}
"""


def varied_up(tmp_path: Path) -> Path:
    """A data dir whose agents are the scripted builder in the modes ok, fail and slow."""
    data = tmp_path / "data"
    data.mkdir()
    (tmp_path / "work").mkdir()
    q = json.dumps
    agents = "".join(
        f'\n[agents.{mode}]\nkind = "command"\n'
        f'command = [{q(sys.executable)}, {q(SCRIPTED)}, "{{phase}}", {q(mode)}]\n'
        for mode in ("ok", "fail", "slow")
    )
    (data / "shipyard.toml").write_text(
        UP_TOML.format(root=q(str(tmp_path / "work")), agents=agents)
    )
    return data


class Work:
    """Commands sent to a running `shipyard up` over its NATS, and what came of them."""

    def __init__(self, tmp_path: Path, nc: NATS) -> None:
        self.tmp_path = tmp_path
        self.nc = nc
        self.log = EventLog(nc)

    async def dispatch(self, name: str, agent: str, **extra: Any) -> str:
        body = {**hello_body(str(self.tmp_path / "work" / name)), "agent": agent, **extra}
        result = await commands.call(self.nc, "dispatch", body, actor="tests")
        return str(result["task_id"])

    async def outcome(self, task_id: str, *, after: int = 0) -> str:
        """How the task's first finish after sequence ``after`` went: the outcome, and for a
        failure its reason (``failed: handler_stopped``)."""
        done = await h.wait_for(self.log, h.finished(task_id), start=after + 1, timeout=SETTLE)
        outcome = str(done.data.outcome)
        return f"{outcome}: {done.data.reason}" if outcome == "failed" else outcome

    async def running(self, task_id: str) -> None:
        await h.wait_for(self.log, h.of_type(task_id, "builder_started"), timeout=SETTLE)

    async def talk(self, task_id: str) -> None:
        """A question to a builder, read by it and answered in the same thread."""
        asked = await commands.call(
            self.nc,
            "send",
            {"sender": "openclaw", "recipient": "ok", "type": "question", "body": "Ready?",
             "task_id": task_id},
        )  # fmt: skip
        await commands.call(
            self.nc,
            "mark_read",
            {"reader": "ok", "thread_id": asked["thread_id"], "message_ids": [asked["message_id"]]},
        )
        await commands.call(
            self.nc,
            "send",
            {"sender": "ok", "recipient": "openclaw", "type": "status_response", "body": "Yes.",
             "thread_id": asked["thread_id"], "reply_to": asked["message_id"]},
        )  # fmt: skip


def verified(up: Up) -> None:
    """`shipyard replay --verify`: the live read models equal a fresh replay, table by table."""
    done = up.cli("replay", "--verify")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Identical." in done.stdout


async def test_read_models_equal_a_fresh_replay_across_sigterm_and_kill_9_restarts(
    tmp_path: Path,
) -> None:
    """`shipyard up` does varied work — builds that succeed, fail and are cancelled, a
    parallel group, a thread of messages, a retry — and is stopped with SIGTERM mid-build,
    started again, killed with SIGKILL mid-build and started once more. Each interrupted
    run is ended (not left running), every task ends as it should, each was dispatched
    exactly once, and after the last restart, running and then stopped, `shipyard replay
    --verify` finds the read models equal to a fresh replay of the whole log."""
    data = varied_up(tmp_path)
    expected: dict[str, str] = {}  # task id -> the outcome of its last finish

    first = Up(data)
    first.wait_ready()
    try:
        nc = await first.connect(name="restarts")
        work = Work(tmp_path, nc)
        ok = await work.dispatch("a", "ok")
        failing = await work.dispatch("b", "fail")
        cancelled = await work.dispatch("c", "slow")
        group = [await work.dispatch(f"g{n}", "ok", group="pair") for n in range(2)]
        await work.talk(ok)
        await work.running(cancelled)
        await commands.call(nc, "cancel", {"task_id": cancelled, "reason": "not now"})
        for task_id, outcome in [
            (ok, "succeeded"),
            (failing, "failed: builder_error"),
            (cancelled, "cancelled"),
            *[(g, "succeeded") for g in group],
        ]:
            assert await work.outcome(task_id) == outcome, task_id
            expected[task_id] = outcome.split(":")[0]
        stopped = await work.dispatch("s1", "slow")
        await work.running(stopped)
        await nc.close()
    finally:
        assert first.stop() == 0  # SIGTERM in the middle of a build

    second = Up(data)
    second.wait_ready()
    try:
        nc = await second.connect(name="restarts")
        work = Work(tmp_path, nc)
        # Ended by the stop, not left running, and not run again (max_attempts = 1).
        assert await work.outcome(stopped) == "failed: handler_stopped"
        expected[stopped] = "failed"
        mark = await work.log.stream_last_seq()
        await commands.call(nc, "retry", {"task_id": failing})
        later = await work.dispatch("d", "ok")
        await work.talk(later)
        assert await work.outcome(failing, after=mark) == "failed: builder_error"
        assert await work.outcome(later) == "succeeded"
        expected[later] = "succeeded"
        killed = await work.dispatch("s2", "slow")
        await work.running(killed)
        await nc.close()
    finally:
        second.proc.kill()  # SIGKILL in the middle of a build
        second.stop()

    third = Up(data)
    third.wait_ready()
    try:
        nc = await third.connect(name="restarts")
        work = Work(tmp_path, nc)
        # The restarted handler ends the run it owned in its previous life at once.
        assert await work.outcome(killed) == "failed: handler_restarted"
        expected[killed] = "failed"
        last = await work.dispatch("e", "ok")
        assert await work.outcome(last) == "succeeded"
        expected[last] = "succeeded"
        dispatched = [e.aggregate_id async for e in work.log.read() if e.type == "task_dispatched"]
        finishes = {
            e.aggregate_id: str(e.data.outcome)
            async for e in work.log.read()
            if e.type == "task_finished"
        }
        await nc.close()
        verified(third)
    finally:
        assert third.stop() == 0
    assert sorted(dispatched) == sorted(expected), "a task lost or dispatched twice"
    assert finishes == expected
    verified(third)  # stopped: the database on disk against a replay by an embedded server


# --- the same restart, seen by a real browser ---------------------------------------------------

# Page-side: a plain EventSource on /api/events, left to reconnect by itself, noting the seq
# of every event it delivers and every time it opens.
FOLLOW_JS = """() => {
  window.seen = []; window.opened = 0;
  const source = new EventSource("/api/events");
  source.addEventListener("open", () => { window.opened += 1; });
  source.addEventListener("task_dispatched", (e) => { window.seen.push(Number(e.lastEventId)); });
}"""


async def test_a_browser_resumes_across_a_gateway_restart(
    tmp_path: Path, nats_server: EmbeddedNats, event_log: EventLog
) -> None:
    """In real Chromium, the dashboard's connection badge goes back to live after the
    gateway is stopped and started again on its port, the Kanban board shows a task
    dispatched after that without a reload, and a plain EventSource left to reconnect by
    itself delivers every event once, in order — also those appended while it was down."""
    playwright_api = pytest.importorskip("playwright.async_api")
    from tests.test_dashboard import CHROMIUM_ARGS, chromium, dashboard_link

    executable = chromium()
    data = tmp_path / "data"
    running = gateway(data, nats_server.url)
    running.wait_ready()
    port = gateway_port(running)
    appends = Commands(event_log)

    async def dispatch(n: int) -> str:
        result = await appends.dispatch(dispatch_body(workdir=f"/srv/app-{n}"))
        return result.task_id

    try:
        async with playwright_api.async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
            try:
                page = await browser.new_page()
                errors: list[str] = []
                page.on("pageerror", lambda e: errors.append(str(e)))
                await page.goto(dashboard_link(running))  # logs in: a cookie for the API
                await page.goto(page.url.split("#")[0] + "#/kanban")
                live = "[data-testid=connection][data-state=live]"
                await page.wait_for_selector(live)
                await page.evaluate(FOLLOW_JS)
                for n in range(5):
                    await dispatch(n)
                await page.wait_for_function("window.seen.length >= 5")

                await asyncio.to_thread(running.stop)
                await page.wait_for_selector("[data-testid=connection][data-state=reconnecting]")
                for n in range(5, 10):  # while the gateway is down
                    await dispatch(n)
                running = gateway(data, nats_server.url, port)
                await asyncio.to_thread(running.wait_ready)
                await page.wait_for_selector(live, timeout=SETTLE * 1000)
                await page.wait_for_function("window.opened >= 2", timeout=SETTLE * 1000)
                newest = ""
                for n in range(10, 15):
                    newest = await dispatch(n)
                card = f"[data-testid=kanban-card][data-task-id={newest}]"
                await page.wait_for_selector(card, timeout=SETTLE * 1000)
                last = await event_log.stream_last_seq()
                await page.wait_for_function(
                    f"window.seen.length && window.seen.at(-1) >= {last}", timeout=SETTLE * 1000
                )
                seen = await page.evaluate("window.seen")
                assert errors == [], f"the page threw: {errors}"
            finally:
                await browser.close()
    finally:
        await asyncio.to_thread(running.stop)
    assert seen == list(range(1, last + 1))
