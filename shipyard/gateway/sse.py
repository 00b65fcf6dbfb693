"""``GET /api/events``: the event log as Server-Sent Events.

Each SSE message's id is the event's stream sequence, so a client that reconnects with
``Last-Event-ID`` (or ``?after=``) resumes exactly after the last event it saw: no gap, no
duplicate. Each client reads through its own ordered consumer; a client that cannot keep up
is dropped (its queue fills) without slowing the others. Pings keep proxies from closing an
idle stream.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.requests import Request

from shipyard.events.envelope import SUBJECT_PREFIX, valid_id
from shipyard.events.log import ALL_EVENTS

if TYPE_CHECKING:
    from shipyard.gateway.app import Gateway

CLIENT_QUEUE = 1000  # events buffered per client before it counts as too slow


def _subject(task: str, type_name: str) -> str:
    if not task and not type_name:
        return ALL_EVENTS
    aggregate = f"task.{task}" if task else "*.*"
    return f"{SUBJECT_PREFIX}.{aggregate}.{type_name or '>'}"


async def stream(gw: Gateway, request: Request) -> EventSourceResponse:
    from shipyard.gateway.app import HTTPError

    after_raw = request.headers.get("last-event-id") or request.query_params.get("after", "0")
    if not after_raw.isdigit():
        raise HTTPError(422, "invalid", "after / Last-Event-ID: must be a stream sequence")
    task = request.query_params.get("task", "")
    type_name = request.query_params.get("type", "")
    if task and not valid_id(task):
        raise HTTPError(422, "invalid", "task: not a task id")
    if type_name and not type_name.isidentifier():
        raise HTTPError(422, "invalid", "type: not an event type")
    after = int(after_raw)
    subject = _subject(task, type_name)
    queue: asyncio.Queue[tuple[int, bytes, str] | None] = asyncio.Queue(CLIENT_QUEUE)

    async def pump() -> None:
        try:
            async for seq, payload in gw.events.follow_raw(subject=subject, start=after + 1):
                type_token = _type_of(payload)
                try:
                    queue.put_nowait((seq, payload, type_token))
                except asyncio.QueueFull:
                    break  # too slow: end its stream; it resumes from Last-Event-ID
        finally:
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait(None)

    async def events() -> AsyncIterator[ServerSentEvent]:
        reader = asyncio.create_task(pump())
        try:
            while True:
                item = await queue.get()
                if item is None:
                    return
                seq, payload, type_token = item
                yield ServerSentEvent(data=_with_seq(payload, seq), id=str(seq), event=type_token)
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader

    return EventSourceResponse(
        events(),
        ping=gw.settings.gateway.sse_ping,
        # A named event, not a comment: EventSource can see it and notice a silent stream.
        ping_message_factory=lambda: ServerSentEvent(event="ping", data=""),
        send_timeout=gw.settings.gateway.sse_send_timeout,
        shutdown_event=gw.shutdown,
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


def _type_of(payload: bytes) -> str:
    # The type is the first field that says so; a cheap look instead of a full decode.
    marker = b'"type":"'
    start = payload.find(marker)
    if start < 0:
        return "message"
    start += len(marker)
    end = payload.find(b'"', start)
    return payload[start:end].decode("ascii", "replace")


def _with_seq(payload: bytes, seq: int) -> str:
    text = payload.decode("utf-8", "replace")
    if text.endswith("}"):
        return f'{text[:-1]},"seq":{seq}}}'
    return text
