// The breakdown drawer: one run phase by phase, with its validation and HEAL rounds, the
// report, the log tail, and what the operator can do next (cancel, retry, rework).

import { ApiError, api, reportUrl } from "./api.js";
import { badge, debounce, errorNote, h, replace, stateTone, toast } from "./dom.js";
import { clock, cost, count, duration, elapsed, full, plural, secondsBetween, when, words } from "./format.js";
import { dotStatus, phaseDots, phases } from "./phases.js";
import { setParams } from "./router.js";

const LOG_EVERY_MS = 3000;
const LOG_TAIL = 200;

export function createBreakdown(backdrop, drawer, { rework }) {
  let target = null; // {runId, taskId}
  let run = null;
  let task = null;
  let error = null;
  let log = null;
  let logError = null;
  let logTimer = 0;
  let opener = null;
  let confirming = false;
  let reason = "";
  let actionError = null;
  let token = 0;

  const close = () => setParams({ run: null, task: null });
  const scroll = h("div", { class: "drawer-scroll" });
  const parts = {
    head: h("header", { class: "drawer-head" }),
    summary: h("div", { class: "drawer-section" }),
    phases: h("section", { class: "drawer-section", "aria-labelledby": "bd-phases" }),
    validation: h("section", { class: "drawer-section", "aria-labelledby": "bd-validation" }),
    extras: h("div", { class: "drawer-section" }),
    log: h("section", { class: "drawer-section", "aria-labelledby": "bd-log" }),
    actions: h("div", { class: "drawer-actions" }),
  };
  replace(drawer, parts.head, scroll, parts.actions);
  replace(scroll, parts.summary, parts.phases, parts.validation, parts.extras, parts.log);

  backdrop.addEventListener("mousedown", (e) => {
    if (e.target === backdrop) close();
  });
  document.addEventListener("keydown", (e) => {
    if (!target) return;
    if (e.key === "Escape") {
      e.preventDefault();
      close();
    } else if (e.key === "Tab") {
      trapFocus(e);
    }
  });

  function trapFocus(e) {
    const focusable = [...drawer.querySelectorAll("a[href], button:not([disabled]), input, select, textarea, summary, [tabindex='0']")]
      .filter((el) => el.offsetParent !== null);
    if (!focusable.length) return;
    const first = focusable[0];
    const last = focusable[focusable.length - 1];
    if (e.shiftKey && (document.activeElement === first || document.activeElement === drawer)) {
      e.preventDefault();
      last.focus();
    } else if (!e.shiftKey && document.activeElement === last) {
      e.preventDefault();
      first.focus();
    }
  }

  async function load() {
    const mine = ++token;
    try {
      let r = null;
      let t = null;
      if (target.runId) {
        r = await api.run(target.runId);
        t = await api.task(r.task_id).catch(() => null);
      } else {
        t = await api.task(target.taskId);
        r = t.runs.length ? t.runs[t.runs.length - 1] : null;
      }
      if (mine !== token) return;
      run = r;
      task = t;
      error = null;
    } catch (e) {
      if (mine !== token) return;
      error = e;
    }
    render();
    if (run && log === null) loadLog();
  }

  async function loadLog() {
    clearTimeout(logTimer);
    if (!run || !target) return;
    const runId = run.run_id;
    try {
      const reply = await api.runLog(runId, LOG_TAIL);
      if (!run || run.run_id !== runId) return;
      log = reply.lines || [];
      logError = null;
    } catch (e) {
      logError = e;
    }
    renderLog();
    if (target && run && run.state === "running") logTimer = setTimeout(loadLog, LOG_EVERY_MS);
  }

  const reload = debounce(() => {
    if (target) load();
  }, 250);

  function show(next) {
    const same = target && next.runId === target.runId && next.taskId === target.taskId;
    if (same) return;
    const wasOpen = Boolean(target);
    target = next;
    run = null;
    task = null;
    error = null;
    log = null;
    logError = null;
    confirming = false;
    actionError = null;
    clearTimeout(logTimer);
    if (!wasOpen) {
      opener = document.activeElement;
      backdrop.hidden = false;
      document.body.classList.add("drawer-open");
      requestAnimationFrame(() => backdrop.classList.add("open"));
    }
    replace(parts.head, h("h2", { id: "drawer-title", class: "drawer-title" }, "Loading…"), closeButton());
    for (const key of ["summary", "phases", "validation", "extras", "log", "actions"]) replace(parts[key]);
    scroll.scrollTop = 0;
    drawer.focus();
    load();
  }

  function hide() {
    if (!target) return;
    target = null;
    token++;
    clearTimeout(logTimer);
    backdrop.classList.remove("open");
    document.body.classList.remove("drawer-open");
    backdrop.hidden = true;
    if (opener && opener.isConnected) opener.focus();
    opener = null;
  }

  function closeButton() {
    return h("button", { type: "button", class: "icon-btn drawer-close", "aria-label": "Close the breakdown", onclick: close }, "✕");
  }

  function render() {
    if (error) {
      const missing = error instanceof ApiError && error.status === 404;
      replace(parts.head, h("h2", { id: "drawer-title", class: "drawer-title" }, missing ? "Not found" : "Couldn't load"), closeButton());
      replace(parts.summary, missing ? h("p", { class: "muted" }, "There is no such run or task (yet). The read models may still be catching up.") : errorNote(error, "this run"));
      return;
    }
    const t = task && task.task;
    const title = (run && run.title) || (t && t.title) || "";
    const state = run ? run.state : t ? t.state : "";
    replace(parts.head,
      h("div", { class: "drawer-heading" },
        h("p", { class: "drawer-kicker" }, run ? "Run breakdown" : "Task"),
        h("h2", { id: "drawer-title", class: "drawer-title" }, title),
        h("p", { class: "drawer-ids" },
          badge(words(state), stateTone(state)),
          run && run.stale ? badge("STALE", "warn", { "data-testid": "stale-badge" }) : null,
          h("span", { class: "mono" }, (run && run.task_id) || (t && t.task_id)),
          run ? h("span", { class: "mono muted" }, run.run_id) : null)),
      closeButton());
    renderSummary(t);
    renderPhases();
    renderValidation();
    renderExtras(t);
    renderLog();
    if (!confirming) renderActions(t);
  }

  function renderSummary(t) {
    const facts = [];
    const fact = (label, value, title, wide = false) =>
      facts.push(h("div", { class: wide ? "fact fact-wide" : "fact" }, h("dt", null, label), h("dd", { title }, value)));
    if (run) {
      const running = run.state === "running";
      fact("Agent", run.agent || "default");
      fact("Handler", run.handler || "—");
      fact("Started", when(run.started_at), full(run.started_at));
      if (running) fact("Elapsed", h("span", { class: "ticking", "data-started": run.started_at }, elapsed(run.started_at)));
      else fact("Duration", duration(secondsBetween(run.started_at, run.ended_at)));
      fact("Turns", count(run.turns));
      fact("Tool calls", count(run.tool_calls));
      fact("Tokens", `${count(run.tokens_in)} in · ${count(run.tokens_out)} out`);
      fact("Cost", cost(run.cost_usd));
      fact("HEAL rounds", count(run.heal_rounds));
      if (run.attempt > 1) fact("Attempt", String(run.attempt));
    }
    if (t) {
      fact("Priority", words(t.priority));
      fact("Dispatcher", t.dispatcher);
      if (t.working_dir) fact("Working dir", h("span", { class: "mono" }, t.working_dir), t.working_dir, true);
      if (t.group) fact("Group", t.group);
      if (t.after && t.after.length) fact("After", h("span", { class: "mono" }, t.after.join(", ")));
      if (t.escalated_from) fact("Escalated from", taskLink(t.escalated_from));
      if (t.escalated_to) fact("Escalated to", taskLink(t.escalated_to));
      if (!run) fact("Queued", when(t.created_at), full(t.created_at));
    }
    const failure = run && run.state !== "running" && run.state !== "succeeded" && (run.reason || run.error)
      ? h("div", { class: "callout callout-bad", role: "note" },
        h("p", { class: "callout-title" },
          `${words(run.state)}${run.failed_phase ? ` in ${labelOf(run.failed_phase)}` : ""}${run.reason ? `: ${run.reason}` : ""}`),
        run.error ? h("pre", { class: "pre pre-error" }, run.error) : null)
      : null;
    const summary = run && run.summary ? h("p", { class: "run-summary" }, run.summary) : null;
    const blockers = run && run.state === "running" && run.blockers && run.blockers.length
      ? h("div", { class: "callout callout-warn" }, h("p", { class: "callout-title" }, "Blockers"), h("ul", null, run.blockers.map((b) => h("li", null, b))))
      : null;
    replace(parts.summary,
      task && task.runs.length > 1 ? attempts() : null,
      failure, blockers, summary,
      h("dl", { class: "facts" }, facts));
  }

  function taskLink(id) {
    const link = h("button", { type: "button", class: "linklike mono", "data-testid": "task-link" }, id);
    link.addEventListener("click", () => setParams({ task: id, run: null }));
    return link;
  }

  function attempts() {
    return h("div", { class: "attempts", role: "group", "aria-label": "Attempts" },
      task.runs.map((r) => h("button", {
        type: "button", class: "attempt", "aria-pressed": String(run && r.run_id === run.run_id),
        onclick: () => setParams({ run: r.run_id, task: null }, { replace: true }),
      }, `Attempt ${r.attempt}`, " ", badge(words(r.state), stateTone(r.state)))));
  }

  function labelOf(name) {
    const p = phases().find((x) => x.name === name);
    return p ? p.label : String(name).toUpperCase();
  }

  function renderPhases() {
    if (!run) {
      replace(parts.phases, h("h3", { id: "bd-phases" }, "Phases"),
        h("p", { class: "muted" }, task && task.task.state === "blocked"
          ? "Waiting for the tasks it runs after to succeed."
          : "Not claimed yet: the phases start when a handler picks this task up."));
      return;
    }
    const running = run.state === "running";
    const rows = phases().map((p) => {
      const row = (run.phases || []).find((x) => x.phase === p.name);
      let status = dotStatus(row ? row.status : "", { running, outcome: run.state });
      if (!running && run.failed_phase === p.name) status = "failed";
      const span = row && row.started_at
        ? `${clock(row.started_at)}${row.ended_at ? ` → ${clock(row.ended_at)} · ${duration(secondsBetween(row.started_at, row.ended_at))}` : " → now"}`
        : "";
      return h("li", { class: "bd-phase", "data-testid": "breakdown-phase", "data-phase": p.name, "data-status": status },
        h("span", { class: "bd-phase-dot" }, phaseDots([status], { size: "sm" }).firstChild),
        h("div", { class: "bd-phase-body" },
          h("p", { class: "bd-phase-head" },
            h("strong", null, p.label), " ",
            h("span", { class: `bd-status bd-status-${status}` }, status === "current" ? "in progress" : status),
            span ? h("span", { class: "bd-time", title: row ? `${full(row.started_at)} → ${full(row.ended_at)}` : "" }, span) : null),
          row && row.action ? h("p", { class: "bd-action" }, row.action) : null,
          row && row.result ? h("p", { class: "bd-result" }, row.result) : null));
    });
    // Only the dot of each row is kept from phaseDots; fix its data-testid so tests count rows.
    for (const li of rows) {
      const dot = li.querySelector(".dot");
      if (dot) dot.removeAttribute("data-testid");
    }
    replace(parts.phases, h("h3", { id: "bd-phases" }, "Phases"), h("ol", { class: "bd-phases" }, rows));
  }

  function renderValidation() {
    const rounds = (run && run.validations) || [];
    if (!run || !rounds.length) {
      replace(parts.validation);
      return;
    }
    const open = new Set([...parts.validation.querySelectorAll("details[open]")].map((d) => d.dataset.round));
    const fresh = !parts.validation.querySelector("details");
    const lastFailed = rounds.length && !rounds[rounds.length - 1].passed ? rounds[rounds.length - 1].round : -1;
    replace(parts.validation,
      h("h3", { id: "bd-validation" }, "Validation", run.heal_rounds ? h("span", { class: "muted" }, ` · ${plural(run.heal_rounds, "HEAL round")}`) : null),
      h("ol", { class: "rounds" }, rounds.map((v) => {
        const details = h("details", { class: "round", "data-round": String(v.round), "data-passed": String(v.passed) },
          h("summary", null,
            badge(v.passed ? "passed" : "failed", v.passed ? "ok" : "bad"), " ",
            h("strong", null, v.round === 0 ? "VALIDATE" : `HEAL round ${v.round}`),
            v.command ? h("code", { class: "round-cmd" }, v.command) : null,
            v.exit_code !== null && v.exit_code !== undefined ? h("span", { class: "muted" }, ` exit ${v.exit_code}`) : null,
            h("time", { class: "muted round-time", datetime: v.at, title: full(v.at) }, clock(v.at))),
          v.missing && v.missing.length
            ? h("p", { class: "round-missing" }, "Missing: ", v.missing.map((m, i) => [i ? ", " : "", h("code", null, m)]))
            : null,
          v.output ? h("pre", { class: "pre" }, v.output) : h("p", { class: "muted" }, "No output."));
        details.open = open.has(String(v.round)) || (fresh && v.round === lastFailed);
        return h("li", null, details);
      })));
  }

  function renderExtras(t) {
    const blocks = [];
    if (run && run.report_path) {
      blocks.push(h("p", null, h("a", { class: "btn btn-quiet", href: reportUrl(run.run_id), target: "_blank", rel: "noopener" }, "Open the HTML report ↗")));
    }
    if (run && run.plan_steps && run.plan_steps.length) {
      blocks.push(h("h3", null, "Plan", h("span", { class: "muted" }, run.plan_source ? ` · from the ${run.plan_source}` : "")),
        h("ol", { class: "plan" }, run.plan_steps.map((s) => h("li", null, s))));
    }
    if (run && run.files_changed && run.files_changed.length) {
      blocks.push(h("h3", null, "Files changed"), h("ul", { class: "files" }, run.files_changed.map((f) => h("li", { class: "mono" }, f))));
    }
    if (t && t.reason && !run) blocks.push(h("p", { class: "muted" }, t.reason));
    replace(parts.extras, blocks);
  }

  function renderLog() {
    if (!run) {
      replace(parts.log);
      return;
    }
    const old = parts.log.querySelector("pre");
    const stick = !old || old.scrollTop + old.clientHeight >= old.scrollHeight - 8;
    const refresh = h("button", { type: "button", class: "btn btn-quiet btn-sm", onclick: loadLog }, "Refresh");
    let content;
    if (logError) content = h("p", { class: "muted" }, logError.status === 404 ? "No log for this run." : `Couldn't read the log: ${logError.message}`);
    else if (log === null) content = h("p", { class: "muted" }, "Reading the log…");
    else if (!log.length) content = h("p", { class: "muted" }, "The log is empty so far.");
    else content = h("pre", { class: "pre pre-log", tabindex: "0", "aria-label": "Log tail" }, log.join("\n"));
    replace(parts.log,
      h("div", { class: "section-head" },
        h("h3", { id: "bd-log" }, "Log", h("span", { class: "muted" }, run.state === "running" ? " · live tail" : ` · last ${LOG_TAIL} lines`)),
        refresh),
      content);
    const pre = parts.log.querySelector("pre");
    if (pre) pre.scrollTop = stick ? pre.scrollHeight : old ? old.scrollTop : 0;
  }

  function renderActions(t) {
    const buttons = [];
    const taskState = t ? t.state : "";
    const live = ["queued", "blocked", "running"].includes(taskState);
    const latest = !task || !run || task.runs[task.runs.length - 1].run_id === run.run_id;
    if (confirming) {
      const input = h("input", { class: "input", type: "text", value: reason, placeholder: "Why? (optional)", "aria-label": "Reason for cancelling" });
      input.addEventListener("input", () => { reason = input.value; });
      buttons.push(h("form", { class: "cancel-form", onsubmit: (e) => { e.preventDefault(); doCancel(); } },
        input,
        h("button", { type: "submit", class: "btn btn-danger" }, "Cancel task"),
        h("button", { type: "button", class: "btn btn-quiet", onclick: () => { confirming = false; renderActions(task && task.task); } }, "Keep it")));
      setTimeout(() => input.focus(), 0);
    } else {
      if (live && t && !t.cancel_requested) {
        buttons.push(h("button", { type: "button", class: "btn btn-quiet", onclick: () => { confirming = true; renderActions(t); } }, "Cancel…"));
      }
      if (t && t.cancel_requested) buttons.push(h("span", { class: "muted" }, "Cancel requested…"));
      if (t && latest && ["failed", "cancelled"].includes(taskState)) {
        buttons.push(h("button", { type: "button", class: "btn", onclick: doRetry }, "Retry"));
      }
      if (run && run.state === "failed") {
        buttons.push(h("button", { type: "button", class: "btn btn-primary", onclick: () => rework(run, t) }, "Rework…"));
      }
    }
    replace(parts.actions, buttons,
      actionError ? h("p", { class: "field-error", role: "alert" }, actionError) : null);
  }

  async function doCancel() {
    const t = task && task.task;
    if (!t) return;
    try {
      await api.cancel(t.task_id, reason);
      toast("Cancel requested");
      actionError = null;
      confirming = false;
      reason = "";
      load();
    } catch (e) {
      actionError = e.problems.length ? e.problems.join("; ") : e.message;
      confirming = false;
      renderActions(t);
    }
  }

  async function doRetry() {
    const t = task && task.task;
    if (!t) return;
    try {
      await api.retry(t.task_id);
      toast("Queued again as a new attempt", "ok");
      actionError = null;
      setParams({ run: null, task: t.task_id }, { replace: true });
    } catch (e) {
      actionError = e.problems.length ? e.problems.join("; ") : e.message;
      renderActions(t);
    }
  }

  return {
    show,
    hide,
    isOpen: () => Boolean(target),
    tick() {
      if (!target) return;
      for (const el of drawer.querySelectorAll(".ticking")) el.textContent = elapsed(el.dataset.started);
    },
    onEvent(event) {
      if (!target) return;
      const d = event.data || {};
      const taskId = (run && run.task_id) || target.taskId;
      if ((d.run_id && run && d.run_id === run.run_id) || (event.aggregate === "task" && event.aggregate_id === taskId)) {
        reload();
        if (event.type === "run_finished" || event.type === "phase_changed") setTimeout(loadLog, 400);
      }
    },
    resync() {
      if (target) load();
    },
  };
}
