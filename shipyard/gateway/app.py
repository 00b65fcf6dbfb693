"""The HTTP API, the live event stream and the dashboard, as one Starlette app.

Every route checks the caller's role. Reads come from the read models (never the log), writes
go through the same command functions as NATS commands, so both validate alike.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import msgspec
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import (
    FileResponse,
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from shipyard import __version__
from shipyard.errors import CommandRejected, ShipyardError
from shipyard.events import comms, dispatch
from shipyard.events import types as t
from shipyard.events.commands import Commands
from shipyard.events.log import EventLog
from shipyard.gateway import metrics, openapi, sse
from shipyard.gateway.auth import COOKIE, Principal, Role, TokenStore
from shipyard.projections import queries
from shipyard.projections.projector import Projector
from shipyard.redact import redact
from shipyard.settings import Settings

UI_DIR = Path(__file__).resolve().parent.parent / "ui"
MAX_BODY = 1024 * 1024  # bytes in one request body
DRAIN_LIMIT = 32 * 1024 * 1024  # bytes of a refused body read and dropped so its 413 is seen
READERS: tuple[Role, ...] = ("admin", "dispatcher", "builder", "viewer")
OPERATORS: tuple[Role, ...] = ("admin", "dispatcher")
TALKERS: tuple[Role, ...] = ("admin", "dispatcher", "builder")


@dataclass
class Gateway:
    settings: Settings
    events: EventLog
    commands: Commands
    projector: Projector
    tokens: TokenStore
    shutdown: anyio.Event = field(default_factory=anyio.Event)
    feed: sse.Feed = field(init=False)  # the live log, shared by the SSE clients

    def __post_init__(self) -> None:
        self.feed = sse.Feed(self.events)

    @property
    def models(self) -> Any:
        return self.projector.models


class HTTPError(Exception):
    def __init__(self, status: int, code: str, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.problems = problems or []
        self.extra: dict[str, Any] = {}


def _json(value: Any, status: int = 200) -> Response:
    return Response(msgspec.json.encode(value), status, media_type="application/json")


def _error(e: HTTPError) -> Response:
    body = {"error": {"code": e.code, "message": e.message, "problems": e.problems, **e.extra}}
    headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
    return Response(msgspec.json.encode(body), e.status, headers, "application/json")


def _token(request: Request) -> str:
    header = request.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip()
    return request.cookies.get(COOKIE, "")


def authorize(gw: Gateway, request: Request, roles: tuple[Role, ...]) -> Principal:
    token = _token(request)
    if not token:
        raise HTTPError(401, "unauthorized", "send `Authorization: Bearer <token>`")
    principal = gw.tokens.check(token)
    if principal is None:
        raise HTTPError(401, "unauthorized", "that token is not valid")
    if principal.role not in roles:
        raise HTTPError(
            403, "forbidden", f"a {principal.role} token may not do this; it needs {roles[0]}"
        )
    return principal


Handler = Callable[[Gateway, Request, Principal], Awaitable[Response]]
APPLIED_HEADER = "Shipyard-Applied-Seq"  # the read models' position when a request was served


def route(gw: Gateway, roles: tuple[Role, ...], fn: Handler) -> Callable[[Request], Any]:
    async def endpoint(request: Request) -> Response:
        try:
            principal = authorize(gw, request, roles)
            # Read before the query runs, so it never claims more than the answer holds: the
            # dashboard asks again while this trails the events it has already seen.
            applied = gw.projector.status.applied_seq
            response = await fn(gw, request, principal)
            response.headers[APPLIED_HEADER] = str(applied)
            return response
        except HTTPError as e:
            return _error(e)
        except CommandRejected as e:
            status = {"not_found": 404, "conflict": 409}.get(e.code, 422)
            err = HTTPError(status, e.code or "rejected", e.message, e.problems)
            if e.template:
                err.extra["template"] = e.template
            return _error(err)
        except ShipyardError as e:
            return _error(HTTPError(503, "unavailable", e.message))

    return endpoint


async def body_bytes(request: Request) -> bytes:
    """The request body, refused with 413 past :data:`MAX_BODY` before more is kept."""
    too_large = HTTPError(413, "too_large", f"the body may be at most {MAX_BODY:,} bytes")
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > MAX_BODY:
        if request.headers.get("expect", "").lower() != "100-continue":
            await _drain(request, 0)
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY:
            await _drain(request, size)
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


async def _drain(request: Request, size: int) -> None:
    """Read and drop the rest of a refused body, up to :data:`DRAIN_LIMIT`. A client that
    sends its whole body before it reads the answer would otherwise see the connection reset
    instead of the 413 (one that asked `Expect: 100-continue` is answered before it sends)."""
    while size <= DRAIN_LIMIT:
        message = await request.receive()
        if message["type"] != "http.request":
            return
        size += len(message.get("body", b""))
        if not message.get("more_body", False):
            return


async def body_json(request: Request) -> Any:
    raw = await body_bytes(request)
    if not raw:
        return {}
    try:
        return dispatch.decode_json(raw)
    except dispatch.MalformedBody as e:
        raise HTTPError(422, "invalid", f"body: {e}") from e


def _q_int(request: Request, name: str, default: int, low: int = 0, high: int = 10**12) -> int:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    if not raw.isdigit():
        raise HTTPError(422, "invalid", f"{name}: must be a whole number")
    return max(low, min(int(raw), high))


def _q_str(request: Request, name: str, limit: int = 200) -> str:
    value = request.query_params.get(name, "")
    if len(value) > limit:
        raise HTTPError(422, "invalid", f"{name}: at most {limit} characters")
    return value


async def db(gw: Gateway, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    def call() -> Any:
        return fn(gw.models.con, *args, **kwargs)

    return await gw.models.run(call)


# --- reads ---------------------------------------------------------------------------------


async def meta(gw: Gateway, request: Request, who: Principal) -> Response:
    return _json(
        {
            "version": __version__,
            "phases": [{"name": p.value, "label": p.label} for p in t.Phase],
            "kanban_columns": list(queries.KANBAN_COLUMNS),
            "priorities": [p.value for p in t.Priority],
            "message_types": [m.value for m in t.MessageType],
            "event_types": t.REGISTRY.names(),
            "outcomes": ["succeeded", "failed", "cancelled"],
            "template": dispatch.TEMPLATE,
            "rework_template": dispatch.REWORK_TEMPLATE,
            "you": {"name": who.name, "role": who.role},
        }
    )


def _projection(gw: Gateway) -> dict[str, Any]:
    s = gw.projector.status
    return {
        "applied_seq": s.applied_seq,
        "target_seq": s.target_seq,
        "caught_up": s.caught_up,
        "percent": s.percent,
    }


async def status(gw: Gateway, request: Request, who: Principal) -> Response:
    return _json({"projection": _projection(gw), "summary": await db(gw, queries.summary)})


async def live_runs(gw: Gateway, request: Request, who: Principal) -> Response:
    return _json(await db(gw, queries.live_runs))


async def history(gw: Gateway, request: Request, who: Principal) -> Response:
    outcome = _q_str(request, "outcome")
    if outcome not in ("", "succeeded", "failed", "cancelled"):
        raise HTTPError(422, "invalid", "outcome: one of succeeded, failed, cancelled")
    page = await db(
        gw,
        queries.history,
        limit=_q_int(request, "limit", 50, 1, 500),
        before=_q_str(request, "before", 64),
        outcome=outcome,
        agent=_q_str(request, "agent", 64),
        search=_q_str(request, "search"),
    )
    return _json(page)


async def run_detail(gw: Gateway, request: Request, who: Principal) -> Response:
    found = await db(gw, queries.run, request.path_params["run_id"])
    if found is None:
        raise HTTPError(404, "not_found", f"no run {request.path_params['run_id']}")
    return _json(found)


def _run_file(gw: Gateway, found: Any, kind: str) -> Path:
    base: Path = gw.settings.data_dir / kind / str(found.task_id)
    return base / (f"{found.run_id}.log" if kind == "logs" else f"{found.run_id}.html")


async def run_log(gw: Gateway, request: Request, who: Principal) -> Response:
    found = await db(gw, queries.run, request.path_params["run_id"])
    if found is None:
        raise HTTPError(404, "not_found", f"no run {request.path_params['run_id']}")
    tail = _q_int(request, "tail", 200, 1, 5000)
    path = _run_file(gw, found, "logs")
    lines = await anyio.to_thread.run_sync(_tail, path, tail)
    return _json({"run_id": found.run_id, "lines": lines})


def _tail(path: Path, n: int) -> list[str]:
    try:
        with path.open("rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - 256 * 1024))
            data = f.read()
    except FileNotFoundError:
        return []
    # The handler writes the builder's output as printed; a secret it printed stays here.
    return redact(data.decode("utf-8", "replace")).splitlines()[-n:]


async def run_report(gw: Gateway, request: Request, who: Principal) -> Response:
    found = await db(gw, queries.run, request.path_params["run_id"])
    if found is None:
        raise HTTPError(404, "not_found", f"no run {request.path_params['run_id']}")
    path = _run_file(gw, found, "reports")
    if not path.is_file():
        raise HTTPError(404, "not_found", "this run has no report yet")
    return FileResponse(path, media_type="text/html")


async def tasks(gw: Gateway, request: Request, who: Principal) -> Response:
    state = _q_str(request, "state", 20)
    allowed = ("", "queued", "blocked", "running", "succeeded", "failed", "cancelled")
    if state not in allowed:
        raise HTTPError(422, "invalid", "state: one of " + ", ".join(allowed[1:]))
    return _json(await db(gw, queries.tasks, state=state, limit=_q_int(request, "limit", 200)))


async def task_detail(gw: Gateway, request: Request, who: Principal) -> Response:
    found = await db(gw, queries.task, request.path_params["task_id"])
    if found is None:
        raise HTTPError(404, "not_found", f"no task {request.path_params['task_id']}")
    return _json(found)


async def activity(gw: Gateway, request: Request, who: Principal) -> Response:
    rows = await db(
        gw,
        queries.activity,
        limit=_q_int(request, "limit", 100, 1, 1000),
        before=_q_int(request, "before", 0),
        task_id=_q_str(request, "task_id", 64),
    )
    return _json(rows)


async def kanban(gw: Gateway, request: Request, who: Principal) -> Response:
    # Open tasks, and finished ones of the last day: the board is for what is in flight.
    since = datetime.now(UTC) - timedelta(days=1)
    return _json(await db(gw, queries.kanban, since=since))


async def groups(gw: Gateway, request: Request, who: Principal) -> Response:
    # Running groups, and those finished in the last day, like the board they sit above.
    since = datetime.now(UTC) - timedelta(days=1)
    return _json(await db(gw, queries.groups, since=since))


async def agents(gw: Gateway, request: Request, who: Principal) -> Response:
    return _json(await db(gw, queries.agents))


async def handlers(gw: Gateway, request: Request, who: Principal) -> Response:
    return _json(await db(gw, queries.handlers))


async def threads(gw: Gateway, request: Request, who: Principal) -> Response:
    return _json(await db(gw, queries.threads, agent=_q_str(request, "agent", 64)))


async def thread(gw: Gateway, request: Request, who: Principal) -> Response:
    found = await db(gw, queries.thread, request.path_params["thread_id"])
    if not found:
        raise HTTPError(404, "not_found", f"no thread {request.path_params['thread_id']}")
    return _json(found)


async def inbox(gw: Gateway, request: Request, who: Principal) -> Response:
    agent = request.path_params["agent"]
    if who.role == "builder" and agent != who.name:
        raise HTTPError(403, "forbidden", "a builder may read only its own inbox")
    unread = request.query_params.get("unread", "") in ("1", "true", "yes")
    messages = await db(gw, queries.inbox, agent, unread=unread)
    counts = await db(gw, queries.unread_counts)
    return _json({"agent": agent, "unread": counts.get(agent, 0), "messages": messages})


# --- writes --------------------------------------------------------------------------------


async def post_dispatch(gw: Gateway, request: Request, who: Principal) -> Response:
    # The raw bytes, so that a body which is not even JSON is refused, and recorded, exactly
    # as over NATS.
    body = await body_bytes(request)
    result = await gw.commands.dispatch(body, actor=f"{who.role}:{who.name}")
    return _json(result, 200 if result.duplicate else 201)


async def post_cancel(gw: Gateway, request: Request, who: Principal) -> Response:
    body = await body_json(request)
    reason = body.get("reason", "") if isinstance(body, dict) else ""
    if not isinstance(reason, str):
        raise HTTPError(422, "invalid", "reason: must be a string")
    result = await gw.commands.cancel(
        request.path_params["task_id"], reason=reason[:500], actor=f"{who.role}:{who.name}"
    )
    return _json(result)


async def post_retry(gw: Gateway, request: Request, who: Principal) -> Response:
    result = await gw.commands.retry(request.path_params["task_id"], actor=f"{who.role}:{who.name}")
    return _json(result)


async def post_escalate(gw: Gateway, request: Request, who: Principal) -> Response:
    body = await body_json(request)
    if not isinstance(body, dict):
        raise HTTPError(422, "invalid", 'body: send {"to": "AGENT", "note": "…"}')
    to, note = body.get("to"), body.get("note", "")
    if not isinstance(to, str) or not isinstance(note, str):
        raise HTTPError(422, "invalid", "to and note: must be strings")
    result = await gw.commands.escalate(
        request.path_params["task_id"], to, note=note, actor=f"{who.role}:{who.name}"
    )
    return _json(result, 201)


async def post_message(gw: Gateway, request: Request, who: Principal) -> Response:
    body = await body_json(request)
    if not isinstance(body, dict):
        raise HTTPError(422, "invalid", "body: must be a JSON object")
    if who.role == "builder" and body.get("sender") != who.name:
        raise HTTPError(403, "forbidden", "a builder may send only as itself")
    result = await comms.send(gw.events, body, actor=f"{who.role}:{who.name}")
    return _json(result, 201)


async def post_read(gw: Gateway, request: Request, who: Principal) -> Response:
    body = await body_json(request)
    if not isinstance(body, dict):
        raise HTTPError(422, "invalid", "body: must be a JSON object")
    if who.role == "builder" and body.get("reader") != who.name:
        raise HTTPError(403, "forbidden", "a builder may mark only its own messages read")
    return _json(await comms.mark_read(gw.events, body, actor=f"{who.role}:{who.name}"))


# --- the edges -----------------------------------------------------------------------------


async def healthz(request: Request) -> Response:
    gw: Gateway = request.app.state.gateway
    projection = _projection(gw)
    ok = gw.events.nc.is_connected
    return JSONResponse(
        {"ok": ok, "nats": "connected" if ok else "disconnected", "projection": projection},
        200 if ok else 503,
    )


async def openapi_json(request: Request) -> Response:
    return JSONResponse(openapi.document(__version__))


async def metrics_text(gw: Gateway, request: Request, who: Principal) -> Response:
    summary = await db(gw, queries.summary)
    last = await gw.events.stream_last_seq()
    text = metrics.render(summary, _projection(gw), last)
    return PlainTextResponse(text, media_type="text/plain; version=0.0.4")


async def events_stream(gw: Gateway, request: Request, who: Principal) -> Response:
    return await sse.stream(gw, request)


async def index(request: Request) -> Response:
    gw: Gateway = request.app.state.gateway
    token = request.query_params.get("token", "")
    if token:
        if gw.tokens.check(token) is None:
            return HTMLResponse(_login_page("That link's token is not valid."), 401)
        # The token leaves the address bar: a cookie carries it from here on.
        response = RedirectResponse("/", 303)
        response.set_cookie(COOKIE, token, httponly=True, samesite="strict", max_age=30 * 86400)
        return response
    if gw.tokens.check(request.cookies.get(COOKIE, "")) is None:
        return HTMLResponse(_login_page(""), 401)
    return FileResponse(UI_DIR / "index.html", media_type="text/html")


def _login_page(problem: str) -> str:
    note = f"<p><strong>{problem}</strong></p>" if problem else ""
    return (
        "<!doctype html><html lang=en><meta charset=utf-8><title>Shipyard</title>"
        "<body style='font:16px system-ui;max-width:36rem;margin:4rem auto;padding:0 1rem'>"
        f"<h1>Shipyard</h1>{note}<p>Open the dashboard link that <code>shipyard up</code> "
        "printed (it logs this browser in), or make a token with "
        "<code>shipyard token create --role viewer</code> and open "
        "<code>/?token=…</code>.</p></body></html>"
    )


def create_app(gw: Gateway) -> Starlette:
    def r(path: str, roles: tuple[Role, ...], fn: Handler, methods: list[str]) -> Route:
        return Route(path, route(gw, roles, fn), methods=methods, name=fn.__name__)

    routes = [
        Route("/", index, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/openapi.json", openapi_json, methods=["GET"]),
        r("/metrics", READERS, metrics_text, ["GET"]),
        r("/api/meta", READERS, meta, ["GET"]),
        r("/api/status", READERS, status, ["GET"]),
        r("/api/runs/live", READERS, live_runs, ["GET"]),
        r("/api/runs/{run_id}", READERS, run_detail, ["GET"]),
        r("/api/runs/{run_id}/log", READERS, run_log, ["GET"]),
        r("/api/runs/{run_id}/report", READERS, run_report, ["GET"]),
        r("/api/history", READERS, history, ["GET"]),
        r("/api/tasks", READERS, tasks, ["GET"]),
        r("/api/tasks/{task_id}", READERS, task_detail, ["GET"]),
        r("/api/tasks/{task_id}/cancel", OPERATORS, post_cancel, ["POST"]),
        r("/api/tasks/{task_id}/retry", OPERATORS, post_retry, ["POST"]),
        r("/api/tasks/{task_id}/escalate", OPERATORS, post_escalate, ["POST"]),
        r("/api/activity", READERS, activity, ["GET"]),
        r("/api/kanban", READERS, kanban, ["GET"]),
        r("/api/groups", READERS, groups, ["GET"]),
        r("/api/agents", READERS, agents, ["GET"]),
        r("/api/handlers", READERS, handlers, ["GET"]),
        r("/api/threads", READERS, threads, ["GET"]),
        r("/api/threads/{thread_id}", READERS, thread, ["GET"]),
        r("/api/inbox/{agent}", READERS, inbox, ["GET"]),
        r("/api/dispatch", OPERATORS, post_dispatch, ["POST"]),
        r("/api/messages", TALKERS, post_message, ["POST"]),
        r("/api/messages/read", TALKERS, post_read, ["POST"]),
        r("/api/events", READERS, events_stream, ["GET"]),
        Mount("/ui", StaticFiles(directory=UI_DIR, check_dir=False), name="ui"),
    ]
    app = Starlette(routes=routes)
    app.state.gateway = gw
    return app
