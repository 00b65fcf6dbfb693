"""The event log: one JetStream stream that holds every event Shipyard records.

Guarantees, all enforced by the server rather than by locks of ours:

- Appends are idempotent: ``Nats-Msg-Id`` is the event id, so a retried publish is stored
  once, and a retry that meets a conflict checks whether its event already landed.
- State changes are guarded per aggregate: ``expect=N`` appends only if the aggregate's last
  event is at stream sequence ``N`` (``0``: the aggregate must not exist yet). A lost race
  raises :class:`~shipyard.errors.ConcurrencyConflict`.
- :meth:`EventLog.append_batch` stores several events atomically (all or none).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import weakref
from collections.abc import AsyncIterator, Iterator, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

import msgspec
import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy, StorageType, StreamConfig

from shipyard.errors import AppendFailed, ConcurrencyConflict, ConnectionFailed, StreamMissing
from shipyard.events.envelope import SUBJECT_PREFIX, Event, aggregate_subject, decode, encode
from shipyard.events.types import REGISTRY, Registry

if TYPE_CHECKING:
    from shipyard.access import Credentials

log = logging.getLogger(__name__)

STREAM = "SHIPYARD"
ALL_EVENTS = f"{SUBJECT_PREFIX}.>"
MAX_EVENT_BYTES = 1024 * 1024  # one event, encoded; the stream refuses anything larger
DUPLICATE_WINDOW = 120.0  # seconds in which a repeated Nats-Msg-Id is recognised
APPEND_TIMEOUT = 5.0  # seconds for one publish acknowledgement
CONNECT_WAIT = 5.0  # seconds to keep trying the first connection
APPEND_RETRY_FOR = 30.0  # seconds an append keeps retrying while the server is unreachable

ERR_WRONG_LAST_SEQUENCE = 10071
# A replicated stream's lost race: another write to the aggregate is still being stored.
ERR_WRONG_LAST_SEQUENCE_IN_FLIGHT = 10164
ERR_BATCH_DUPLICATE_ID = 10201
# A replicated stream is still storing this very event (an earlier try): ask again.
ERR_DUPLICATE_IN_FLIGHT = 10158
ERR_BATCH_INCOMPLETE = 10176  # a new stream leader missed part of a batch: send it all again
UNAVAILABLE = 503  # no stream leader yet, or a new one still catching up: ask again
CONFLICTS = (ERR_WRONG_LAST_SEQUENCE, ERR_WRONG_LAST_SEQUENCE_IN_FLIGHT, ERR_BATCH_DUPLICATE_ID)
RETRY_PAUSE = 0.25  # seconds between tries of an append the server could not take yet
STALL_AFTER = 5.0  # seconds a follower waits before asking whether it has missed an event

V1_ACK_TOKENS = 9  # a JetStream reply subject without a domain

H_MSG_ID = "Nats-Msg-Id"
H_EXPECT_SEQ = "Nats-Expected-Last-Subject-Sequence"
H_EXPECT_SUBJECT = "Nats-Expected-Last-Subject-Sequence-Subject"
H_BATCH_ID = "Nats-Batch-Id"
H_BATCH_SEQ = "Nats-Batch-Sequence"
H_BATCH_COMMIT = "Nats-Batch-Commit"


_NATS_ERROR = {"action": "nats_error"}
# The server's answer to a publish this user may not make; it names the subject only.
_DENIED = re.compile(r'permissions violation for publish to "([^"]+)"', re.IGNORECASE)
_denials: weakref.WeakKeyDictionary[NATS, dict[str, set[asyncio.Future[str]]]] = (
    weakref.WeakKeyDictionary()
)


@contextlib.contextmanager
def watch_denial(nc: NATS, subject: str) -> Iterator[asyncio.Future[str]]:
    """A future set (to the server's message) if NATS refuses this connection's user a
    publish to ``subject`` meanwhile: a request refused that way gets no reply at all, and
    its caller deserves better than a timeout. Works on connections made by :func:`connect`."""
    future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    subject = subject.lower()
    waiting = _denials.setdefault(nc, {}).setdefault(subject, set())
    waiting.add(future)
    try:
        yield future
    finally:
        waiting.discard(future)
        if not waiting:
            _denials.get(nc, {}).pop(subject, None)


async def connect(
    servers: Sequence[str],
    *,
    name: str = "shipyard",
    credentials: Credentials | None = None,
    connect_timeout: float = 3.0,
    wait: float = CONNECT_WAIT,
) -> NATS:
    """Connect to NATS, trying for up to ``wait`` seconds; once connected, reconnect forever
    if the connection drops. Refused credentials fail at once, with a message saying so."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    connected = False
    shown = ", ".join(servers)

    async def on_error(exc: Exception) -> None:
        if not connected:
            text = str(exc).lower()
            if "authorization violation" in text or "authentication" in text:
                who = (
                    f"user {credentials.user!r}"
                    if credentials and credentials.user
                    else ("these credentials" if credentials else "no credentials")
                )
                raise ConnectionFailed(
                    f"NATS at {shown} refused {who}: check SHIPYARD_NATS_USER / "
                    "SHIPYARD_NATS_PASSWORD (or --nats-creds); on the embedded server, "
                    "`shipyard nats-user ROLE` prints working ones"
                )
            if loop.time() >= deadline:
                raise ConnectionFailed(
                    f"could not connect to NATS at {shown} within {wait:.0f}s: "
                    f"{exc or type(exc).__name__}. Check that the server runs and the URL is "
                    "right."
                )
        refused = _DENIED.search(str(exc))
        # nats-py lowercases the server's message, subject included.
        waiting = _denials.get(nc, {}).get(refused.group(1).lower(), set()) if refused else set()
        for future in waiting:
            if not future.done():
                future.set_result(str(exc))
        if not waiting:  # else its caller is told, in its own words
            text = str(exc) or type(exc).__name__
            log.warning(text if text.startswith("nats") else f"nats: {text}", extra=_NATS_ERROR)

    async def on_disconnected() -> None:
        # Also called on a deliberate close, so not a warning by itself.
        log.info("nats: disconnected", extra={"action": "nats_disconnected"})

    async def on_reconnected() -> None:
        log.info("nats: reconnected", extra={"action": "nats_reconnected"})

    options: dict[str, Any] = {
        "servers": list(servers),
        "name": name,
        "connect_timeout": connect_timeout,
        "max_reconnect_attempts": -1,
        "reconnect_time_wait": 0.5,
        "allow_reconnect": True,
        "error_cb": on_error,
        "disconnected_cb": on_disconnected,
        "reconnected_cb": on_reconnected,
        **(credentials.connect_options() if credentials else {}),
    }
    nc = NATS()
    try:
        await nc.connect(**options)
    except ConnectionFailed:
        with contextlib.suppress(Exception):
            await nc.close()
        raise
    except (TimeoutError, OSError, nats.errors.Error) as e:
        with contextlib.suppress(Exception):
            await nc.close()
        raise ConnectionFailed(
            f"could not connect to NATS at {shown}: {e or type(e).__name__}. "
            "Check that the server runs and the URL is right."
        ) from e
    connected = True
    return nc


class _Stamp(msgspec.Struct):
    time: datetime


def stream_config(replicas: int = 1) -> StreamConfig:
    return StreamConfig(
        name=STREAM,
        description="Shipyard: every event, immutable",
        subjects=[ALL_EVENTS],
        storage=StorageType.FILE,
        num_replicas=replicas,
        max_msg_size=MAX_EVENT_BYTES,
        duplicate_window=DUPLICATE_WINDOW,
        deny_delete=True,
        deny_purge=True,
        allow_direct=True,
        allow_atomic=True,
    )


class EventLog:
    """Append to, read and follow the Shipyard stream over one NATS connection."""

    def __init__(self, nc: NATS, *, registry: Registry = REGISTRY, stream: str = STREAM):
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream(timeout=APPEND_TIMEOUT)
        self.registry = registry
        self.stream = stream

    async def ensure_stream(self, replicas: int = 1) -> None:
        """Create the stream, or bring an existing one's settings up to date."""
        wanted = stream_config(replicas)
        wanted.name = self.stream
        try:
            try:
                info = await self.js.stream_info(self.stream)
            except nats.js.errors.NotFoundError:
                await self.js.add_stream(wanted)
                return
            have = info.config
            if not (
                have.allow_atomic and have.allow_direct and have.deny_delete and have.deny_purge
            ):
                wanted.num_replicas = have.num_replicas
                await self.js.update_stream(wanted)
        except nats.js.errors.APIError as e:
            # A full or unwritable JetStream store says only "error creating store".
            raise AppendFailed(
                f"the NATS server could not set up the {self.stream} stream: "
                f"{e.description or e}. Check that its JetStream store directory is "
                "writable and not full (its log says more)."
            ) from e

    # --- appending ------------------------------------------------------------------

    async def append(self, event: Event[Any], *, expect: int | None = None) -> int:
        """Store one event and return its stream sequence.

        ``expect``: the aggregate's last sequence this append is based on (``0`` for a new
        aggregate); ``None`` appends unconditionally.
        """
        headers = {H_MSG_ID: event.id}
        if expect is not None:
            headers[H_EXPECT_SEQ] = str(expect)
            headers[H_EXPECT_SUBJECT] = aggregate_subject(event.aggregate, event.aggregate_id)
        reply = await self._request([(event.subject, encode(event), headers)])
        return await self._settle(reply, [event], expect)

    async def append_batch(
        self, events: Sequence[Event[Any]], *, expect: int | None = None
    ) -> list[int]:
        """Store ``events`` atomically, in order; ``expect`` guards the first event's
        aggregate. Returns their stream sequences."""
        if not events:
            return []
        if len(events) == 1:
            return [await self.append(events[0], expect=expect)]
        batch_id = events[0].id
        last = len(events)
        messages: list[tuple[str, bytes, dict[str, str]]] = []
        for i, event in enumerate(events, start=1):
            headers = {H_MSG_ID: event.id, H_BATCH_ID: batch_id, H_BATCH_SEQ: str(i)}
            if i == 1 and expect is not None:
                headers[H_EXPECT_SEQ] = str(expect)
                headers[H_EXPECT_SUBJECT] = aggregate_subject(event.aggregate, event.aggregate_id)
            if i == last:
                headers[H_BATCH_COMMIT] = "1"
            messages.append((event.subject, encode(event), headers))
        reply = await self._request(messages)
        seq = await self._settle(reply, events, expect)
        return list(range(seq - last + 1, seq + 1))

    async def _request(self, messages: Sequence[tuple[str, bytes, dict[str, str]]]) -> Any:
        """Publish ``messages``, the last one as a request, and return the server's reply;
        while no server can take them (no answer, or a replicated stream between leaders),
        send them all again until ``APPEND_RETRY_FOR`` has passed. A whole batch is sent
        again because a new stream leader knows nothing of a batch its predecessor was
        given; the same Nats-Msg-Ids make every retry safe if an earlier try landed."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + APPEND_RETRY_FOR
        *first, (subject, payload, headers) = messages
        while True:
            try:
                for s, p, h in first:
                    await self.nc.publish(s, p, headers=h)
                msg = await self.nc.request(
                    subject, payload, timeout=APPEND_TIMEOUT, headers=headers
                )
                reply = json.loads(msg.data)
                error = reply.get("error") or {}
                if error.get("code") != UNAVAILABLE and error.get("err_code") not in (
                    ERR_DUPLICATE_IN_FLIGHT,
                    ERR_BATCH_INCOMPLETE,
                ):
                    return reply
                cause: Exception = AppendFailed(str(error.get("description")))
            except (nats.errors.TimeoutError, nats.errors.NoRespondersError) as e:
                cause = e
            if loop.time() >= deadline:
                raise AppendFailed(
                    f"no acknowledgement for {subject} within {APPEND_RETRY_FOR:.0f}s: "
                    "is the NATS server up, with the Shipyard stream, and its store not full?"
                ) from cause
            await asyncio.sleep(RETRY_PAUSE)

    async def _settle(self, reply: Any, events: Sequence[Event[Any]], expect: int | None) -> int:
        error = reply.get("error")
        if not error:
            return int(reply["seq"])
        code = error.get("err_code")
        if code in CONFLICTS:
            # A retry of an append that landed meets its own event: that is success.
            stored = await self._find(events[-1])
            if stored:
                return stored
            first = events[0]
            raise ConcurrencyConflict(
                aggregate_subject(first.aggregate, first.aggregate_id), expect or 0
            )
        raise AppendFailed(f"the event log refused {events[0].subject}: {error.get('description')}")

    async def _find(self, event: Event[Any]) -> int:
        for stored in await self.history(event.aggregate, event.aggregate_id):
            if stored.id == event.id:
                return stored.seq
        return 0

    # --- reading --------------------------------------------------------------------

    async def last_seq(self, aggregate: str, aggregate_id: str) -> int:
        """The stream sequence of the aggregate's last event, 0 if it has none."""
        try:
            msg = await self.js.get_last_msg(
                self.stream, aggregate_subject(aggregate, aggregate_id), direct=True
            )
        except nats.js.errors.NotFoundError:
            return 0
        return int(msg.seq or 0)

    async def subject_last_seq(self, subject: str) -> int:
        """The sequence of the last event on ``subject`` (wildcards allowed), 0 if none."""
        if subject == ALL_EVENTS:
            return await self.stream_last_seq()
        try:
            msg = await self.js.get_last_msg(self.stream, subject, direct=True)
        except nats.js.errors.NotFoundError:
            return 0
        return int(msg.seq or 0)

    async def stream_last_seq(self) -> int:
        try:
            info = await self.js.stream_info(self.stream)
        except nats.js.errors.NotFoundError as e:
            raise StreamMissing() from e
        return int(info.state.last_seq)

    async def seq_at(self, when: datetime) -> int:
        """The sequence of the first event at or after ``when`` (one past the last if none):
        where to start reading "since then" without scanning the log."""
        info = await self.js.stream_info(self.stream)
        lo, hi = int(info.state.first_seq or 1), int(info.state.last_seq) + 1
        # Event times rise along the stream, give or take clock skew between hosts, which
        # only moves the start by as much.
        while lo < hi:
            mid = (lo + hi) // 2
            try:
                msg = await self.js.get_msg(self.stream, seq=mid, direct=True)
            except nats.js.errors.NotFoundError:
                lo = mid + 1
                continue
            stamp = msgspec.json.decode(msg.data or b"{}", type=_Stamp).time
            if stamp < when:
                lo = mid + 1
            else:
                hi = mid
        return lo

    async def history(self, aggregate: str, aggregate_id: str) -> list[Event[Any]]:
        """Every event of one aggregate, oldest first."""
        last = await self.last_seq(aggregate, aggregate_id)
        if not last:
            return []
        return [
            e
            async for e in self.read(
                subject=aggregate_subject(aggregate, aggregate_id), start=1, stop=last
            )
        ]

    async def read(
        self, *, subject: str = ALL_EVENTS, start: int = 1, stop: int | None = None
    ) -> AsyncIterator[Event[Any]]:
        """Events from ``start`` up to ``stop`` (default: the last one on ``subject`` now)."""
        if stop is None:
            stop = await self.subject_last_seq(subject)
        if stop < start:
            return
        async for event in self.follow(subject=subject, start=start):
            if event.seq > stop:
                return
            yield event
            if event.seq >= stop:
                return

    async def follow(
        self, *, subject: str = ALL_EVENTS, start: int = 1
    ) -> AsyncIterator[Event[Any]]:
        """Every event on ``subject`` from sequence ``start`` on, then each new one as it
        lands, forever. An ordered consumer: no gaps, no duplicates, and it survives
        reconnects."""
        async for seq, payload in self.follow_raw(subject=subject, start=start):
            yield decode(payload, seq=seq, registry=self.registry)

    async def follow_raw(
        self, *, subject: str = ALL_EVENTS, start: int = 1
    ) -> AsyncIterator[tuple[int, bytes]]:
        """Like :meth:`follow`, without decoding: ``(sequence, json bytes)``."""
        position = _Position(max(1, start) - 1, await self._subscribe(subject, start))
        watch = asyncio.create_task(self._watch(subject, position), name="follow-watch")
        try:
            while True:
                # nats-py's message iterator costs a Task and an asyncio.wait per message,
                # two thirds of a replay's time. Messages already queued are taken straight
                # from the subscription's pending queue, with the bookkeeping the iterator
                # would do (flow control counts what is still queued); only an empty queue
                # waits through the iterator, which also ends the loop when the subscription
                # is closed.
                sub = position.sub
                pending, messages = sub._pending_queue, sub.messages
                while True:
                    try:
                        msg = pending.get_nowait()
                    except asyncio.QueueEmpty:
                        position.waiting_since = asyncio.get_running_loop().time()
                        try:
                            msg = await anext(messages)
                        except StopAsyncIteration:
                            break
                        finally:
                            position.waiting_since = None
                    else:
                        pending.task_done()
                        sub._pending_size -= len(msg.data)
                    position.seen = _stream_seq(msg.reply)
                    yield position.seen, msg.data
                if not position.stalled:
                    return  # closed
                position.stalled = False
                position.sub = await self._subscribe(subject, position.seen + 1, patient=True)
        finally:
            watch.cancel()
            with contextlib.suppress(Exception):
                await position.sub.unsubscribe()

    async def _watch(self, subject: str, position: _Position) -> None:
        """End the subscription of a follower that has waited ``STALL_AFTER`` for an event
        the stream already holds; :meth:`follow_raw` then follows again from the next one.
        After a replicated stream changed leader, nats-py's ordered consumer was seen to
        stay silent for good, neither resetting itself nor reporting an error."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(STALL_AFTER / 2)
            since = position.waiting_since
            if since is None or loop.time() - since < STALL_AFTER:
                continue
            seen = position.seen
            try:
                behind = await self.subject_last_seq(subject) > seen
            except (nats.errors.Error, StreamMissing, TimeoutError):
                continue  # no answer now (no leader?): look again later
            if not behind or position.seen != seen or position.waiting_since != since:
                continue
            log.warning(
                "following %s: nothing after %d for %.0fs though the stream has more; "
                "following again from %d",
                subject,
                seen,
                loop.time() - since,
                seen + 1,
                extra={"action": "follow_stalled"},
            )
            position.stalled = True
            try:
                await position.sub.unsubscribe()
            except Exception:
                position.stalled = False  # it is closing anyway

    async def _subscribe(self, subject: str, start: int, *, patient: bool = False) -> Any:
        """An ordered consumer from ``start``. A replicated stream's consumers are made by
        its leader: while there is none (a node lost, an election under way), ask again —
        for ``APPEND_RETRY_FOR``, or, when ``patient``, as long as it takes."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + APPEND_RETRY_FOR
        while True:
            # A new config each time, so a new inbox: a consumer made by a try whose answer
            # was lost then delivers to no one (and the server soon removes it).
            config = ConsumerConfig(
                deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=max(1, start)
            )
            try:
                return await self.js.subscribe(
                    subject, ordered_consumer=True, config=config, stream=self.stream
                )
            except nats.js.errors.NotFoundError as e:
                raise StreamMissing() from e
            except (nats.errors.TimeoutError, nats.js.errors.ServiceUnavailableError):
                if not patient and loop.time() >= deadline:
                    raise
            await asyncio.sleep(RETRY_PAUSE)


class _Position:
    """Where a follower is: its subscription, the last sequence it yielded, and since when
    it has been waiting for the next (None: it is not waiting)."""

    def __init__(self, seen: int, sub: Any) -> None:
        self.seen = seen
        self.sub = sub
        self.waiting_since: float | None = None
        self.stalled = False


def _stream_seq(reply: str) -> int:
    """The stream sequence in a JetStream delivery's reply subject, without building the
    whole metadata record: ``$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.…`` (9
    tokens), or with ``<domain>.<account hash>`` after ``ACK`` in the longer form."""
    tokens = reply.split(".")
    return int(tokens[5] if len(tokens) == V1_ACK_TOKENS else tokens[7])
