"""``GET /api/events``: the event log as Server-Sent Events.

Each SSE message's id is the event's stream sequence, so a client that reconnects with
``Last-Event-ID`` (or ``?after=``) resumes exactly after the last event it saw: no gap, no
duplicate. Unfiltered clients — the dashboard — share one ordered consumer per gateway
(:class:`Feed`), which frames each event once and hands the bytes to every client's
bounded queue; a client that cannot keep up is dropped (its queue fills) without slowing
the others. A client resuming from further back first reads the gap through a consumer of
its own. Filtered streams (``?task=``, ``?type=``) read through their own consumer. Every
stream starts by saying how soon to reconnect (``retry:``); pings keep proxies from closing
an idle stream.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.requests import Request

from shipyard.events.envelope import SUBJECT_PREFIX, valid_id
from shipyard.events.log import ALL_EVENTS, EventLog

if TYPE_CHECKING:
    from shipyard.gateway.app import Gateway

CLIENT_QUEUE = 1000  # events buffered per client before it counts as too slow
# How long EventSource waits before it reconnects after the stream ends (a gateway restart),
# told at the start of every stream; browsers otherwise wait 3-5 seconds of their choosing.
RECONNECT_MS = 1000
_RETRY_FRAME = ServerSentEvent(retry=RECONNECT_MS).encode()


class _Client:
    """One unfiltered stream's queue of framed events from the feed."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[int, bytes] | None] = asyncio.Queue(CLIENT_QUEUE)
        self.dropped = False


class Feed:
    """One ordered consumer of the whole log per gateway, fanned out to its SSE clients."""

    def __init__(self, events: EventLog) -> None:
        self.events = events
        self.last = 0  # every client attached now gets each event after this sequence
        self.clients: set[_Client] = set()
        self._task: asyncio.Task[None] | None = None
        self._starting = asyncio.Lock()

    async def attach(self) -> tuple[_Client, int]:
        """A new client, and the sequence its queue starts after."""
        async with self._starting:
            if self._task is None or self._task.done():
                self.last = await self.events.stream_last_seq()
                self._task = asyncio.create_task(self._read(self.last + 1), name="sse-feed")
        client = _Client()
        self.clients.add(client)
        return client, self.last

    def detach(self, client: _Client) -> None:
        self.clients.discard(client)

    async def _read(self, start: int) -> None:
        try:
            async for seq, payload in self.events.follow_raw(start=start):
                frame = frame_of(seq, payload)
                self.last = seq
                for client in list(self.clients):
                    try:
                        client.queue.put_nowait((seq, frame))
                    except asyncio.QueueFull:  # too slow: it resumes from Last-Event-ID
                        client.dropped = True
                        self.clients.discard(client)
        finally:
            for client in self.clients:
                client.dropped = True
                with contextlib.suppress(asyncio.QueueFull):
                    client.queue.put_nowait(None)
            self.clients.clear()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None


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
    if task or type_name:
        frames = _own_consumer(gw.events, _subject(task, type_name), after)
    else:
        frames = _shared(gw.feed, gw.events, after)
    return EventSourceResponse(
        frames,
        ping=gw.settings.gateway.sse_ping,
        # A named event, not a comment: EventSource can see it and notice a silent stream.
        ping_message_factory=lambda: ServerSentEvent(event="ping", data=""),
        send_timeout=gw.settings.gateway.sse_send_timeout,
        shutdown_event=gw.shutdown,
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


async def _shared(feed: Feed, events: EventLog, after: int) -> AsyncIterator[bytes]:
    client, start = await feed.attach()
    try:
        yield _RETRY_FRAME
        if after < start:  # the gap up to where the feed took over, read on our own
            async for seq, payload in events.follow_raw(start=after + 1):
                yield frame_of(seq, payload)
                if seq >= start:
                    break
        while True:
            item = await client.queue.get()
            if item is None:
                return
            seq, frame = item
            if seq > after:
                yield frame
            if client.dropped and client.queue.empty():
                return
    finally:
        feed.detach(client)


async def _own_consumer(events: EventLog, subject: str, after: int) -> AsyncIterator[bytes]:
    queue: asyncio.Queue[bytes | None] = asyncio.Queue(CLIENT_QUEUE)

    async def pump() -> None:
        try:
            async for seq, payload in events.follow_raw(subject=subject, start=after + 1):
                try:
                    queue.put_nowait(frame_of(seq, payload))
                except asyncio.QueueFull:
                    break  # too slow: end its stream; it resumes from Last-Event-ID
        finally:
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait(None)

    reader = asyncio.create_task(pump())
    try:
        yield _RETRY_FRAME
        while (frame := await queue.get()) is not None:
            yield frame
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await reader


def frame_of(seq: int, payload: bytes) -> bytes:
    """One event as an SSE message, ready to send."""
    return ServerSentEvent(
        data=_with_seq(payload, seq), id=str(seq), event=_type_of(payload)
    ).encode()


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
