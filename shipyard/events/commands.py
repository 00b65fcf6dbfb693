"""Commands: requests to change something, answered with a result or a clear refusal.

Commands travel as NATS request/reply on ``sy.cmd.<name>`` and are served by a queue group,
so several instances share them. The HTTP gateway calls the same functions, so both paths
validate alike and end in the same events. A refused command is itself recorded.

A reply is JSON: ``{"ok": true, "result": {...}}`` or
``{"ok": false, "error": {"code": "...", "message": "...", "problems": [...]}}``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from shipyard import access
from shipyard.errors import (
    AppendFailed,
    CommandRejected,
    CommandUnavailable,
    ConcurrencyConflict,
    ShipyardError,
)
from shipyard.events import comms, dispatch, escalation
from shipyard.events.envelope import make, new_id, valid_id
from shipyard.events.log import EventLog, watch_denial
from shipyard.events.tasks import Task, TaskBook
from shipyard.events.types import (
    DispatchRejected,
    TaskCancelRequested,
    TaskDispatched,
    TaskFinished,
    TaskRequeued,
    TaskState,
)

log = logging.getLogger(__name__)

COMMAND_PREFIX = "sy.cmd"
QUEUE_GROUP = "shipyard-commands"
COMMAND_TIMEOUT = 10.0  # seconds a caller waits for a reply
MAX_EXCERPT = 2048  # characters of a refused request kept in its rejection event

Handler = Callable[[bytes, str], Awaitable[dict[str, Any]]]


def command_subject(name: str) -> str:
    return f"{COMMAND_PREFIX}.{name}"


class DispatchResult(msgspec.Struct, frozen=True, kw_only=True):
    task_id: str
    seq: int
    duplicate: bool
    task: TaskDispatched


class Commands:
    """The command logic, shared by the NATS service and the HTTP gateway."""

    def __init__(self, events: EventLog) -> None:
        self.events = events

    async def dispatch(self, body: object, *, actor: str = "") -> DispatchResult:
        """Validate and record a dispatch. A repeated ``idempotency_key`` returns the first
        task instead of making a second."""
        try:
            _, data = dispatch.parse(body)
            await self._check_references(data)
        except dispatch.DispatchInvalid as e:
            await self._reject("dispatch", e, body)
            raise
        actor = actor or f"dispatcher:{data.dispatcher}"
        for _ in range(5):
            task_id = dispatch.task_id_for(data.dispatcher, data.idempotency_key)
            event = make(data, aggregate_id=task_id, actor=actor)
            try:
                seq = await self.events.append(event, expect=0)
            except ConcurrencyConflict:
                if not data.idempotency_key:
                    continue  # two new ids met in the same millisecond: draw another
                history = await self.events.history("task", task_id)
                if not history:
                    continue  # the first dispatch with this key is still being stored
                first = history[0]
                return DispatchResult(
                    task_id=task_id, seq=first.seq, duplicate=True, task=first.data
                )
            return DispatchResult(task_id=task_id, seq=seq, duplicate=False, task=data)
        raise AppendFailed("could not find a free task id; try again")

    async def task(self, task_id: str) -> Task:
        """The task's current state, folded from its history."""
        if not valid_id(task_id):
            raise CommandRejected(f"{task_id!r} is not a task id", code="invalid")
        book = TaskBook()
        for event in await self.events.history("task", task_id):
            book.apply(event)
        task = book.tasks.get(task_id)
        if task is None:
            raise CommandRejected(f"no task {task_id}", code="not_found")
        return task

    async def cancel(self, task_id: str, *, reason: str = "", actor: str = "") -> dict[str, Any]:
        """Cancel a queued, blocked or running task. A running builder's group is killed by
        its handler as soon as it reads the request."""
        for _ in range(5):
            task = await self.task(task_id)
            if task.state.finished:
                raise CommandRejected(
                    f"task {task_id} already {task.state}; nothing to cancel", code="conflict"
                )
            why = reason or f"cancelled by {actor or 'an operator'}"
            data: TaskCancelRequested | TaskFinished
            if task.run_open:
                data = TaskCancelRequested(reason=why)
            else:
                data = TaskFinished(outcome=TaskState.CANCELLED, reason=why)
            try:
                await self.events.append(
                    make(data, aggregate_id=task_id, actor=actor or "commands"),
                    expect=task.last_seq,
                )
            except ConcurrencyConflict:
                continue
            state = "cancelling" if task.run_open else "cancelled"
            return {"task_id": task_id, "state": state}
        raise CommandRejected(f"task {task_id} keeps changing; try again", code="conflict")

    async def retry(self, task_id: str, *, actor: str = "") -> dict[str, Any]:
        """Queue a failed or cancelled task again as a new attempt; its history stays."""
        for _ in range(5):
            task = await self.task(task_id)
            if task.state not in (TaskState.FAILED, TaskState.CANCELLED):
                raise CommandRejected(
                    f"task {task_id} is {task.state}; only a failed or cancelled task can be "
                    "retried",
                    code="conflict",
                )
            data = TaskRequeued(
                attempt=task.attempt + 1, reason=f"retried by {actor or 'an operator'}"
            )
            try:
                await self.events.append(
                    make(data, aggregate_id=task_id, actor=actor or "commands"),
                    expect=task.last_seq,
                )
            except ConcurrencyConflict:
                continue
            return {"task_id": task_id, "state": "queued", "attempt": task.attempt + 1}
        raise CommandRejected(f"task {task_id} keeps changing; try again", code="conflict")

    async def escalate(
        self, task_id: str, to_agent: str, *, note: str = "", actor: str = ""
    ) -> dict[str, Any]:
        """Hand a failed or cancelled task to ``to_agent`` as a new task that knows what
        went wrong (see :mod:`shipyard.events.escalation`)."""
        for _ in range(5):
            task = await self.task(task_id)
            try:
                return await escalation.escalate(
                    self.events, task, to_agent, note=note, actor=actor or "commands"
                )
            except ConcurrencyConflict:
                continue
        raise CommandRejected(f"task {task_id} keeps changing; try again", code="conflict")

    async def _check_references(self, data: TaskDispatched) -> None:
        problems = []
        for tid in data.after:
            if not await self.events.last_seq("task", tid):
                problems.append(f"after: no task {tid} exists")
        if data.escalated_from and not await self.events.last_seq("task", data.escalated_from):
            problems.append(f"escalated_from: no task {data.escalated_from} exists")
        if problems:
            raise dispatch.DispatchInvalid(problems, dispatcher=data.dispatcher, rework=data.rework)

    async def _reject(self, command: str, error: CommandRejected, body: Any) -> None:
        if isinstance(body, bytes):
            excerpt = body[:MAX_EXCERPT].decode("utf-8", "replace")
        elif isinstance(body, dict):
            excerpt = msgspec.json.encode(body)[:MAX_EXCERPT].decode("utf-8", "replace")
        else:
            excerpt = str(body)[:MAX_EXCERPT]
        data = DispatchRejected(
            command=command,
            problems=error.problems or [error.message],
            dispatcher=getattr(error, "dispatcher", ""),
            excerpt=excerpt,
        )
        event = make(data, aggregate_id=new_id("r-"), actor="commands")
        try:
            await self.events.append(event)
        except ShipyardError:
            log.exception("could not record a rejection", extra={"action": "reject_record"})


def _error_reply(
    code: str, message: str, problems: list[str] | None = None, **extra: Any
) -> dict[str, Any]:
    error: dict[str, Any] = {"code": code, "message": message, "problems": problems or []}
    error.update(extra)
    return {"ok": False, "error": error}


class CommandService:
    """Serves ``sy.cmd.*`` in a queue group until stopped."""

    def __init__(self, nc: NATS, commands: Commands) -> None:
        self.nc = nc
        self.commands = commands
        self._sub: Any = None
        self._handlers: dict[str, Handler] = {
            "dispatch": self._dispatch,
            "cancel": self._cancel,
            "retry": self._retry,
            "escalate": self._escalate,
            "send": self._send,
            "mark_read": self._mark_read,
        }
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._sub = await self.nc.subscribe(
            f"{COMMAND_PREFIX}.>", queue=QUEUE_GROUP, cb=self._on_message
        )

    async def stop(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()
            self._sub = None
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _on_message(self, msg: Msg) -> None:
        # Each command in its own task: one slow append must not hold up the others.
        task = asyncio.create_task(self._serve(msg))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, msg: Msg) -> None:
        name, _, scope = msg.subject[len(COMMAND_PREFIX) + 1 :].partition(".")
        actor = (msg.headers or {}).get("Shipyard-Actor", "")
        handler = self._handlers.get(name)
        if handler is None:
            known = ", ".join(sorted(self._handlers))
            reply = _error_reply("unknown_command", f"no command {name!r}; known: {known}")
        elif scope and name not in SCOPED:
            reply = _error_reply(
                "unknown_command",
                f"{msg.subject}: only {' and '.join(SCOPED)} take an agent in the subject",
            )
        else:
            try:
                if scope:
                    # Sent on the agent's own subject, which NATS lets only that agent (and
                    # operators) use: the body must speak for the same agent.
                    actor = f"agent:{scope}"
                    _check_scope(msg.data, SCOPED[name], scope)
                reply = await handler(msg.data, actor)
            except dispatch.DispatchInvalid as e:
                reply = _error_reply(e.code, e.message, e.problems, template=e.template)
            except CommandRejected as e:
                reply = _error_reply(e.code or "rejected", e.message, e.problems)
            except ShipyardError as e:
                reply = _error_reply("unavailable", e.message)
            except Exception:
                log.exception("command %s failed", name, extra={"action": "command_error"})
                reply = _error_reply("internal", f"the {name} command failed; see the log")
        if msg.reply:
            try:
                await msg.respond(msgspec.json.encode(reply))
            except nats.errors.Error:
                log.warning("could not reply to %s", name, extra={"action": "command_reply"})

    async def _dispatch(self, body: bytes, actor: str) -> dict[str, Any]:
        result = await self.commands.dispatch(body, actor=actor)
        return {"ok": True, "result": msgspec.to_builtins(result)}

    async def _cancel(self, body: bytes, actor: str) -> dict[str, Any]:
        args = _task_args(body)
        reason = args.get("reason", "")
        result = await self.commands.cancel(
            args["task_id"], reason=reason if isinstance(reason, str) else "", actor=actor
        )
        return {"ok": True, "result": result}

    async def _send(self, body: bytes, actor: str) -> dict[str, Any]:
        return {"ok": True, "result": await comms.send(self.commands.events, body, actor=actor)}

    async def _mark_read(self, body: bytes, actor: str) -> dict[str, Any]:
        result = await comms.mark_read(self.commands.events, body, actor=actor)
        return {"ok": True, "result": result}

    async def _retry(self, body: bytes, actor: str) -> dict[str, Any]:
        result = await self.commands.retry(_task_args(body)["task_id"], actor=actor)
        return {"ok": True, "result": result}

    async def _escalate(self, body: bytes, actor: str) -> dict[str, Any]:
        args = _task_args(body)
        to, note = args.get("to"), args.get("note", "")
        if not isinstance(to, str) or not isinstance(note, str):
            raise CommandRejected(
                'body: send {"task_id": "t-…", "to": "AGENT", "note": "…"}', code="invalid"
            )
        result = await self.commands.escalate(args["task_id"], to, note=note, actor=actor)
        return {"ok": True, "result": result}


# Commands an agent sends for itself on ``sy.cmd.<name>.<agent>``, and the body field that
# must name that agent.
SCOPED = {"send": "sender", "mark_read": "reader"}


def scoped_subject(name: str, agent: str) -> str:
    """The subject on which ``agent`` sends ``name`` for itself (see :mod:`shipyard.access`)."""
    return f"{COMMAND_PREFIX}.{name}.{access.token(agent)}"


def _check_scope(body: bytes, field: str, scope: str) -> None:
    try:
        args = dispatch.decode_json(body)
    except dispatch.MalformedBody as e:
        raise CommandRejected(f"body: {e}", code="invalid") from e
    named = args.get(field) if isinstance(args, dict) else None
    if not isinstance(named, str) or access.token(named) != scope:
        raise CommandRejected(
            f"{field}: on this subject you may only act as {scope.replace('~', '.')!r}",
            code="forbidden",
        )


def _task_args(body: bytes) -> dict[str, Any]:
    try:
        args = dispatch.decode_json(body)
    except dispatch.MalformedBody as e:
        raise CommandRejected(f"body: {e}", code="invalid") from e
    if not isinstance(args, dict) or not isinstance(args.get("task_id"), str):
        raise CommandRejected('body: send {"task_id": "t-…"}', code="invalid")
    return args


async def call(
    nc: NATS,
    name: str,
    body: bytes | dict[str, Any],
    *,
    timeout: float = COMMAND_TIMEOUT,
    actor: str = "",
    subject: str = "",
) -> dict[str, Any]:
    """Send a command (or, with ``subject``, any request in the same reply format) and return
    its result; raise :class:`CommandRejected` on refusal."""
    payload = body if isinstance(body, bytes) else msgspec.json.encode(body)
    headers = {"Shipyard-Actor": actor} if actor else None
    subject = subject or command_subject(name)
    try:
        with watch_denial(nc, subject) as denied:
            request = asyncio.ensure_future(
                nc.request(subject, payload, timeout=timeout, headers=headers)
            )
            try:
                await asyncio.wait((request, denied), return_when=asyncio.FIRST_COMPLETED)
                refused = not request.done()
            finally:
                if not request.done():
                    request.cancel()  # refused by NATS, or the caller gave up
            if refused:
                raise CommandRejected(
                    f"{name}: your NATS user may not use {subject} ({denied.result()}); "
                    "connect with credentials of a role that may",
                    code="forbidden",
                )
            msg = request.result()
    except nats.errors.MaxPayloadError as e:
        limit = nc.max_payload
        raise CommandRejected(
            f"{name}: the request is {len(payload):,} bytes, too large for NATS (at most "
            f"{limit:,}); put large context in files in the working directory",
            code="too_large",
        ) from e
    except nats.errors.NoRespondersError as e:
        raise CommandUnavailable() from e
    except nats.errors.TimeoutError as e:
        raise CommandUnavailable(
            f"no reply to {name} within {timeout:.0f}s; its outcome is unknown — check with "
            "`shipyard events` before sending it again"
        ) from e
    reply = msgspec.json.decode(msg.data)
    if reply.get("ok"):
        result: dict[str, Any] = reply["result"]
        return result
    error = reply.get("error") or {}
    raise CommandRejected(
        error.get("message", "refused"),
        error.get("problems"),
        code=error.get("code", ""),
        template=error.get("template", ""),
    )
