// Panel 1, Live build: one card per active run, grouped by `group`. Progress and phase
// events are applied to a card directly (the read models lag an event by a moment); the
// list itself is re-read from /api/runs/live.

import { api } from "./api.js";
import { badge, errorNote, h, replace } from "./dom.js";
import { cost, count, elapsed, parseTime, plural, words } from "./format.js";
import { liveStatuses, phaseDots, phaseLabel, phases, updateDots } from "./phases.js";
import { go, openRun } from "./router.js";

// How long a finished run stays on the panel: long enough to notice a failure.
const LINGER_MS = { failed: 45000, cancelled: 12000, succeeded: 8000 };

export function createLive(body, meta, announcer) {
  const entries = new Map(); // run_id → {run, known, ended, el, timer}
  let loaded = false;
  let queued = 0;
  let error = null;

  function announce(text) {
    announcer.textContent = "";
    setTimeout(() => { announcer.textContent = text; }, 50);
  }

  let asked = 0; // replies to older requests are dropped

  async function refresh() {
    const mine = ++asked;
    let rows;
    try {
      rows = await api.liveRuns();
      error = null;
    } catch (e) {
      error = e;
      render();
      return;
    }
    if (mine !== asked) return;
    const seen = new Set();
    for (const run of rows) {
      seen.add(run.run_id);
      const entry = entries.get(run.run_id);
      if (!entry) {
        entries.set(run.run_id, { run, known: {}, ended: null, el: null });
        loadPhases(run.run_id);
        if (loaded) announce(`Build started: ${run.title}`);
      } else if (!entry.ended) {
        // Keep what a newer event already told us; the read model may not have it yet.
        const ours = parseTime(entry.run.last_heartbeat) || 0;
        const theirs = parseTime(run.last_heartbeat) || 0;
        entry.run = theirs >= ours ? run : { ...run, ...pick(entry.run), stale: run.stale && entry.run.stale };
      }
    }
    for (const [runId, entry] of entries) {
      if (!seen.has(runId) && !entry.ended) entries.delete(runId);
    }
    loaded = true;
    render();
  }

  async function loadPhases(runId) {
    try {
      const detail = await api.run(runId);
      const entry = entries.get(runId);
      if (!entry || !detail) return;
      for (const p of detail.phases || []) {
        if (!(p.phase in entry.known)) entry.known[p.phase] = p.status;
      }
      update(entry);
    } catch {
      // The card still shows phases from the current one; the next event corrects it.
    }
  }

  /** Apply an event straight to its card. Returns true when the list itself may change. */
  function onEvent(event) {
    const d = event.data || {};
    const entry = d.run_id ? entries.get(d.run_id) : null;
    switch (event.type) {
      case "work_progress":
        if (!entry || entry.ended) return !entry;
        Object.assign(entry.run, {
          phase: d.phase, percent: d.percent, action: d.action || "",
          turns: d.turns || 0, tool_calls: d.tool_calls || 0, tokens_in: d.tokens_in || 0,
          tokens_out: d.tokens_out || 0, cost_usd: d.cost_usd || 0, last_tool: d.last_tool || "",
          blockers: d.blockers || [], stale: false, last_heartbeat: event.time,
        });
        update(entry);
        return false;
      case "phase_changed":
        if (!entry || entry.ended) return !entry;
        entry.known[d.phase] = d.status;
        if (d.status === "started") Object.assign(entry.run, { phase: d.phase, action: d.action || "" });
        Object.assign(entry.run, { stale: false, last_heartbeat: event.time });
        update(entry);
        return false;
      case "run_stale":
        if (!entry || entry.ended) return false;
        entry.run.stale = true;
        update(entry);
        announce(`${entry.run.title} is STALE: no heartbeat`);
        return false;
      case "run_finished":
        if (!entry) return false;
        finish(entry, d, event.time);
        return false;
      case "task_claimed":
      case "task_requeued":
      case "task_finished":
        return true;
      default:
        return false;
    }
  }

  function finish(entry, d, at) {
    entry.ended = { outcome: d.outcome, at, phase: d.phase || "", reason: d.reason || "" };
    if (d.outcome === "succeeded") {
      entry.run.percent = 100;
      for (const p of phases()) if (entry.known[p.name] === "started") entry.known[p.name] = "succeeded";
    } else if (d.phase) {
      entry.known[d.phase] = "failed";
    }
    entry.run.stale = false;
    update(entry);
    announce(`${entry.run.title} ${d.outcome}${d.reason ? `: ${d.reason}` : ""}`);
    clearTimeout(entry.timer);
    entry.timer = setTimeout(() => {
      entries.delete(entry.run.run_id);
      const el = entry.el && entry.el.card;
      if (el) {
        el.classList.add("leaving");
        setTimeout(render, 400);
      } else {
        render();
      }
    }, LINGER_MS[d.outcome] || 10000);
  }

  function card(entry) {
    const run = entry.run;
    const title = h("button", { type: "button", class: "live-title linklike" }, run.title);
    title.addEventListener("click", () => openRun(entry.run.run_id));
    const el = {
      title,
      ids: h("p", { class: "live-ids" }),
      badges: h("div", { class: "live-badges" }),
      clock: h("span", { class: "live-clock", title: "Elapsed" }),
      dots: phaseDots([], { labels: true }),
      fill: h("span", { class: "progress-fill" }),
      pct: h("span", { class: "progress-pct" }),
      action: h("p", { class: "live-action" }),
      stats: h("p", { class: "live-stats" }),
      blockers: h("ul", { class: "live-blockers", hidden: true }),
    };
    el.bar = h("div", {
      class: "progress", role: "progressbar", "data-testid": "progress",
      "aria-valuemin": "0", "aria-valuemax": "100", "aria-valuenow": "0",
      "aria-label": `Progress of ${run.title}`,
    }, el.fill);
    el.card = h("article", {
      class: "live-card", "data-testid": "live-run", "data-run-id": run.run_id,
      "aria-label": `Build: ${run.title}`,
    },
    h("header", { class: "live-card-head" },
      h("div", { class: "live-heading" }, el.title, el.ids),
      h("div", { class: "live-side" }, el.badges, el.clock)),
    el.dots,
    h("div", { class: "progress-row" }, el.bar, el.pct),
    el.action,
    el.stats,
    el.blockers);
    entry.el = el;
    update(entry);
    return el.card;
  }

  function update(entry) {
    const el = entry.el;
    if (!el) return;
    const run = entry.run;
    const ended = entry.ended;
    const state = ended ? ended.outcome : run.stale ? "stale" : "running";
    el.card.dataset.state = state;
    el.title.textContent = run.title;
    replace(el.ids,
      h("span", { class: "mono" }, run.task_id), " · ", run.agent || "default agent",
      run.attempt > 1 ? ` · attempt ${run.attempt}` : "",
      run.handler ? h("span", { class: "live-handler" }, ` · on ${run.handler}`) : "");

    const badges = [];
    if (ended && ended.outcome === "failed") badges.push(badge("FAILED", "bad", { "data-testid": "failed-badge" }));
    else if (ended && ended.outcome === "succeeded") badges.push(badge("DONE", "ok"));
    else if (ended) badges.push(badge(ended.outcome.toUpperCase(), "muted"));
    else if (run.stale) {
      badges.push(badge("STALE", "warn", {
        "data-testid": "stale-badge",
        title: `No heartbeat since ${new Date(parseTime(run.last_heartbeat) || Date.now()).toLocaleTimeString()}`,
      }));
    }
    replace(el.badges, badges);
    el.clock.dataset.started = run.started_at;
    el.clock.dataset.ended = ended ? ended.at : "";
    tickOne(el.clock);

    const statuses = liveStatuses(run.phase, entry.known);
    if (ended && ended.outcome !== "succeeded") {
      // The phase it stopped in failed; nothing after it will run.
      const at = statuses.indexOf("current");
      if (at >= 0) statuses[at] = ended.outcome === "failed" ? "failed" : "pending";
    }
    el.dots = updateDots(el.dots, statuses);

    const percent = Math.max(0, Math.min(100, Number(run.percent) || 0));
    el.fill.style.width = `${percent}%`;
    el.bar.setAttribute("aria-valuenow", String(percent));
    el.pct.textContent = `${percent}%`;

    const phase = h("strong", { class: "live-phase" }, phaseLabel(ended && ended.phase ? ended.phase : run.phase));
    if (ended && ended.outcome === "failed") {
      replace(el.action, phase, ` · failed${ended.reason ? `: ${ended.reason}` : ""}`);
    } else if (ended) {
      replace(el.action, `${words(ended.outcome)}${ended.reason ? `: ${ended.reason}` : ""}`);
    } else {
      replace(el.action, phase, run.action ? ` · ${run.action}` : "");
    }
    el.action.title = run.action || "";

    replace(el.stats,
      stat(plural(run.turns, "turn")), stat(plural(run.tool_calls, "tool call")),
      stat(cost(run.cost_usd), "cost"),
      run.tokens_in || run.tokens_out ? stat(`${count(run.tokens_in + run.tokens_out)} tokens`) : null,
      run.last_tool ? stat(`last: ${run.last_tool}`, "last-tool") : null);

    const blockers = run.blockers || [];
    el.blockers.hidden = blockers.length === 0 || Boolean(ended);
    replace(el.blockers, blockers.map((b) => h("li", null, b)));
  }

  function stat(text, cls = "") {
    return h("span", { class: `live-stat ${cls}` }, text);
  }

  function render() {
    body.setAttribute("aria-busy", loaded ? "false" : "true");
    const list = [...entries.values()];
    const running = list.filter((e) => !e.ended).length;
    const stale = list.filter((e) => !e.ended && e.run.stale).length;
    meta.textContent = running ? `${plural(running, "run")} building${stale ? ` · ${stale} stale` : ""}` : "";
    if (error && !list.length) {
      replace(body, errorNote(error, "the live builds"));
      return;
    }
    if (!loaded) return;
    if (!list.length) {
      replace(body, idle());
      return;
    }
    const groups = new Map();
    for (const entry of list) {
      const key = entry.run.group || "";
      if (!groups.has(key)) groups.set(key, []);
      groups.get(key).push(entry);
    }
    const sections = [];
    const keys = [...groups.keys()].sort((a, b) => (a === "" ? -1 : b === "" ? 1 : a.localeCompare(b)));
    for (const key of keys) {
      const members = groups.get(key);
      const grid = h("div", { class: "live-grid" }, members.map((e) => (e.el ? e.el.card : card(e))));
      if (!key) {
        sections.push(grid);
        continue;
      }
      const done = members.filter((e) => e.ended && e.ended.outcome === "succeeded").length;
      sections.push(h("section", { class: "live-group", "data-group": key, "aria-label": `Group ${key}` },
        h("h3", { class: "live-group-head" }, h("span", { class: "group-chip" }, key),
          h("span", { class: "muted" }, ` ${plural(members.length, "run")}${members.length > 1 ? " in parallel" : ""}${done ? ` · ${done} done` : ""}`)),
        grid));
    }
    replace(body, sections);
  }

  function idle() {
    return h("div", { class: "idle", "data-testid": "idle" },
      h("span", { class: "idle-mark", "aria-hidden": "true" }, h("span"), h("span"), h("span")),
      h("div", null,
        h("p", { class: "idle-title" }, "All quiet — nothing is building."),
        h("p", { class: "idle-detail" },
          queued ? `${plural(queued, "task")} queued, waiting for a handler to claim ${queued === 1 ? "it" : "them"}.`
            : "Dispatch a task to see it here."),
        h("button", { type: "button", class: "btn btn-quiet", onclick: () => go("dispatch") }, "Dispatch a task")));
  }

  function tickOne(clock) {
    const end = parseTime(clock.dataset.ended);
    clock.textContent = elapsed(clock.dataset.started, end || Date.now());
  }

  return {
    refresh,
    onEvent,
    tick() {
      for (const entry of entries.values()) if (entry.el && !entry.ended) tickOne(entry.el.clock);
    },
    setQueued(n) {
      if (n === queued) return;
      queued = n;
      if (loaded && entries.size === 0) render();
    },
    /** Reload each card's phases after a reconnect, when phase events may have been missed. */
    resync() {
      for (const runId of entries.keys()) loadPhases(runId);
      return refresh();
    },
  };
}

function pick(run) {
  const { phase, percent, action, turns, tool_calls, tokens_in, tokens_out, cost_usd, last_tool, blockers, last_heartbeat } = run;
  return { phase, percent, action, turns, tool_calls, tokens_in, tokens_out, cost_usd, last_tool, blockers, last_heartbeat };
}
