"""A loopback stand-in for the Anthropic Messages API, scripted by tests.

The real Claude Code CLI talks to it (``ANTHROPIC_BASE_URL=fake.url``) and really runs the tools
"the model" asks for. It is a real HTTP/1.1 server on 127.0.0.1 (random port) in a background
thread, so it keeps answering while a test's asyncio loop runs subprocesses.

Scripting::

    with FakeAnthropic() as api:
        api.script(
            Turn.tool("Write", {"file_path": str(tmp / "README.md"), "content": "# Hi\\n"}),
            Turn.text("Wrote README.md."),
        )
        ... run claude ...
        assert api.main_requests[1].tool_results()[0]["is_error"] is False

Every ``POST /v1/messages`` is classified (``default_classify``; override with ``classify=``):

* ``main`` — the session's own agent loop: the body offers ``tools`` and there is no
  ``x-claude-code-agent-id`` header. Takes the next turn from ``api.script(...)``; when the script
  is used up, ``api.fallback`` answers (default: a short end_turn text, so a forgotten turn ends
  the run instead of hanging it; set ``api.fallback = Turn.tool(...)`` for a model that never
  stops).
* ``subagent`` — a subagent's loop (Agent tool): the CLI sends ``x-claude-code-agent-id`` and marks
  the system prompt ``cc_is_subagent=true``. Subagents run in the background, concurrently with
  the main loop, so they get their own queue, ``api.script(..., role="subagent")``, and
  ``api.subagent_fallback``; otherwise the two loops would race for turns.
* ``aux`` — a side request without ``tools`` (title/topic generation, summaries on the small fast
  model, quota probes). Never consumes scripted turns; ``api.aux_turn`` answers. Version 2.1.330
  in ``-p`` mode made none in our runs, but the rule keeps such calls from eating the script.
  (A run with ``--tools ""`` sends no tools at all: pass ``classify=lambda r: "main"`` there.)

Other endpoints: ``POST /v1/messages/count_tokens`` is answered with a rough count; GET/HEAD
probes outside ``/v1`` (the CLI's ``HEAD /api/hello`` connectivity check, made only when
nonessential traffic is allowed) get ``200 {}``; anything else a 404 in Anthropic's error format.

Every request is recorded in ``api.requests`` (method, path, lower-cased headers, raw and parsed
JSON body, role, and the Turn that answered it).
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal, Self

__all__ = [
    "ERROR_TYPES",
    "FakeAnthropic",
    "RecordedRequest",
    "Turn",
    "TurnFactory",
    "default_classify",
]

#: Anthropic's error ``type`` for each HTTP status it uses.
ERROR_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}

_ids = itertools.count(1)


def _new_id(prefix: str) -> str:
    return f"{prefix}_fake{next(_ids):06d}"


@dataclass(frozen=True)
class Turn:
    """One scripted answer of "the model": content blocks, an HTTP error, or a hang."""

    kind: Literal["message", "error", "hang"]
    blocks: tuple[dict[str, Any], ...] = ()
    stop_reason: str = "end_turn"
    status: int = 200
    error_type: str = ""
    error_message: str = ""
    headers: tuple[tuple[str, str], ...] = ()
    hang_after_start: bool = False
    delay: float = 0.0

    @classmethod
    def text(cls, text: str, *, delay: float = 0.0) -> Turn:
        """A plain text answer that ends the turn (``stop_reason: end_turn``)."""
        return cls("message", ({"type": "text", "text": text},), "end_turn", delay=delay)

    @classmethod
    def tool(
        cls,
        name: str,
        input: dict[str, Any],
        *,
        text: str | None = None,
        id: str | None = None,
        delay: float = 0.0,
    ) -> Turn:
        """One tool call (optionally after some text); ``stop_reason: tool_use``."""
        return cls.tools((name, input, id), text=text, delay=delay)

    @classmethod
    def tools(
        cls,
        *calls: tuple[str, dict[str, Any]] | tuple[str, dict[str, Any], str | None],
        text: str | None = None,
        delay: float = 0.0,
    ) -> Turn:
        """Several tool calls in one message (``(name, input)`` or ``(name, input, id)``)."""
        blocks: list[dict[str, Any]] = []
        if text:
            blocks.append({"type": "text", "text": text})
        for call in calls:
            name, tool_input = call[0], call[1]
            tool_id = call[2] if len(call) > 2 else None
            # id None: a fresh toolu_ id is made each time the turn is sent (see _render).
            blocks.append({"type": "tool_use", "id": tool_id, "name": name, "input": tool_input})
        return cls("message", tuple(blocks), "tool_use", delay=delay)

    @classmethod
    def error(
        cls,
        status: int,
        error_type: str | None = None,
        message: str | None = None,
        *,
        headers: dict[str, str] | None = None,
    ) -> Turn:
        """An HTTP error with Anthropic's error JSON, e.g. ``Turn.error(401)``, ``(529)``."""
        etype = error_type or ERROR_TYPES.get(status, "api_error")
        default_messages = {
            "authentication_error": "invalid x-api-key",
            "overloaded_error": "Overloaded",
            "rate_limit_error": "Number of request tokens has exceeded your rate limit.",
        }
        msg = message or default_messages.get(etype, etype.replace("_", " "))
        return cls(
            "error",
            status=status,
            error_type=etype,
            error_message=msg,
            headers=tuple((headers or {}).items()),
        )

    @classmethod
    def hang(cls, *, after_start: bool = False) -> Turn:
        """Accept the request and never answer (until the server stops): a silent agent.

        With ``after_start`` the response headers and ``message_start`` go out first, so the
        stream is open but nothing more ever arrives.
        """
        return cls("hang", hang_after_start=after_start)


@dataclass
class RecordedRequest:
    """One HTTP request the stand-in received."""

    method: str
    path: str
    headers: dict[str, str]  # names lower-cased
    raw: bytes
    body: Any  # the parsed JSON, or None
    role: str  # "main", "subagent", "aux", "count_tokens" or "other"
    turn: Turn | None = None
    time: float = field(default_factory=time.time)

    @property
    def model(self) -> str:
        return str(self.body.get("model", "")) if isinstance(self.body, dict) else ""

    @property
    def messages(self) -> list[dict[str, Any]]:
        if isinstance(self.body, dict):
            return list(self.body.get("messages") or [])
        return []

    @property
    def tool_names(self) -> list[str]:
        if isinstance(self.body, dict):
            return [t.get("name", "") for t in self.body.get("tools") or []]
        return []

    def blocks(self, block_type: str) -> list[dict[str, Any]]:
        """All content blocks of ``block_type`` in every message of the request."""
        found = []
        for message in self.messages:
            content = message.get("content")
            if isinstance(content, list):
                found += [b for b in content if isinstance(b, dict) and b.get("type") == block_type]
        return found

    def tool_results(self) -> list[dict[str, Any]]:
        """The ``tool_result`` blocks of the last message (what the tools just returned)."""
        if not self.messages:
            return []
        content = self.messages[-1].get("content")
        if not isinstance(content, list):
            return []
        return [b for b in content if isinstance(b, dict) and b.get("type") == "tool_result"]

    def text(self) -> str:
        """Every text in the request's messages, joined: handy for ``in`` assertions."""
        parts = []
        for message in self.messages:
            content = message.get("content")
            if isinstance(content, str):
                parts.append(content)
            elif isinstance(content, list):
                for block in content:
                    if not isinstance(block, dict):
                        continue
                    if block.get("type") == "text":
                        parts.append(str(block.get("text", "")))
                    elif block.get("type") == "tool_result":
                        inner = block.get("content")
                        if isinstance(inner, str):
                            parts.append(inner)
                        elif isinstance(inner, list):
                            parts += [str(b.get("text", "")) for b in inner if isinstance(b, dict)]
        return "\n".join(parts)


TurnFactory = Callable[[RecordedRequest], Turn]


def default_classify(request: RecordedRequest) -> str:
    """``POST /v1/messages`` → ``main``, ``subagent`` or ``aux``.

    No ``tools`` in the body: ``aux`` (a side request of the CLI). An ``x-claude-code-agent-id``
    header (the CLI also marks the system prompt ``cc_is_subagent=true``): ``subagent``.
    Otherwise ``main``: the agent loop of the session itself.
    """
    body = request.body if isinstance(request.body, dict) else {}
    if not body.get("tools"):
        return "aux"
    if "x-claude-code-agent-id" in request.headers:
        return "subagent"
    return "main"


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    fake: FakeAnthropic


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _dispatch(self) -> None:
        self.server.fake._handle(self)

    do_GET = do_POST = do_HEAD = do_PUT = do_DELETE = do_OPTIONS = do_PATCH = _dispatch


class FakeAnthropic:
    """The scripted stand-in. Use as a context manager or call start()/stop()."""

    def __init__(
        self,
        turns: Iterable[Turn | TurnFactory] = (),
        *,
        classify: Callable[[RecordedRequest], str] = default_classify,
        fallback: Turn | TurnFactory | None = None,
        subagent_fallback: Turn | TurnFactory | None = None,
        aux_turn: Turn | TurnFactory | None = None,
    ) -> None:
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)
        self._queues: dict[str, list[Turn | TurnFactory]] = {"main": list(turns)}
        self.classify = classify
        #: Answers a main request when its script is used up.
        self.fallback: Turn | TurnFactory = fallback or Turn.text(
            "(the fake model has no more scripted turns)"
        )
        #: Answers a subagent request when the subagent script is used up.
        self.subagent_fallback: Turn | TurnFactory = subagent_fallback or Turn.text(
            "(the fake subagent has no more scripted turns)"
        )
        #: Answers every auxiliary request (they never consume scripted turns).
        self.aux_turn: Turn | TurnFactory = aux_turn or Turn.text("Fake auxiliary answer")
        self.requests: list[RecordedRequest] = []
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> Self:
        server = _Server(("127.0.0.1", 0), _Handler)
        server.fake = self
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"fake-anthropic-{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving; hung requests are released (their connections close unanswered)."""
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(5)
        self._server = None
        self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._server is not None, "not started"
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        """The value for ``ANTHROPIC_BASE_URL``."""
        return f"http://127.0.0.1:{self.port}"

    # -- scripting -------------------------------------------------------------------------

    def script(self, *turns: Turn | TurnFactory, role: str = "main") -> None:
        """Append turns for the next requests of ``role`` (``main`` or ``subagent``), in order.

        A turn may be a function of the :class:`RecordedRequest` that returns the Turn, for an
        answer that depends on what the CLI sent (e.g. the plan file path named in the request).
        """
        with self._lock:
            self._queues.setdefault(role, []).extend(turns)

    def pending(self, role: str = "main") -> list[Turn | TurnFactory]:
        """Scripted turns of ``role`` not yet used."""
        with self._lock:
            return list(self._queues.get(role, []))

    def of_role(self, role: str) -> list[RecordedRequest]:
        with self._lock:
            return [r for r in self.requests if r.role == role]

    @property
    def main_requests(self) -> list[RecordedRequest]:
        """The main session's agent-loop requests, in arrival order."""
        return self.of_role("main")

    @property
    def subagent_requests(self) -> list[RecordedRequest]:
        return self.of_role("subagent")

    @property
    def aux_requests(self) -> list[RecordedRequest]:
        return self.of_role("aux")

    def wait_for(self, count: int, role: str = "main", timeout: float = 30.0) -> RecordedRequest:
        """Block until ``count`` requests of ``role`` arrived; return the ``count``-th."""
        deadline = time.monotonic() + timeout
        with self._arrived:
            while True:
                matching = [
                    r
                    for r in self.requests
                    if r.role == role and (r.turn is not None or role in ("count_tokens", "other"))
                ]
                if len(matching) >= count:
                    return matching[count - 1]
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{len(matching)} {role} requests, wanted {count}")
                self._arrived.wait(left)

    # -- serving ---------------------------------------------------------------------------

    def _next_turn(self, role: str) -> Turn | TurnFactory:
        if role == "aux":
            return self.aux_turn
        queue = self._queues.get(role)
        if queue:
            return queue.pop(0)
        return self.subagent_fallback if role == "subagent" else self.fallback

    def _handle(self, h: _Handler) -> None:
        raw = _read_body(h)
        try:
            body: Any = json.loads(raw) if raw else None
        except ValueError:
            body = None
        path = h.path.split("?", 1)[0].rstrip("/")
        headers = {k.lower(): v for k, v in h.headers.items()}
        rec = RecordedRequest(h.command, h.path, headers, raw, body, "other")
        if h.command == "POST" and path == "/v1/messages":
            rec.role = self.classify(rec)
        elif path == "/v1/messages/count_tokens":
            rec.role = "count_tokens"
        with self._arrived:
            self.requests.append(rec)
            chosen = self._next_turn(rec.role) if path == "/v1/messages" and body else None
        turn = chosen(rec) if callable(chosen) else chosen
        with self._arrived:
            rec.turn = turn
            self._arrived.notify_all()

        if rec.role == "count_tokens":
            _send_json(h, 200, {"input_tokens": max(1, len(raw) // 4)})
        elif turn is not None:
            self._answer(h, rec, turn)
        elif h.command in ("GET", "HEAD") and not path.startswith("/v1/"):
            _send_json(h, 200, {})  # connectivity probes such as HEAD /api/hello
        else:
            _send_json(h, 404, _error_body("not_found_error", f"{h.command} {path} not found"))

    def _answer(self, h: _Handler, rec: RecordedRequest, turn: Turn) -> None:
        if turn.delay:
            self._stopping.wait(turn.delay)
        if turn.kind == "error":
            body = _error_body(turn.error_type, turn.error_message)
            _send_json(h, turn.status, body, dict(turn.headers))
            return
        if turn.kind == "hang" and not turn.hang_after_start:
            h.close_connection = True
            self._stopping.wait()
            return
        request = rec.body if isinstance(rec.body, dict) else {}
        message = _render(turn, model=str(request.get("model") or "claude-sonnet-4-5"), raw=rec.raw)
        if not request.get("stream"):
            _send_json(h, 200, message, dict(turn.headers))
            return
        try:
            h.send_response(200)
            h.send_header("Content-Type", "text/event-stream; charset=utf-8")
            h.send_header("Cache-Control", "no-cache")
            h.send_header("Transfer-Encoding", "chunked")
            h.send_header("request-id", _new_id("req"))
            for name, value in turn.headers:
                h.send_header(name, value)
            h.end_headers()
            for event in _sse_events(message):
                h.wfile.write(_chunk(event))
                if turn.kind == "hang":  # message_start is out; now go silent
                    h.wfile.flush()
                    h.close_connection = True
                    self._stopping.wait()
                    return
            h.wfile.write(b"0\r\n\r\n")
            h.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            h.close_connection = True


def _read_body(h: BaseHTTPRequestHandler) -> bytes:
    if h.headers.get("Transfer-Encoding", "").lower() == "chunked":
        data = b""
        while True:
            size = int(h.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while h.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass
                return data
            data += h.rfile.read(size)
            h.rfile.readline()
    length = int(h.headers.get("Content-Length") or 0)
    return h.rfile.read(length) if length else b""


def _error_body(error_type: str, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": error_type, "message": message}}


def _send_json(
    h: BaseHTTPRequestHandler, status: int, obj: Any, headers: dict[str, str] | None = None
) -> None:
    data = json.dumps(obj).encode()
    try:
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.send_header("request-id", _new_id("req"))
        for name, value in (headers or {}).items():
            h.send_header(name, value)
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(data)
        h.wfile.flush()
    except (BrokenPipeError, ConnectionResetError):
        pass


def _render(turn: Turn, *, model: str, raw: bytes) -> dict[str, Any]:
    """The full (non-streamed) message for ``turn``; tool_use blocks get fresh ids."""
    content = []
    for block in turn.blocks:
        block = dict(block)
        if block["type"] == "tool_use" and not block.get("id"):
            block["id"] = _new_id("toolu")
        content.append(block)
    output_tokens = max(1, len(json.dumps(content)) // 4)
    return {
        "id": _new_id("msg"),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": turn.stop_reason if turn.kind == "message" else None,
        "stop_sequence": None,
        "usage": {
            "input_tokens": max(1, len(raw) // 4),
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
            "output_tokens": output_tokens,
            "service_tier": "standard",
        },
    }


def _sse_events(message: dict[str, Any]) -> Iterator[bytes]:
    """The SSE events of a streamed message, exactly as the Messages API sends them."""

    def event(name: str, data: dict[str, Any]) -> bytes:
        return f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()

    usage = message["usage"]
    start = dict(message, content=[], stop_reason=None, usage=dict(usage, output_tokens=1))
    yield event("message_start", {"type": "message_start", "message": start})
    yield event("ping", {"type": "ping"})
    for index, block in enumerate(message["content"]):
        if block["type"] == "text":
            yield event(
                "content_block_start",
                {
                    "type": "content_block_start",
                    "index": index,
                    "content_block": {**block, "text": ""},
                },
            )
            text = block["text"]
            for i in range(0, max(len(text), 1), 200):
                delta = {"type": "text_delta", "text": text[i : i + 200]}
                yield event(
                    "content_block_delta",
                    {"type": "content_block_delta", "index": index, "delta": delta},
                )
        elif block["type"] == "tool_use":
            yield event(
                "content_block_start",
                {
                    "type": "content_block_start",
                    "index": index,
                    "content_block": {**block, "input": {}},
                },
            )
            partial = json.dumps(block["input"])
            for i in range(0, len(partial), 200):
                delta = {"type": "input_json_delta", "partial_json": partial[i : i + 200]}
                yield event(
                    "content_block_delta",
                    {"type": "content_block_delta", "index": index, "delta": delta},
                )
        else:
            yield event(
                "content_block_start",
                {"type": "content_block_start", "index": index, "content_block": block},
            )
        yield event("content_block_stop", {"type": "content_block_stop", "index": index})
    yield event(
        "message_delta",
        {
            "type": "message_delta",
            "delta": {"stop_reason": message["stop_reason"], "stop_sequence": None},
            "usage": {
                "input_tokens": usage["input_tokens"],
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 0,
                "output_tokens": usage["output_tokens"],
            },
        },
    )
    yield event("message_stop", {"type": "message_stop"})


def _chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"
