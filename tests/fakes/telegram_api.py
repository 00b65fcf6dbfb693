"""A loopback stand-in for the Telegram Bot API, scripted by tests.

The real aiogram client talks to it (``AiohttpSession(api=TelegramAPIServer.from_base(url))``)
over a real socket: form-encoded ``POST /bot<token>/<method>``, answered with the Bot API's
``{"ok": true, "result": …}`` or ``{"ok": false, "error_code": …, "description": …}``. It is
a real HTTP/1.1 server on 127.0.0.1 (random port) in a background thread, so it keeps
answering while a test blocks on a subprocess.

Methods: ``getMe``, ``getUpdates`` (long poll with ``offset`` and ``timeout``, as Telegram
does it), ``sendMessage`` (checks the HTML the way Telegram does: known tags, balanced, at
most 4096 characters of text), ``answerCallbackQuery``, ``editMessageReplyMarkup``,
``deleteWebhook``. Anything else is a 404.

Scripting::

    with FakeTelegram() as api:
        api.fail("sendMessage", Failure.retry_after(1), Failure.server_error(), Failure.drop())
        api.user_says(42, "/status")
        api.user_presses(42, "retry:t-123", message_id=7)
        messages = await api.wait_messages(2, chat_id=42)
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import itertools
import json
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from html.parser import HTMLParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal, Self
from urllib.parse import parse_qsl

TOKEN = "123456789:TEST-token_for-the-stand-in"
BOT_USER = {
    "id": 123456789,
    "is_bot": True,
    "first_name": "Shipyard",
    "username": "shipyard_test_bot",
    "can_join_groups": True,
    "can_read_all_group_messages": False,
    "supports_inline_queries": False,
}
MESSAGE_LIMIT = 4096
HTML_TAGS = frozenset(
    {"b", "strong", "i", "em", "u", "ins", "s", "strike", "del", "a", "code", "pre", "span"}
    | {"tg-spoiler", "tg-emoji", "blockquote"}
)


@dataclass(frozen=True)
class Failure:
    """One scripted failure of a method call."""

    kind: Literal["retry_after", "server_error", "drop"]
    seconds: int = 0

    @classmethod
    def retry_after(cls, seconds: int) -> Failure:
        """429 Too Many Requests with ``parameters.retry_after``."""
        return cls("retry_after", seconds)

    @classmethod
    def server_error(cls) -> Failure:
        return cls("server_error")

    @classmethod
    def drop(cls) -> Failure:
        """Close the connection without an answer."""
        return cls("drop")


class _HTMLCheck(HTMLParser):
    """Refuses what Telegram's entity parser refuses: unknown or unbalanced tags, a bare
    ``<``."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=False)
        self.stack: list[str] = []
        self.text: list[str] = []
        self.problem = ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag not in HTML_TAGS:
            self.problem = self.problem or f'unsupported start tag "{tag}"'
        self.stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if not self.stack or self.stack[-1] != tag:
            self.problem = self.problem or f'unmatched end tag "{tag}"'
            return
        self.stack.pop()

    def handle_data(self, data: str) -> None:
        if "<" in data:
            self.problem = self.problem or "unexpected '<'"
        self.text.append(data)

    def handle_entityref(self, name: str) -> None:
        self.text.append(html.unescape(f"&{name};"))

    def handle_charref(self, name: str) -> None:
        self.text.append(html.unescape(f"&#{name};"))


def plain_text(text: str) -> tuple[str, str]:
    """The text Telegram would show for HTML ``text``, and the parse problem, if any."""
    check = _HTMLCheck()
    check.feed(text)
    check.close()
    problem = check.problem
    if not problem and check.stack:
        problem = f'can\'t find end tag corresponding to start tag "{check.stack[-1]}"'
    return "".join(check.text), problem


def utf16_len(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    fake: FakeTelegram

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A dropped connection is a scripted failure, not an error worth a traceback.
        pass


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        kind = self.headers.get("Content-Type", "")
        if raw and not kind.startswith("application/x-www-form-urlencoded"):
            self._reply(400, _error(400, f"Bad Request: unexpected content type {kind}"))
            return
        params = dict(parse_qsl(raw.decode(), keep_blank_values=True))
        _, _, rest = self.path.partition("/bot")
        token, _, method = rest.partition("/")
        status, body = self.server.fake.handle(token, method, params)
        if status == 0:
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            return
        self._reply(status, body)

    def do_GET(self) -> None:
        self._reply(405, _error(405, "Method Not Allowed"))

    def _reply(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def _error(code: int, description: str, **parameters: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"ok": False, "error_code": code, "description": description}
    if parameters:
        body["parameters"] = parameters
    return body


def _ok(result: Any) -> tuple[int, dict[str, Any]]:
    return 200, {"ok": True, "result": result}


@dataclass
class Call:
    """One request the stand-in answered (or failed on purpose)."""

    method: str
    params: dict[str, str]
    status: int
    at: float


class FakeTelegram:
    """The Bot API on loopback. Every attribute is safe to read from tests while it runs."""

    def __init__(self, token: str = TOKEN) -> None:
        self.token = token
        self.calls: list[Call] = []
        self.messages: list[dict[str, Any]] = []  # every sendMessage, as its Message object
        self.answers: list[dict[str, str]] = []  # answerCallbackQuery calls
        self.edits: list[dict[str, str]] = []
        self.refuse_button_urls = False  # answer 400 to URL buttons, as Telegram does for some
        self._failures: dict[str, deque[Failure]] = {}
        self._updates: list[dict[str, Any]] = []
        self._update_ids = itertools.count(1)
        self._message_ids = itertools.count(1)
        self._cond = threading.Condition()
        self._closing = False
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.fake = self
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    # --- scripting ----------------------------------------------------------------------

    def fail(self, method: str, *failures: Failure) -> None:
        """The next calls of ``method`` fail like this, in order, then it works again."""
        with self._cond:
            self._failures.setdefault(method, deque()).extend(failures)

    def user_says(
        self, chat_id: int, text: str, *, user_id: int | None = None, username: str = "operator"
    ) -> dict[str, Any]:
        """A person writes ``text`` in ``chat_id``; returns the message as the bot will get it."""
        user = _person(user_id or chat_id, username)
        message: dict[str, Any] = {
            "message_id": next(self._message_ids),
            "date": int(time.time()),
            "chat": _chat(chat_id, username),
            "from": user,
            "text": text,
        }
        if text.startswith("/"):
            word = text.split()[0]
            message["entities"] = [{"type": "bot_command", "offset": 0, "length": len(word)}]
        self._push({"message": message})
        return message

    def user_presses(
        self, chat_id: int, data: str, *, message_id: int = 0, user_id: int | None = None
    ) -> str:
        """A person presses an inline button with ``data`` under the bot's message
        ``message_id`` (default: its last message in that chat); returns the query id."""
        with self._cond:
            sent = [m for m in self.messages if m["chat"]["id"] == chat_id]
        found = next((m for m in sent if m["message_id"] == message_id), None)
        message = found or (sent[-1] if sent else None)
        if message is None:
            message = {
                "message_id": message_id or next(self._message_ids),
                "date": int(time.time()),
                "chat": _chat(chat_id, "operator"),
                "from": BOT_USER,
                "text": "an old message",
            }
        query_id = f"cq{next(self._update_ids)}"
        query = {
            "id": query_id,
            "from": _person(user_id or chat_id, "operator"),
            "chat_instance": f"ci{chat_id}",
            "message": message,
            "data": data,
        }
        self._push({"callback_query": query})
        return query_id

    # --- waiting ------------------------------------------------------------------------

    async def wait_until(
        self, check: Callable[[], bool], *, timeout: float = 20.0, what: str = "a condition"
    ) -> None:
        """Return as soon as ``check()`` holds; fail after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while not check():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}")
            await asyncio.sleep(0.02)

    async def wait_messages(
        self, count: int, *, chat_id: int | None = None, timeout: float = 20.0
    ) -> list[dict[str, Any]]:
        """At least ``count`` messages sent (to ``chat_id``), as soon as they are."""
        await self.wait_until(
            lambda: len(self.sent(chat_id)) >= count,
            timeout=timeout,
            what=f"{count} message(s) to {chat_id or 'any chat'}; got {self.texts(chat_id)}",
        )
        return self.sent(chat_id)

    def sent(self, chat_id: int | None = None) -> list[dict[str, Any]]:
        with self._cond:
            return [m for m in self.messages if chat_id is None or m["chat"]["id"] == chat_id]

    def texts(self, chat_id: int | None = None) -> list[str]:
        return [m["text"] for m in self.sent(chat_id)]

    def count(self, method: str, status: int | None = None) -> int:
        with self._cond:
            return sum(1 for c in self.calls if c.method == method and status in (None, c.status))

    # --- serving ------------------------------------------------------------------------

    def _push(self, update: dict[str, Any]) -> None:
        with self._cond:
            self._updates.append({"update_id": next(self._update_ids), **update})
            self._cond.notify_all()

    def handle(self, token: str, method: str, params: dict[str, str]) -> tuple[int, Any]:
        """Answer one call: ``(status, body)``, status 0 to drop the connection."""
        if token != self.token:
            status, body = 401, _error(401, "Unauthorized")
        else:
            with self._cond:
                queue = self._failures.get(method)
                failure = queue.popleft() if queue else None
            if failure is not None:
                status, body = _failure(failure)
            else:
                status, body = self._serve(method, params)
        with self._cond:
            self.calls.append(Call(method, params, status, time.monotonic()))
        return status, body

    def _serve(self, method: str, params: dict[str, str]) -> tuple[int, Any]:
        if method == "getMe":
            return _ok(BOT_USER)
        if method == "deleteWebhook":
            return _ok(True)
        if method == "getUpdates":
            return _ok(self._get_updates(params))
        if method == "sendMessage":
            return self._send_message(params)
        if method == "answerCallbackQuery":
            with self._cond:
                self.answers.append(params)
            return _ok(True)
        if method == "editMessageReplyMarkup":
            with self._cond:
                self.edits.append(params)
            return _ok(True)
        return 404, _error(404, "Not Found: method not found")

    def _get_updates(self, params: dict[str, str]) -> list[dict[str, Any]]:
        offset = int(params.get("offset") or 0)
        limit = int(params.get("limit") or 100)
        wait = float(params.get("timeout") or 0)
        deadline = time.monotonic() + wait
        with self._cond:
            if offset:
                # As Telegram does: asking from an offset confirms every update before it.
                self._updates = [u for u in self._updates if u["update_id"] >= offset]
            while not self._updates and not self._closing:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            return list(self._updates[:limit])

    def _send_message(self, params: dict[str, str]) -> tuple[int, Any]:
        try:
            chat_id = int(params["chat_id"])
        except (KeyError, ValueError):
            return 400, _error(400, "Bad Request: chat_id is empty")
        text = params.get("text", "")
        shown, problem = plain_text(text) if params.get("parse_mode") == "HTML" else (text, "")
        if problem:
            return 400, _error(400, f"Bad Request: can't parse entities: {problem}")
        if not shown.strip():
            return 400, _error(400, "Bad Request: message text is empty")
        if utf16_len(shown) > MESSAGE_LIMIT:
            return 400, _error(400, "Bad Request: message is too long")
        markup = json.loads(params["reply_markup"]) if params.get("reply_markup") else None
        if markup and self.refuse_button_urls:
            for row in markup.get("inline_keyboard", []):
                for button in row:
                    if button.get("url"):
                        return 400, _error(
                            400,
                            f"Bad Request: inline keyboard button URL '{button['url']}' is "
                            "invalid: Wrong HTTP URL",
                        )
        message: dict[str, Any] = {
            "message_id": next(self._message_ids),
            "date": int(time.time()),
            "chat": _chat(chat_id, "operator"),
            "from": BOT_USER,
            "text": shown,
        }
        if markup:
            message["reply_markup"] = markup
        with self._cond:
            self.messages.append({**message, "html": text})
        return _ok(message)


def _failure(failure: Failure) -> tuple[int, Any]:
    if failure.kind == "retry_after":
        return 429, _error(
            429,
            f"Too Many Requests: retry after {failure.seconds}",
            retry_after=failure.seconds,
        )
    if failure.kind == "server_error":
        return 500, _error(500, "Internal Server Error")
    return 0, None


def _person(user_id: int, username: str) -> dict[str, Any]:
    return {"id": user_id, "is_bot": False, "first_name": username.title(), "username": username}


def _chat(chat_id: int, username: str) -> dict[str, Any]:
    if chat_id < 0:
        return {"id": chat_id, "type": "group", "title": "Operators"}
    return {"id": chat_id, "type": "private", "first_name": username.title(), "username": username}
