"""Report-back to OpenClaw: when a task it dispatched ends, goes STALE, is retried after a
watchdog verdict or is escalated, POST ``{hooks_url}/agent`` so the agent that dispatched it
hears without polling.

Reports are derived from events, so a reporter that was down sends what it missed (as far
back as ``horizon``) when it starts again. Each is sent once: its ``idempotencyKey`` is the
event's id, and an ``alert_delivered`` event, appended create-only after the endpoint
accepted it, keeps every reporter — this one after a restart, or another instance — from
sending it again. Failures back off and retry; a 429 waits for ``Retry-After``; nothing
here can hold up a build.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import aiohttp
import msgspec

from shipyard.errors import ShipyardError
from shipyard.events import types as t
from shipyard.events.envelope import Event, utcnow
from shipyard.events.log import EventLog
from shipyard.gateway import alerts, delivery
from shipyard.settings import Settings

log = logging.getLogger(__name__)

CHANNEL = "webhook"
STOP_TIMEOUT = 5.0  # seconds stop() waits for the reporter to end
MAX_ERROR = 600  # characters of a failure's error quoted in a report
WATCHDOG = ("agent_silent", "handler_lost")
_REPORTED = (t.TaskFinished, t.RunStale, t.TaskRequeued, t.TaskEscalated)


@dataclass(frozen=True)
class Report:
    event_id: str
    task_id: str
    kind: str  # succeeded, failed, cancelled, stale, retrying, escalated
    message: str


def describe(event: Event[Any], history: list[Event[Any]], link: str) -> Report | None:
    """What to tell the dispatcher about ``event`` of the task whose ``history`` this is."""
    data = event.data
    spec: t.TaskDispatched = history[0].data
    name = f'"{spec.title}" ({event.aggregate_id})'
    last_run = next((e.data for e in reversed(history) if isinstance(e.data, t.RunFinished)), None)
    if isinstance(data, t.TaskFinished):
        kind = data.outcome.value
        if data.outcome == t.TaskState.SUCCEEDED:
            text = f"Shipyard: {name} succeeded."
            if last_run and last_run.summary:
                text += f" {last_run.summary}."
        elif data.outcome == t.TaskState.CANCELLED:
            text = f"Shipyard: {name} was cancelled: {data.reason or 'no reason given'}."
        else:
            where = f" in {last_run.phase.label}" if last_run and last_run.phase else ""
            text = f"Shipyard: {name} failed{where}: {data.reason or 'no reason recorded'}."
            if last_run and last_run.error:
                text += f"\nError: {last_run.error[-MAX_ERROR:]}"
            tid = event.aggregate_id
            text += (
                f"\nNext: `shipyard retry {tid}`, `shipyard escalate {tid} --to AGENT`, or "
                f"`shipyard rework {data.run_id or tid}`."
            )
    elif isinstance(data, t.RunStale):
        kind = "stale"
        text = (
            f"Shipyard: {name} is STALE: no heartbeat for {data.silent_for:.0f}s. It fails if "
            "it stays silent."
        )
    elif isinstance(data, t.TaskRequeued):
        if not any(reason in data.reason for reason in WATCHDOG):
            return None  # an operator's retry or an ordinary failure's: reported at the end
        kind = "retrying"
        text = f"Shipyard: {name} was failed by the watchdog ({data.reason}); retrying."
    elif isinstance(data, t.TaskEscalated):
        kind = "escalated"
        how = "by policy" if data.automatic else "by hand"
        text = f"Shipyard: {name} was escalated {how} to {data.to_agent} as {data.task_id}."
    else:
        return None
    if link:
        text += f"\n{link}"
    return Report(event.id, event.aggregate_id, kind, text)


class OpenClawReporter:
    def __init__(self, events: EventLog, settings: Settings, *, dashboard_url: str = "") -> None:
        self.events = events
        self.cfg = settings.openclaw
        self.base_url = (settings.gateway.public_url or dashboard_url).rstrip("/")
        self.delivered = 0  # reports the endpoint accepted (for tests and metrics)
        self._job: asyncio.Task[None] | None = None
        self._http: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        start = await self.events.seq_at(utcnow() - timedelta(seconds=self.cfg.horizon))
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.cfg.timeout))
        self._job = asyncio.create_task(self._follow(self._http, start), name="openclaw-reporter")

    async def stop(self) -> None:
        if self._job is not None:
            self._job.cancel()
            await asyncio.wait([self._job], timeout=STOP_TIMEOUT)
        if self._http is not None:
            await self._http.close()

    async def _follow(self, http: aiohttp.ClientSession, start: int) -> None:
        async for event in self.events.follow(start=start):
            if event.aggregate != "task" or not isinstance(event.data, _REPORTED):
                continue
            try:
                await self._consider(http, event)
            except ShipyardError as e:
                log.warning(
                    "report of %s skipped: %s", event.id, e, extra={"action": "report_skip"}
                )

    async def _consider(self, http: aiohttp.ClientSession, event: Event[Any]) -> None:
        target = self.cfg.hooks_url
        if await delivery.delivered(self.events, CHANNEL, target, event.id):
            return  # sent before
        history = await self.events.history("task", event.aggregate_id)
        if not history or history[0].data.dispatcher not in self.cfg.dispatchers:
            return
        link = ""
        if self.base_url:
            run_id = getattr(event.data, "run_id", "")
            link = (
                alerts.run_link(self.base_url, run_id)
                if run_id
                else alerts.task_link(self.base_url, event.aggregate_id)
            )
        report = describe(event, history, link)
        if report is None:
            return
        if await self._send(http, report):
            await delivery.record(
                self.events, CHANNEL, target, event.id, report.kind, actor="openclaw"
            )

    async def _send(self, http: aiohttp.ClientSession, report: Report) -> bool:
        body = {
            **self.cfg.extra,
            "message": report.message,
            "name": "Shipyard",
            "agentId": self.cfg.agent_id,
            "idempotencyKey": report.event_id,
        }
        headers = {"Authorization": f"Bearer {self.cfg.token}", "Content-Type": "application/json"}
        url = self.cfg.hooks_url + "/agent"
        delay = self.cfg.backoff
        for attempt in range(1, self.cfg.max_attempts + 1):
            wait = delay
            try:
                async with http.post(url, data=msgspec.json.encode(body), headers=headers) as r:
                    if r.status < 300:
                        self.delivered += 1
                        log.info(
                            "reported %s of %s",
                            report.kind,
                            report.task_id,
                            extra={"action": "report_sent"},
                        )
                        return True
                    problem = f"HTTP {r.status}"
                    if r.status == 429:
                        wait = _retry_after(r.headers.get("Retry-After"), delay)
            except (aiohttp.ClientError, TimeoutError) as e:
                problem = f"{type(e).__name__}: {e}"
            log.warning(
                "report of %s to %s failed (attempt %d): %s",
                report.task_id,
                url,
                attempt,
                problem,
                extra={"action": "report_retry"},
            )
            if attempt < self.cfg.max_attempts:
                await asyncio.sleep(wait)
                delay = min(delay * 2, self.cfg.max_backoff)
        log.error(
            "gave up reporting %s of %s after %d attempts",
            report.kind,
            report.task_id,
            self.cfg.max_attempts,
            extra={"action": "report_gave_up"},
        )
        return False


def _retry_after(header: str | None, fallback: float) -> float:
    try:
        return max(0.0, float(header)) if header else fallback
    except ValueError:
        return fallback
