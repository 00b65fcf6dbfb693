"""The event log on a real nats-server: idempotent, guarded, atomic, replayable."""

from __future__ import annotations

import asyncio
from typing import Any, ClassVar

import msgspec
import pytest

from shipyard.errors import ConcurrencyConflict, UnknownEventType
from shipyard.events import envelope
from shipyard.events import log as log_module
from shipyard.events.envelope import aggregate_subject, make
from shipyard.events.log import EventLog
from shipyard.events.types import (
    REGISTRY,
    EventData,
    Phase,
    PhaseChanged,
    PhaseStatus,
    TaskClaimed,
    TaskDispatched,
    WorkProgress,
)


def dispatched(title: str = "t") -> TaskDispatched:
    return TaskDispatched(title=title, prompt="## Task\nx", dispatcher="tests", working_dir="/w")


async def test_append_then_history_returns_events_in_order(event_log: EventLog) -> None:
    """Events appended to one aggregate come back oldest first with their sequences."""
    first = make(dispatched("a"), aggregate_id="t-1", actor="tests")
    s1 = await event_log.append(first, expect=0)
    claim = make(TaskClaimed(run_id="r-1", handler="h", agent="a"), aggregate_id="t-1", actor="h")
    s2 = await event_log.append(claim, expect=s1)
    await event_log.append(make(dispatched("other"), aggregate_id="t-2", actor="tests"))

    history = await event_log.history("task", "t-1")

    assert [e.seq for e in history] == [s1, s2]
    assert [e.type for e in history] == ["task_dispatched", "task_claimed"]
    assert history[0].data == first.data
    assert history[1].data.run_id == "r-1"
    assert history[1].actor == "h"
    assert await event_log.history("task", "t-none") == []


async def test_duplicate_append_is_stored_once(event_log: EventLog) -> None:
    """Appending the same event twice (a retry) stores it once and returns one sequence."""
    event = make(dispatched(), aggregate_id="t-dup", actor="tests")
    a = await event_log.append(event)
    b = await event_log.append(event)
    assert a == b
    assert len(await event_log.history("task", "t-dup")) == 1
    assert await event_log.stream_last_seq() == a


async def test_retry_of_guarded_append_that_landed_succeeds(event_log: EventLog) -> None:
    """A guarded append retried after it landed returns its sequence, not a conflict."""
    event = make(dispatched(), aggregate_id="t-retry", actor="tests")
    a = await event_log.append(event, expect=0)
    b = await event_log.append(event, expect=0)
    assert a == b
    assert len(await event_log.history("task", "t-retry")) == 1


async def test_stale_expectation_raises_concurrency_conflict(event_log: EventLog) -> None:
    """An append based on an old sequence is refused with ConcurrencyConflict."""
    seq = await event_log.append(make(dispatched(), aggregate_id="t-occ", actor="x"), expect=0)
    await event_log.append(
        make(TaskClaimed(run_id="r-a", handler="a", agent="a"), aggregate_id="t-occ", actor="a"),
        expect=seq,
    )
    late = make(TaskClaimed(run_id="r-b", handler="b", agent="a"), aggregate_id="t-occ", actor="b")
    with pytest.raises(ConcurrencyConflict) as caught:
        await event_log.append(late, expect=seq)
    assert caught.value.subject == aggregate_subject("task", "t-occ")
    assert [e.data.run_id for e in (await event_log.history("task", "t-occ"))[1:]] == ["r-a"]


async def test_creating_an_existing_aggregate_conflicts(event_log: EventLog) -> None:
    """expect=0 means 'new aggregate': a second creation with another event id fails."""
    await event_log.append(make(dispatched(), aggregate_id="t-new", actor="x"), expect=0)
    with pytest.raises(ConcurrencyConflict):
        await event_log.append(make(dispatched(), aggregate_id="t-new", actor="y"), expect=0)


async def test_twenty_concurrent_claimers_produce_exactly_one_winner(event_log: EventLog) -> None:
    """20 handlers claiming the same task at once: exactly one claim is stored."""
    seq = await event_log.append(make(dispatched(), aggregate_id="t-race", actor="x"), expect=0)

    async def claim(n: int) -> str | None:
        event = make(
            TaskClaimed(run_id=f"r-{n}", handler=f"h{n}", agent="a"),
            aggregate_id="t-race",
            actor=f"handler:h{n}",
        )
        try:
            await event_log.append(event, expect=seq)
        except ConcurrencyConflict:
            return None
        return f"r-{n}"

    results = await asyncio.gather(*(claim(n) for n in range(20)))
    winners = [r for r in results if r is not None]
    assert len(winners) == 1
    claims = [e for e in await event_log.history("task", "t-race") if e.type == "task_claimed"]
    assert [c.data.run_id for c in claims] == winners


async def test_batch_lands_atomically(event_log: EventLog) -> None:
    """A batch is stored whole, in order, with consecutive sequences."""
    seq = await event_log.append(make(dispatched(), aggregate_id="t-b", actor="x"), expect=0)
    batch = [
        make(TaskClaimed(run_id="r-1", handler="h", agent="a"), aggregate_id="t-b", actor="h"),
        make(
            PhaseChanged(run_id="r-1", phase=Phase.CONTEXT, status=PhaseStatus.STARTED),
            aggregate_id="t-b",
            actor="h",
        ),
        make(
            WorkProgress(run_id="r-1", phase=Phase.CONTEXT, percent=0),
            aggregate_id="t-b",
            actor="h",
        ),
    ]
    seqs = await event_log.append_batch(batch, expect=seq)
    assert seqs == [seq + 1, seq + 2, seq + 3]
    history = await event_log.history("task", "t-b")
    assert [e.id for e in history[1:]] == [e.id for e in batch]


async def test_batch_with_stale_expectation_stores_nothing(event_log: EventLog) -> None:
    """A batch whose guard fails is refused whole: none of its events land."""
    seq = await event_log.append(make(dispatched(), aggregate_id="t-bx", actor="x"), expect=0)
    await event_log.append(
        make(TaskClaimed(run_id="r-0", handler="h0", agent="a"), aggregate_id="t-bx", actor="h0"),
        expect=seq,
    )
    before = await event_log.stream_last_seq()
    batch = [
        make(TaskClaimed(run_id="r-1", handler="h1", agent="a"), aggregate_id="t-bx", actor="h1"),
        make(
            WorkProgress(run_id="r-1", phase=Phase.PLAN, percent=5), aggregate_id="t-bx", actor="h1"
        ),
    ]
    with pytest.raises(ConcurrencyConflict):
        await event_log.append_batch(batch, expect=seq)
    assert await event_log.stream_last_seq() == before
    assert len(await event_log.history("task", "t-bx")) == 2


async def test_retried_batch_is_not_stored_twice(event_log: EventLog) -> None:
    """Sending the same batch again (a retry after a lost ack) stores nothing new."""
    batch = [
        make(dispatched(), aggregate_id="t-br", actor="x"),
        make(TaskClaimed(run_id="r-1", handler="h", agent="a"), aggregate_id="t-br", actor="h"),
    ]
    first = await event_log.append_batch(batch, expect=0)
    again = await event_log.append_batch(batch, expect=0)
    assert again == first
    assert len(await event_log.history("task", "t-br")) == 2


async def test_follow_from_a_sequence_yields_old_then_new_events(event_log: EventLog) -> None:
    """follow(start=N) gives every event from N on, then events appended later, no gaps."""
    seqs = [
        await event_log.append(make(dispatched(str(i)), aggregate_id=f"t-f{i}", actor="x"))
        for i in range(5)
    ]
    got: list[int] = []
    done = asyncio.Event()

    async def reader() -> None:
        async for event in event_log.follow(start=seqs[2]):
            got.append(event.seq)
            if len(got) == 6:
                done.set()
                return

    task = asyncio.create_task(reader())
    for i in range(3):
        await event_log.append(make(dispatched(), aggregate_id=f"t-g{i}", actor="x"))
    await asyncio.wait_for(done.wait(), 10)
    await task
    assert got == list(range(seqs[2], seqs[2] + 6))


async def test_follow_raw_delivers_a_burst_in_order_with_stream_sequences(
    event_log: EventLog,
) -> None:
    """follow_raw over more events than arrive in one read gives each once, in order, with
    the sequence the stream stored it under."""
    seqs = [
        await event_log.append(make(dispatched(str(i)), aggregate_id=f"t-b{i}", actor="x"))
        for i in range(300)
    ]
    got: list[int] = []
    async for seq, payload in event_log.follow_raw(start=seqs[0]):
        assert envelope.decode(payload, seq=seq).aggregate_id == f"t-b{len(got)}"
        got.append(seq)
        if seq == seqs[-1]:
            break
    assert got == seqs


def test_stream_sequence_is_read_from_both_reply_subject_forms() -> None:
    """The stream sequence comes from the 9-token reply subject and the longer one with a
    domain and account hash."""
    assert log_module._stream_seq("$JS.ACK.SHIPYARD.c1.1.42.7.1700000000000000000.0") == 42
    longer = "$JS.ACK._.HASH.SHIPYARD.c1.1.42.7.1700000000000000000.0.rand"
    assert log_module._stream_seq(longer) == 42


async def test_read_stops_at_the_end_of_the_stream(event_log: EventLog) -> None:
    """read() returns what is stored now and ends, even on an empty filter."""
    for i in range(3):
        await event_log.append(make(dispatched(), aggregate_id=f"t-r{i}", actor="x"))
    assert [e.aggregate_id async for e in event_log.read()] == ["t-r0", "t-r1", "t-r2"]
    assert [e async for e in event_log.read(start=99)] == []


async def test_events_are_plain_json_on_the_wire(event_log: EventLog) -> None:
    """A stored event is readable JSON with id, type, v, aggregate, time, actor and data."""
    event = make(dispatched("wire"), aggregate_id="t-w", actor="dispatcher:openclaw")
    seq = await event_log.append(event)
    raw = await event_log.js.get_msg(event_log.stream, seq)
    doc = msgspec.json.decode(raw.data)
    assert raw.subject == "sy.ev.task.t-w.task_dispatched"
    assert doc["id"] == event.id
    assert doc["type"] == "task_dispatched"
    assert doc["v"] == 1
    assert doc["aggregate"] == "task"
    assert doc["aggregate_id"] == "t-w"
    assert doc["actor"] == "dispatcher:openclaw"
    assert doc["data"]["title"] == "wire"
    assert doc["time"].endswith("Z")
    assert "seq" not in doc


class NoteV1(EventData, frozen=True, kw_only=True):
    TYPE: ClassVar[str] = "note_added"
    AGGREGATE: ClassVar[str] = "task"
    VERSION: ClassVar[int] = 1

    text: str


class NoteV2(EventData, frozen=True, kw_only=True):
    TYPE: ClassVar[str] = "note_added"
    AGGREGATE: ClassVar[str] = "task"
    VERSION: ClassVar[int] = 2

    body: str
    author: str


async def test_version_one_events_replay_through_the_upcaster(event_log: EventLog) -> None:
    """Events written as v1 are read as v2 once v2 exists, via the registered upcaster."""
    old = REGISTRY.copy()
    old.register(NoteV1)
    writer = EventLog(event_log.nc, registry=old)
    await writer.append(make(NoteV1(text="first"), aggregate_id="t-up", actor="old-release"))

    new = REGISTRY.copy()
    new.register(NoteV2)

    @new.upcaster("note_added", 1)
    def _split(data: dict[str, Any]) -> dict[str, Any]:
        return {"body": data["text"], "author": "unknown"}

    await EventLog(event_log.nc, registry=new).append(
        make(NoteV2(body="second", author="ana"), aggregate_id="t-up", actor="new-release")
    )
    reader = EventLog(event_log.nc, registry=new)
    notes = await reader.history("task", "t-up")
    assert [n.data for n in notes] == [
        NoteV2(body="first", author="unknown"),
        NoteV2(body="second", author="ana"),
    ]
    assert all(n.v == 2 for n in notes)


async def test_unknown_event_type_names_the_problem(event_log: EventLog) -> None:
    """Reading a type this release does not know raises UnknownEventType, not KeyError."""
    future = REGISTRY.copy()
    future.register(NoteV1)
    await EventLog(event_log.nc, registry=future).append(
        make(NoteV1(text="x"), aggregate_id="t-unk", actor="future")
    )
    with pytest.raises(UnknownEventType, match="upgrade Shipyard"):
        await event_log.history("task", "t-unk")


def test_ids_sort_by_time_and_are_valid_subject_tokens() -> None:
    """new_id sorts by creation time; ids never hold dots or wildcards."""
    ids = [envelope.new_id() for _ in range(50)]
    assert len(set(ids)) == 50
    assert all(envelope.valid_id(i) for i in ids)
    assert not envelope.valid_id("a.b")
    assert not envelope.valid_id("a*")
    assert not envelope.valid_id("a>")
    with pytest.raises(ValueError, match="aggregate id"):
        make(dispatched(), aggregate_id="bad.id", actor="x")
