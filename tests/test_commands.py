"""Commands over NATS request/reply: validation, events, rejections, idempotency."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import msgspec
import pytest
from nats.aio.client import Client as NATS

from shipyard.errors import CommandRejected, CommandUnavailable
from shipyard.events import commands
from shipyard.events.commands import Commands, CommandService
from shipyard.events.log import EventLog
from tests.samples import dispatch_body


@pytest.fixture
async def service(nc: NATS, event_log: EventLog) -> AsyncIterator[CommandService]:
    svc = CommandService(nc, Commands(event_log))
    await svc.start()
    await nc.flush()
    yield svc
    await svc.stop()


async def test_dispatch_over_nats_records_a_task(
    nc: NATS, event_log: EventLog, service: CommandService
) -> None:
    """A valid dispatch sent on sy.cmd.dispatch becomes one task_dispatched event."""
    result = await commands.call(nc, "dispatch", dispatch_body(priority="high"))
    history = await event_log.history("task", result["task_id"])
    assert [e.type for e in history] == ["task_dispatched"]
    task = history[0].data
    assert task.title == "Add a health endpoint"
    assert task.priority == "high"
    assert task.working_dir == "/srv/app"
    assert task.validation_command == "python -m pytest -q"
    assert task.deliverable_files == ["app/health.py", "README.md"]
    assert history[0].actor == "dispatcher:openclaw"
    assert result["duplicate"] is False
    assert result["seq"] == history[0].seq


async def test_rejection_lists_every_problem_and_is_recorded(
    nc: NATS, event_log: EventLog, service: CommandService
) -> None:
    """A bad dispatch is refused with all its problems, and only the refusal is recorded."""
    body = dispatch_body(priority="asap")
    body["payload"]["prompt"] = "## Task\nsomething"
    with pytest.raises(CommandRejected) as caught:
        await commands.call(nc, "dispatch", body)
    problems = caught.value.problems
    assert any(p.startswith("priority:") for p in problems)
    assert any("## Requirements" in p for p in problems)
    assert any("## Environment" in p for p in problems)
    assert any("## Deliverables" in p for p in problems)
    assert "## Task" in caught.value.template
    recorded = [e async for e in event_log.read()]
    assert [e.type for e in recorded] == ["dispatch_rejected"]
    assert recorded[0].data.problems == problems
    assert recorded[0].data.dispatcher == "openclaw"


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b"\xff\xfe\x00garbage", "not valid UTF-8"),
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b"", "empty"),
    ],
)
async def test_raw_garbage_gets_a_clear_refusal(
    nc: NATS, event_log: EventLog, service: CommandService, payload: bytes, expected: str
) -> None:
    """Bytes that are not a dispatch are refused with a sentence, never a crash."""
    with pytest.raises(CommandRejected) as caught:
        await commands.call(nc, "dispatch", payload)
    assert expected in caught.value.problems[0]
    assert [e.type async for e in event_log.read()] == ["dispatch_rejected"]
    # The service still serves after it.
    assert (await commands.call(nc, "dispatch", dispatch_body()))["task_id"].startswith("t-")


async def test_unknown_command_is_refused_by_name(nc: NATS, service: CommandService) -> None:
    """A command the service does not know is refused, naming the known ones."""
    with pytest.raises(CommandRejected, match="no command 'explode'"):
        await commands.call(nc, "explode", {})


async def test_no_service_means_command_unavailable(nc: NATS) -> None:
    """With no command service running, the caller is told so instead of hanging."""
    with pytest.raises(CommandUnavailable):
        await commands.call(nc, "dispatch", dispatch_body(), timeout=2)


async def test_repeated_idempotency_key_returns_the_first_task(
    nc: NATS, event_log: EventLog, service: CommandService
) -> None:
    """Ten concurrent dispatches with one idempotency key make one task, all told its id."""
    body = dispatch_body(idempotency_key="nightly-2026-11-23")
    results = await asyncio.gather(*(commands.call(nc, "dispatch", body) for _ in range(10)))
    ids = {r["task_id"] for r in results}
    assert len(ids) == 1
    assert sum(not r["duplicate"] for r in results) == 1
    dispatched = [e async for e in event_log.read() if e.type == "task_dispatched"]
    assert len(dispatched) == 1


async def test_after_must_name_existing_tasks(
    nc: NATS, event_log: EventLog, service: CommandService
) -> None:
    """`after` and `escalated_from` are checked against the log; known ids are kept."""
    first = await commands.call(nc, "dispatch", dispatch_body())
    with pytest.raises(CommandRejected) as caught:
        await commands.call(
            nc, "dispatch", dispatch_body(after=[first["task_id"], "t-nosuchtask0"])
        )
    assert caught.value.problems == ["after: no task t-nosuchtask0 exists"]
    second = await commands.call(
        nc,
        "dispatch",
        dispatch_body(after=[first["task_id"]], group="release", escalated_from=first["task_id"]),
    )
    task = (await event_log.history("task", second["task_id"]))[0].data
    assert task.after == [first["task_id"]]
    assert task.group == "release"
    assert task.escalated_from == first["task_id"]


async def test_two_services_share_commands_in_a_queue_group(
    nc: NATS, event_log: EventLog, service: CommandService
) -> None:
    """With two command services, each dispatch is handled once (one event per call)."""
    other = CommandService(nc, Commands(event_log))
    await other.start()
    try:
        results = await asyncio.gather(
            *(commands.call(nc, "dispatch", dispatch_body()) for _ in range(20))
        )
    finally:
        await other.stop()
    dispatched = [e async for e in event_log.read() if e.type == "task_dispatched"]
    assert sorted(e.aggregate_id for e in dispatched) == sorted(r["task_id"] for r in results)


async def test_reply_is_json_any_client_can_read(nc: NATS, service: CommandService) -> None:
    """The raw reply on sy.cmd.dispatch is a JSON envelope with ok and result."""
    msg = await nc.request("sy.cmd.dispatch", msgspec.json.encode(dispatch_body()), timeout=5)
    reply = msgspec.json.decode(msg.data)
    assert reply["ok"] is True
    assert reply["result"]["task"]["dispatcher"] == "openclaw"
