"""The HTTP gateway on real uvicorn, spoken to over real sockets with aiohttp."""

from __future__ import annotations

import asyncio
import io
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from starlette.routing import Mount, Route

from shipyard.events.log import EventLog
from shipyard.gateway import openapi
from shipyard.gateway.app import create_app
from shipyard.gateway.server import GatewayService
from shipyard.projections.projector import Projector
from shipyard.settings import GatewaySettings, Settings
from tests.samples import dispatch_body


class Client:
    def __init__(self, service: GatewayService, session: aiohttp.ClientSession) -> None:
        self.service = service
        self.session = session
        self.tokens = {
            role: service.tokens.create(role, f"test-{role}")  # type: ignore[arg-type]
            for role in ("admin", "dispatcher", "builder", "viewer")
        }
        self.tokens["builder"] = service.tokens.create("builder", "claude")

    @property
    def url(self) -> str:
        return self.service.url

    async def call(
        self, method: str, path: str, role: str | None = "admin", **kw: Any
    ) -> tuple[int, Any]:
        headers = dict(kw.pop("headers", {}))
        if role:
            headers["Authorization"] = f"Bearer {self.tokens[role]}"
        async with self.session.request(method, self.url + path, headers=headers, **kw) as r:
            body = await r.read()
            if r.content_type == "application/json":
                return r.status, await r.json()
            return r.status, body.decode()


def gateway_settings(tmp_path: Path, port: int = 0) -> Settings:
    return Settings(data_dir=tmp_path / "data", gateway=GatewaySettings(port=port, sse_ping=1))


@pytest.fixture
async def client(
    tmp_path: Path, event_log: EventLog, projector: Projector
) -> AsyncIterator[Client]:
    service = GatewayService(gateway_settings(tmp_path), event_log, projector)
    await service.start()
    async with aiohttp.ClientSession() as session:
        yield Client(service, session)
    await service.stop()


def app_routes() -> set[tuple[str, str]]:
    app = create_app(None)  # type: ignore[arg-type]
    out = set()
    for r in app.routes:
        if isinstance(r, Route):
            for method in r.methods or ():
                if method != "HEAD":
                    out.add((r.path, method.lower()))
        else:
            assert isinstance(r, Mount)
    return out


def test_openapi_lists_exactly_the_routes_served() -> None:
    """/openapi.json describes every route the app serves, and no other."""
    doc = openapi.document("test")
    assert doc["openapi"].startswith("3.1")
    documented = {(p, m) for p, item in doc["paths"].items() for m in item}
    assert documented == app_routes()


async def test_openapi_and_health_need_no_token(client: Client) -> None:
    """/healthz and /openapi.json answer without a token; the API does not."""
    status, health = await client.call("GET", "/healthz", role=None)
    assert status == 200
    assert health["ok"] is True
    status, doc = await client.call("GET", "/openapi.json", role=None)
    assert status == 200
    assert "/api/dispatch" in doc["paths"]


@pytest.mark.parametrize(
    ("path", "method"), sorted(r for r in app_routes() if r[0].startswith(("/api", "/metrics")))
)
async def test_every_api_route_needs_a_token(client: Client, path: str, method: str) -> None:
    """Each API route answers 401 with no token and with a wrong one."""
    concrete = re.sub(r"\{[^}]+\}", "t-x", path)
    status, body = await client.call(method.upper(), concrete, role=None)
    assert status == 401
    assert body["error"]["code"] == "unauthorized"
    status, _ = await client.call(
        method.upper(), concrete, role=None, headers={"Authorization": "Bearer nope"}
    )
    assert status == 401


@pytest.mark.parametrize(
    ("path", "role"),
    [
        ("/api/dispatch", "viewer"),
        ("/api/dispatch", "builder"),
        ("/api/tasks/t-x/cancel", "viewer"),
        ("/api/tasks/t-x/retry", "builder"),
        ("/api/messages", "viewer"),
        ("/api/messages/read", "viewer"),
    ],
)
async def test_the_wrong_role_is_refused(client: Client, path: str, role: str) -> None:
    """A token whose role may not write gets 403, and nothing is recorded."""
    status, body = await client.call("POST", path, role=role, json={})
    assert status == 403
    assert body["error"]["code"] == "forbidden"
    assert [e async for e in client.service.gateway.events.read()] == []


async def test_dispatch_over_http(client: Client, projector: Projector) -> None:
    """POST /api/dispatch takes the seed JSON: 201 with the task id; a repeat with the same
    idempotency key 200 with the same id; a bad one 422 listing every problem."""
    status, made = await client.call(
        "POST", "/api/dispatch", json=dispatch_body(), role="dispatcher"
    )
    assert status == 201
    assert made["task_id"].startswith("t-")
    body = dispatch_body(idempotency_key="k1")
    first = await client.call("POST", "/api/dispatch", json=body)
    again = await client.call("POST", "/api/dispatch", json=body)
    assert (first[0], again[0]) == (201, 200)
    assert first[1]["task_id"] == again[1]["task_id"]
    bad = dispatch_body(priority="asap")
    bad["payload"]["prompt"] = "## Task\nx"
    status, err = await client.call("POST", "/api/dispatch", json=bad)
    assert status == 422
    assert len(err["error"]["problems"]) >= 4
    assert "## Requirements" in err["error"]["template"]
    status, err = await client.call("POST", "/api/dispatch", data=b"{not json")
    assert status == 422
    assert "not valid JSON" in err["error"]["problems"][0]
    big = io.BytesIO(b"x" * (1024 * 1024 + 10))
    status, err = await client.call("POST", "/api/dispatch", data=big)
    assert status == 413

    await asyncio.wait_for(
        projector.wait_for(await client.service.gateway.events.stream_last_seq()), 10
    )
    status, task = await client.call("GET", f"/api/tasks/{made['task_id']}", role="viewer")
    assert status == 200
    assert task["task"]["title"] == "Add a health endpoint"
    status, cancel = await client.call(
        "POST", f"/api/tasks/{made['task_id']}/cancel", json={"reason": "no"}
    )
    assert (status, cancel["state"]) == (200, "cancelled")
    status, err = await client.call("POST", f"/api/tasks/{made['task_id']}/cancel", json={})
    assert status == 409


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/api/history?limit=abc", 422),
        ("/api/history?outcome=maybe", 422),
        ("/api/tasks?state=sleeping", 422),
        ("/api/runs/r-none", 404),
        ("/api/tasks/t-none", 404),
        ("/api/threads/th-none", 404),
        ("/api/events?after=minus", 422),
        ("/api/events?task=a.b", 422),
    ],
)
async def test_bad_reads_get_a_clear_4xx(client: Client, path: str, status: int) -> None:
    """Bad query parameters and unknown ids get 4xx with a message, never a 500."""
    got, body = await client.call("GET", path, role="viewer")
    assert got == status
    assert body["error"]["message"]


async def test_reads_answer_from_the_read_models(client: Client) -> None:
    """Every read route answers 200 with JSON for a viewer."""
    for path in (
        "/api/meta",
        "/api/status",
        "/api/runs/live",
        "/api/history",
        "/api/tasks",
        "/api/activity",
        "/api/kanban",
        "/api/agents",
        "/api/handlers",
        "/api/threads",
        "/api/inbox/claude",
    ):
        status, _ = await client.call("GET", path, role="viewer")
        assert status == 200, path
    _, meta = await client.call("GET", "/api/meta", role="viewer")
    assert [p["label"] for p in meta["phases"]][:3] == ["CONTEXT", "PLAN", "TASK BOARD"]
    assert meta["kanban_columns"][0] == "queued"
    status, text = await client.call("GET", "/metrics", role="viewer")
    assert status == 200
    assert 'shipyard_queue_depth{priority="urgent"} 0' in text
    assert "shipyard_projection_lag" in text


async def test_a_builder_may_message_only_as_itself(client: Client) -> None:
    """A builder token sends as its own agent name and reads only its own inbox."""
    ok = {"sender": "claude", "recipient": "openclaw", "type": "question", "body": "?"}
    status, _ = await client.call("POST", "/api/messages", role="builder", json=ok)
    assert status == 201
    status, _ = await client.call(
        "POST", "/api/messages", role="builder", json={**ok, "sender": "openclaw"}
    )
    assert status == 403
    assert (await client.call("GET", "/api/inbox/openclaw", role="builder"))[0] == 403
    assert (await client.call("GET", "/api/inbox/claude", role="builder"))[0] == 200


async def test_the_dashboard_link_logs_the_browser_in(client: Client) -> None:
    """/?token= sets a cookie and redirects so the token leaves the address bar; the cookie
    then opens the page and the API."""
    status, page = await client.call("GET", "/", role=None)
    assert status == 401
    assert "shipyard up" in page
    token = client.service.admin_token
    async with client.session.get(f"{client.url}/?token={token}", allow_redirects=False) as r:
        assert r.status == 303
        assert r.headers["Location"] == "/"
        cookie = r.cookies["shipyard_token"]
        assert cookie["httponly"]
    jar = {"shipyard_token": token}
    async with client.session.get(f"{client.url}/", cookies=jar) as r:
        assert r.status == 200
    async with client.session.get(f"{client.url}/api/status", cookies=jar) as r:
        assert r.status == 200


async def read_sse(
    session: aiohttp.ClientSession, url: str, token: str, count: int, last_id: str = ""
) -> list[tuple[int, str]]:
    """The first ``count`` (id, event type) pairs of an SSE stream."""
    headers = {"Authorization": f"Bearer {token}"}
    if last_id:
        headers["Last-Event-ID"] = last_id
    got: list[tuple[int, str]] = []
    async with session.get(url + "/api/events", headers=headers) as r:
        assert r.status == 200
        event_id, event_type = "", ""
        async for raw in r.content:
            line = raw.decode().rstrip("\r\n")
            if line.startswith("id: "):
                event_id = line[4:]
            elif line.startswith("event: "):
                event_type = line[7:]
            elif line == "" and event_id:
                got.append((int(event_id), event_type))
                event_id = ""
                if len(got) == count:
                    return got
    return got


async def test_sse_resumes_across_a_gateway_restart_with_no_gap(
    tmp_path: Path, event_log: EventLog, projector: Projector
) -> None:
    """A client reads some events, the gateway restarts, the client reconnects with
    Last-Event-ID: it gets every later event once, in order."""
    from shipyard.events.commands import Commands

    commands = Commands(event_log)
    for _ in range(3):
        await commands.dispatch(dispatch_body())
    first = GatewayService(gateway_settings(tmp_path), event_log, projector)
    await first.start()
    token = first.tokens.create("viewer", "sse")
    async with aiohttp.ClientSession() as session:
        before = await asyncio.wait_for(read_sse(session, first.url, token, 3), 10)
        await first.stop()
        for _ in range(4):
            await commands.dispatch(dispatch_body())
        second = GatewayService(gateway_settings(tmp_path), event_log, projector)
        await second.start()
        try:
            after = await asyncio.wait_for(
                read_sse(session, second.url, token, 4, last_id=str(before[-1][0])), 10
            )
        finally:
            await second.stop()
    ids = [i for i, _ in before + after]
    assert ids == list(range(1, 8))
    assert {kind for _, kind in before + after} == {"task_dispatched"}


async def test_sse_clients_sharing_the_feed_each_get_every_event_once(
    client: Client, event_log: EventLog
) -> None:
    """Several unfiltered clients, one resuming from the start of the log, one from the
    middle and one live, each get every later event once, in order, while more are
    appended."""
    from shipyard.events.commands import Commands

    commands = Commands(event_log)
    for _ in range(3):
        await commands.dispatch(dispatch_body())
    token = client.tokens["viewer"]
    readers = [
        asyncio.create_task(read_sse(client.session, client.url, token, 9, last_id=last))
        for last in ("", "2", "3")
    ]
    for _ in range(9):
        await commands.dispatch(dispatch_body())
    got = await asyncio.wait_for(asyncio.gather(*readers), 20)
    assert [[i for i, _ in events] for events in got] == [
        list(range(1, 10)),
        list(range(3, 12)),
        list(range(4, 13)),
    ]
