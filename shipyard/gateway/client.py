"""A small client for Shipyard's HTTP API, for agents: the MCP server and builders.

It finds the gateway and its token the way an agent is set up to: ``SHIPYARD_URL`` and
``SHIPYARD_TOKEN`` (which the handler gives every builder it starts), else the running
instance on this data dir and the agent's token that ``shipyard init`` saved in it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiohttp
import msgspec

from shipyard import instance
from shipyard.errors import NotRunning, ShipyardError

TIMEOUT = 15.0  # seconds per request
AGENT_TOKENS = "agents"  # <data dir>/agents/<agent>.token


class ApiError(ShipyardError):
    """The gateway refused a request; ``status`` and ``code`` say why."""

    def __init__(self, status: int, code: str, message: str, problems: list[str]) -> None:
        super().__init__(message)
        self.status, self.code, self.problems = status, code, problems


def agent_token_path(data_dir: Path, agent: str) -> Path:
    return data_dir / AGENT_TOKENS / f"{agent}.token"


def locate(data_dir: Path, agent: str, env: Mapping[str, str] = os.environ) -> tuple[str, str]:
    """The gateway URL and token this agent should use."""
    url, token = env.get("SHIPYARD_URL", ""), env.get("SHIPYARD_TOKEN", "")
    if not url:
        info = instance.read_info(data_dir) or {}
        url = info.get("gateway_url", "")
        if not url:
            raise NotRunning(
                f"no Shipyard gateway runs on {data_dir}; start `shipyard up`, or set "
                "SHIPYARD_URL and SHIPYARD_TOKEN"
            )
    if not token:
        try:
            token = agent_token_path(data_dir, agent).read_text().strip()
        except FileNotFoundError:
            raise ShipyardError(
                f"no token for agent {agent}: set SHIPYARD_TOKEN, or run "
                f"`shipyard init claude --agent {agent}` to make one"
            ) from None
    return url.rstrip("/"), token


class Api:
    def __init__(self, url: str, token: str) -> None:
        self.url, self.token = url.rstrip("/"), token

    async def get(self, path: str, **params: str) -> Any:
        return await self._call("GET", path, params=params)

    async def post(self, path: str, body: Any) -> Any:
        return await self._call("POST", path, body=body)

    async def _call(
        self, method: str, path: str, *, params: dict[str, str] | None = None, body: Any = None
    ) -> Any:
        headers = {"Authorization": f"Bearer {self.token}"}
        data = None
        if body is not None:
            headers["Content-Type"] = "application/json"
            data = msgspec.json.encode(body)
        timeout = aiohttp.ClientTimeout(total=TIMEOUT)
        try:
            async with (
                aiohttp.ClientSession(timeout=timeout) as session,
                session.request(
                    method, self.url + path, params=params, data=data, headers=headers
                ) as response,
            ):
                payload = await response.read()
                status = response.status
        except (aiohttp.ClientError, TimeoutError) as e:
            raise NotRunning(f"cannot reach the Shipyard gateway at {self.url}: {e}") from e
        try:
            result = msgspec.json.decode(payload) if payload else None
        except msgspec.DecodeError:
            result = None
        if status >= 400:
            error = (result or {}).get("error", {}) if isinstance(result, dict) else {}
            raise ApiError(
                status,
                error.get("code", str(status)),
                error.get("message", f"HTTP {status}"),
                error.get("problems", []),
            )
        return result
