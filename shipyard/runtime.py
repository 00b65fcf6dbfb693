"""``shipyard up``: start the roles this process runs and keep them running until stopped.

With no NATS URL configured, the embedded nats-server is started first and stopped last.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import socket
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from shipyard import __version__, access, instance, redact, storage
from shipyard.access import Users
from shipyard.embedded import EmbeddedNats
from shipyard.errors import ConfigError
from shipyard.events.commands import Commands, CommandService
from shipyard.events.envelope import short_id, valid_id
from shipyard.events.log import EventLog, connect
from shipyard.gateway.server import GatewayService
from shipyard.gateway.webhook import OpenClawReporter
from shipyard.handler.service import Handler
from shipyard.projections.projector import DB_FILE, Projector, ReadModels
from shipyard.projections.service import QueryService
from shipyard.settings import Settings

log = logging.getLogger(__name__)

DRAIN_TIMEOUT = 5.0  # seconds to flush and unsubscribe at shutdown
START_WAIT = 30.0  # seconds `up` waits for a configured NATS to accept it (it may start later)
# Every role this release can run; openclaw runs only when its hooks_url is set, telegram
# only when a token and chats are.
ROLES = ("projector", "commands", "handler", "gateway", "openclaw", "telegram")
DEFAULT_ROLES = ROLES


async def _start_roles(
    settings: Settings,
    roles: tuple[str, ...],
    nc: Any,
    events: EventLog,
    services: list[Any],
    info: dict[str, Any],
) -> None:
    """Start each role, appending what must be stopped to ``services`` as it goes."""
    if "projector" in roles:
        models = ReadModels(settings.data_dir / DB_FILE)
        await models.open()
        services.append(_Closing(models))
        projector = Projector(events, models)
        await projector.start()
        services.append(projector)
        query_service = QueryService(nc, projector)
        await query_service.start()
        services.append(query_service)
    if "commands" in roles:
        command_service = CommandService(nc, Commands(events))
        await command_service.start()
        services.append(command_service)
    if "handler" in roles:
        handler = Handler(events, settings, handler_id=stable_handler_id(settings))
        await handler.start()
        services.append(handler)
    if "gateway" in roles:
        found = next((s for s in services if isinstance(s, Projector)), None)
        if found is None:
            raise ConfigError("the gateway role needs the projector role in the same process")
        gateway = GatewayService(settings, events, found)
        await gateway.start()
        services.append(gateway)
        info["dashboard"] = gateway.login_url
        info["gateway_url"] = gateway.url
    if "openclaw" in roles and settings.openclaw.hooks_url:
        reporter = OpenClawReporter(
            events, settings, dashboard_url=info.get("gateway_url") or _dashboard(settings)
        )
        await reporter.start()
        services.append(reporter)
    elif "roles" in info:
        info["roles"] = [r for r in info["roles"] if r != "openclaw"]  # unconfigured: absent
    if "telegram" in roles and settings.telegram.enabled:
        # Imported here: aiogram takes seconds to import, which no process without a bot, and
        # no CLI command, should pay.
        from shipyard.gateway.telegram import TelegramService

        bot = TelegramService(
            settings, events, nc, dashboard_url=info.get("gateway_url") or _dashboard(settings)
        )
        await bot.start()
        services.append(bot)
        info["telegram_chats"] = len(settings.telegram.chat_ids)
    elif "roles" in info:
        # Unconfigured, the role is simply absent: not an error, and not shown as running.
        info["roles"] = [r for r in info["roles"] if r != "telegram"]


def _dashboard(settings: Settings) -> str:
    """Where the gateway of this deployment listens, when it runs in another process."""
    cfg = settings.gateway
    host = "127.0.0.1" if cfg.host in ("0.0.0.0", "") else cfg.host
    return f"http://{host}:{cfg.port}"


class _Closing:
    """Closes the read models last among the services that use them."""

    def __init__(self, models: ReadModels) -> None:
        self.models = models

    async def stop(self) -> None:
        await self.models.close()


def stable_handler_id(settings: Settings) -> str:
    """The same id across restarts on one data dir, so a restarted handler knows its runs."""
    path = settings.data_dir / "handler.id"
    try:
        value = path.read_text().strip()
    except FileNotFoundError:
        value = ""
    if not valid_id(value):
        host = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname().split(".")[0])[:40]
        value = f"{host}-{short_id('')}"
        path.write_text(value + "\n")
    return value


def parse_roles(text: str | None) -> tuple[str, ...]:
    if not text:
        return DEFAULT_ROLES
    roles = tuple(dict.fromkeys(r.strip() for r in text.split(",") if r.strip()))
    unknown = [r for r in roles if r not in ROLES]
    if unknown or not roles:
        raise ConfigError(
            f"unknown role{'s' if len(unknown) > 1 else ''} {', '.join(unknown) or '(none)'}: "
            f"choose from {', '.join(ROLES)}"
        )
    return roles


async def run(
    settings: Settings,
    roles: tuple[str, ...] = DEFAULT_ROLES,
    *,
    stop: asyncio.Event | None = None,
    on_ready: Callable[[dict[str, Any]], None] | None = None,
    then: Callable[[Any], Awaitable[None]] | None = None,
) -> None:
    """Run until ``stop`` is set, or until SIGINT / SIGTERM."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)

    for secret in (
        settings.nats_password,
        settings.nats_token,
        settings.openclaw.token,
        settings.telegram.token.get_secret_value(),
    ):
        redact.add_secret(secret)  # from a settings file, where names do not give them away
    storage.check_writable(settings.data_dir, "the data directory")
    lock = instance.InstanceLock(settings.data_dir)
    lock.acquire()
    server: EmbeddedNats | None = None
    try:
        if settings.embedded:
            # Every role gets its own NATS user; this process runs as the service.
            users = Users.ensure(access.nats_dir(settings.data_dir), list(settings.agents))
            for password in users.passwords.values():
                redact.add_secret(password)
            server = EmbeddedNats(access.nats_dir(settings.data_dir), users=users)
            urls = [await asyncio.to_thread(server.start)]
            credentials = users.credentials("service")
        else:
            urls = list(settings.nats_url)
            credentials = access.credentials_for(settings, "service")
        nc = await connect(
            urls,
            name=f"shipyard-up@{socket.gethostname()}",
            credentials=credentials,
            wait=START_WAIT,
        )
        try:
            events = EventLog(nc)
            await events.ensure_stream(replicas=settings.stream_replicas)
            services: list[Any] = []
            try:
                info: dict[str, Any] = {
                    "pid": os.getpid(),
                    "version": __version__,
                    "nats_url": urls,
                    "embedded": settings.embedded,
                    "roles": list(roles),
                    "started": datetime.now(UTC).isoformat(),
                }
                await _start_roles(settings, roles, nc, events, services, info)
                # nats-py can send flush's PING ahead of queued SUBs; a second round trip
                # makes sure every subscription is on the server before we say "up".
                await nc.flush()
                await nc.flush()
                instance.write_info(settings.data_dir, info)
                if on_ready:
                    on_ready(info)
                if then is not None:
                    await then(nc)
                await stop.wait()
            finally:
                for service in reversed(services):
                    try:
                        await service.stop()
                    except Exception:
                        log.exception("stopping %s failed", type(service).__name__)
        finally:
            try:
                await asyncio.wait_for(nc.drain(), DRAIN_TIMEOUT)
            except Exception:
                with contextlib.suppress(Exception):
                    await nc.close()
    finally:
        if server is not None:
            await asyncio.to_thread(server.stop)
        lock.release()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)
