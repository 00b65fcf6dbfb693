"""Read models in DuckDB, projected from real events on the real nats-server."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import subprocess
import sys
from array import array
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar

import msgspec
import pytest

from shipyard.embedded import EmbeddedNats
from shipyard.errors import UnknownEventType
from shipyard.events import types as t
from shipyard.events.commands import Commands
from shipyard.events.envelope import Event, encode, make
from shipyard.events.log import EventLog
from shipyard.events.types import REGISTRY, TaskDispatched
from shipyard.handler.service import Handler
from shipyard.projections import queries, rebuild, worker
from shipyard.projections.projector import Projector, ReadModels, Status, build
from shipyard.projections.service import PROGRESS_SUBJECT, ask
from tests import handlers as h
from tests.test_handler import body


async def q(proj: Projector, fn: Any, *args: Any, **kwargs: Any) -> Any:
    return await proj.models.run(lambda: fn(proj.models.con, *args, **kwargs))


async def settle(proj: Projector, log: EventLog) -> None:
    await asyncio.wait_for(proj.wait_for(await log.stream_last_seq()), 30)


async def mixed_workload(tmp: Path, log: EventLog) -> dict[str, str]:
    """Dispatches, runs that pass, heal and fail, a cancel, a dependant, a rejection."""
    commands = Commands(log)
    ids = {
        "ok": (await commands.dispatch(body(tmp, "ok", test="test -f hello.txt"))).task_id,
        "heal": (
            await commands.dispatch(
                body(tmp, "heal", agent="heal-once", test="grep -q healed hello.txt")
            )
        ).task_id,
        "fail": (await commands.dispatch(body(tmp, "fail", agent="fail"))).task_id,
    }
    ids["after"] = (await commands.dispatch(body(tmp, "after", after=[ids["ok"]]))).task_id
    ids["orphan"] = (await commands.dispatch(body(tmp, "orphan", after=[ids["fail"]]))).task_id
    ids["cancel"] = (await commands.dispatch(body(tmp, "cancel", after=[ids["ok"]]))).task_id
    await commands.cancel(ids["cancel"], reason="not needed")
    with pytest.raises(Exception, match="dispatch rejected"):
        await commands.dispatch({"payload": {"prompt": "## Task\nx", "dispatcher": "d"}})
    handler = Handler(log, h.settings(tmp))
    await handler.start()
    try:
        for key in ("ok", "heal", "fail", "after", "orphan"):
            await h.wait_for(log, h.finished(ids[key]), timeout=60)
    finally:
        await handler.stop()
    return ids


async def test_every_read_model_reflects_a_mixed_workload(
    tmp_path: Path, event_log: EventLog, projector: Projector
) -> None:
    """Tasks, runs, phases, Build History, activity, Kanban, agents and handlers all show
    what the log says after dispatches, passes, heals, failures, a cancel and a rejection."""
    ids = await mixed_workload(tmp_path, event_log)
    await settle(projector, event_log)

    page = await q(projector, queries.history)
    by_task = {r.task_id: r for r in page.rows}
    assert page.total == 4
    assert by_task[ids["ok"]].outcome == "succeeded"
    assert by_task[ids["ok"]].phase_results == [
        "succeeded", "succeeded", "succeeded", "succeeded", "succeeded", "skipped",
        "succeeded", "succeeded",
    ]  # fmt: skip
    assert by_task[ids["heal"]].heal_rounds == 1
    assert by_task[ids["heal"]].phase_results[4:6] == ["failed", "succeeded"]
    assert by_task[ids["fail"]].outcome == "failed"
    assert by_task[ids["fail"]].phase_results[3] == "failed"
    assert by_task[ids["ok"]].duration_s > 0

    failed = await q(projector, queries.history, outcome="failed")
    assert [r.task_id for r in failed.rows] == [ids["fail"]]

    detail = await q(projector, queries.task, ids["heal"])
    assert detail.task.state == "succeeded"
    run = detail.runs[0]
    assert [p.phase for p in run.phases] == [p.value for p in t.Phase]
    assert [(v.round, v.passed) for v in run.validations] == [(0, False), (1, True)]
    assert run.report_path.endswith(".html")
    assert run.plan_source == "requirements"

    orphan = await q(projector, queries.task, ids["orphan"])
    assert orphan.task.state == "failed"
    assert orphan.task.reason == f"prerequisite {ids['fail']} failed"
    cancelled = await q(projector, queries.task, ids["cancel"])
    assert cancelled.task.state == "cancelled"

    cards = await q(projector, queries.kanban)
    task_cards = {c.task_id: c.column for c in cards if c.kind == "task"}
    assert task_cards[ids["ok"]] == "done"
    assert task_cards[ids["fail"]] == "failed"
    steps = [c for c in cards if c.kind == "step" and c.task_id == ids["ok"]]
    assert steps
    assert {c.column for c in steps} == {"done"}
    assert all(c.parent == ids["ok"] for c in steps)

    activity = await q(projector, queries.activity, limit=500)
    kinds = {a.kind for a in activity}
    assert {"task_dispatched", "task_claimed", "phase_changed", "run_finished"} <= kinds
    assert "dispatch_rejected" in kinds
    assert "work_progress" not in kinds
    only_fail = await q(projector, queries.activity, task_id=ids["fail"])
    assert {a.task_id for a in only_fail} == {ids["fail"]}

    agents = {a.name: a for a in await q(projector, queries.agents)}
    assert agents["ok"].succeeded >= 2
    assert agents["fail"].failed == 1
    assert agents["ok"].current_runs == []
    assert len(await q(projector, queries.handlers)) == 1
    summary = await q(projector, queries.summary)
    assert summary.live == []
    assert summary.tasks_by_state["failed"] == 2


async def test_blocked_tasks_show_as_blocked_until_their_prerequisite_succeeds(
    tmp_path: Path, event_log: EventLog, projector: Projector
) -> None:
    """A task waiting on an unfinished prerequisite is in the Kanban's blocked column."""
    commands = Commands(event_log)
    first = (await commands.dispatch(body(tmp_path, "first"))).task_id
    second = (await commands.dispatch(body(tmp_path, "second", after=[first]))).task_id
    await settle(projector, event_log)
    columns = {c.task_id: c.column for c in await q(projector, queries.kanban)}
    assert columns == {first: "queued", second: "blocked"}
    blocked = await q(projector, queries.tasks, state="blocked")
    assert [r.task_id for r in blocked] == [second]
    summary = await q(projector, queries.summary)
    assert summary.queue_depth["normal"] == 2


async def test_replay_is_deterministic_and_equals_the_live_projection(
    tmp_path: Path, event_log: EventLog, projector: Projector
) -> None:
    """Two replays of a mixed workload are identical, table by table, and equal the live
    projection that followed the log in small batches; so does a rebuild in a worker."""
    await mixed_workload(tmp_path, event_log)
    await settle(projector, event_log)
    live = await projector.models.run(projector.models.digests_sync)
    one = await build(event_log, tmp_path / "one.duckdb", stop=projector.applied)
    two = await build(event_log, tmp_path / "two.duckdb", stop=projector.applied)
    three = await build(event_log, tmp_path / "3.duckdb", stop=projector.applied, worker=True)
    try:
        first = await one.run(one.digests_sync)
        second = await two.run(two.digests_sync)
        third = await three.run(three.digests_sync)
    finally:
        await one.close()
        await two.close()
        await three.close()
    assert first == second
    assert first == live
    assert third == live
    assert int(first["history"].split(":")[0]) == 4


async def test_history_pages_through_runs_newest_first(
    tmp_path: Path, event_log: EventLog, projector: Projector
) -> None:
    """Build History pages with a cursor, newest first, and counts the whole filter."""
    for i in range(7):
        run_id = f"r-page{i}"
        task_id = f"t-page{i}"
        data: list[t.EventData] = [
            TaskDispatched(title=f"page {i}", prompt="p", dispatcher="d"),
            t.TaskClaimed(run_id=run_id, handler="h", agent="a"),
            t.RunFinished(run_id=run_id, outcome=t.TaskState.SUCCEEDED),
        ]
        events = [make(d, aggregate_id=task_id, actor="tests") for d in data]
        await event_log.append_batch(events)
    await settle(projector, event_log)
    first = await q(projector, queries.history, limit=3)
    assert [r.title for r in first.rows] == ["page 6", "page 5", "page 4"]
    assert first.total == 7
    second = await q(projector, queries.history, limit=3, before=first.next_before)
    assert [r.title for r in second.rows] == ["page 3", "page 2", "page 1"]
    last = await q(projector, queries.history, limit=3, before=second.next_before)
    assert [r.title for r in last.rows] == ["page 0"]
    assert last.next_before == ""
    found = await q(projector, queries.history, search="PAGE 2")
    assert [r.title for r in found.rows] == ["page 2"]


def every_event_type() -> list[list[Event[Any]]]:
    """A log that holds every event type, in groups the live projector applies one at a
    time: two attempts of a task (a failed run that went stale and healed, then a pass),
    late events after a run closed, a receipt read twice, a cancel, an escalation, a
    group's outcome, a claim of a task nobody dispatched, a rejection, heartbeats, an alert."""
    P, S, ts = t.Phase, t.PhaseStatus, t.TaskState
    clock = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)

    def ev(aggregate_id: str, data: t.EventData) -> Event[Any]:
        nonlocal clock
        clock += timedelta(seconds=7, microseconds=123)
        return make(data, aggregate_id=aggregate_id, actor="tests", at=clock)

    def phase(run: str, ph: t.Phase, status: t.PhaseStatus, **kw: Any) -> Event[Any]:
        return ev("t-a", t.PhaseChanged(run_id=run, phase=ph, status=status, **kw))

    def dispatched(title: str, **kw: Any) -> t.TaskDispatched:
        return t.TaskDispatched(title=title, prompt="p", dispatcher="openclaw", **kw)

    groups = [
        [
            ev("t-a", dispatched("A", group="g1", agent="claude", priority=t.Priority.HIGH)),
            ev("t-b", dispatched("B", group="g1", after=["t-a"], working_dir="/srv/b")),
            ev("x-1", t.DispatchRejected(command="dispatch", problems=["no ## Task", "no env"])),
            ev("h-1", t.HandlerHeartbeat(host="build-1", pid=42, capacity=2)),
            ev("t-a", t.TaskClaimed(run_id="r-a1", handler="h-1", agent="claude")),
            ev("t-a", t.BuilderStarted(run_id="r-a1", phase=P.PLAN, host="b", pid=9, pgid=9)),
            phase("r-a1", P.CONTEXT, S.STARTED, action="gathering"),
            phase("r-a1", P.CONTEXT, S.SUCCEEDED, result="5 sections"),
            ev("t-a", t.WorkProgress(run_id="r-a1", phase=P.PLAN, percent=10, blockers=["x"])),
            ev("t-a", t.PlanRecorded(run_id="r-a1", source="builder", steps=["one", "two"])),
        ],
        [
            ev("t-a", t.CardAdded(run_id="r-a1", card_id="c-1", title="one", position=0)),
            ev("t-a", t.CardAdded(run_id="r-a1", card_id="c-2", title="two", position=1)),
            ev("t-a", t.CardMoved(run_id="r-a1", card_id="c-1", column="in_progress")),
            ev(
                "t-a",
                t.ValidationChecked(
                    run_id="r-a1",
                    round=0,
                    passed=False,
                    missing=["README.md"],
                    command="pytest",
                    exit_code=1,
                    output="1 failed",
                ),
            ),
            phase("r-a1", P.VALIDATE, S.FAILED, result="README.md missing"),
            phase("r-a1", P.HEAL, S.STARTED, action="round 1"),
            ev("t-a", t.RunStale(run_id="r-a1", silent_for=600.0, detected_by="watchdog")),
            ev(
                "th-1",
                t.MessageSent(
                    message_id="m-1",
                    sender="claude",
                    recipient="openclaw",
                    type=t.MessageType.QUESTION,
                    body="Behind a flag?",
                    task_id="t-a",
                ),
            ),
            ev("th-1", t.MessageRead(message_id="m-1", reader="openclaw")),
            ev("h-1", t.HandlerHeartbeat(host="build-1", pid=42, runs=["r-a1"], capacity=2)),
        ],
        [
            ev("th-1", t.MessageRead(message_id="m-1", reader="openclaw")),  # the first stands
            ev("t-a", t.WorkProgress(run_id="r-a1", phase=P.HEAL, percent=60, turns=7)),
            ev(
                "t-a",
                t.ReportWritten(
                    run_id="r-a1",
                    path="/r/a1.html",
                    summary="still failing",
                    files_changed=["a.py"],
                    heal_rounds=1,
                ),
            ),
            ev(
                "t-a",
                t.RunFinished(
                    run_id="r-a1",
                    outcome=ts.FAILED,
                    reason="validation_failed",
                    phase=P.HEAL,
                    error="E" * 2500,
                ),
            ),
            ev("t-a", t.TaskRequeued(attempt=2, reason="retry")),
            ev("t-a", t.TaskClaimed(run_id="r-a2", handler="h-1", agent="claude", attempt=2)),
            phase("r-a2", P.BUILD, S.STARTED, action="b" * 2500),
            ev("t-a", t.RunFinished(run_id="r-a2", outcome=ts.SUCCEEDED, summary="done")),
            ev("t-a", t.TaskFinished(outcome=ts.SUCCEEDED, run_id="r-a2")),
            ev(
                "th-1",
                t.MessageSent(
                    message_id="m-2",
                    sender="openclaw",
                    recipient=t.EVERYONE,
                    type=t.MessageType.COMMENT,
                    body="No flag.",
                    reply_to="m-1",
                ),
            ),
            ev("al-1", t.AlertDelivered(channel="telegram", target="42", source_event="e-1")),
        ],
        [
            ev("t-a", t.WorkProgress(run_id="r-a2", phase=P.CLOSE, percent=100)),  # late
            ev("t-a", t.CardMoved(run_id="r-a1", card_id="c-2", column="done")),  # late
            phase("r-a1", P.REPORT, S.STARTED, action="too late"),
            ev("t-b", t.TaskCancelRequested(reason="not needed")),
            ev("t-b", t.TaskFinished(outcome=ts.CANCELLED, reason="cancelled")),
            ev("t-b", t.TaskEscalated(task_id="t-c", to_agent="codex", from_agent="claude")),
            ev("t-c", dispatched("C", agent="codex", escalated_from="t-b")),
            ev("t-c", t.TaskClaimed(run_id="r-c1", handler="h-2", agent="codex")),
            ev("t-c", t.RunFinished(run_id="r-c1", outcome=ts.CANCELLED, reason="cancelled")),
            ev(
                "gr-1",
                t.GroupFinished(
                    group="g1", tasks=["t-a", "t-b"], succeeded=["t-a"], cancelled=["t-b"]
                ),
            ),
            ev("t-ghost", t.TaskClaimed(run_id="r-ghost", handler="h-1", agent="claude")),
        ],
    ]
    assert {e.type for g in groups for e in g} == set(REGISTRY.names())
    return groups


async def test_a_rebuild_in_a_worker_equals_the_live_projection_over_every_event_type(
    tmp_path: Path, event_log: EventLog, projector: Projector
) -> None:
    """A log with every event type, projected live a group at a time, gives the same
    tables as a replay in this process and as rebuilds in a worker process: with the
    worker's rows held for the whole rebuild, and with them written out and loaded back
    every few events."""
    for group in every_event_type():
        for event in group:
            await event_log.append(event)
        await settle(projector, event_log)
    live = await projector.models.run(projector.models.digests_sync)
    stop = projector.applied

    async def digests(models: ReadModels) -> dict[str, str]:
        try:
            return await models.run(models.digests_sync)
        finally:
            await models.close()

    here = await digests(await build(event_log, tmp_path / "here.duckdb", worker=False))
    held = await digests(await build(event_log, tmp_path / "held.duckdb", worker=True))
    spilled = []
    # Rows written out and dropped after every chunk, or after every few: chunks in between
    # touch rows that memory holds newer than the database does.
    for chunk, cap in (("1", "1"), ("2", "12")):
        path = tmp_path / f"spilled-{chunk}-{cap}.duckdb"
        report = await rebuild.rebuild(
            event_log, path, stop, worker_args=["--chunk", chunk, "--row-cap", cap]
        )
        assert report.seq == stop
        models = ReadModels(path)
        await models.open()
        spilled.append(await digests(models))

    assert here == live
    assert held == live
    assert spilled == [live, live]
    rows = {table: int(digest.split(":")[0]) for table, digest in live.items()}
    assert rows["history"] == 3  # r-a1, r-a2, r-c1; the ghost task's claim made nothing
    assert rows["message_reads"] == 1
    assert rows["cards"] == 2
    assert rows["activity"] > 20


def test_a_worker_whose_input_stops_short_commits_nothing(tmp_path: Path) -> None:
    """Frames that end without their end frame (the receiving process is gone) make the
    worker stop with an error and leave no checkpoint; with the end frame it applies them."""
    payload = encode(
        make(TaskDispatched(title="x", prompt="p", dispatcher="d"), aggregate_id="t-1", actor="x")
    )
    whole = worker.frame(array("q", [1]), [payload])
    for name, cut in (("none", whole), ("half", whole[:-5])):
        with pytest.raises(EOFError):
            worker.work(str(tmp_path / f"{name}.duckdb"), io.BytesIO(cut))
        models = ReadModels(tmp_path / f"{name}.duckdb")
        models.open_sync()
        assert models.checkpoint_sync() == 0
        models.close_sync()
    assert worker.work(str(tmp_path / "ok.duckdb"), io.BytesIO(whole + worker.END)) == 1


async def test_an_unknown_event_type_stops_a_rebuild_in_a_worker_as_it_does_here(
    tmp_path: Path, event_log: EventLog
) -> None:
    """An event of a type this release does not know fails a rebuild, in a worker or not,
    with the message that says to upgrade."""
    await event_log.append(
        make(TaskDispatched(title="x", prompt="p", dispatcher="d"), aggregate_id="t-1", actor="x")
    )
    future = {
        "id": "e-future", "type": "from_the_future", "v": 1, "aggregate": "task",
        "aggregate_id": "t-1", "time": "2026-01-01T00:00:00Z", "actor": "x", "data": {},
    }  # fmt: skip
    await event_log.js.publish("sy.ev.task.t-1.from_the_future", json.dumps(future).encode())
    for in_worker in (False, True):
        with pytest.raises(UnknownEventType, match="upgrade Shipyard"):
            await build(event_log, tmp_path / f"{in_worker}.duckdb", worker=in_worker)


async def test_a_worker_that_fails_says_why(tmp_path: Path, event_log: EventLog) -> None:
    """A worker that exits early fails the rebuild with its last words, without waiting
    for the rest of the log."""
    await event_log.append(
        make(TaskDispatched(title="x", prompt="p", dispatcher="d"), aggregate_id="t-1", actor="x")
    )
    with pytest.raises(rebuild.RebuildFailed, match="invalid int value"):
        await rebuild.rebuild(
            event_log, tmp_path / "x.duckdb", stop=5, worker_args=["--row-cap", "many"]
        )


class DispatchedV2(TaskDispatched, frozen=True, kw_only=True):
    """A later schema of task_dispatched, for the test: the title now has a label."""

    VERSION: ClassVar[int] = 2

    label: str = ""


async def test_an_old_event_version_replays_through_its_upcaster(
    tmp_path: Path, event_log: EventLog
) -> None:
    """A v1 task_dispatched written by an old release projects correctly once the current
    version is 2: the upcaster fills the new field, and the read model shows both."""
    old = TaskDispatched(title="old one", prompt="p", dispatcher="d")
    await event_log.append(make(old, aggregate_id="t-old", actor="old-release"))
    registry = REGISTRY.copy()
    registry.register(DispatchedV2)

    @registry.upcaster("task_dispatched", 1)
    def _label(data: dict[str, Any]) -> dict[str, Any]:
        return {**data, "label": "from v1"}

    newer = EventLog(event_log.nc, registry=registry)
    events = [e async for e in newer.read()]
    assert isinstance(events[0].data, DispatchedV2)
    assert events[0].data.label == "from v1"
    models = await build(newer, tmp_path / "up.duckdb")
    try:
        detail = await models.run(lambda: queries.task(models.con, "t-old"))
    finally:
        await models.close()
    assert detail is not None
    assert detail.task.title == "old one"


def test_status_reports_progress_while_catching_up() -> None:
    """Status says how far behind the projection is, as a lag and a percentage."""
    behind = Status(applied_seq=250_000, target_seq=1_000_000, caught_up=False)
    assert behind.lag == 750_000
    assert behind.percent == 25.0
    assert Status(applied_seq=0, target_seq=0, caught_up=True).percent == 100.0


async def test_kill_9_between_batches_loses_and_doubles_nothing(
    tmp_path: Path, nats_server: EmbeddedNats, event_log: EventLog
) -> None:
    """kill -9 a projecting `shipyard up --roles projector` mid catch-up, restart it: once
    caught up its tables equal a clean replay (checked with `shipyard replay --verify`)."""
    for start in range(0, 6000, 500):
        batch = [
            make(
                TaskDispatched(title=f"bulk {i}", prompt="p", dispatcher="d"),
                aggregate_id=f"t-bulk{i}",
                actor="x",
            )
            for i in range(start, start + 500)
        ]
        await asyncio.gather(*(event_log.append(e) for e in batch))
    data = tmp_path / "proj"
    env = {**os.environ, "SHIPYARD_DATA_DIR": str(data), "SHIPYARD_NATS_URL": nats_server.url}
    cmd = [sys.executable, "-m", "shipyard.cli", "up", "--roles", "projector"]

    def start_projector() -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        assert proc.stdout is not None
        assert "is up" in proc.stdout.readline()
        return proc

    progress = await event_log.nc.subscribe(PROGRESS_SUBJECT)

    async def announced(done: Any) -> dict[str, Any]:
        while True:
            msg = await progress.next_msg(timeout=30)
            state = msgspec.json.decode(msg.data)
            if done(state):
                return dict(state)

    first = start_projector()
    # Once it has committed a batch (it says so after each), kill it without warning.
    await announced(lambda s: s["applied_seq"] > 0 and not s["caught_up"])
    first.send_signal(signal.SIGKILL)
    first.communicate(timeout=10)

    second = start_projector()
    try:
        target = await event_log.stream_last_seq()
        await announced(lambda s: s["caught_up"] and s["applied_seq"] >= target)
        status = await ask(event_log.nc, "status")
        assert status["summary"]["tasks_by_state"] == {"queued": 6000}
    finally:
        await progress.unsubscribe()
        second.send_signal(signal.SIGTERM)
        second.communicate(timeout=30)
    verify = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "shipyard.cli", "replay", "--verify"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert "Identical." in verify.stdout
