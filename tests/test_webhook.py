"""Report-back to OpenClaw's hooks endpoint, against a loopback stand-in, with real handlers
and builders on a real nats-server."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from shipyard.events.commands import Commands
from shipyard.events.log import EventLog
from shipyard.gateway.webhook import OpenClawReporter
from shipyard.handler.service import Handler
from shipyard.settings import OpenClawSettings, Settings
from tests import handlers as h
from tests.fakes.openclaw_hooks import FakeHooks
from tests.test_handler import body


@pytest.fixture
async def hooks() -> AsyncIterator[FakeHooks]:
    async with FakeHooks() as fake:
        yield fake


@pytest.fixture
async def running(event_log: EventLog) -> AsyncIterator[list[Handler | OpenClawReporter]]:
    started: list[Handler | OpenClawReporter] = []
    yield started
    for service in reversed(started):
        await service.stop()


def with_hooks(cfg: Settings, hooks: FakeHooks) -> Settings:
    openclaw = OpenClawSettings(
        hooks_url=hooks.url, token=hooks.token, agent_id="ops", backoff=0.05, max_backoff=0.2
    )
    return cfg.model_copy(update={"openclaw": openclaw})


async def reporter(
    started: list[Handler | OpenClawReporter],
    log: EventLog,
    cfg: Settings,
    dashboard_url: str = "",
) -> OpenClawReporter:
    service = OpenClawReporter(log, cfg, dashboard_url=dashboard_url)
    await service.start()
    started.append(service)
    return service


async def handler(started: list[Handler | OpenClawReporter], log: EventLog, cfg: Settings) -> None:
    service = Handler(log, cfg, handler_id="h1")
    await service.start()
    started.append(service)


async def test_a_finished_task_openclaw_dispatched_is_reported_once(
    tmp_path: Path, event_log: EventLog, hooks: FakeHooks, running: list[Handler | OpenClawReporter]
) -> None:
    """A task dispatched by `openclaw` that succeeds is posted to {hooks_url}/agent with the
    bearer token, the agentId, its summary, a link to its run on the dashboard and
    idempotencyKey = the event's id; a task another
    dispatcher sent is not reported; the delivery is recorded once in the log."""
    cfg = with_hooks(h.settings(tmp_path), hooks)
    await handler(running, event_log, cfg)
    await reporter(running, event_log, cfg, dashboard_url="http://dash.test:7780/")
    commands = Commands(event_log)
    cron = body(tmp_path, "cron")
    cron["payload"]["dispatcher"] = "cron"
    cron_id = (await commands.dispatch(cron)).task_id
    await h.wait_for(event_log, h.finished(cron_id))
    task_id = (await commands.dispatch(body(tmp_path, "claw"))).task_id
    done = await h.wait_for(event_log, h.finished(task_id))

    [report] = await hooks.wait_for(1)
    assert report["agentId"] == "ops"
    assert report["name"] == "Shipyard"
    assert report["idempotencyKey"] == done.id
    assert report["message"].startswith(f'Shipyard: "Greeting claw" ({task_id}) succeeded.')
    assert "turns" in report["message"]
    assert report["message"].endswith(f"\nhttp://dash.test:7780/#/?run={done.data.run_id}")
    delivered = await h.wait_for(event_log, lambda e: e.type == "alert_delivered")
    assert delivered.data.source_event == done.id
    assert delivered.data.kind == "succeeded"
    assert hooks.attempts == 1


async def test_errors_back_off_and_retry_until_delivered_once(
    tmp_path: Path, event_log: EventLog, hooks: FakeHooks, running: list[Handler | OpenClawReporter]
) -> None:
    """A 500, a dropped connection and a 429 with Retry-After are each retried; the report
    then lands exactly once."""
    cfg = with_hooks(h.settings(tmp_path), hooks)
    hooks.fail(500, "drop", (429, "0.1"))
    await handler(running, event_log, cfg)
    service = await reporter(running, event_log, cfg)
    task_id = (await Commands(event_log).dispatch(body(tmp_path, "retry"))).task_id
    done = await h.wait_for(event_log, h.finished(task_id))

    [report] = await hooks.wait_for(1)
    assert report["idempotencyKey"] == done.id
    assert hooks.attempts == 4
    assert service.delivered == 1


async def test_a_restarted_reporter_sends_what_it_missed_and_nothing_twice(
    tmp_path: Path, event_log: EventLog, hooks: FakeHooks, running: list[Handler | OpenClawReporter]
) -> None:
    """Reports for tasks that ended while the reporter was down are sent when it starts
    again; the one it had already sent is not repeated. A failure says where and why."""
    cfg = with_hooks(h.settings(tmp_path), hooks)
    await handler(running, event_log, cfg)
    first = await reporter(running, event_log, cfg)
    commands = Commands(event_log)
    one = (await commands.dispatch(body(tmp_path, "one"))).task_id
    await hooks.wait_for(1)
    await first.stop()
    running.remove(first)

    two = (await commands.dispatch(body(tmp_path, "two"))).task_id
    broken = (await commands.dispatch(body(tmp_path, "broken", agent="fail"))).task_id
    await h.wait_for(event_log, h.finished(two))
    await h.wait_for(event_log, h.finished(broken))
    await reporter(running, event_log, cfg)

    reports = await hooks.wait_for(3)
    assert len(reports) == 3
    assert len({r["idempotencyKey"] for r in reports}) == 3
    about = [r["message"].split(") ")[0].rsplit("(", 1)[1] for r in reports]
    assert about[0] == one
    assert sorted(about[1:]) == sorted([two, broken])  # in the order they finished
    failure = reports[about.index(broken)]["message"]
    assert f'"Greeting broken" ({broken}) failed in BUILD' in failure
    assert f"`shipyard escalate {broken} --to AGENT`" in failure


async def test_a_stale_run_is_reported(
    tmp_path: Path, event_log: EventLog, hooks: FakeHooks, running: list[Handler | OpenClawReporter]
) -> None:
    """A run with no heartbeat past stale_after is reported as STALE while it still runs."""
    cfg = with_hooks(h.settings(tmp_path, stale_after=1.0, heartbeat_interval=0.5), hooks)
    await handler(running, event_log, cfg)
    await reporter(running, event_log, cfg)
    task_id = (await Commands(event_log).dispatch(body(tmp_path, "quiet", agent="silent"))).task_id

    [report] = await hooks.wait_for(1)
    assert report["message"].startswith(f'Shipyard: "Greeting quiet" ({task_id}) is STALE')
