"""Hostile commands over NATS: generated JSON and raw bytes on every `sy.cmd.*` subject get a
clear refusal, the service keeps answering, and nothing lands in the log but the recorded
rejection of a dispatch."""

from __future__ import annotations

import json
import string
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nats.aio.client import Client as NATS

from shipyard.errors import CommandRejected
from shipyard.events import commands
from shipyard.events.commands import Commands, CommandService
from shipyard.events.log import EventLog
from tests.samples import dispatch_body

NAMES = ("dispatch", "cancel", "retry", "escalate", "send", "mark_read")
SETTINGS = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture
async def service(nc: NATS, event_log: EventLog) -> AsyncIterator[CommandService]:
    svc = CommandService(nc, Commands(event_log))
    await svc.start()
    yield svc
    await svc.stop()


texts = st.text(max_size=40) | st.sampled_from(
    ["", "t-x", "../../etc/passwd", "<script>alert(1)</script>", "a\x00b", "\u202e", "*"]
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | texts,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4),
    max_leaves=20,
)
FIELDS = (
    "task_id",
    "reason",
    "to",
    "note",
    "sender",
    "recipient",
    "type",
    "body",
    "thread_id",
    "reply_to",
    "reader",
    "message_ids",
    "payload",
    "priority",
    "after",
    "group",
    "agent",
    "action_name",
)
# Objects with the fields the commands look for, filled with anything.
near_misses = st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=6)
# Real dispatches with one field spoiled.
spoilt_dispatches = st.builds(
    lambda key, value: {**dispatch_body(), key: value},
    st.sampled_from(["priority", "after", "group", "agent", "action_name", "payload"]),
    json_values,
)
invalid_utf8 = st.builds(
    lambda head, bad, tail: head + bad + tail,
    st.binary(max_size=20),
    st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\x80"]),
    st.binary(max_size=20),
)
deep = st.integers(min_value=500, max_value=20_000).map(lambda n: b"[" * n + b"]" * n)
payloads = (
    json_values.map(msgspec.json.encode)
    | near_misses.map(msgspec.json.encode)
    | spoilt_dispatches.map(msgspec.json.encode)
    | st.binary(max_size=200)
    | invalid_utf8
    | deep
    | invalid_utf8.map(lambda b: b'{"task_id": "' + b + b'"}')
)


async def types_after(log: EventLog, seq: int) -> list[str]:
    return [e.type async for e in log.read(start=seq + 1)]


def assert_clear_refusal(reply: dict[str, Any]) -> None:
    error = reply["error"]
    assert error["code"] not in ("", "internal"), error
    assert isinstance(error["message"], str)
    assert error["message"].strip()
    assert isinstance(error["problems"], list)
    assert all(isinstance(p, str) and p.strip() for p in error["problems"])


@SETTINGS
@given(name=st.sampled_from(NAMES), payload=payloads)
async def test_generated_commands_get_a_clear_answer(
    nc: NATS, event_log: EventLog, service: CommandService, name: str, payload: bytes
) -> None:
    """Any JSON, near-miss objects, spoilt dispatches, raw bytes, invalid UTF-8 and deep
    nesting on every command subject: the reply is JSON, a refusal names its problem (never
    `internal`), and the log gains only a dispatch's recorded rejection."""
    before = await event_log.stream_last_seq()
    msg = await nc.request(commands.command_subject(name), payload, timeout=10)
    reply = json.loads(msg.data)
    appended = await types_after(event_log, before)
    if reply["ok"]:
        assert name == "dispatch", reply  # nothing else can succeed on an empty log
        assert appended == ["task_dispatched"]
        return
    assert_clear_refusal(reply)
    assert appended == (["dispatch_rejected"] if name == "dispatch" else [])


@SETTINGS
@given(name=st.text(string.ascii_letters + "_-", min_size=1, max_size=20), payload=payloads)
async def test_unknown_commands_are_refused_by_name(
    nc: NATS, event_log: EventLog, service: CommandService, name: str, payload: bytes
) -> None:
    """A subject under sy.cmd that names no command is refused saying which exist, and
    nothing is recorded."""
    before = await event_log.stream_last_seq()
    msg = await nc.request(commands.command_subject(name), payload, timeout=10)
    reply = json.loads(msg.data)
    if name in NAMES:
        return
    assert reply["error"]["code"] == "unknown_command"
    assert "dispatch" in reply["error"]["message"]
    assert await event_log.stream_last_seq() == before


async def test_the_service_keeps_answering_after_abuse(
    nc: NATS, event_log: EventLog, service: CommandService
) -> None:
    """After a burst of garbage on every subject, a valid dispatch is accepted at once."""
    for name in NAMES:
        for junk in (b"\xff" * 100, b"[" * 50_000, b"{}", b"null", b""):
            await nc.request(commands.command_subject(name), junk, timeout=10)
    result = await commands.call(nc, "dispatch", dispatch_body())
    assert result["task_id"].startswith("t-")


async def test_a_body_over_the_nats_limit_is_refused_before_it_is_sent(
    nc: NATS, event_log: EventLog, service: CommandService
) -> None:
    """A 10 MB dispatch is over the server's max_payload: the client is told, in a sentence,
    that it is too large, and nothing is appended. One under max_payload but over the
    dispatch limit is refused by the service, and only that refusal is recorded."""
    huge = dispatch_body()
    huge["payload"]["prompt"] += "x" * (10 * 1024 * 1024)
    with pytest.raises(CommandRejected) as refused:
        await commands.call(nc, "dispatch", huge)
    assert refused.value.code == "too_large"
    assert "too large" in refused.value.message
    assert await event_log.stream_last_seq() == 0

    big = dispatch_body()
    big["payload"]["prompt"] += "x" * (1024 * 1024)
    with pytest.raises(CommandRejected) as refused:
        await commands.call(nc, "dispatch", big)
    assert "too large" in refused.value.problems[0]
    assert await types_after(event_log, 0) == ["dispatch_rejected"]
