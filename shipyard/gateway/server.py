"""Running the gateway inside ``shipyard up``: uvicorn on the configured address."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Generator

import uvicorn

from shipyard.errors import ConfigError
from shipyard.events.commands import Commands
from shipyard.events.log import EventLog
from shipyard.gateway.app import Gateway, create_app
from shipyard.gateway.auth import TokenStore
from shipyard.projections.projector import Projector
from shipyard.settings import Settings

log = logging.getLogger(__name__)


class _Server(uvicorn.Server):
    # `shipyard up` owns the signals; uvicorn must not take them over.
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


class GatewayService:
    def __init__(self, settings: Settings, events: EventLog, projector: Projector) -> None:
        self.settings = settings
        self.tokens = TokenStore(settings.data_dir)
        self.gateway = Gateway(
            settings=settings,
            events=events,
            commands=Commands(events),
            projector=projector,
            tokens=self.tokens,
        )
        self.admin_token = ""
        self.url = ""
        self._server: _Server | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.admin_token = self.tokens.admin_token(os.environ.get("SHIPYARD_ADMIN_TOKEN", ""))
        cfg = self.settings.gateway
        config = uvicorn.Config(
            create_app(self.gateway),
            host=cfg.host,
            port=cfg.port,
            log_level="warning",
            lifespan="off",
            access_log=False,
            timeout_graceful_shutdown=2,
        )
        self._server = _Server(config)
        # Bind here, so a taken port is a clear error rather than uvicorn's exit mid-start.
        sock = socket.socket(socket.AF_INET6 if ":" in cfg.host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((cfg.host, cfg.port))
        except OSError as e:
            sock.close()
            raise ConfigError(
                f"the gateway cannot listen on {cfg.host}:{cfg.port}: {e.strerror or e}. "
                "Choose another port with SHIPYARD_PORT or [gateway] port in shipyard.toml."
            ) from e
        sock.listen(512)
        sock.setblocking(False)
        port = sock.getsockname()[1]
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name="gateway")
        while not self._server.started:
            if self._task.done():
                raise ConfigError(f"the gateway on {cfg.host}:{port} stopped while starting")
            await asyncio.sleep(0.01)
        host = "127.0.0.1" if cfg.host in ("0.0.0.0", "") else cfg.host
        self.url = cfg.public_url.rstrip("/") or f"http://{host}:{port}"

    @property
    def login_url(self) -> str:
        return f"{self.url}/?token={self.admin_token}"

    async def stop(self) -> None:
        self.gateway.shutdown.set()
        if self._server is not None:
            self._server.should_exit = True
        if self._task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._task, 10)
        await self.gateway.feed.stop()
