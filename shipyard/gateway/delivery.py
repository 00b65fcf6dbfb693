"""Sent once: the record an edge (Telegram, the OpenClaw webhook) keeps of each alert it
delivered, so no instance — this one after a restart, or another — sends it again.

The record is an ``alert_delivered`` event on an aggregate whose id is derived from
(channel, target, source event); it is appended create-only after the target accepted the
alert, so of several senders racing, one record lands.
"""

from __future__ import annotations

import logging

from shipyard.errors import ConcurrencyConflict, ShipyardError
from shipyard.events import types as t
from shipyard.events.envelope import derived_id, make
from shipyard.events.log import EventLog

log = logging.getLogger(__name__)


def record_id(channel: str, target: str, source_event: str) -> str:
    """The aggregate that records one alert's delivery to one target."""
    return derived_id("a-", channel, target, source_event)


async def delivered(events: EventLog, channel: str, target: str, source_event: str) -> bool:
    return bool(await events.last_seq("alert", record_id(channel, target, source_event)))


async def record(
    events: EventLog, channel: str, target: str, source_event: str, kind: str, *, actor: str
) -> None:
    """Note that the alert about ``source_event`` reached ``target``. A failure to write the
    note is logged, not raised: the alert went out, and at worst is sent once more."""
    data = t.AlertDelivered(channel=channel, target=target, source_event=source_event, kind=kind)
    event = make(data, aggregate_id=record_id(channel, target, source_event), actor=actor)
    try:
        await events.append(event, expect=0)
    except ConcurrencyConflict:
        pass  # another sender delivered it too and recorded it first
    except ShipyardError as e:
        log.warning(
            "%s: sent, but could not record, the alert on %s: %s",
            channel,
            source_event,
            e,
            extra={"action": "delivery_record_failed"},
        )
