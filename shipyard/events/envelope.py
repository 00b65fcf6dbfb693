"""The envelope every event travels in, its ids, and its JSON encoding.

On the wire an event is one JSON object::

    {"id": "...", "type": "task_dispatched", "v": 1, "aggregate": "task",
     "aggregate_id": "t-...", "time": "2026-...Z", "actor": "dispatcher:openclaw",
     "data": {...}}

so any NATS client, and a person with the ``nats`` CLI, can read the log. Reading decodes
``data`` with the class registered for ``type``, after running upcasters when ``v`` is
older than the current version.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

import msgspec

from shipyard.errors import UnknownEventType
from shipyard.events.types import REGISTRY, EventData, Registry

_CROCKFORD = "0123456789abcdefghjkmnpqrstvwxyz"
_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

D = TypeVar("D", bound=EventData)


def b32(value: int, length: int) -> str:
    out = []
    for _ in range(length):
        out.append(_CROCKFORD[value & 31])
        value >>= 5
    return "".join(reversed(out))


def new_id(prefix: str = "") -> str:
    """A 26-character id that sorts by creation time (ms) and is random within a ms."""
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    return prefix + b32(ms, 10) + b32(rand, 16)


def short_id(prefix: str) -> str:
    """A 12-character id people can type: 42 bits of ms time, 18 random bits.

    Collisions are caught by the create-only append (expected sequence 0), which retries.
    """
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(3), "big") & 0x3FFFF
    return prefix + b32(((ms & ((1 << 42) - 1)) << 18) | rand, 12)


def derived_id(prefix: str, *parts: str) -> str:
    """A stable aggregate id for a natural key that may not be a valid id itself (a group
    name with spaces, an alert's channel + target + source event): same parts, same id."""
    digest = hashlib.blake2b("\x1f".join(parts).encode(), digest_size=15).digest()
    return prefix + b32(int.from_bytes(digest, "big"), 24)


def valid_id(value: str) -> bool:
    """Ids become subject tokens, so they may not hold dots, wildcards or spaces."""
    return bool(_ID_RE.match(value))


def utcnow() -> datetime:
    return datetime.now(UTC)


class Event(msgspec.Struct, Generic[D], frozen=True, kw_only=True, omit_defaults=True):
    """One immutable fact. ``seq`` is the stream sequence, set when read back (0 before)."""

    id: str
    type: str
    v: int
    aggregate: str
    aggregate_id: str
    time: datetime
    actor: str
    data: D
    seq: int = 0

    @property
    def subject(self) -> str:
        return subject_for(self.aggregate, self.aggregate_id, self.type)


SUBJECT_PREFIX = "sy.ev"


def subject_for(aggregate: str, aggregate_id: str, type_name: str) -> str:
    return f"{SUBJECT_PREFIX}.{aggregate}.{aggregate_id}.{type_name}"


def aggregate_subject(aggregate: str, aggregate_id: str) -> str:
    """The wildcard subject covering every event of one aggregate."""
    return f"{SUBJECT_PREFIX}.{aggregate}.{aggregate_id}.>"


def make(
    data: D,
    *,
    aggregate_id: str,
    actor: str,
    at: datetime | None = None,
    event_id: str | None = None,
) -> Event[D]:
    """Wrap ``data`` in a new envelope, stamped now unless ``at`` is given."""
    if not valid_id(aggregate_id):
        raise ValueError(f"aggregate id {aggregate_id!r} must match {_ID_RE.pattern}")
    return Event(
        id=event_id or new_id(),
        type=data.TYPE,
        v=data.VERSION,
        aggregate=data.AGGREGATE,
        aggregate_id=aggregate_id,
        time=at or utcnow(),
        actor=actor,
        data=data,
    )


_encoder = msgspec.json.Encoder()


def encode(event: Event[Any]) -> bytes:
    return _encoder.encode(event)


class _Raw(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    type: str
    v: int
    aggregate: str
    aggregate_id: str
    time: datetime
    actor: str
    data: msgspec.Raw


_raw_decoder = msgspec.json.Decoder(_Raw)
_dict_decoder = msgspec.json.Decoder(dict[str, Any])
_data_decoders: dict[type[EventData], msgspec.json.Decoder[Any]] = {}


def decode(payload: bytes, *, seq: int = 0, registry: Registry = REGISTRY) -> Event[Any]:
    """Decode one event, upcasting old versions to the current one."""
    raw = _raw_decoder.decode(payload)
    cls = registry.get(raw.type)
    if cls is None:
        raise UnknownEventType(
            f"event {raw.id} at sequence {seq} has type {raw.type!r}, which this version of "
            "Shipyard does not know: upgrade Shipyard to read it"
        )
    if raw.v == cls.VERSION:
        dec = _data_decoders.get(cls)
        if dec is None:
            dec = _data_decoders[cls] = msgspec.json.Decoder(cls)
        data = dec.decode(raw.data)
    elif raw.v < cls.VERSION:
        fields = registry.upcast(raw.type, raw.v, _dict_decoder.decode(raw.data))
        data = msgspec.convert(fields, cls)
    else:
        raise UnknownEventType(
            f"event {raw.id} at sequence {seq} is {raw.type} v{raw.v}, newer than the v"
            f"{cls.VERSION} this Shipyard knows: upgrade Shipyard to read it"
        )
    return Event(
        id=raw.id,
        type=raw.type,
        v=cls.VERSION,
        aggregate=raw.aggregate,
        aggregate_id=raw.aggregate_id,
        time=raw.time,
        actor=raw.actor,
        data=data,
        seq=seq,
    )
