"""Read-model queries over NATS (``sy.qry.<name>``), for the CLI and other processes.

DuckDB lets one process open the database, so other processes ask the one that holds it.
Replies use the command reply format: ``{"ok": true, "result": …}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from shipyard import access
from shipyard.errors import CommandRejected, CommandUnavailable
from shipyard.events import commands
from shipyard.projections import queries
from shipyard.projections.projector import Projector, ReadModels, Status

log = logging.getLogger(__name__)

QUERY_PREFIX = "sy.qry"
QUEUE_GROUP = "shipyard-queries"
FRESH_TIMEOUT = 20.0  # seconds a query waits for the projection to reach ``min_seq``
PROGRESS_SUBJECT = "sy.status.projector"  # each committed batch: applied, target, caught_up

Handler = Callable[[dict[str, Any]], Awaitable[Any]]


def _str(args: dict[str, Any], key: str, default: str = "") -> str:
    value = args.get(key, default)
    if not isinstance(value, str):
        raise CommandRejected(f"{key}: must be a string", code="invalid")
    return value


def _int(args: dict[str, Any], key: str, default: int) -> int:
    value = args.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool):
        raise CommandRejected(f"{key}: must be a whole number", code="invalid")
    return value


class QueryService:
    def __init__(self, nc: NATS, projector: Projector) -> None:
        self.nc = nc
        self.projector = projector
        self.models: ReadModels = projector.models
        self._sub: Any = None
        self._handlers: dict[str, Handler] = {
            "status": self._status,
            "history": self._history,
            "task": self._task,
            "tasks": self._tasks,
            "run": self._run,
            "activity": self._activity,
            "kanban": self._kanban,
            "digests": self._digests,
            "inbox": self._inbox,
            "thread": self._thread,
            "threads": self._threads,
        }

    async def start(self) -> None:
        self._sub = await self.nc.subscribe(
            f"{QUERY_PREFIX}.>", queue=QUEUE_GROUP, cb=self._on_message
        )
        self.projector.listeners.append(self._announce)

    async def _announce(self, status: Status) -> None:
        """Tell whoever listens how far the projection is (core NATS; nothing is stored)."""
        body = {
            "applied_seq": status.applied_seq,
            "target_seq": status.target_seq,
            "caught_up": status.caught_up,
        }
        with contextlib.suppress(nats.errors.Error):
            await self.nc.publish(PROGRESS_SUBJECT, msgspec.json.encode(body))

    async def stop(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()
            self._sub = None

    async def _on_message(self, msg: Msg) -> None:
        name, _, scope = msg.subject[len(QUERY_PREFIX) + 1 :].partition(".")
        handler = self._handlers.get(name)
        try:
            if handler is None or (scope and name != "inbox"):
                raise CommandRejected(f"no query {msg.subject!r}", code="unknown_query")
            args = msgspec.json.decode(msg.data) if msg.data else {}
            if not isinstance(args, dict):
                raise CommandRejected("body: must be a JSON object", code="invalid")
            agent = args.get("agent")
            if scope and (not isinstance(agent, str) or access.token(agent) != scope):
                # An agent's own subject (see shipyard.access): its own inbox only.
                raise CommandRejected(
                    f"agent: on this subject only {scope.replace('~', '.')!r}", code="forbidden"
                )
            min_seq = _int(args, "min_seq", 0)
            if min_seq:
                # Read-your-writes: answer once the projection has applied that sequence.
                try:
                    await asyncio.wait_for(self.projector.wait_for(min_seq), FRESH_TIMEOUT)
                except TimeoutError:
                    raise CommandRejected(
                        f"the read models did not reach sequence {min_seq} within "
                        f"{FRESH_TIMEOUT:.0f}s; try again without --fresh",
                        code="unavailable",
                    ) from None
            reply: dict[str, Any] = {"ok": True, "result": await handler(args)}
        except CommandRejected as e:
            reply = {"ok": False, "error": {"code": e.code, "message": e.message, "problems": []}}
        except msgspec.DecodeError as e:
            reply = {"ok": False, "error": {"code": "invalid", "message": f"body: {e}"}}
        except Exception:
            log.exception("query %s failed", name)
            reply = {"ok": False, "error": {"code": "internal", "message": "query failed"}}
        if msg.reply:
            try:
                await msg.respond(msgspec.json.encode(reply))
            except nats.errors.Error:
                log.warning("could not answer query %s", name)

    async def _db(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        def call() -> Any:
            assert self.models.con is not None
            return fn(self.models.con, *args, **kwargs)

        return await self.models.run(call)

    async def _status(self, args: dict[str, Any]) -> dict[str, Any]:
        status = self.projector.status
        summary = await self._db(queries.summary)
        return {
            "projection": {
                "applied_seq": status.applied_seq,
                "target_seq": status.target_seq,
                "caught_up": status.caught_up,
                "percent": status.percent,
            },
            "summary": summary,
        }

    async def _history(self, args: dict[str, Any]) -> Any:
        return await self._db(
            queries.history,
            limit=_int(args, "limit", 20),
            before=_str(args, "before"),
            outcome=_str(args, "outcome"),
            agent=_str(args, "agent"),
            search=_str(args, "search"),
        )

    async def _task(self, args: dict[str, Any]) -> Any:
        found = await self._db(queries.task, _str(args, "task_id"))
        if found is None:
            raise CommandRejected(f"no task {args.get('task_id')}", code="not_found")
        return found

    async def _tasks(self, args: dict[str, Any]) -> Any:
        """Tasks newest first, optionally in one state (``blocked``: queued, waiting on
        ``after``)."""
        return await self._db(
            queries.tasks, state=_str(args, "state"), limit=_int(args, "limit", 200)
        )

    async def _run(self, args: dict[str, Any]) -> Any:
        found = await self._db(queries.run, _str(args, "run_id"))
        if found is None:
            raise CommandRejected(f"no run {args.get('run_id')}", code="not_found")
        return found

    async def _activity(self, args: dict[str, Any]) -> Any:
        return await self._db(
            queries.activity,
            limit=_int(args, "limit", 50),
            before=_int(args, "before", 0),
            task_id=_str(args, "task_id"),
        )

    async def _kanban(self, args: dict[str, Any]) -> Any:
        return await self._db(queries.kanban, since=datetime.now(UTC) - timedelta(days=1))

    async def _inbox(self, args: dict[str, Any]) -> dict[str, Any]:
        agent = _str(args, "agent")
        if not agent:
            raise CommandRejected("agent: say whose inbox", code="invalid")
        unread = args.get("unread", False)
        messages = await self._db(
            queries.inbox, agent, unread=unread is True, limit=_int(args, "limit", 200)
        )
        counts = await self._db(queries.unread_counts)
        return {"agent": agent, "unread": counts.get(agent, 0), "messages": messages}

    async def _thread(self, args: dict[str, Any]) -> Any:
        found = await self._db(queries.thread, _str(args, "thread_id"))
        if not found:
            raise CommandRejected(f"no thread {args.get('thread_id')}", code="not_found")
        return found

    async def _threads(self, args: dict[str, Any]) -> Any:
        return await self._db(queries.threads, agent=_str(args, "agent"))

    async def _digests(self, args: dict[str, Any]) -> dict[str, Any]:
        def both() -> tuple[int, dict[str, str]]:
            return self.models.checkpoint_sync(), self.models.digests_sync()

        seq, digests = await self.models.run(both)
        return {"seq": seq, "digests": digests}


async def ask(nc: NATS, name: str, args: dict[str, Any] | None = None) -> Any:
    """Run a read-model query in the instance that holds the database. An inbox is asked
    on the agent's own subject, the one a builder's NATS user may use."""
    subject = f"{QUERY_PREFIX}.{name}"
    if name == "inbox" and args and isinstance(args.get("agent"), str):
        subject += "." + access.token(args["agent"])
    try:
        return await commands.call(nc, name, args or {}, subject=subject, timeout=30)
    except CommandUnavailable as e:
        raise CommandUnavailable(
            "no projector answered: is `shipyard up` running with the `projector` role?"
        ) from e
