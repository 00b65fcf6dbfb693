"""The handler on a real nats-server with real builder processes (`command` agents)."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from shipyard.events.commands import Commands
from shipyard.events.envelope import Event
from shipyard.events.log import EventLog
from shipyard.events.types import Phase, PhaseStatus, TaskState
from shipyard.handler.service import Handler
from shipyard.settings import AgentSettings, Settings
from tests import handlers as h
from tests.samples import dispatch_body

PROMPT = """## Task
Write a greeting.

## Requirements
- hello.txt says hello
- README.md explains it

## Environment
- Working directory: {workdir}
{test}

## Deliverables
1. hello.txt
2. README.md
"""


def body(
    tmp: Path, name: str, *, agent: str = "ok", test: str = "", **extra: Any
) -> dict[str, Any]:
    workdir = tmp / "work" / name
    prompt = PROMPT.format(workdir=workdir, test=f"- Test: {test}" if test else "")
    b = dispatch_body(**extra)
    b["payload"]["prompt"] = prompt
    b["agent"] = agent
    b["action_name"] = b["payload"]["task_title"] = f"Greeting {name}"
    return b


async def start(running: list[Handler], log: EventLog, cfg: Settings, name: str = "") -> Handler:
    handler = Handler(log, cfg, handler_id=name)
    await handler.start()
    running.append(handler)
    return handler


async def history(log: EventLog, task_id: str) -> list[Event[Any]]:
    return await log.history("task", task_id)


def phases(events: list[Event[Any]]) -> dict[Phase, list[PhaseStatus]]:
    out: dict[Phase, list[PhaseStatus]] = {}
    for e in events:
        if e.type == "phase_changed":
            out.setdefault(e.data.phase, []).append(e.data.status)
    return out


async def test_a_task_runs_through_all_eight_phases(
    tmp_path: Path, event_log: EventLog, handlers: list[Handler]
) -> None:
    """A dispatched task is claimed and taken through the 8 phases, each posted by the handler."""
    cfg = h.settings(tmp_path)
    await start(handlers, event_log, cfg)
    task_id = (
        await Commands(event_log).dispatch(body(tmp_path, "a", test="test -f hello.txt"))
    ).task_id

    done = await h.wait_for(event_log, h.finished(task_id))
    assert done.data.outcome == TaskState.SUCCEEDED

    events = await history(event_log, task_id)
    seen = phases(events)
    assert list(seen) == list(Phase)
    for phase in Phase:
        expected = (
            [PhaseStatus.SKIPPED]
            if phase == Phase.HEAL
            else [
                PhaseStatus.STARTED,
                PhaseStatus.SUCCEEDED,
            ]
        )
        assert seen[phase] == expected, phase
    assert all(e.actor.startswith("handler:") for e in events[1:])
    plan = next(e for e in events if e.type == "plan_recorded")
    assert plan.data.source == "requirements"
    assert plan.data.steps[:2] == ["hello.txt says hello", "README.md explains it"]
    cards = [e for e in events if e.type == "card_added"]
    assert len(cards) == len(plan.data.steps)
    moved = {e.data.card_id: e.data.column for e in events if e.type == "card_moved"}
    assert set(moved.values()) == {"done"}
    assert len(moved) == len(cards)
    check = next(e for e in events if e.type == "validation_checked")
    assert check.data.passed
    assert check.data.exit_code == 0
    report = next(e for e in events if e.type == "report_written")
    page = await asyncio.to_thread(Path(report.data.path).read_text)
    assert "Greeting a" in page
    assert "hello.txt" in page
    assert "+ hello.txt" in report.data.files_changed
    progress = [e for e in events if e.type == "work_progress"]
    assert progress[-1].data.percent == 100
    assert [p.data.percent for p in progress] == sorted(p.data.percent for p in progress)
    assert (tmp_path / "work" / "a" / "README.md").exists()


async def test_events_before_the_builder_starts_are_stored_in_the_order_they_were_made(
    tmp_path: Path, event_log: EventLog, handlers: list[Handler]
) -> None:
    """The phase changes up to BUILD go out without waiting for each acknowledgement, yet
    the log holds them in the order the handler made them, all before builder_started."""
    cfg = h.settings(tmp_path)
    await start(handlers, event_log, cfg)
    task_id = (await Commands(event_log).dispatch(body(tmp_path, "order"))).task_id
    await h.wait_for(event_log, h.finished(task_id))

    events = await history(event_log, task_id)
    upto = next(i for i, e in enumerate(events) if e.type == "builder_started")
    made = [e.time for e in events[1:]]  # stamped when made, after the dispatch
    assert made == sorted(made)
    changes = [(e.data.phase, e.data.status) for e in events[:upto] if e.type == "phase_changed"]
    assert changes == [
        (phase, status)
        for phase in (Phase.CONTEXT, Phase.PLAN, Phase.TASK_BOARD)
        for status in (PhaseStatus.STARTED, PhaseStatus.SUCCEEDED)
    ] + [(Phase.BUILD, PhaseStatus.STARTED)]
    kinds = [e.type for e in events[:upto]]
    assert kinds.index("plan_recorded") < kinds.index("card_added")
    assert kinds.count("work_progress") == len(changes)


async def test_validation_failure_is_healed(
    tmp_path: Path, event_log: EventLog, handlers: list[Handler]
) -> None:
    """VALIDATE fails, HEAL resumes the builder with the failure, VALIDATE then passes."""
    await start(handlers, event_log, h.settings(tmp_path))
    task_id = (
        await Commands(event_log).dispatch(
            body(tmp_path, "heal", agent="heal-once", test="grep -q healed hello.txt")
        )
    ).task_id
    done = await h.wait_for(event_log, h.finished(task_id))
    assert done.data.outcome == TaskState.SUCCEEDED
    events = await history(event_log, task_id)
    seen = phases(events)
    assert seen[Phase.VALIDATE] == [PhaseStatus.STARTED, PhaseStatus.FAILED]
    assert seen[Phase.HEAL] == [PhaseStatus.STARTED, PhaseStatus.SUCCEEDED]
    checks = [e.data for e in events if e.type == "validation_checked"]
    assert [(c.round, c.passed) for c in checks] == [(0, False), (1, True)]
    assert "hello.txt" in checks[0].missing
    report = next(e for e in events if e.type == "report_written")
    assert report.data.heal_rounds == 1
    assert [p for _, p, _ in h.launches(tmp_path)] == ["build", "heal"]


async def test_a_failing_builder_fails_the_run_with_its_error(
    tmp_path: Path, event_log: EventLog, handlers: list[Handler]
) -> None:
    """A builder that exits non-zero fails BUILD; later work phases are skipped, REPORT and
    CLOSE still run, and the task fails with the builder's error."""
    await start(handlers, event_log, h.settings(tmp_path))
    task_id = (await Commands(event_log).dispatch(body(tmp_path, "f", agent="fail"))).task_id
    done = await h.wait_for(event_log, h.finished(task_id))
    assert done.data.outcome == TaskState.FAILED
    assert done.data.reason == "builder_error"
    events = await history(event_log, task_id)
    seen = phases(events)
    assert seen[Phase.BUILD][-1] == PhaseStatus.FAILED
    assert seen[Phase.VALIDATE] == [PhaseStatus.SKIPPED]
    assert seen[Phase.HEAL] == [PhaseStatus.SKIPPED]
    assert seen[Phase.REPORT][-1] == PhaseStatus.SUCCEEDED
    assert seen[Phase.CLOSE][-1] == PhaseStatus.SUCCEEDED
    finished_run = next(e for e in events if e.type == "run_finished")
    assert finished_run.data.phase == Phase.BUILD
    assert "something broke" in finished_run.data.error
    moved = {e.data.column for e in events if e.type == "card_moved"}
    assert moved == {"failed"}


async def test_a_workdir_outside_the_roots_is_refused_before_any_builder_starts(
    tmp_path: Path, event_log: EventLog, handlers: list[Handler]
) -> None:
    """CONTEXT refuses a working directory outside the configured roots; nothing is launched."""
    await start(handlers, event_log, h.settings(tmp_path))
    b = body(tmp_path, "x")
    b["payload"]["prompt"] = b["payload"]["prompt"].replace(str(tmp_path / "work" / "x"), "/etc")
    task_id = (await Commands(event_log).dispatch(b)).task_id
    done = await h.wait_for(event_log, h.finished(task_id))
    assert done.data.outcome == TaskState.FAILED
    assert done.data.reason == "workdir_refused"
    assert h.launches(tmp_path) == []
    assert phases(await history(event_log, task_id))[Phase.CONTEXT][-1] == PhaseStatus.FAILED


async def test_symlink_escape_is_refused(
    tmp_path: Path, event_log: EventLog, handlers: list[Handler]
) -> None:
    """A working directory that is a symlink out of the roots is refused."""
    await start(handlers, event_log, h.settings(tmp_path))
    (tmp_path / "work" / "link").symlink_to("/etc")
    task_id = (await Commands(event_log).dispatch(body(tmp_path, "link"))).task_id
    done = await h.wait_for(event_log, h.finished(task_id))
    assert done.data.reason == "workdir_refused"
    assert h.launches(tmp_path) == []


async def test_dependants_wait_for_their_prerequisites(
    tmp_path: Path, event_log: EventLog, handlers: list[Handler]
) -> None:
    """`after` holds a task until its prerequisite succeeds; a failed prerequisite fails it."""
    commands = Commands(event_log)
    first = (await commands.dispatch(body(tmp_path, "first"))).task_id
    second = (await commands.dispatch(body(tmp_path, "second", after=[first]))).task_id
    broken = (await commands.dispatch(body(tmp_path, "broken", agent="fail"))).task_id
    orphan = (await commands.dispatch(body(tmp_path, "orphan", after=[broken]))).task_id
    await start(handlers, event_log, h.settings(tmp_path))

    done = await h.wait_for(event_log, h.finished(second))
    assert done.data.outcome == TaskState.SUCCEEDED
    first_done = await h.wait_for(event_log, h.finished(first))
    second_claim = await h.wait_for(event_log, h.of_type(second, "task_claimed"))
    assert second_claim.seq > first_done.seq
    lost = await h.wait_for(event_log, h.finished(orphan))
    assert lost.data.outcome == TaskState.FAILED
    assert lost.data.reason == f"prerequisite {broken} failed"
    assert orphan not in {task for task, _, _ in h.launches(tmp_path)}


async def test_claims_follow_priority_then_age(
    tmp_path: Path, event_log: EventLog, handlers: list[Handler]
) -> None:
    """With one slot, queued tasks run urgent > high > normal > low, oldest first."""
    commands = Commands(event_log)
    order = [("low", "l1"), ("normal", "n1"), ("urgent", "u1"), ("high", "h1"), ("urgent", "u2")]
    ids = {}
    for priority, name in order:
        ids[name] = (await commands.dispatch(body(tmp_path, name, priority=priority))).task_id
    await start(handlers, event_log, h.settings(tmp_path, concurrency=1))
    await h.wait_for(event_log, h.finished(ids["l1"]), timeout=60)
    launched = [task for task, phase, _ in h.launches(tmp_path) if phase == "build"]
    assert launched == [ids[n] for n in ("u1", "u2", "h1", "n1", "l1")]


async def test_cancel_stops_a_running_builder_and_its_whole_group(
    tmp_path: Path, event_log: EventLog, handlers: list[Handler]
) -> None:
    """`cancel` on a running task kills its builder's process group and closes it cancelled."""
    await start(handlers, event_log, h.settings(tmp_path))
    commands = Commands(event_log)
    task_id = (await commands.dispatch(body(tmp_path, "slow", agent="slow"))).task_id
    started = await h.wait_for(
        event_log, lambda e: e.aggregate_id == task_id and e.type == "builder_started"
    )
    pgid = started.data.pgid
    assert (await commands.cancel(task_id, reason="changed my mind"))["state"] == "cancelling"
    done = await h.wait_for(event_log, h.finished(task_id), timeout=10)
    assert done.data.outcome == TaskState.CANCELLED
    assert done.data.reason == "changed my mind"
    assert (done.time - started.time).total_seconds() < 5
    with pytest.raises(ProcessLookupError):
        os.killpg(pgid, 0)


async def test_cancel_a_queued_task_and_retry_it(
    tmp_path: Path, event_log: EventLog, handlers: list[Handler]
) -> None:
    """A queued task is cancelled at once; retry queues it again as attempt 2, which runs."""
    commands = Commands(event_log)
    task_id = (await commands.dispatch(body(tmp_path, "q"))).task_id
    assert (await commands.cancel(task_id))["state"] == "cancelled"
    await start(handlers, event_log, h.settings(tmp_path))
    assert (await commands.retry(task_id))["attempt"] == 2
    claim = await h.wait_for(event_log, h.of_type(task_id, "task_claimed"))
    assert claim.data.attempt == 2
    done = await h.wait_for(event_log, h.finished(task_id), start=claim.seq)
    assert done.data.outcome == TaskState.SUCCEEDED
    types = [e.type for e in await history(event_log, task_id)]
    assert types[:3] == ["task_dispatched", "task_finished", "task_requeued"]


async def test_a_silent_builder_goes_stale_then_fails_and_is_killed(
    tmp_path: Path, event_log: EventLog, handlers: list[Handler]
) -> None:
    """No heartbeat for stale_after: STALE; for failed_after: FAILED (agent_silent); the
    builder's whole group is killed."""
    cfg = h.settings(tmp_path, heartbeat_interval=0.2, stale_after=1.0, failed_after=2.0)
    await start(handlers, event_log, cfg)
    task_id = (await Commands(event_log).dispatch(body(tmp_path, "quiet", agent="silent"))).task_id
    started = await h.wait_for(event_log, h.of_type(task_id, "builder_started"))
    stale = await h.wait_for(event_log, h.of_type(task_id, "run_stale"))
    assert stale.data.silent_for >= 1.0
    ended = await h.wait_for(event_log, h.of_type(task_id, "run_finished"))
    assert ended.data.outcome == TaskState.FAILED
    assert ended.data.reason == "agent_silent"
    done = await h.wait_for(event_log, h.finished(task_id))
    assert done.data.reason == "agent_silent"
    child_file = Path(str(tmp_path / "launches.txt") + ".child")
    child = int(await asyncio.to_thread(child_file.read_text))
    for pid in (started.data.pid, child):
        assert await _gone(pid), f"process {pid} outlived its run"


async def _gone(pid: int, timeout: float = 5.0) -> bool:
    """Whether ``pid`` has exited within ``timeout`` (polled via pidfd readiness)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    loop = asyncio.get_running_loop()
    ready = loop.create_future()
    loop.add_reader(fd, lambda: ready.done() or ready.set_result(True))
    try:
        await asyncio.wait_for(ready, timeout)
        return True
    except TimeoutError:
        return False
    finally:
        loop.remove_reader(fd)
        os.close(fd)


async def test_two_handlers_run_each_of_thirty_tasks_exactly_once(
    tmp_path: Path, event_log: EventLog, handlers: list[Handler]
) -> None:
    """Two handlers racing over 30 queued tasks: every task's builder is launched once."""
    commands = Commands(event_log)
    ids = [(await commands.dispatch(body(tmp_path, f"m{i}"))).task_id for i in range(30)]
    cfg = h.settings(tmp_path, concurrency=4)
    one = await start(handlers, event_log, cfg, "one")
    two = await start(handlers, event_log, cfg, "two")
    for task_id in ids:
        done = await h.wait_for(event_log, h.finished(task_id), timeout=120)
        assert done.data.outcome == TaskState.SUCCEEDED
    builds = [task for task, phase, _ in h.launches(tmp_path) if phase == "build"]
    assert sorted(builds) == sorted(ids)
    assert one.launches + two.launches == 30
    assert one.launches > 0
    assert two.launches > 0


async def test_stale_lock_on_the_run_of_a_vanished_handler_is_failed_as_handler_lost(
    tmp_path: Path, event_log: EventLog, handlers: list[Handler]
) -> None:
    """A run whose handler stopped heartbeating is failed as handler_lost and retried."""
    cfg = h.settings(
        tmp_path, heartbeat_interval=0.2, stale_after=1.0, failed_after=2.0, max_attempts=2
    )
    doomed = Handler(event_log, cfg, handler_id="doomed")
    await doomed.start()
    task_id = (await Commands(event_log).dispatch(body(tmp_path, "lost", agent="slow"))).task_id
    started = await h.wait_for(event_log, h.of_type(task_id, "builder_started"))
    # The handler vanishes without a word: its loops stop, its builder is killed by the guard
    # as if its process had died.
    for loop in doomed._loops:
        loop.cancel()
    os.killpg(started.data.pgid, signal.SIGKILL)
    for run in list(doomed._run_tasks):
        run.cancel()
    await start(handlers, event_log, cfg, "survivor")
    ended = await h.wait_for(event_log, h.of_type(task_id, "run_finished"), timeout=15)
    assert ended.data.reason == "handler_lost"
    assert ended.actor == "handler:survivor"
    requeued = await h.wait_for(event_log, h.of_type(task_id, "task_requeued"))
    assert requeued.data.attempt == 2
    claim = await h.wait_for(
        event_log, lambda e: h.of_type(task_id, "task_claimed")(e) and e.data.attempt == 2
    )
    assert claim.data.handler == "survivor"


async def test_codex_builder_runs_through_the_pipeline(
    tmp_path: Path, event_log: EventLog, handlers: list[Handler]
) -> None:
    """A `codex` agent (a stand-in printing codex's JSONL) builds; its todo_list moves the
    cards and its usage is counted."""
    cfg = h.settings(tmp_path)
    fake = str(Path(__file__).parent / "builders" / "fake_codex.py")
    agents = {**cfg.agents, "codex": AgentSettings(kind="codex", binary=fake)}
    cfg = cfg.model_copy(update={"agents": agents})
    await start(handlers, event_log, cfg)
    task_id = (await Commands(event_log).dispatch(body(tmp_path, "cx", agent="codex"))).task_id
    done = await h.wait_for(event_log, h.finished(task_id))
    assert done.data.outcome == TaskState.SUCCEEDED, done.data.reason
    events = await history(event_log, task_id)
    plan = next(e.data for e in events if e.type == "plan_recorded")
    assert plan.source == "requirements"
    moves = [e.data.column for e in events if e.type == "card_moved"]
    assert "done" in moves
    report = next(e.data for e in events if e.type == "report_written")
    assert report.turns == 1
    progress = [e.data for e in events if e.type == "work_progress"]
    assert max(p.tokens_in for p in progress) == 1200


async def test_concurrency_limits_runs_per_handler(
    tmp_path: Path, event_log: EventLog, handlers: list[Handler]
) -> None:
    """With handler concurrency 2, no more than two runs are open at any moment."""
    commands = Commands(event_log)
    ids = [(await commands.dispatch(body(tmp_path, f"c{i}", agent="ok"))).task_id for i in range(5)]
    await start(handlers, event_log, h.settings(tmp_path, concurrency=2))
    for task_id in ids:
        await h.wait_for(event_log, h.finished(task_id), timeout=60)
    open_runs = peak = 0
    async for event in event_log.read():
        if event.type == "task_claimed":
            open_runs += 1
        elif event.type == "run_finished":
            open_runs -= 1
        peak = max(peak, open_runs)
    assert peak == 2


async def test_a_builder_past_its_wall_clock_limit_is_killed(
    tmp_path: Path, event_log: EventLog, handlers: list[Handler]
) -> None:
    """A builder still running at handler.builder_timeout is killed; the run fails as such."""
    await start(handlers, event_log, h.settings(tmp_path, builder_timeout=1.0))
    task_id = (await Commands(event_log).dispatch(body(tmp_path, "wall", agent="slow"))).task_id
    started = await h.wait_for(event_log, h.of_type(task_id, "builder_started"))
    done = await h.wait_for(event_log, h.finished(task_id), timeout=20)
    assert done.data.reason == "builder_timeout"
    assert await _gone(started.data.pid)


async def test_a_status_request_is_answered_by_the_handler_once(
    tmp_path: Path, event_log: EventLog, handlers: list[Handler]
) -> None:
    """A status_request about a running task gets one status_response with its live phase
    and percent, from the handler (the sandboxed builder is not asked), even with two
    handlers following the log."""
    from shipyard.events import comms

    cfg = h.settings(tmp_path)
    await start(handlers, event_log, cfg, "first")
    await start(handlers, event_log, cfg, "second")
    task_id = (await Commands(event_log).dispatch(body(tmp_path, "st", agent="slow"))).task_id
    await h.wait_for(event_log, h.of_type(task_id, "builder_started"))
    asked = await comms.send(
        event_log,
        {
            "sender": "openclaw",
            "recipient": "slow",
            "type": "status_request",
            "body": "How is it going?",
            "task_id": task_id,
        },
    )
    answer = await h.wait_for(
        event_log,
        lambda e: e.type == "message_sent" and e.data.type == "status_response",
        start=asked["seq"],
    )
    assert answer.aggregate_id == asked["thread_id"]
    assert answer.data.reply_to == asked["message_id"]
    assert answer.data.recipient == "openclaw"
    assert "is running" in answer.data.body
    assert "BUILD" in answer.data.body
    assert "%" in answer.data.body
    assert answer.actor.startswith("handler:")
    await Commands(event_log).cancel(task_id)
    await h.wait_for(event_log, h.finished(task_id))
    thread = await event_log.history("thread", asked["thread_id"])
    assert [e.data.type for e in thread] == ["status_request", "status_response"]


async def test_unread_directives_reach_the_builder_at_context_and_are_marked_read(
    tmp_path: Path, event_log: EventLog, handlers: list[Handler]
) -> None:
    """A directive sent to the builder's agent before its task runs is put into the
    builder's prompt at CONTEXT and then marked read for that agent."""
    from shipyard.events import comms

    sent = await comms.send(
        event_log,
        {"sender": "openclaw", "recipient": "ok", "type": "directive", "body": "Use tabs."},
    )
    await start(handlers, event_log, h.settings(tmp_path))
    task_id = (await Commands(event_log).dispatch(body(tmp_path, "dir"))).task_id
    done = await h.wait_for(event_log, h.finished(task_id))
    assert done.data.outcome == TaskState.SUCCEEDED
    prompt_file = Path(f"{tmp_path / 'launches.txt'}.{task_id}.build.prompt")
    prompt = await asyncio.to_thread(prompt_file.read_text)
    assert "directive from openclaw: Use tabs." in prompt
    receipts = [
        e.data
        for e in await event_log.history("thread", sent["thread_id"])
        if e.type == "message_read"
    ]
    assert [(r.message_id, r.reader) for r in receipts] == [(sent["message_id"], "ok")]
    context = next(
        e.data
        for e in await history(event_log, task_id)
        if e.type == "phase_changed" and e.data.phase == Phase.CONTEXT and e.data.result
    )
    assert "1 message(s) for ok" in context.result
