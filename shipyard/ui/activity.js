// Panel 3, Activity: the timeline of notable events, newest first. A row about a run or a
// task opens its phase-by-phase breakdown.

import { api } from "./api.js";
import { empty, errorNote, h, replace } from "./dom.js";
import { clock, full, parseTime, words } from "./format.js";
import { openRun } from "./router.js";

const PAGE = 60;
const KEEP = 600; // rows kept on screen when new ones keep arriving
const MODE_KEY = "shipyard.activity";
// Steps inside a run; "Milestones" hides them unless something went wrong.
const STEPS = new Set(["phase_changed", "builder_started", "plan_recorded", "validation_checked"]);

// Colour by what happened. Finished and validation rows say in their text how it went.
function tone(row) {
  switch (row.kind) {
    case "dispatch_rejected":
      return "bad";
    case "run_stale":
    case "task_requeued":
    case "task_cancel_requested":
      return "warn";
    case "report_written":
      return "ok";
    case "task_dispatched":
    case "task_claimed":
      return "info";
    case "message_sent":
      return "comms";
    case "run_finished":
    case "task_finished":
    case "validation_checked":
    case "phase_changed":
      if (/\bfailed\b/.test(row.text)) return "bad";
      if (/\b(succeeded|passed)\b/.test(row.text)) return "ok";
      if (/\bcancell?ed\b/.test(row.text)) return "muted";
      return row.kind === "phase_changed" ? "phase" : "muted";
    default:
      return "muted";
  }
}

function dayLabel(iso) {
  const t = parseTime(iso);
  if (t === null) return "";
  const date = new Date(t);
  const today = new Date();
  const yesterday = new Date(today.getTime() - 86400000);
  if (date.toDateString() === today.toDateString()) return "Today";
  if (date.toDateString() === yesterday.toDateString()) return "Yesterday";
  return date.toLocaleDateString(undefined, { weekday: "short", month: "short", day: "numeric" });
}

export function createActivity(root) {
  let rows = [];
  let error = null;
  let exhausted = false;
  let busy = false;
  let mode = localStorage.getItem(MODE_KEY) === "milestones" ? "milestones" : "all";
  const list = h("ol", { class: "timeline", role: "list" });
  const older = h("button", { type: "button", class: "btn btn-quiet", hidden: true }, "Load older");
  older.addEventListener("click", loadOlder);
  const modeButton = (value, label) => {
    const b = h("button", { type: "button", class: "segment", "aria-pressed": String(mode === value), "data-mode": value }, label);
    b.addEventListener("click", () => {
      mode = value;
      localStorage.setItem(MODE_KEY, mode);
      for (const x of modes.children) x.setAttribute("aria-pressed", String(x.dataset.mode === mode));
      render(new Set());
    });
    return b;
  };
  const modes = h("div", { class: "segments", role: "group", "aria-label": "Which events" },
    modeButton("all", "Everything"), modeButton("milestones", "Milestones"));
  replace(root, h("div", { class: "toolbar" }, modes), list, h("div", { class: "list-footer" }, older));

  async function refresh() {
    if (busy) return;
    busy = true;
    try {
      const fresh = await api.activity({ limit: PAGE });
      error = null;
      const top = rows.length ? rows[0].seq : 0;
      const added = fresh.filter((r) => r.seq > top);
      if (!rows.length) exhausted = fresh.length < PAGE;
      rows = added.concat(rows).slice(0, Math.max(KEEP, rows.length));
      render(new Set(top ? added.map((r) => r.seq) : []));
    } catch (e) {
      error = e;
      render(new Set());
    } finally {
      busy = false;
    }
  }

  async function loadOlder() {
    if (!rows.length) return;
    older.disabled = true;
    try {
      const page = await api.activity({ limit: PAGE, before: rows[rows.length - 1].seq });
      exhausted = page.length < PAGE;
      rows = rows.concat(page);
      render(new Set());
    } catch (e) {
      error = e;
    } finally {
      older.disabled = false;
    }
  }

  function item(row, fresh) {
    const opens = row.run_id || row.task_id;
    const attrs = {
      class: "activity-row", "data-testid": "activity-row", "data-kind": row.kind,
      "data-tone": tone(row), "data-seq": String(row.seq),
    };
    const content = [
      h("time", { class: "a-time", datetime: row.at, title: full(row.at) }, clock(row.at)),
      h("span", { class: "a-mark", "aria-hidden": "true" }),
      h("span", { class: "a-body" },
        h("span", { class: "a-kind" }, words(row.kind)),
        h("span", { class: "a-text" }, row.text || words(row.kind)),
        h("span", { class: "a-meta" },
          row.task_id ? h("span", { class: "mono" }, row.task_id) : null,
          row.actor ? h("span", null, row.task_id ? ` · ${row.actor}` : row.actor) : null)),
    ];
    const el = opens
      ? h("button", { type: "button", ...attrs, "aria-label": `${words(row.kind)}: ${row.text}. Open the breakdown` }, content)
      : h("div", attrs, content);
    if (opens) el.addEventListener("click", () => openRun(row.run_id, row.task_id));
    return h("li", { class: fresh ? "arrived" : null }, el);
  }

  function render(fresh) {
    older.hidden = exhausted || !rows.length;
    if (error && !rows.length) {
      replace(list, h("li", null, errorNote(error, "the activity")));
      return;
    }
    if (!rows.length) {
      replace(list, h("li", null, empty("No activity yet.", "Dispatches, phases, validations and messages appear here as they happen.")));
      return;
    }
    const items = [];
    let day = "";
    const shown = mode === "all" ? rows : rows.filter((r) => !STEPS.has(r.kind) || tone(r) === "bad");
    if (!shown.length) items.push(h("li", null, empty("No milestones among these events.", "Switch to Everything, or load older events.")));
    for (const row of shown) {
      const label = dayLabel(row.at);
      if (label !== day) {
        day = label;
        items.push(h("li", { class: "timeline-day", "aria-hidden": "true" }, label));
      }
      items.push(item(row, fresh.has(row.seq)));
    }
    replace(list, items);
  }

  return { refresh };
}
