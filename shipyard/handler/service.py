"""A handler: follows the log, claims what it can run, runs it, and watches every run.

Handlers learn of dispatches by following the stream (no polling) and claim with an
expected-sequence append, so with any number of handlers on any number of hosts each task
runs once. Each handler also runs the watchdog over every run, its own and others'.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import socket
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from shipyard import demo
from shipyard.errors import ConcurrencyConflict, ShipyardError
from shipyard.events import escalation
from shipyard.events import types as t
from shipyard.events.envelope import Event, derived_id, make, new_id, short_id, utcnow
from shipyard.events.log import EventLog
from shipyard.events.tasks import Task, TaskBook
from shipyard.handler import guard
from shipyard.handler.pipeline import Mailroom, Run
from shipyard.handler.runners import make_runner
from shipyard.handler.runners.base import Runner
from shipyard.settings import Settings

log = logging.getLogger(__name__)

# Events after which a queued task may have become claimable, or a slot free.
_WAKING = (t.TaskDispatched, t.TaskRequeued, t.TaskFinished, t.RunFinished, t.TaskClaimed)
MIN_CHECK = 0.05  # seconds: the watchdog's shortest check period
STOP_TIMEOUT = 5.0  # seconds stop() waits for the handler's own loops to end
STATUS_DEFER = 1.0  # seconds a handler not running the task waits before answering for it
MAX_CHECK = 5.0  # seconds: and its longest


class Handler:
    def __init__(self, events: EventLog, settings: Settings, *, handler_id: str = "") -> None:
        self.events = events
        self.settings = settings
        self.hs = settings.handler
        self.host = socket.gethostname()
        host = re.sub(r"[^A-Za-z0-9_-]", "-", self.host.split(".")[0])[:40]
        self.id = handler_id or f"{host}-{os.getpid()}-{short_id('')[-4:]}"
        self.actor = f"handler:{self.id}"
        self.book = TaskBook()
        # The built-in demo agent is always there (a configured one of that name wins).
        agents = {demo.AGENT: demo.agent_settings(), **settings.agents}
        self.runners: dict[str, Runner] = {
            name: make_runner(name, agent) for name, agent in agents.items()
        }
        self.runs: dict[str, Run] = {}  # task id -> our active run
        self.mail = Mailroom()
        self._jobs: set[asyncio.Task[None]] = set()  # status answers, aftercare
        self._run_tasks: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._caught_up = asyncio.Event()
        self._reconciled = asyncio.Event()  # claims wait for it: see _reconcile
        self._advanced = asyncio.Event()  # set after each event is folded in
        self._loops: list[asyncio.Task[None]] = []
        self._stopping = False
        self.launches = 0  # builders this handler started a run for (for tests and bench)

    # --- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        target = await self.events.stream_last_seq()
        self._loops = [
            asyncio.create_task(self._follow(target), name="handler-follow"),
            asyncio.create_task(self._claim_loop(), name="handler-claim"),
        ]
        if target == 0:
            self._caught_up.set()
        await self._caught_up.wait()
        await self._beat()
        await self._reconcile()
        self._reconciled.set()
        for group in list(self.book.groups):
            self._spawn(self._close_group(group))  # groups that ended while no handler ran
        # The watchdog starts after reconciling, so our own old runs are not judged silent.
        self._loops += [
            asyncio.create_task(self._heartbeat_loop(), name="handler-heartbeat"),
            asyncio.create_task(self._watchdog_loop(), name="handler-watchdog"),
        ]

    async def settled(self, seq: int) -> None:
        """Wait until this handler has folded in the log up to ``seq`` and finished what
        those events set off (status answers, group outcomes, escalations); not its runs."""
        while self.book.last_seq < seq:
            self._advanced.clear()
            await self._advanced.wait()
        while self._jobs:
            await asyncio.wait(set(self._jobs))

    async def _reconcile(self) -> None:
        """Runs this handler owned in a previous life cannot be running now: end them (killing
        any builder group left on this host) so they are retried at once, not after
        ``failed_after``."""
        now = utcnow()
        for task in self.book.running():
            if task.run_open and task.handler == self.id and task.id not in self.runs:
                kill_leftover_group(task.pgids.get(self.host))
                await self._end_run(task, "handler_restarted", "the handler restarted", now)

    async def stop(self) -> None:
        """Stop claiming; end our runs (their builders killed), and let them be retried."""
        self._stopping = True
        for run in list(self.runs.values()):
            run.abort(t.TaskState.FAILED, "handler_stopped")
        if self._run_tasks:
            await asyncio.wait(self._run_tasks, timeout=self.hs.kill_grace + 10)
        jobs = [*self._loops, *self._jobs]
        for job in jobs:
            job.cancel()
        if jobs:
            # A consumer being set up can sit on its cancellation; never hang the shutdown.
            await asyncio.wait(jobs, timeout=STOP_TIMEOUT)

    # --- following the log ----------------------------------------------------------

    async def _follow(self, target: int) -> None:
        async for event in self.events.follow(start=1):
            if event.aggregate == "thread":
                self.mail.apply(event)
                data = event.data
                if (
                    self._caught_up.is_set()
                    and isinstance(data, t.MessageSent)
                    and data.type == t.MessageType.STATUS_REQUEST
                    and data.task_id
                ):
                    self._spawn(self._answer_status(event))
            task = self.book.apply(event)
            if task is not None:
                self._react(event, task)
                if self._caught_up.is_set() and isinstance(event.data, t.TaskFinished):
                    self._spawn(self._aftercare(task, event.data))
                if isinstance(event.data, _WAKING):
                    self._wake.set()
            self._advanced.set()
            if not self._caught_up.is_set() and event.seq >= target:
                self._caught_up.set()
                self._wake.set()

    def _react(self, event: Event[Any], task: Task) -> None:
        run = self.runs.get(task.id)
        if run is None:
            return
        data = event.data
        if isinstance(data, t.TaskCancelRequested):
            run.abort(t.TaskState.CANCELLED, data.reason or "cancelled")
        elif (
            isinstance(data, t.RunFinished)
            and data.run_id == run.run_id
            and event.actor != self.actor
        ):
            # Another handler's watchdog ended our run: stop the builder now.
            run.abort(data.outcome, data.reason)

    def _spawn(self, job: Any) -> None:
        task = asyncio.create_task(job)
        self._jobs.add(task)
        task.add_done_callback(self._jobs.discard)

    # --- after a task finished: its group, the escalation policy -----------------

    async def _aftercare(self, task: Task, finished: t.TaskFinished) -> None:
        """Every handler tries; the guarded appends let exactly one of each land."""
        try:
            if task.spec.group:
                await self._close_group(task.spec.group)
            if finished.outcome == t.TaskState.FAILED:
                await self._escalate_by_policy(task)
        except ShipyardError as e:
            log.warning("after %s finished: %s", task.id, e, extra={"action": "aftercare"})

    async def _close_group(self, group: str) -> None:
        if group in self.book.finished_groups:
            return
        outcome = self.book.group_outcome(group)
        if outcome is None:
            return
        event = make(outcome, aggregate_id=derived_id("g-", group), actor=self.actor)
        with contextlib.suppress(ConcurrencyConflict):
            await self.events.append(event, expect=0)
            log.info("group %s finished", group, extra={"action": "group_finished"})

    async def _escalate_by_policy(self, task: Task) -> None:
        target = self.hs.escalate.get(task.agent)
        if not target or not task.agent or task.escalated_to:
            return
        if target in {(t_.agent or t_.spec.agent) for t_ in self.book.escalation_chain(task)}:
            return  # it has been there already: a policy loop would never end
        with contextlib.suppress(ConcurrencyConflict):
            result = await escalation.escalate(
                self.events, task, target, automatic=True, actor=self.actor
            )
            log.info(
                "escalated %s to %s as %s",
                task.id,
                target,
                result["escalated_to"],
                extra={"action": "escalate"},
            )

    # --- claiming -------------------------------------------------------------------

    def _agent_for(self, task: Task) -> str:
        return task.spec.agent or self.hs.default_agent

    def _busy(self, agent: str) -> int:
        return sum(1 for run in self.runs.values() if run.runner.name == agent)

    async def _claim_loop(self) -> None:
        # A claim made before reconciling would look like a run of our previous life.
        await self._reconciled.wait()
        while not self._stopping:
            await self._wake.wait()
            self._wake.clear()
            try:
                delay = await self._claim_ready()
            except ShipyardError as e:
                log.warning("claiming failed: %s", e, extra={"action": "claim_error"})
                delay = 1.0
            if delay is not None:
                self._wake_later(delay)

    def _wake_later(self, delay: float) -> None:
        asyncio.get_running_loop().call_later(max(0.0, delay), self._wake.set)

    async def _claim_ready(self) -> float | None:
        """Settle blocked tasks, claim what we can; return when to look again, if needed."""
        now = utcnow()
        await self._settle_dependants()
        next_due: datetime | None = None
        for task in self.book.claimable(now):
            if len(self.runs) >= self.hs.concurrency:
                break
            if task.id in self.runs:
                continue
            agent = self._agent_for(task)
            runner = self.runners.get(agent)
            if runner is None or self._busy(agent) >= runner.settings.concurrency:
                continue  # another handler may have this agent, or a free slot
            await self._claim(task, runner)
        for task in self.book.queued.values():
            if task.not_before and task.not_before > now:
                next_due = min(next_due or task.not_before, task.not_before)
        return (next_due - now).total_seconds() if next_due else None

    async def _settle_dependants(self) -> None:
        if self.hs.hold_dependants:
            return
        for task in list(self.book.queued.values()):
            if task.state != t.TaskState.QUEUED or not task.spec.after:
                continue
            dep = self.book.failed_prerequisite(task)
            if dep is None:
                continue
            reason = f"prerequisite {dep.id} {dep.state}"
            fate = t.TaskFinished(outcome=t.TaskState.FAILED, reason=reason)
            with contextlib.suppress(ConcurrencyConflict):
                await self.events.append(
                    make(fate, aggregate_id=task.id, actor=self.actor), expect=task.last_seq
                )

    async def _claim(self, task: Task, runner: Runner) -> None:
        # Task objects are live: earlier awaits in this pass may have let the follower move this
        # one on. Decide on what is true now; the expected sequence is read with no await
        # between this check and the append.
        if (
            task.state != t.TaskState.QUEUED
            or task.cancel_requested
            or task.id in self.runs
            or self.book.waiting_for(task)
        ):
            return
        run_id = short_id("r-")
        claim = t.TaskClaimed(
            run_id=run_id, handler=self.id, agent=runner.name, attempt=task.attempt
        )
        try:
            await self.events.append(
                make(claim, aggregate_id=task.id, actor=self.actor), expect=task.last_seq
            )
        except ConcurrencyConflict:
            return  # another handler won, or the task moved on: the follower will show it
        run = Run(
            events=self.events,
            settings=self.settings,
            book=self.book,
            task=task,
            run_id=run_id,
            attempt=task.attempt,
            runner=runner,
            handler_id=self.id,
            mail=self.mail,
        )
        self.runs[task.id] = run
        self.launches += 1
        log.info("claimed %s as %s", task.id, run_id, extra={"action": "claim"})
        job = asyncio.create_task(self._execute(task.id, run), name=f"run-{run_id}")
        self._run_tasks.add(job)
        job.add_done_callback(self._run_tasks.discard)

    async def _execute(self, task_id: str, run: Run) -> None:
        try:
            await run.execute()
        finally:
            self.runs.pop(task_id, None)
            self._wake.set()

    # --- comms ----------------------------------------------------------------------

    async def _answer_status(self, request: Event[Any]) -> None:
        """Answer a status_request about a task with its live state. The builder is not
        asked. Every handler may answer; the reply is guarded on the request being the
        thread's last event, so exactly one lands, and the run's own handler goes first."""
        data: t.MessageSent = request.data
        task = self.book.tasks.get(data.task_id)
        if task is None:
            return
        own = self.runs.get(task.id)
        if own is None and task.run_open:
            await asyncio.sleep(STATUS_DEFER)  # the owner knows turns and cost; let it answer
        state = self.book.effective_state(task)
        parts = [f"{task.spec.title} ({task.id}) is {state}"]
        if task.run_open:
            phase = task.phase.label if task.phase else "CLAIMED"
            parts.append(f"in {phase}, {task.percent}%")
            if task.stale:
                parts.append("STALE: no heartbeat lately")
        if own is not None:
            p = own.progress
            parts.append(f"{p.action}; {p.turns} turns, ${p.cost_usd:.4f}".strip("; "))
        elif task.reason:
            parts.append(task.reason)
        sender = data.recipient if data.recipient != t.EVERYONE else (task.agent or "handler")
        reply = t.MessageSent(
            message_id=new_id("m-"),
            sender=sender,
            recipient=data.sender,
            type=t.MessageType.STATUS_RESPONSE,
            body="; ".join(parts),
            reply_to=data.message_id,
            task_id=task.id,
        )
        with contextlib.suppress(ConcurrencyConflict):
            await self.events.append(
                make(reply, aggregate_id=request.aggregate_id, actor=self.actor),
                expect=request.seq,
            )

    # --- liveness -------------------------------------------------------------------

    async def _beat(self) -> None:
        beat = t.HandlerHeartbeat(
            host=self.host, pid=os.getpid(), runs=sorted(self.runs), capacity=self.hs.concurrency
        )
        try:
            await self.events.append(make(beat, aggregate_id=self.id, actor=self.actor))
        except ShipyardError as e:
            log.warning("handler heartbeat failed: %s", e)

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.hs.heartbeat_interval)
            await self._beat()
            await asyncio.gather(*(run.heartbeat() for run in list(self.runs.values())))

    async def _watchdog_loop(self) -> None:
        period = min(
            MAX_CHECK, max(MIN_CHECK, min(self.hs.stale_after, self.hs.heartbeat_interval) / 5)
        )
        await self._caught_up.wait()
        while True:
            await asyncio.sleep(period)
            try:
                await self.check_runs(utcnow())
            except ShipyardError as e:
                log.warning("watchdog check failed: %s", e)

    async def check_runs(self, now: datetime) -> None:
        """STALE after ``stale_after`` without a heartbeat; FAILED after ``failed_after``.

        Each verdict is an expected-sequence append, so among many handlers exactly one lands.
        """
        for task in self.book.running():
            # Re-checked each time round: earlier verdicts' awaits may have moved this task on.
            if task.last_activity is None or not task.run_open:
                continue
            silent = (now - task.last_activity).total_seconds()
            if silent >= self.hs.failed_after:
                await self._fail_silent_run(task, silent, now)
            elif silent >= self.hs.stale_after and not task.stale:
                stale = t.RunStale(
                    run_id=task.run_id, silent_for=round(silent, 3), detected_by=self.id
                )
                with contextlib.suppress(ConcurrencyConflict):
                    await self.events.append(
                        make(stale, aggregate_id=task.id, actor=self.actor), expect=task.last_seq
                    )

    def _handler_alive(self, handler_id: str, now: datetime) -> bool:
        if handler_id == self.id:
            return True
        seen = self.book.handlers.get(handler_id)
        return seen is not None and (now - seen).total_seconds() < self.hs.stale_after

    async def _fail_silent_run(self, task: Task, silent: float, now: datetime) -> None:
        alive = self._handler_alive(task.handler, now)
        reason = "agent_silent" if alive else "handler_lost"
        if await self._end_run(task, reason, f"no heartbeat for {silent:.0f}s", now):
            own = self.runs.get(task.id)
            if own is not None and own.run_id == task.run_id:
                own.abort(
                    t.TaskState.CANCELLED if task.cancel_requested else t.TaskState.FAILED, reason
                )
            else:
                kill_leftover_group(task.pgids.get(self.host))

    async def _end_run(self, task: Task, reason: str, summary: str, now: datetime) -> bool:
        """Fail (or, if a cancel was asked for, cancel) a run with a guarded append; retry by
        policy. True if this verdict landed."""
        cancel = task.cancel_requested
        outcome = t.TaskState.CANCELLED if cancel else t.TaskState.FAILED
        finished = t.RunFinished(
            run_id=task.run_id,
            outcome=outcome,
            reason=reason,
            summary=summary,
            phase=task.phase,
        )
        fate: t.EventData
        if not cancel and task.attempt < self.hs.max_attempts:
            fate = t.TaskRequeued(
                attempt=task.attempt + 1,
                reason=f"attempt {task.attempt} failed: {reason}",
                not_before=now + timedelta(seconds=self.hs.retry_backoff),
            )
        else:
            fate = t.TaskFinished(outcome=outcome, reason=reason, run_id=task.run_id)
        batch = [make(d, aggregate_id=task.id, actor=self.actor) for d in (finished, fate)]
        try:
            await self.events.append_batch(batch, expect=task.last_seq)
        except ConcurrencyConflict:
            return False
        log.warning(
            "run %s of %s ended: %s", task.run_id, task.id, reason, extra={"action": "verdict"}
        )
        return True


def kill_leftover_group(pgid: int | None) -> None:
    """Kill a builder group left on this host, if it is really one of ours (the guard)."""
    if not pgid:
        return
    try:
        cmdline = Path(f"/proc/{pgid}/cmdline").read_bytes()
    except OSError:
        return
    if Path(guard.__file__).name.encode() not in cmdline:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
