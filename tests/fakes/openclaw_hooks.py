"""A loopback stand-in for OpenClaw's hooks endpoint (``POST /hooks/agent``).

A real aiohttp server on 127.0.0.1 (random port), in the test's own event loop. It checks the
bearer token like OpenClaw does (401 otherwise), answers ``202 {"ok": true}``, and records
every accepted body. ``fail(...)`` scripts the next answers: an HTTP status (``500``), a
``429`` with ``Retry-After``, or ``"drop"`` to close the connection without a response.
"""

from __future__ import annotations

import asyncio
import json
from collections import deque
from typing import Any

from aiohttp import web


class FakeHooks:
    def __init__(self, token: str = "hooks-secret-token") -> None:
        self.token = token
        self.accepted: list[dict[str, Any]] = []
        self.attempts = 0  # every POST, failed ones included
        self._script: deque[int | str | tuple[int, str]] = deque()
        self._changed = asyncio.Condition()
        self._runner: web.AppRunner | None = None
        self.url = ""

    def fail(self, *answers: int | str | tuple[int, str]) -> None:
        """Answer the next requests with these: 500, (429, "1") or "drop"."""
        self._script.extend(answers)

    async def __aenter__(self) -> FakeHooks:
        app = web.Application()
        app.router.add_post("/hooks/agent", self._agent)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}/hooks"
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _agent(self, request: web.Request) -> web.StreamResponse:
        self.attempts += 1
        try:
            if request.headers.get("Authorization") != f"Bearer {self.token}":
                return web.json_response({"ok": False, "error": "unauthorized"}, status=401)
            if self._script:
                answer = self._script.popleft()
                if answer == "drop":
                    assert request.transport is not None
                    request.transport.close()
                    return web.Response(status=500)
                if isinstance(answer, tuple):
                    status, retry_after = answer
                    return web.json_response(
                        {"ok": False}, status=status, headers={"Retry-After": retry_after}
                    )
                return web.json_response({"ok": False}, status=int(answer))
            body = json.loads(await request.read())
            self.accepted.append(body)
            return web.json_response({"ok": True, "runId": f"run-{len(self.accepted)}"}, status=202)
        finally:
            async with self._changed:
                self._changed.notify_all()

    async def wait_for(self, count: int, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Until ``count`` bodies were accepted."""
        async with self._changed:
            await asyncio.wait_for(
                self._changed.wait_for(lambda: len(self.accepted) >= count), timeout
            )
        return self.accepted
