"""Agents working together: handoff, parallel groups, escalation and rework, end to end on a
real nats-server with real builder processes."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from shipyard.errors import CommandRejected
from shipyard.events import comms, dispatch, rework
from shipyard.events import types as t
from shipyard.events.commands import Commands
from shipyard.events.log import EventLog
from shipyard.handler.service import Handler
from shipyard.projections import queries
from shipyard.projections.projector import Projector
from shipyard.settings import HandlerSettings, Settings
from tests import handlers as h
from tests.test_handler import body, start


def with_agents(cfg: Settings, **handler: Any) -> Settings:
    """``cfg`` plus a second well-behaved agent, ``reviewer``, and handler options."""
    agents = {**cfg.agents, "reviewer": cfg.agents["ok"]}
    options = {**cfg.handler.model_dump(), **handler}
    return cfg.model_copy(update={"agents": agents, "handler": HandlerSettings(**options)})


def prompt_of(tmp: Path, task_id: str, phase: str = "build") -> str:
    return Path(f"{tmp / 'launches.txt'}.{task_id}.{phase}.prompt").read_text()


async def test_handoff_passes_the_result_and_the_directive_to_the_next_agent(
    tmp_path: Path, event_log: EventLog, handlers: list[Handler]
) -> None:
    """B `after` A starts only when A succeeded, and B's builder is told A's result summary,
    the files A changed and the directive A's dispatcher left for B's agent."""
    commands = Commands(event_log)
    a = (await commands.dispatch(body(tmp_path, "a", agent="ok"))).task_id
    b = (await commands.dispatch(body(tmp_path, "b", agent="reviewer", after=[a]))).task_id
    await comms.send(
        event_log,
        {
            "sender": "openclaw",
            "recipient": "reviewer",
            "type": "directive",
            "body": "Review hello.txt for tone before you touch it.",
            "task_id": b,
        },
    )
    await start(handlers, event_log, with_agents(h.settings(tmp_path)), "h1")

    done_b = await h.wait_for(event_log, h.finished(b))
    assert done_b.data.outcome == t.TaskState.SUCCEEDED
    done_a = await h.wait_for(event_log, h.finished(a))
    claim_b = await h.wait_for(event_log, h.of_type(b, "task_claimed"))
    assert claim_b.seq > done_a.seq, "B started before A finished"

    prompt = await asyncio.to_thread(prompt_of, tmp_path, b)
    assert "## Results of the tasks this one waited for" in prompt
    assert f"- {a} (Greeting a): succeeded" in prompt
    assert "Result: Greeting a: succeeded in" in prompt
    assert "Files it changed: " in prompt and "hello.txt" in prompt
    assert "directive from openclaw: Review hello.txt for tone" in prompt
    assert "Review hello.txt" not in await asyncio.to_thread(prompt_of, tmp_path, a)


async def test_a_parallel_group_runs_at_once_and_records_one_merged_outcome(
    tmp_path: Path, event_log: EventLog, handlers: list[Handler], projector: Projector
) -> None:
    """Tasks of one group run at the same time across two handlers; when the last ends, one
    group_finished event says which passed and which failed, and the read model shows it."""
    commands = Commands(event_log)
    cfg = h.settings(tmp_path, concurrency=2)
    await start(handlers, event_log, cfg, "left")
    await start(handlers, event_log, cfg, "right")
    ids = [
        (await commands.dispatch(body(tmp_path, name, agent=agent, group="release-1"))).task_id
        for name, agent in (("api", "ok"), ("ui", "ok"), ("docs", "fail"))
    ]
    outcome = await h.wait_for(event_log, lambda e: e.type == "group_finished")
    group: t.GroupFinished = outcome.data
    assert group.group == "release-1"
    assert group.tasks == ids
    assert sorted(group.succeeded) == sorted(ids[:2])
    assert group.failed == [ids[2]]
    assert not group.passed

    history = [e async for e in event_log.read(start=1)]
    claims = [e for e in history if e.type == "task_claimed"]
    first_finish = min(e.seq for e in history if e.type == "task_finished")
    assert all(c.seq < first_finish for c in claims), "a group task waited for another"
    assert {c.data.handler for c in claims} == {"left", "right"}
    assert sum(1 for e in history if e.type == "group_finished") == 1

    await projector.wait_for(outcome.seq)
    groups = await projector.models.run(lambda: queries.groups(projector.models.con))
    card = next(g for g in groups if g.group == "release-1")
    assert (card.total, card.succeeded, card.failed, card.state) == (3, 2, 1, "failed")
    assert card.failed_tasks == [ids[2]]


async def test_a_group_with_a_size_waits_for_all_its_tasks(
    tmp_path: Path, event_log: EventLog, handlers: list[Handler]
) -> None:
    """With ``group_size``, a group whose first task finished before the next was even
    dispatched stays open; it closes when the declared number of tasks have all finished."""
    commands = Commands(event_log)
    handler = await start(handlers, event_log, h.settings(tmp_path), "h1")
    first = (
        await commands.dispatch(body(tmp_path, "one", group="release-3", group_size=2))
    ).task_id
    done = await h.wait_for(event_log, h.finished(first))
    await handler.settled(done.seq)
    assert not [e async for e in event_log.read(subject="sy.ev.group.>")]

    second = (
        await commands.dispatch(body(tmp_path, "two", group="release-3", group_size=2))
    ).task_id
    outcome = await h.wait_for(event_log, lambda e: e.type == "group_finished")
    assert outcome.data.tasks == [first, second]
    assert outcome.data.passed


def test_group_size_needs_a_group() -> None:
    """A size without a group is refused, saying what it is for."""
    with pytest.raises(dispatch.DispatchInvalid) as refused:
        dispatch.parse({**body(Path("/tmp"), "x"), "group_size": 2})
    assert any(p.startswith("group_size: only with group") for p in refused.value.problems)


async def test_escalation_carries_what_failed_to_the_next_agent(
    tmp_path: Path, event_log: EventLog, handlers: list[Handler]
) -> None:
    """`escalate` makes a task for another agent whose CONTEXT holds the attempts, the error,
    the builder's last output and the note; a task is escalated only once."""
    commands = Commands(event_log)
    await start(handlers, event_log, h.settings(tmp_path), "h1")
    failed = (await commands.dispatch(body(tmp_path, "esc", agent="fail"))).task_id
    end = await h.wait_for(event_log, h.finished(failed))
    assert end.data.outcome == t.TaskState.FAILED

    result = await commands.escalate(failed, "ok", note="Write hello.txt first.", actor="me")
    new = result["escalated_to"]
    done = await h.wait_for(event_log, h.finished(new))
    assert done.data.outcome == t.TaskState.SUCCEEDED

    spec = (await event_log.history("task", new))[0].data
    assert (spec.escalated_from, spec.agent) == (failed, "ok")
    record = (await event_log.history("task", failed))[-1].data
    assert isinstance(record, t.TaskEscalated)
    assert (record.task_id, record.to_agent, record.from_agent) == (new, "ok", "fail")
    assert not record.automatic

    prompt = await asyncio.to_thread(prompt_of, tmp_path, new)
    assert "## Escalated to you: what went wrong before" in prompt
    assert "Attempt on fail" in prompt and "failed in BUILD" in prompt
    assert "something broke" in prompt, "the builder's last output is missing"
    assert "Note from whoever escalated it: Write hello.txt first." in prompt

    with pytest.raises(CommandRejected, match="already escalated") as again:
        await commands.escalate(failed, "reviewer")
    assert again.value.code == "conflict"
    with pytest.raises(CommandRejected, match="only a failed or cancelled task") as busy:
        await commands.escalate(new, "fail")
    assert busy.value.code == "conflict"


async def test_the_policy_escalates_a_final_failure_once_across_handlers(
    tmp_path: Path, event_log: EventLog, handlers: list[Handler]
) -> None:
    """With `escalate = {fail = "ok"}` on two handlers, a task that finally fails on `fail`
    is escalated to `ok` exactly once, marked automatic, and the new task succeeds."""
    cfg = with_agents(h.settings(tmp_path), escalate={"fail": "ok", "ok": "fail"})
    await start(handlers, event_log, cfg, "h1")
    await start(handlers, event_log, cfg, "h2")
    failed = (await Commands(event_log).dispatch(body(tmp_path, "auto", agent="fail"))).task_id

    escalated = await h.wait_for(event_log, h.of_type(failed, "task_escalated"))
    assert escalated.data.automatic and escalated.data.to_agent == "ok"
    done = await h.wait_for(event_log, h.finished(escalated.data.task_id))
    assert done.data.outcome == t.TaskState.SUCCEEDED
    trail = await event_log.history("task", failed)
    assert sum(1 for e in trail if e.type == "task_escalated") == 1


async def test_the_policy_never_loops_back_to_an_agent_in_the_chain(
    tmp_path: Path, event_log: EventLog, handlers: list[Handler]
) -> None:
    """With `escalate = {fail = "fail2", fail2 = "fail"}`, a task escalated from `fail` to
    `fail2` that fails again is not escalated back to `fail`: the chain has been there."""
    cfg = h.settings(tmp_path)
    agents = {**cfg.agents, "fail2": cfg.agents["fail"]}
    options = {**cfg.handler.model_dump(), "escalate": {"fail": "fail2", "fail2": "fail"}}
    cfg = cfg.model_copy(update={"agents": agents, "handler": HandlerSettings(**options)})
    await start(handlers, event_log, cfg, "h1")
    first = (await Commands(event_log).dispatch(body(tmp_path, "loop", agent="fail"))).task_id

    escalated = await h.wait_for(event_log, h.of_type(first, "task_escalated"))
    second = escalated.data.task_id
    end = await h.wait_for(event_log, h.finished(second))
    assert end.data.outcome == t.TaskState.FAILED
    for handler in handlers:
        await handler.settled(end.seq)
    trail = await event_log.history("task", second)
    assert not any(e.type == "task_escalated" for e in trail)


async def test_rework_writes_a_valid_fix_dispatch_from_the_failed_run(
    tmp_path: Path, event_log: EventLog, handlers: list[Handler]
) -> None:
    """The rework dispatch for a failed run is the seed's `Fix:` shape, passes validation,
    and quotes the real failure in Current State (Broken)."""
    commands = Commands(event_log)
    await start(handlers, event_log, h.settings(tmp_path), "h1")
    failed = (await commands.dispatch(body(tmp_path, "rw", agent="fail"))).task_id
    end = await h.wait_for(event_log, h.finished(failed))
    trail = await event_log.history("task", failed)

    fix = rework.fix_dispatch(trail, end.data.run_id)
    assert fix["action_name"] == fix["payload"]["task_title"] == "Fix: Greeting rw"
    assert fix["priority"] == "high"
    _, parsed = dispatch.parse(fix)
    assert parsed.rework and parsed.agent == "fail"
    assert parsed.working_dir == str(tmp_path / "work" / "rw")
    broken = dispatch.split_sections(parsed.prompt).get("Current State (Broken)") or ""
    assert f"Run {end.data.run_id} of task {failed} ended failed in BUILD" in broken
    assert "something broke" in broken
    assert "README.md" in (dispatch.split_sections(parsed.prompt).get("Deliverables") or "")

    ok = (await commands.dispatch(body(tmp_path, "fine"))).task_id
    await h.wait_for(event_log, h.finished(ok))
    with pytest.raises(CommandRejected, match="succeeded"):
        rework.fix_dispatch(await event_log.history("task", ok))
