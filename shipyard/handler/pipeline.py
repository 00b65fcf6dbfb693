"""One run of one task through the eight phases. The handler posts every transition; the
builder only ever sees a prompt and a working directory."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import socket
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from shipyard import access, instance
from shipyard.errors import ConcurrencyConflict, ConfigError, ShipyardError
from shipyard.events import dispatch, escalation
from shipyard.events import types as t
from shipyard.events.envelope import Event, make, utcnow
from shipyard.events.log import EventLog
from shipyard.events.tasks import Task, TaskBook
from shipyard.gateway.auth import TokenStore
from shipyard.handler import report, validate, workspace
from shipyard.handler.process import BuilderProcess
from shipyard.handler.runners.base import Invocation, Outcome, Runner, Update
from shipyard.redact import is_secret_name, mask, secrets
from shipyard.settings import Settings

log = logging.getLogger(__name__)

P = t.Phase
# Where each phase starts on the progress bar; BUILD fills its span as plan steps complete.
PERCENT = {
    P.CONTEXT: 0,
    P.PLAN: 5,
    P.TASK_BOARD: 15,
    P.BUILD: 20,
    P.VALIDATE: 70,
    P.HEAL: 80,
    P.REPORT: 90,
    P.CLOSE: 95,
}
PROGRESS_EVERY = 10.0  # seconds: at most one progress event this often while things change
README_FILES = ("README.md", "CLAUDE.md")
MAX_FILES_SHOWN = 30  # of a prerequisite's changed files, in the next task's CONTEXT
LOG_TAIL_LINES = 40  # of a failed builder's output, kept in its RunFinished
LOG_TAIL_LINE_CHARS = 300
# How the handler itself reaches NATS; a builder gets its agent's own user instead.
_NATS_AUTH_ENV = frozenset(
    {"SHIPYARD_NATS_USER", "SHIPYARD_NATS_PASSWORD", "SHIPYARD_NATS_CREDS", "SHIPYARD_NATS_TOKEN"}
)


class Mailroom:
    """Directives and questions not yet read, as the handler has seen them on the log."""

    KINDS = (t.MessageType.DIRECTIVE, t.MessageType.QUESTION)

    def __init__(self) -> None:
        self._notes: dict[str, tuple[str, t.MessageSent, set[str]]] = {}

    def apply(self, event: Event[Any]) -> None:
        data = event.data
        if isinstance(data, t.MessageSent) and data.type in self.KINDS:
            self._notes[data.message_id] = (event.aggregate_id, data, set())
        elif isinstance(data, t.MessageRead) and data.message_id in self._notes:
            self._notes[data.message_id][2].add(data.reader)

    def unread_for(self, agent: str) -> list[tuple[str, t.MessageSent]]:
        return [
            (thread_id, m)
            for thread_id, m, readers in self._notes.values()
            if m.recipient in (agent, t.EVERYONE) and m.sender != agent and agent not in readers
        ]


class Aborted(Exception):
    """The run was cancelled, or a watchdog verdict ended it."""

    def __init__(self, outcome: t.TaskState, reason: str) -> None:
        super().__init__(reason)
        self.outcome = outcome
        self.reason = reason


class PhaseFailed(Exception):
    def __init__(self, phase: t.Phase, reason: str, error: str = "") -> None:
        super().__init__(reason)
        self.phase = phase
        self.reason = reason
        self.error = error


@dataclass
class Progress:
    phase: t.Phase = P.CONTEXT
    percent: int = 0
    action: str = ""
    turns: int = 0
    tool_calls: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    cost_usd: float = 0.0
    last_tool: str = ""
    blockers: list[str] = field(default_factory=list)

    def add(self, outcome: Outcome) -> None:
        self.turns += outcome.turns
        self.tool_calls += outcome.tool_calls
        self.tokens_in += outcome.tokens_in
        self.tokens_out += outcome.tokens_out
        self.cost_usd += outcome.cost_usd


class Run:
    """Drives one claimed task through CONTEXT … CLOSE."""

    def __init__(
        self,
        *,
        events: EventLog,
        settings: Settings,
        book: TaskBook,
        task: Task,
        run_id: str,
        attempt: int,
        runner: Runner,
        handler_id: str,
        mail: Mailroom | None = None,
    ) -> None:
        self.events = events
        self.settings = settings
        self.hs = settings.handler
        self.book = book
        self.task_id = task.id
        self.spec = task.spec
        self.run_id = run_id
        self.attempt = attempt
        self.runner = runner
        self.mail = mail
        self.handler_id = handler_id
        self.actor = f"handler:{handler_id}"
        self.host = socket.gethostname()
        self.progress = Progress()
        self.active = False  # something happened since the last heartbeat
        self.started = utcnow()
        self.session_id = ""
        self.plan_steps: list[str] = []
        self.cards: list[str] = []
        self.card_state: dict[str, str] = {}
        self.phase_lines: dict[t.Phase, report.PhaseLine] = {}
        self.validations: list[tuple[int, bool, str, str]] = []
        self.heal_rounds = 0
        self.workdir = Path(self.spec.working_dir or "/")
        self.before: dict[str, workspace.FileState] = {}
        self.context_prompt = ""
        self._abort: Aborted | None = None
        self._abort_event = asyncio.Event()
        self._builder: BuilderProcess | None = None
        self._last_progress_post = 0.0
        self._pending_moves: list[t.CardMoved] = []
        self._unacked: list[asyncio.Task[int]] = []  # appends sent, not yet acknowledged
        self._log_path = settings.data_dir / "logs" / self.task_id / f"{run_id}.log"
        self._log_file: Any = None
        self._tail: deque[str] = deque(maxlen=LOG_TAIL_LINES)
        self._token = ""  # the builder's token for messaging, for this run only
        self._comms: dict[str, str] = {}  # what the builder is told of it, once made
        # Masked in everything the builder's output reaches: the handler's secrets and the
        # ones configured for this agent (its run token joins them when it is made).
        self._secrets = sorted({*secrets(), *secrets(runner.settings.env)}, key=len, reverse=True)

    # --- outside control ------------------------------------------------------------

    def abort(self, outcome: t.TaskState, reason: str) -> None:
        """Stop the run: kill the builder's group and close with ``outcome``."""
        if self._abort is None:
            self._abort = Aborted(outcome, reason)
            self._abort_event.set()  # the builder call in progress kills its group

    def _check(self) -> None:
        if self._abort is not None:
            raise self._abort

    # --- appending ------------------------------------------------------------------

    def _event(self, data: t.EventData) -> Event[Any]:
        return make(data, aggregate_id=self.task_id, actor=self.actor)

    def _send(self, *events: Event[Any], track: bool = True) -> list[asyncio.Task[int]]:
        """Start appending ``events`` without waiting for their acknowledgements. Plain
        appends, not an atomic batch: these events need no all-or-nothing (each is
        idempotent) and a batch commit costs ten times more.

        Order holds: each append is a task, tasks take their first step in the order they
        were made, and that step writes the request to the connection. So every append of
        a run goes through here, or one could overtake those still waiting to start."""
        tasks = [asyncio.ensure_future(self.events.append(e)) for e in events]
        if track:
            self._unacked += tasks
        return tasks

    async def _acked(self) -> None:
        """Wait until everything sent so far is stored; raise the first failure."""
        pending, self._unacked = self._unacked, []
        for result in await asyncio.gather(*pending, return_exceptions=True):
            if isinstance(result, BaseException):
                raise result

    def _post(self, *data: t.EventData) -> None:
        """Append in order, acknowledged later (:meth:`_acked`): for the phase changes before
        the builder starts, which then cost one round trip instead of one each."""
        self._send(*(self._event(d) for d in data))

    async def _append(self, *data: t.EventData) -> None:
        """Append in order and wait until these, and all sent before, are stored."""
        self._post(*data)
        await self._acked()

    def _progress_event(self) -> t.WorkProgress:
        p = self.progress
        return t.WorkProgress(
            run_id=self.run_id,
            phase=p.phase,
            percent=p.percent,
            action=p.action[:300],
            turns=p.turns,
            tool_calls=p.tool_calls,
            tokens_in=p.tokens_in,
            tokens_out=p.tokens_out,
            cost_usd=round(p.cost_usd, 6),
            last_tool=p.last_tool,
            blockers=list(p.blockers),
        )

    async def heartbeat(self, *, force: bool = False) -> None:
        """Post progress if anything happened since the last one (or ``force``)."""
        if self._abort is not None or not (self.active or force):
            return
        self.active = False
        self._last_progress_post = asyncio.get_running_loop().time()
        try:
            # Not waiting for the run's own appends in flight: their failures are the run's.
            await asyncio.gather(*self._send(self._event(self._progress_event()), track=False))
        except ShipyardError as e:
            log.warning("heartbeat for %s failed: %s", self.run_id, e)

    async def _phase(
        self,
        phase: t.Phase,
        status: t.PhaseStatus,
        action: str = "",
        result: str = "",
        *,
        wait: bool = True,
    ) -> None:
        """Record a phase change and the progress it makes; ``wait=False`` leaves the
        acknowledgements to the next :meth:`_acked`."""
        # Results quote the builder's output (its error, say), which may echo a secret.
        action, result = mask(action, self._secrets), mask(result, self._secrets)
        now = utcnow()
        line = self.phase_lines.setdefault(phase, report.PhaseLine(phase, status.value))
        line.status = status.value
        if status == t.PhaseStatus.STARTED:
            line.started = now
            line.action = action
            self.progress.phase = phase
            self.progress.percent = max(self.progress.percent, PERCENT[phase])
            self.progress.action = action
        else:
            line.ended = now
            line.result = result
            if status == t.PhaseStatus.SKIPPED:
                line.started = line.started or now
        changed = t.PhaseChanged(
            run_id=self.run_id, phase=phase, status=status, action=action, result=result[:2000]
        )
        self.active = False
        self._post(changed, self._progress_event())
        if wait:
            await self._acked()

    # --- the pipeline ---------------------------------------------------------------

    async def execute(self) -> None:
        outcome, reason, failed_phase, error = t.TaskState.SUCCEEDED, "", None, ""
        self._log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = self._log_path.open("a", encoding="utf-8")
        try:
            try:
                await self._context()
                await self._plan()
                await self._task_board()
                await self._build()
                verdict = await self._validate()
                await self._heal(verdict)
            except PhaseFailed as e:
                outcome, reason, failed_phase, error = (
                    t.TaskState.FAILED,
                    e.reason,
                    e.phase,
                    e.error,
                )
                await self._skip_rest(e.phase)
            except Aborted as e:
                outcome, reason = e.outcome, e.reason
            if self._abort is not None and outcome != t.TaskState.CANCELLED:
                outcome, reason = self._abort.outcome, self._abort.reason
            summary = await self._report(outcome, reason)
            await self._revoke_token()
            await self._close(outcome, reason, summary, failed_phase, error)
        except Exception:
            log.exception("run %s of %s broke", self.run_id, self.task_id)
            await self._revoke_token()
            await self._close(t.TaskState.FAILED, "handler_error", "", None, "see handler log")
        finally:
            if self._builder is not None:
                await self._builder.kill()
            # A run that broke may leave appends in flight: wait so none fails unseen.
            await asyncio.gather(*self._unacked, return_exceptions=True)
            self._log_file.close()
            await self._revoke_token()

    async def _revoke_token(self) -> None:
        """The builder's token dies before the run is recorded as finished, so whoever sees
        it finished can count on the token being dead."""
        token, self._token = self._token, ""
        if token:
            await asyncio.to_thread(TokenStore(self.settings.data_dir).revoke, token)

    async def _skip_rest(self, failed: t.Phase) -> None:
        for phase in (P.PLAN, P.TASK_BOARD, P.BUILD, P.VALIDATE, P.HEAL):
            if phase.position > failed.position and phase not in self.phase_lines:
                await self._phase(phase, t.PhaseStatus.SKIPPED, result=f"{failed.label} failed")

    # 1. CONTEXT
    async def _context(self) -> None:
        # Up to BUILD's builder, phase changes are sent without waiting for each to be
        # stored: their round trips overlap (see _call_builder, which waits for them all).
        await self._phase(P.CONTEXT, t.PhaseStatus.STARTED, "gathering context", wait=False)
        try:
            roots = [*self.hs.workdir_roots, self.settings.data_dir / "demo"]
            self.workdir = workspace.confine(self.spec.working_dir, roots)
            self.workdir.mkdir(parents=True, exist_ok=True)
        except (ShipyardError, OSError) as e:
            reason = e.message if isinstance(e, ShipyardError) else str(e)
            await self._phase(P.CONTEXT, t.PhaseStatus.FAILED, result=reason)
            raise PhaseFailed(P.CONTEXT, "workdir_refused", reason) from e
        self.before = await asyncio.to_thread(workspace.snapshot, self.workdir)
        parts = [f"# Task {self.task_id}: {self.spec.title}", "", self.spec.prompt.strip()]
        found = []
        for name in README_FILES:
            text = workspace.read_head(self.workdir / name)
            if text:
                found.append(name)
                parts += ["", f"## Project file {name} (as it was before this run)", text]
        prereq = self._prerequisite_results()
        if prereq:
            parts += ["", "## Results of the tasks this one waited for", *prereq]
        if self.spec.escalated_from:
            history = await escalation.failure_history(
                self.events, self.spec.escalated_from, for_task=self.task_id
            )
            parts += ["", "## Escalated to you: what went wrong before", history]
        notes = self.mail.unread_for(self.runner.name) if self.mail else []
        if notes:
            parts += ["", "## Messages for you (directives and questions, unread until now)"]
            parts += [f"- {m.type} from {m.sender}: {m.body}" for _, m in notes]
        parts += [
            "",
            "## Working rules",
            f"- Work only inside {self.workdir}.",
            "- Deliver every item under Deliverables, README.md included.",
            "- Do not report progress yourself; the handler watches and reports.",
        ]
        self.context_prompt = "\n".join(parts)
        what = [f"{len(dispatch.split_sections(self.spec.prompt).by_name)} sections"]
        what += [f"{n} read" for n in found] or ["no README.md yet"]
        if prereq:
            what.append(f"{len(prereq)} prerequisite result(s)")
        if self.spec.escalated_from:
            what.append(f"escalated from {self.spec.escalated_from}")
        if notes:
            what.append(f"{len(notes)} message(s) for {self.runner.name}")
            # Put into the prompt, so read: the builder cannot mark them itself.
            for thread_id, m in notes:
                receipt = t.MessageRead(message_id=m.message_id, reader=self.runner.name)
                self._send(make(receipt, aggregate_id=thread_id, actor=self.actor))
        what.append(f"{len(self.before)} files in {self.workdir}")
        await self._phase(P.CONTEXT, t.PhaseStatus.SUCCEEDED, result=", ".join(what), wait=False)

    def _prerequisite_results(self) -> list[str]:
        lines = []
        for tid in self.spec.after:
            dep = self.book.tasks.get(tid)
            if dep is None:
                continue
            lines.append(f"- {tid} ({dep.spec.title}): {dep.state}")
            if dep.summary:
                lines.append(f"  Result: {dep.summary}")
            if dep.files_changed:
                shown = ", ".join(dep.files_changed[:MAX_FILES_SHOWN])
                more = len(dep.files_changed) - MAX_FILES_SHOWN
                lines.append(f"  Files it changed: {shown}" + (f" and {more} more" * (more > 0)))
            if dep.report:
                lines.append(f"  Its report: {dep.report}")
        return lines

    # 2. PLAN
    async def _plan(self) -> None:
        self._check()
        if not self.runner.can_plan:
            await self._phase(
                P.PLAN, t.PhaseStatus.STARTED, "deriving the plan from Requirements", wait=False
            )
            await self._record_plan(requirements_plan(self.spec.prompt), "requirements", "")
            return
        await self._phase(
            P.PLAN, t.PhaseStatus.STARTED, f"{self.runner.name} is planning", wait=False
        )
        prompt = (
            self.context_prompt
            + "\n\n## Now\nMake a plan only: a numbered list of concrete steps that together "
            "deliver the Deliverables. Do not change any files yet."
        )
        outcome = await self._call_builder(P.PLAN, prompt)
        if not outcome.ok:
            await self._phase(P.PLAN, t.PhaseStatus.FAILED, result=outcome.error)
            raise PhaseFailed(P.PLAN, _reason(outcome), outcome.error)
        steps = plan_steps(outcome.plan) or requirements_plan(self.spec.prompt)
        await self._record_plan(steps, "builder", outcome.plan)

    async def _record_plan(self, steps: list[str], source: str, text: str) -> None:
        self.plan_steps = steps[:50]
        self._post(
            t.PlanRecorded(
                run_id=self.run_id,
                source=source,
                steps=self.plan_steps,
                text=text[:20000],
                session_id=self.session_id,
            )
        )
        await self._phase(
            P.PLAN,
            t.PhaseStatus.SUCCEEDED,
            result=f"{len(self.plan_steps)} steps ({source})",
            wait=False,
        )

    # 3. TASK BOARD
    async def _task_board(self) -> None:
        self._check()
        await self._phase(
            P.TASK_BOARD, t.PhaseStatus.STARTED, "putting the plan on the board", wait=False
        )
        cards = []
        for i, step in enumerate(self.plan_steps):
            card_id = f"{self.run_id}-{i + 1}"
            self.cards.append(card_id)
            self.card_state[card_id] = "todo"
            cards.append(
                t.CardAdded(run_id=self.run_id, card_id=card_id, title=step[:300], position=i)
            )
        self._post(*cards)
        await self._phase(
            P.TASK_BOARD, t.PhaseStatus.SUCCEEDED, result=f"{len(cards)} cards", wait=False
        )

    # 4. BUILD
    async def _build(self) -> None:
        self._check()
        await self._phase(
            P.BUILD, t.PhaseStatus.STARTED, f"{self.runner.name} is building", wait=False
        )
        steps = "\n".join(f"{i + 1}. {s}" for i, s in enumerate(self.plan_steps))
        prompt = (
            self.context_prompt if not self.session_id else f"# Task {self.task_id}"
        ) + f"\n\n## Now\nCarry out the plan:\n{steps}\n\nThen stop."
        outcome = await self._call_builder(P.BUILD, prompt)
        if not outcome.ok:
            await self._move_cards("failed", only_open=True)
            await self._phase(P.BUILD, t.PhaseStatus.FAILED, result=outcome.error)
            raise PhaseFailed(P.BUILD, _reason(outcome), outcome.error)
        await self._move_cards("done", only_open=True)
        await self._phase(
            P.BUILD,
            t.PhaseStatus.SUCCEEDED,
            result=f"{self.progress.turns} turns, {self.progress.tool_calls} tool calls",
        )

    async def _move_cards(self, column: str, *, only_open: bool) -> None:
        moves = [
            t.CardMoved(run_id=self.run_id, card_id=c, column=column)
            for c in self.cards
            if not only_open or self.card_state[c] not in ("done", "failed")
        ]
        for c in self.cards:
            if not only_open or self.card_state[c] not in ("done", "failed"):
                self.card_state[c] = column
        if moves:
            await self._append(*moves)

    # 5. VALIDATE
    async def _validate(self) -> validate.Verdict:
        self._check()
        await self._phase(P.VALIDATE, t.PhaseStatus.STARTED, "checking the deliverables")
        verdict = await self._check_deliverables(0)
        status = t.PhaseStatus.SUCCEEDED if verdict.passed else t.PhaseStatus.FAILED
        await self._phase(P.VALIDATE, status, result=verdict.describe())
        return verdict

    async def _check_deliverables(self, round_no: int) -> validate.Verdict:
        env = {k: v for k, v in os.environ.items() if k != "CLAUDECODE"}
        verdict = await validate.check(
            self.workdir,
            self.spec.deliverable_files,
            self.spec.validation_command,
            env=env,
            timeout=self.hs.validate_timeout,
            grace=self.hs.kill_grace,
            on_line=self._on_validation_line,
        )
        self.validations.append((round_no, verdict.passed, verdict.describe(), verdict.output))
        await self._append(
            t.ValidationChecked(
                run_id=self.run_id,
                round=round_no,
                passed=verdict.passed,
                missing=verdict.missing,
                command=verdict.command,
                exit_code=verdict.exit_code,
                output=verdict.output,
            )
        )
        return verdict

    def _on_validation_line(self, line: str) -> None:
        self.active = True
        self._log(f"[validate] {line}")

    # 6. HEAL
    async def _heal(self, verdict: validate.Verdict) -> None:
        if verdict.passed:
            await self._phase(P.HEAL, t.PhaseStatus.SKIPPED, result="VALIDATE passed first time")
            return
        for round_no in range(1, self.hs.max_heal_rounds + 1):
            self._check()
            self.heal_rounds = round_no
            await self._phase(
                P.HEAL, t.PhaseStatus.STARTED, f"round {round_no} of {self.hs.max_heal_rounds}"
            )
            prompt = (
                f"# Task {self.task_id}: validation failed\n\n"
                f"The handler checked the deliverables in {self.workdir} and found: "
                f"{verdict.describe()}.\n\nOutput:\n```\n{verdict.output[-8000:]}\n```\n\n"
                "Fix the cause, keep README.md current, then stop."
            )
            if not self.session_id:
                prompt = self.context_prompt + "\n\n" + prompt
            outcome = await self._call_builder(P.HEAL, prompt)
            if not outcome.ok:
                await self._phase(P.HEAL, t.PhaseStatus.FAILED, result=outcome.error)
                raise PhaseFailed(P.HEAL, _reason(outcome), outcome.error)
            verdict = await self._check_deliverables(round_no)
            if verdict.passed:
                await self._phase(
                    P.HEAL,
                    t.PhaseStatus.SUCCEEDED,
                    result=f"validation passed after round {round_no}",
                )
                return
        result = f"still failing after {self.hs.max_heal_rounds} rounds: {verdict.describe()}"
        await self._phase(P.HEAL, t.PhaseStatus.FAILED, result=result)
        raise PhaseFailed(P.HEAL, "validation_failed", verdict.output[-4000:])

    # 7. REPORT
    async def _report(self, outcome: t.TaskState, reason: str) -> str:
        await self._phase(P.REPORT, t.PhaseStatus.STARTED, "writing the report")
        after = await asyncio.to_thread(workspace.snapshot, self.workdir)
        changed = workspace.changes(self.before, after)
        ended = utcnow()
        p = self.progress
        summary = (
            f"{self.spec.title}: {outcome}"
            + (f" ({reason})" if reason else "")
            + f" in {(ended - self.started).total_seconds():.1f}s, {p.turns} turns, "
            f"${p.cost_usd:.4f}, {len(changed)} files changed"
            + (f", {self.heal_rounds} heal round(s)" if self.heal_rounds else "")
        )
        data = report.ReportData(
            task_id=self.task_id,
            run_id=self.run_id,
            title=self.spec.title,
            agent=self.runner.name,
            attempt=self.attempt,
            outcome=outcome.value,
            reason=reason,
            workdir=str(self.workdir),
            started=self.started,
            ended=ended,
            turns=p.turns,
            cost_usd=p.cost_usd,
            tokens_in=p.tokens_in,
            tokens_out=p.tokens_out,
            heal_rounds=self.heal_rounds,
            plan_steps=self.plan_steps,
            phases=[self.phase_lines[ph] for ph in P if ph in self.phase_lines],
            files_changed=changed,
            validations=self.validations,
            summary=summary,
        )
        path = await asyncio.to_thread(
            report.write, self.settings.data_dir / "reports" / self.task_id, data
        )
        await self._append(
            t.ReportWritten(
                run_id=self.run_id,
                path=str(path),
                summary=summary,
                files_changed=changed[:500],
                duration_s=round((ended - self.started).total_seconds(), 3),
                turns=p.turns,
                cost_usd=round(p.cost_usd, 6),
                heal_rounds=self.heal_rounds,
            )
        )
        await self._phase(P.REPORT, t.PhaseStatus.SUCCEEDED, result=str(path))
        return summary

    # 8. CLOSE
    async def _close(
        self,
        outcome: t.TaskState,
        reason: str,
        summary: str,
        failed_phase: t.Phase | None,
        error: str,
    ) -> None:
        """Card to Done or Failed, the run's and the task's fate in one atomic batch."""
        column = "done" if outcome == t.TaskState.SUCCEEDED else "failed"
        try:
            await self._phase(P.CLOSE, t.PhaseStatus.STARTED, f"card to {column}")
        except ShipyardError as e:
            log.warning("could not post CLOSE for %s: %s", self.run_id, e)
        self.progress.phase, self.progress.percent = P.CLOSE, 100
        fate: t.EventData
        retry = (
            outcome == t.TaskState.FAILED
            and self.attempt < self.hs.max_attempts
            and reason not in ("workdir_refused", "validation_failed")
        )
        now = utcnow()
        if retry:
            fate = t.TaskRequeued(
                attempt=self.attempt + 1,
                reason=f"attempt {self.attempt} failed: {reason}",
                not_before=_after(now, self.hs.retry_backoff),
            )
        else:
            fate = t.TaskFinished(outcome=outcome, reason=reason, run_id=self.run_id)
        batch = [
            t.PhaseChanged(
                run_id=self.run_id,
                phase=P.CLOSE,
                status=t.PhaseStatus.SUCCEEDED,
                action=f"card to {column}",
                result=f"{outcome}" + (f": {reason}" if reason else ""),
            ),
            self._progress_event(),
            t.RunFinished(
                run_id=self.run_id,
                outcome=outcome,
                reason=reason,
                summary=summary,
                phase=failed_phase,
                error=mask(error[-4000:], self._secrets),
                log_tail="" if outcome == t.TaskState.SUCCEEDED else "\n".join(self._tail),
            ),
            fate,
        ]
        for _ in range(10):
            seq, still_ours = await self._ownership()
            if not still_ours:
                return  # a verdict already closed this run
            try:
                await self.events.append_batch([self._event(d) for d in batch], expect=seq)
                return
            except ConcurrencyConflict:
                continue

    async def _ownership(self) -> tuple[int, bool]:
        history = await self.events.history("task", self.task_id)
        book = TaskBook()
        for event in history:
            book.apply(event)
        task = book.tasks.get(self.task_id)
        ours = task is not None and task.run_id == self.run_id and task.run_open
        return (history[-1].seq if history else 0), ours

    # --- calling the builder --------------------------------------------------------

    async def _call_builder(self, phase: t.Phase, prompt: str) -> Outcome:
        inv = Invocation(
            prompt=prompt,
            cwd=self.workdir,
            phase=phase,
            max_turns=self.spec.max_turns,
            task_id=self.task_id,
            run_id=self.run_id,
            session_id=self.session_id if phase != P.PLAN else "",
        )
        parser = self.runner.parser(inv)
        argv = self.runner.argv(inv)
        if shutil.which(argv[0]) is None:
            return Outcome(
                ok=False,
                exit_code=127,
                error=f"agent {self.runner.name!r}: the program {argv[0]!r} is not installed or "
                "not on PATH; install it, or set `binary`/`command` for this agent in "
                "shipyard.toml",
            )
        # The handler's own secrets (admin token, bot token, NATS credentials) stay with it.
        base = {
            k: v
            for k, v in os.environ.items()
            if not (k.startswith("SHIPYARD_") and (is_secret_name(k) or k in _NATS_AUTH_ENV))
        }
        env = self.runner.env(inv, base)
        env.update(await asyncio.to_thread(self._comms_env))
        proc = BuilderProcess(
            argv,
            cwd=self.workdir,
            env=env,
            grace=self.hs.kill_grace,
        )
        # The builder starts only once every phase change before it is stored.
        await self._acked()
        try:
            await proc.start()
        except OSError as e:
            return Outcome(ok=False, exit_code=127, error=f"cannot start {self.runner.binary}: {e}")
        self._builder = proc
        await self._append(
            t.BuilderStarted(
                run_id=self.run_id,
                phase=phase,
                host=self.host,
                pid=proc.pid,
                pgid=proc.pgid,
                program=argv[0],
            )
        )
        self._check()

        async def read() -> None:
            lines = proc.lines()
            while True:
                # Once it printed a result it must exit soon; more output (a subagent's
                # second result) is still read, but silence past the grace ends it.
                grace = self.hs.result_grace if parser.result_seen else None
                try:
                    line = await asyncio.wait_for(anext(lines), grace)
                except StopAsyncIteration:
                    return
                except TimeoutError:
                    log.info("builder %s lingered after its result; ending it", proc.pid)
                    await proc.kill()
                    return
                self._log(line)
                for update in parser.feed(line):
                    self._on_update(update)
                if self._pending_moves:
                    moves, self._pending_moves = self._pending_moves, []
                    await self._append(*moves)
                await self._maybe_progress()

        reader = asyncio.create_task(read())
        aborted = asyncio.create_task(self._abort_event.wait())
        timed_out = False
        try:
            done, _ = await asyncio.wait(
                {reader, aborted},
                timeout=self.hs.builder_timeout,
                return_when=asyncio.FIRST_COMPLETED,
            )
            if reader in done:
                reader.result()
                try:
                    await asyncio.wait_for(proc.wait(), self.hs.result_grace)
                except TimeoutError:
                    log.info("builder %s lingered after closing its output", proc.pid)
            else:
                timed_out = not done
                await proc.kill()
        finally:
            for task in (reader, aborted):
                task.cancel()
            await asyncio.gather(reader, aborted, return_exceptions=True)
        code = await proc.kill()
        self._builder = None
        if self._log_file is not None:
            self._log_file.flush()
        self._check()
        outcome = parser.finish(code, list(proc.stderr_tail))
        if timed_out:
            outcome.ok = False
            outcome.subtype = "timeout"
            outcome.error = f"killed after {self.hs.builder_timeout:.0f}s (handler.builder_timeout)"
        if outcome.session_id:
            self.session_id = outcome.session_id
        self.progress.add(outcome)
        self.active = True
        return outcome

    def _on_update(self, update: Update) -> None:
        self.active = True
        if update.kind == "tool":
            self.progress.last_tool = update.tool
            self.progress.action = f"{self.progress.phase.label}: {update.tool}"
        elif update.kind == "session":
            self.session_id = update.session_id or self.session_id
        elif update.kind == "retry":
            self.progress.blockers = [update.text[:200]]
        elif update.kind == "todos":
            self._todos(update)
        elif update.kind == "text" and update.text.strip():
            self.progress.action = update.text.strip().splitlines()[0][:200]

    def _todos(self, update: Update) -> None:
        """Claude Code's TodoWrite / Codex's todo_list move the plan cards."""
        if not self.cards or self.progress.phase not in (P.BUILD, P.HEAL):
            return
        for i, todo in enumerate(update.todos):
            card = _match_card(todo.title, self.plan_steps, i, len(self.cards))
            if card is None:
                continue
            card_id = self.cards[card]
            column = {"completed": "done", "in_progress": "in_progress"}.get(todo.status, "todo")
            if self.card_state.get(card_id) != column:
                self.card_state[card_id] = column
                self._pending_moves.append(
                    t.CardMoved(run_id=self.run_id, card_id=card_id, column=column)
                )
        done = sum(1 for c in self.cards if self.card_state[c] == "done")
        span = PERCENT[P.VALIDATE] - PERCENT[P.BUILD]
        self.progress.percent = max(
            self.progress.percent, PERCENT[P.BUILD] + span * done // max(1, len(self.cards))
        )

    def _comms_env(self) -> dict[str, str]:
        """Who the builder is, and — when this data dir's gateway runs — its address and a
        builder-role token valid for this run only: the builder may message as its agent,
        never dispatch or append phases. Worked out at the first builder call that finds the
        gateway, then kept for the run's later calls."""
        if self._comms:
            return self._comms
        env = {"SHIPYARD_AGENT": self.runner.name}
        info = instance.read_info(self.settings.data_dir) or {}
        env.update(self._nats_env(info))
        if not info.get("gateway_url"):
            return env  # not up yet (a claim at start-up), or not in this data dir
        url = self.settings.gateway.public_url or info["gateway_url"]
        expires = utcnow() + timedelta(seconds=self.hs.builder_timeout * 3)
        store = TokenStore(self.settings.data_dir)
        self._token = store.create("builder", self.runner.name, expires=expires)
        self._secrets = [self._token, *self._secrets]
        self._comms = {**env, "SHIPYARD_URL": url.rstrip("/"), "SHIPYARD_TOKEN": self._token}
        return self._comms

    def _nats_env(self, info: dict[str, Any]) -> dict[str, str]:
        """On the embedded server, the agent's own NATS user: the builder's `shipyard send`
        and `shipyard inbox` work, and NATS refuses it everything else."""
        if not (self.settings.embedded and info.get("nats_url")):
            return {}
        try:
            users = access.Users.load(access.nats_dir(self.settings.data_dir))
            creds = users.credentials("builder", self.runner.name)
        except ConfigError:
            return {}  # an agent added since the server started has no user until restart
        self._secrets = [creds.password, *self._secrets]
        return {
            "SHIPYARD_NATS_URL": ",".join(info["nats_url"]),
            "SHIPYARD_NATS_USER": creds.user,
            "SHIPYARD_NATS_PASSWORD": creds.password,
        }

    async def _maybe_progress(self) -> None:
        now = asyncio.get_running_loop().time()
        if self.active and now - self._last_progress_post >= min(
            PROGRESS_EVERY, self.hs.heartbeat_interval
        ):
            await self.heartbeat()

    def _log(self, line: str) -> None:
        line = mask(line, self._secrets)
        self._tail.append(line[:LOG_TAIL_LINE_CHARS])
        if self._log_file is not None:
            self._log_file.write(line + "\n")  # buffered; flushed when each call ends


def _reason(outcome: Outcome) -> str:
    if outcome.subtype == "error_max_turns":
        return "max_turns"
    if outcome.subtype == "timeout":
        return "builder_timeout"
    return "builder_error"


def _after(now: datetime, seconds: float) -> datetime:
    return now + timedelta(seconds=seconds)


def _match_card(title: str, steps: list[str], index: int, count: int) -> int | None:
    low = title.casefold().strip()
    for i, step in enumerate(steps):
        s = step.casefold().strip()
        if low and (low == s or low in s or s in low):
            return i
    return index if index < count else None


def plan_steps(text: str) -> list[str]:
    """The numbered or bulleted lines of a plan, in order."""
    steps = [item for item in dispatch.list_items(text) if item and not item.startswith("#")]
    return [s.strip("*_ ") for s in steps if len(s.strip("*_ ")) > 1][:50]


def requirements_plan(prompt: str) -> list[str]:
    """A plan for builders that cannot plan: one step per requirement, then the deliverables."""
    sections = dispatch.split_sections(prompt)
    steps = dispatch.list_items(sections.get("Requirements") or "")
    if not steps:
        steps = [sections.get("Task") or "Do the task"]
    deliver = sections.get("Deliverables")
    if deliver:
        steps.append("Deliver: " + "; ".join(dispatch.list_items(deliver)))
    return steps
