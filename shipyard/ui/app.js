// The dashboard: loads /api/meta, builds the views, follows /api/events and re-reads the
// panels an event affects. Read models update a moment after an event arrives, so panels
// are re-read shortly after (debounced), and once more a little later to be sure.

import { createActivity } from "./activity.js";
import { ApiError, api, onOffline, onUnauthorized, trackApplied } from "./api.js";
import { createBreakdown } from "./breakdown.js";
import { createComms } from "./comms.js";
import { createDispatch } from "./dispatch.js";
import { h, replace, toast } from "./dom.js";
import { count, plural } from "./format.js";
import { createHistory } from "./history.js";
import { createKanban } from "./kanban.js";
import { createLive } from "./live.js";
import { setPhases } from "./phases.js";
import { current, onRoute } from "./router.js";
import { follow } from "./stream.js";

const DEBOUNCE_MS = 150;
const SETTLE_MS = 1200; // a second look, for read models that lag more than a moment
const MAX_SETTLE_ROUNDS = 25; // looks at most, while the read models trail the events seen
const STATUS_EVERY_MS = 15000;
const CATCHUP_EVERY_MS = 2000;

// Which panels an event type touches. Anything else refreshes only the activity timeline.
const AFFECTS = {
  task_dispatched: ["status", "kanban"],
  dispatch_rejected: [],
  task_claimed: ["live", "status", "kanban"],
  task_cancel_requested: ["kanban"],
  task_requeued: ["live", "status", "kanban"],
  builder_started: [],
  phase_changed: ["kanban"],
  work_progress: ["quiet"],
  plan_recorded: [],
  card_added: ["kanban", "quiet"],
  card_moved: ["kanban", "quiet"],
  validation_checked: [],
  run_stale: ["live", "status"],
  report_written: [],
  run_finished: ["live", "history", "status", "kanban"],
  task_finished: ["live", "status", "kanban", "history"],
  message_sent: ["comms"],
  message_read: ["comms", "quiet"],
  handler_heartbeat: ["quiet"],
  task_escalated: ["kanban"],
  group_finished: ["kanban"],
  alert_delivered: ["quiet"],
};

const $ = (id) => document.getElementById(id);

const state = {
  meta: null,
  view: "",
  caughtUp: true,
  stream: null,
  dirty: new Set(),
  pending: new Set(),
  seen: new Set(), // views whose panel has been read once
  seenSeq: 0, // the newest event the stream delivered
};

const live = createLive($("live-body"), $("live-meta"), announcer());
const history = createHistory($("history-body"), $("history-meta"));
const activity = createActivity($("activity-body"));
const kanban = createKanban($("kanban-body"));
const comms = createComms($("comms-body"), { onUnread: showUnread });
const dispatch = createDispatch($("dispatch-body"));
const breakdown = createBreakdown($("drawer-backdrop"), $("drawer"), {
  rework: (run, task) => dispatch.rework(run, task),
});

function announcer() {
  const el = h("p", { class: "visually-hidden", "aria-live": "polite", id: "live-announcer" });
  document.querySelector("[data-testid=live-panel]").appendChild(el);
  return el;
}

// --- refreshing panels ---------------------------------------------------------------

const REFRESH = {
  live: () => live.refresh(),
  history: () => history.refreshTop(),
  activity: () => activity.refresh(),
  status: () => refreshStatus(),
  kanban: () => kanban.refresh(),
  comms: () => comms.refresh(),
};
const VIEW_PANELS = { kanban: "kanban", comms: "comms" };

let flushTimer = 0;
let settleTimer = 0;
let settleRunning = false;
const settling = new Set();

// Timers are not pushed back by later events, so a steady stream of events cannot starve
// the panels of refreshes.
function invalidate(panels) {
  for (const p of panels) {
    state.pending.add(p);
    settling.add(p);
  }
  if (!flushTimer) flushTimer = setTimeout(flush, DEBOUNCE_MS);
  if (!settleTimer && !settleRunning) settle(0);
}

/** A second look at the panels events touched, a while later; again while the answers they
 * got were served from read models that had not yet applied the newest event seen. */
function settle(round) {
  settleTimer = setTimeout(async () => {
    settleTimer = 0;
    settleRunning = true;
    const target = state.seenSeq;
    for (const p of settling) state.pending.add(p);
    const tracker = trackApplied();
    try {
      await flush();
    } finally {
      tracker.stop();
      settleRunning = false;
    }
    if ((tracker.min < target || state.seenSeq > target) && round + 1 < MAX_SETTLE_ROUNDS) {
      settle(round + 1);
    } else {
      settling.clear();
    }
  }, SETTLE_MS);
}

function flush() {
  clearTimeout(flushTimer);
  flushTimer = 0;
  const panels = [...state.pending];
  state.pending.clear();
  const reads = [];
  for (const p of panels) {
    const view = Object.keys(VIEW_PANELS).find((v) => VIEW_PANELS[v] === p);
    if (view && state.view !== view) {
      state.dirty.add(p); // re-read when the view is shown
      continue;
    }
    reads.push(REFRESH[p]());
  }
  return Promise.allSettled(reads);
}

function refreshAll() {
  invalidate(["live", "history", "activity", "status", "kanban", "comms"]);
  breakdown.resync();
}

// --- the header: status, queue depth, catching up ------------------------------------

let statusTimer = 0;

async function refreshStatus() {
  clearTimeout(statusTimer);
  let status = null;
  try {
    status = await api.status();
  } catch {
    statusTimer = setTimeout(refreshStatus, STATUS_EVERY_MS);
    return null;
  }
  const { projection, summary } = status;
  const wasCaughtUp = state.caughtUp;
  state.caughtUp = projection.caught_up;
  const banner = $("catchup");
  banner.hidden = projection.caught_up;
  if (!projection.caught_up) {
    const pct = Math.max(0, Math.min(100, Math.floor(projection.percent)));
    $("catchup-text").textContent = `Catching up with the event log: ${pct}% (event ${count(projection.applied_seq)} of ${count(projection.target_seq)}). Panels fill in as it goes.`;
    $("catchup-bar").style.width = `${pct}%`;
  }
  if (!wasCaughtUp && projection.caught_up) refreshAll();
  renderQueue(summary);
  live.setQueued(Object.values(summary.queue_depth).reduce((a, b) => a + b, 0));
  history.setChoices({ outcomes: outcomesOf(summary) });
  const running = summary.live.length;
  document.title = running ? `(${running}) building · Shipyard` : "Shipyard";
  statusTimer = setTimeout(refreshStatus, projection.caught_up ? STATUS_EVERY_MS : CATCHUP_EVERY_MS);
  if (!projection.caught_up) invalidate(["live", "history", "activity"]);
  return status;
}

function outcomesOf(summary) {
  if (Array.isArray(state.meta.outcomes)) return state.meta.outcomes;
  return Object.keys(summary.runs_by_state).filter((s) => s !== "running").sort();
}

function renderQueue(summary) {
  const total = Object.values(summary.queue_depth).reduce((a, b) => a + b, 0);
  const chips = state.meta.priorities.map((p) => {
    const n = summary.queue_depth[p] || 0;
    return h("span", { class: "queue-chip", "data-priority": p, "data-count": String(n), title: `${plural(n, "task")} queued at ${p} priority` },
      h("span", { class: "queue-n" }, count(n)), h("span", { class: "queue-p" }, p));
  });
  const stale = summary.stale_runs
    ? h("span", { class: "queue-chip queue-stale", title: "Runs without a heartbeat" }, h("span", { class: "queue-n" }, count(summary.stale_runs)), h("span", { class: "queue-p" }, "stale"))
    : null;
  replace($("queue"), h("span", { class: "queue-label" }, total ? "Queued" : "Queue empty"), total ? chips : null, stale);
}

function showUnread(n) {
  const el = $("nav-unread");
  el.hidden = !n;
  el.textContent = n ? String(n) : "";
  el.setAttribute("aria-label", `${n} unread`);
}

// --- the event stream ----------------------------------------------------------------

function setConnection(next) {
  const el = $("connection");
  const wasLive = el.dataset.state === "live";
  el.dataset.state = next;
  el.querySelector(".connection-text").textContent = next === "live" ? "Live" : wasLive || state.stream ? "Reconnecting…" : "Connecting…";
  el.title = next === "live" ? "Following the event log" : "Lost the event stream; retrying";
}

function onEvent(event) {
  const type = event.type;
  if (Number(event.seq) > state.seenSeq) state.seenSeq = Number(event.seq);
  const panels = AFFECTS[type] || [];
  const listChanged = live.onEvent(event);
  breakdown.onEvent(event);
  const wanted = panels.filter((p) => p !== "quiet");
  if (listChanged && !wanted.includes("live")) wanted.push("live");
  if (!panels.includes("quiet")) wanted.push("activity");
  if (type === "dispatch_rejected") toast(`A dispatch was refused${event.data && event.data.dispatcher ? ` (from ${event.data.dispatcher})` : ""}`, "bad");
  if (wanted.length) invalidate(wanted);
}

function startStream(after) {
  state.stream = follow({
    after,
    types: state.meta.event_types || [],
    onEvent,
    onState: setConnection,
    onResync: () => {
      live.resync();
      refreshAll();
    },
    probe: () => api.status().catch(() => null),
  });
}

// --- views -----------------------------------------------------------------------------

function route({ view, params }) {
  if (view !== state.view) {
    state.view = view;
    for (const section of document.querySelectorAll(".view")) section.hidden = section.dataset.view !== view;
    for (const link of document.querySelectorAll(".nav a")) {
      if (link.dataset.view === view) link.setAttribute("aria-current", "page");
      else link.removeAttribute("aria-current");
    }
    const panel = VIEW_PANELS[view];
    if (panel && (state.dirty.has(panel) || !state.seen.has(panel))) {
      state.dirty.delete(panel);
      state.seen.add(panel);
      REFRESH[panel]();
    }
    window.scrollTo(0, 0);
  }
  if (view === "comms") comms.select(params.get("thread") || "");
  const runId = params.get("run");
  const taskId = params.get("task");
  if (runId || taskId) breakdown.show({ runId: runId || "", taskId: runId ? "" : taskId });
  else breakdown.hide();
}

// --- signing in --------------------------------------------------------------------------

function showGate() {
  $("gate").hidden = false;
  document.body.classList.add("gated");
  if (state.stream) {
    state.stream.close();
    state.stream = null;
  }
}

onUnauthorized(showGate);
// A request that cannot reach the server means the stream is probably dead too.
onOffline(() => {
  if (state.stream) state.stream.restart();
});
$("gate-retry").addEventListener("click", () => location.reload());

// --- start ---------------------------------------------------------------------------------

async function start() {
  try {
    state.meta = await api.meta();
  } catch (e) {
    if (e instanceof ApiError && e.status === 401) return;
    replace($("live-body"), h("p", { class: "load-error", role: "alert" },
      e.status === 0 ? "Shipyard can't be reached. Is `shipyard up` running?" : `Couldn't start: ${e.message}`),
    h("button", { type: "button", class: "btn", onclick: () => location.reload() }, "Try again"));
    return;
  }
  const meta = state.meta;
  setPhases(meta.phases);
  kanban.setColumns(meta.kanban_columns);
  comms.setTypes(meta.message_types);
  dispatch.setMeta(meta);
  document.documentElement.dataset.version = meta.version || "";

  let status = await refreshStatus();
  while (!status) {
    if (!$("gate").hidden) return;
    replace($("live-body"), h("p", { class: "load-error", role: "alert" }, "Waiting for Shipyard to answer…"));
    await new Promise((resolve) => setTimeout(resolve, 3000));
    status = await refreshStatus();
  }
  route(current());
  onRoute(route);
  live.refresh();
  history.load();
  activity.refresh();
  refreshAgents();
  // Follow from the newest event: the read models hold the rest, or will when caught up.
  const p = status.projection;
  startStream(Math.max(p.applied_seq, p.target_seq));
  setInterval(() => {
    live.tick();
    breakdown.tick();
  }, 1000);
  setInterval(refreshAgents, 60000);
}

async function refreshAgents() {
  try {
    const agents = await api.agents();
    const names = agents.map((a) => a.name);
    history.setChoices({ agents: names });
    dispatch.setAgents(names);
    comms.setNames(names);
  } catch {
    // Filters work without the agent list.
  }
}

start();
