"""Agent comms: messages in threads, replies, read receipts and unread counts."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client as NATS

from shipyard.errors import CommandRejected
from shipyard.events import commands
from shipyard.events.commands import Commands, CommandService
from shipyard.events.log import EventLog
from shipyard.projections import queries
from shipyard.projections.projector import Projector, build
from tests.samples import dispatch_body


@pytest.fixture
async def service(nc: NATS, event_log: EventLog) -> AsyncIterator[CommandService]:
    svc = CommandService(nc, Commands(event_log))
    await svc.start()
    await nc.flush()
    yield svc
    await svc.stop()


async def view(proj: Projector, log: EventLog, fn: Any, *args: Any, **kw: Any) -> Any:
    await asyncio.wait_for(proj.wait_for(await log.stream_last_seq()), 30)
    return await proj.models.run(lambda: fn(proj.models.con, *args, **kw))


async def send(nc: NATS, **fields: Any) -> dict[str, Any]:
    return await commands.call(nc, "send", fields)


async def test_a_question_and_its_reply_form_a_thread(
    nc: NATS, event_log: EventLog, service: CommandService, projector: Projector
) -> None:
    """A question starts a thread; the reply joins it; the inbox, the unread count and the
    thread view show both; marking read clears the count and records the receipt."""
    task = await commands.call(nc, "dispatch", dispatch_body())
    q = await send(
        nc,
        sender="openclaw",
        recipient="claude",
        type="question",
        body="Which port should the API use?",
        task_id=task["task_id"],
    )
    a = await send(
        nc,
        sender="claude",
        recipient="openclaw",
        type="status_response",
        body="8080, as in the README.",
        thread_id=q["thread_id"],
        reply_to=q["message_id"],
    )
    assert a["thread_id"] == q["thread_id"]

    inbox = await view(projector, event_log, queries.inbox, "claude")
    assert [m.body for m in inbox] == ["Which port should the API use?"]
    assert inbox[0].task_id == task["task_id"]
    assert not inbox[0].read
    counts = await view(projector, event_log, queries.unread_counts)
    assert counts == {"claude": 1, "openclaw": 1}

    marked = await commands.call(
        nc,
        "mark_read",
        {"reader": "claude", "thread_id": q["thread_id"], "message_ids": [q["message_id"]]},
    )
    assert marked["marked"] == 1
    again = await commands.call(
        nc,
        "mark_read",
        {"reader": "claude", "thread_id": q["thread_id"], "message_ids": [q["message_id"]]},
    )
    assert again["marked"] == 0
    assert await view(projector, event_log, queries.inbox, "claude", unread=True) == []
    assert (await view(projector, event_log, queries.unread_counts)).get("claude", 0) == 0

    thread = await view(projector, event_log, queries.thread, q["thread_id"])
    assert [(m.type, m.reply_to) for m in thread] == [
        ("question", ""),
        ("status_response", q["message_id"]),
    ]
    assert thread[0].read_by == ["claude"]
    listed = await view(projector, event_log, queries.threads, agent="openclaw")
    assert listed[0].messages == 2
    assert listed[0].participants == ["claude", "openclaw"]


async def test_a_message_to_everyone_reaches_every_other_agent(
    nc: NATS, event_log: EventLog, service: CommandService, projector: Projector
) -> None:
    """A directive to '*' is in every other agent's inbox, not the sender's."""
    await send(nc, sender="ops", recipient="alpha", type="comment", body="hello alpha")
    await send(nc, sender="ops", recipient="*", type="directive", body="Freeze deploys")
    alpha = await view(projector, event_log, queries.inbox, "alpha")
    assert [m.body for m in alpha] == ["hello alpha", "Freeze deploys"]
    assert [m.body for m in await view(projector, event_log, queries.inbox, "beta")] == [
        "Freeze deploys"
    ]
    assert await view(projector, event_log, queries.inbox, "ops") == []


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ({"type": "gossip"}, "type:"),
        ({"body": ""}, "body:"),
        ({"body": "   "}, "must not be blank"),
        ({"body": "bell\x07"}, "control characters"),
        ({"recipient": "two words"}, "recipient:"),
        ({"thread_id": "th-missing"}, "no thread th-missing"),
        ({"reply_to": "m-x"}, "give the thread_id"),
        ({"task_id": "t-nosuchtask0"}, "no task t-nosuchtask0"),
        ({"colour": "red"}, "colour:"),
    ],
)
async def test_bad_messages_are_refused_with_the_reason(
    nc: NATS, event_log: EventLog, service: CommandService, fields: dict[str, Any], problem: str
) -> None:
    """Each malformed message is refused, naming the field, and nothing is recorded."""
    message = {"sender": "a", "recipient": "b", "type": "comment", "body": "hi", **fields}
    with pytest.raises(CommandRejected) as caught:
        await commands.call(nc, "send", message)
    assert any(problem in p for p in caught.value.problems), caught.value.problems
    assert [e async for e in event_log.read() if e.aggregate == "thread"] == []


async def test_only_the_recipient_can_mark_a_message_read(
    nc: NATS, event_log: EventLog, service: CommandService
) -> None:
    """A receipt for a message addressed to someone else is refused."""
    sent = await send(nc, sender="a", recipient="b", type="comment", body="for b")
    with pytest.raises(CommandRejected, match="read receipt refused") as caught:
        await commands.call(
            nc,
            "mark_read",
            {"reader": "c", "thread_id": sent["thread_id"], "message_ids": [sent["message_id"]]},
        )
    assert "not addressed to c" in caught.value.problems[0]


async def test_comms_replay_deterministically(
    tmp_path: Path, nc: NATS, event_log: EventLog, service: CommandService, projector: Projector
) -> None:
    """Messages and receipts project the same live and in a replay, receipts first-wins."""
    sent = await send(nc, sender="a", recipient="b", type="question", body="?")
    receipt = {"reader": "b", "thread_id": sent["thread_id"], "message_ids": [sent["message_id"]]}
    await commands.call(nc, "mark_read", receipt)
    await view(projector, event_log, queries.inbox, "b")
    live = await projector.models.run(projector.models.digests_sync)
    fresh = await build(event_log, tmp_path / "fresh.duckdb", stop=projector.applied)
    try:
        assert await fresh.run(fresh.digests_sync) == live
    finally:
        await fresh.close()
    assert live["messages"].startswith("1:")
    assert live["message_reads"].startswith("1:")
