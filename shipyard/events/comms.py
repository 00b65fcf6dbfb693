"""Agent comms: validated messages between agents, in threads, with read receipts.

A message is ``comment``, ``question``, ``status_request``, ``status_response`` or
``directive``; it goes to one agent or to everyone (``*``), may reply to an earlier message in
its thread, and may be about a task. Each is an event on its thread's aggregate.
"""

from __future__ import annotations

import unicodedata
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from shipyard.errors import CommandRejected
from shipyard.events.dispatch import NAME_PATTERN, MalformedBody, decode_json
from shipyard.events.envelope import make, new_id, short_id, valid_id
from shipyard.events.log import EventLog
from shipyard.events.types import EVERYONE, MessageRead, MessageSent, MessageType, Priority

MAX_BODY = 20_000  # characters in one message

Name = Annotated[str, Field(pattern=NAME_PATTERN)]


class SendRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    sender: Name
    recipient: Annotated[str, Field(pattern=NAME_PATTERN + "|^\\*$")]
    type: MessageType
    body: Annotated[str, Field(min_length=1, max_length=MAX_BODY)]
    priority: Priority = Priority.NORMAL
    thread_id: Annotated[str, Field(max_length=64)] = ""
    reply_to: Annotated[str, Field(max_length=64)] = ""
    task_id: Annotated[str, Field(max_length=64)] = ""

    @field_validator("body")
    @classmethod
    def _printable(cls, value: str) -> str:
        for ch in value:
            if unicodedata.category(ch) == "Cc" and ch not in "\n\t":
                raise ValueError(f"must not contain control characters (found U+{ord(ch):04X})")
        if not value.strip():
            raise ValueError("must not be blank")
        return value


class ReadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    reader: Name
    thread_id: Annotated[str, Field(min_length=1, max_length=64)]
    message_ids: Annotated[list[str], Field(min_length=1, max_length=1000)]


def _invalid(e: ValidationError) -> CommandRejected:
    problems = [
        f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}"
        for err in e.errors(include_url=False)
    ]
    return CommandRejected("message refused", problems, code="invalid_message")


def _decode(body: bytes | dict[str, Any]) -> Any:
    if isinstance(body, dict):
        return body
    try:
        return decode_json(body)
    except MalformedBody as e:
        raise CommandRejected("message refused", [f"body: {e}"], "invalid") from e


async def send(
    events: EventLog, body: bytes | dict[str, Any], *, actor: str = ""
) -> dict[str, Any]:
    """Record a message; a new thread is started unless ``thread_id`` names one."""
    try:
        req = SendRequest.model_validate(_decode(body))
    except ValidationError as e:
        raise _invalid(e) from e
    problems = []
    for field, value in (("thread_id", req.thread_id), ("reply_to", req.reply_to)):
        if value and not valid_id(value):
            problems.append(f"{field}: {value!r} is not an id")
    if req.reply_to and not req.thread_id:
        problems.append("reply_to: give the thread_id of the message you reply to")
    if req.task_id and (
        not valid_id(req.task_id) or not await events.last_seq("task", req.task_id)
    ):
        problems.append(f"task_id: no task {req.task_id}")
    thread_id = req.thread_id or short_id("th-")
    if req.thread_id and not problems:
        history = await events.history("thread", req.thread_id)
        if not history:
            problems.append(f"thread_id: no thread {req.thread_id}")
        elif req.reply_to and not any(
            isinstance(e.data, MessageSent) and e.data.message_id == req.reply_to for e in history
        ):
            problems.append(f"reply_to: no message {req.reply_to} in thread {req.thread_id}")
    if problems:
        raise CommandRejected("message refused", problems, code="invalid_message")
    message_id = new_id("m-")
    data = MessageSent(
        message_id=message_id,
        sender=req.sender,
        recipient=req.recipient,
        type=req.type,
        body=req.body,
        priority=req.priority,
        reply_to=req.reply_to,
        task_id=req.task_id,
    )
    seq = await events.append(
        make(data, aggregate_id=thread_id, actor=actor or f"agent:{req.sender}")
    )
    return {"message_id": message_id, "thread_id": thread_id, "seq": seq}


async def mark_read(
    events: EventLog, body: bytes | dict[str, Any], *, actor: str = ""
) -> dict[str, Any]:
    """Record read receipts for messages addressed to ``reader`` (or to everyone)."""
    try:
        req = ReadRequest.model_validate(_decode(body))
    except ValidationError as e:
        raise _invalid(e) from e
    if not valid_id(req.thread_id):
        raise CommandRejected("message refused", [f"thread_id: {req.thread_id!r}"], "invalid")
    history = await events.history("thread", req.thread_id)
    sent = {e.data.message_id: e.data for e in history if isinstance(e.data, MessageSent)}
    done = {(e.data.message_id, e.data.reader) for e in history if isinstance(e.data, MessageRead)}
    problems, receipts = [], []
    for mid in dict.fromkeys(req.message_ids):
        msg = sent.get(mid)
        if msg is None:
            problems.append(f"message_ids: no message {mid} in thread {req.thread_id}")
        elif msg.recipient not in (req.reader, EVERYONE):
            problems.append(f"message_ids: {mid} is not addressed to {req.reader}")
        elif (mid, req.reader) not in done:
            receipts.append(MessageRead(message_id=mid, reader=req.reader))
    if problems:
        raise CommandRejected("read receipt refused", problems, code="invalid_message")
    for receipt in receipts:
        await events.append(
            make(receipt, aggregate_id=req.thread_id, actor=actor or f"agent:{req.reader}")
        )
    return {"thread_id": req.thread_id, "marked": len(receipts)}
