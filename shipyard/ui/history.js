// Panel 2, Build History: a row per finished run, newest first, paged with `next_before`
// through as many thousands as there are. New runs are added at the top as they finish.

import { api } from "./api.js";
import { badge, debounce, empty, errorNote, h, replace, stateTone } from "./dom.js";
import { cost, count, duration, full, when, words } from "./format.js";
import { historyStatuses, phaseDots } from "./phases.js";
import { openRun } from "./router.js";

const PAGE = 50;

export function createHistory(root, meta) {
  let rows = [];
  let total = 0;
  let nextBefore = "";
  let loading = false;
  let error = null;
  let generation = 0; // a filter change makes older replies obsolete
  const filters = { outcome: "", agent: "", search: "" };

  const outcome = h("select", { class: "input input-sm", "aria-label": "Filter by outcome" });
  const agent = h("select", { class: "input input-sm", "aria-label": "Filter by agent" });
  const search = h("input", {
    class: "input input-sm", type: "search", placeholder: "Search title or task id",
    "aria-label": "Search Build History", autocomplete: "off", spellcheck: "false",
  });
  const list = h("ul", { class: "history-list", role: "list" });
  const more = h("button", { type: "button", class: "btn btn-quiet", hidden: true }, "Load more");
  const footer = h("div", { class: "list-footer" }, h("span", { class: "muted", id: "history-shown" }), more);

  outcome.addEventListener("change", () => setFilter("outcome", outcome.value));
  agent.addEventListener("change", () => setFilter("agent", agent.value));
  const onSearch = debounce(() => setFilter("search", search.value.trim()), 250);
  search.addEventListener("input", onSearch);
  more.addEventListener("click", () => load(false));

  const header = h("div", { class: "history-header", "aria-hidden": "true", hidden: true },
    h("span", null, "Phases"), h("span", null, "Build"), h("span", null, "Outcome"),
    h("span", { class: "num" }, "Duration"), h("span", { class: "num" }, "Turns"),
    h("span", { class: "num" }, "Cost"), h("span", { class: "num" }, "Ended"));
  replace(root, h("div", { class: "toolbar", role: "search" }, outcome, agent, search), header, list, footer);

  function setFilter(key, value) {
    if (filters[key] === value) return;
    filters[key] = value;
    load(true);
  }

  function options(select, values, allLabel, current, label = (v) => v) {
    const list = [...new Set(values.filter(Boolean))];
    if (current && !list.includes(current)) list.push(current);
    replace(select, h("option", { value: "" }, allLabel),
      list.map((v) => h("option", { value: v, selected: v === current }, label(v))));
  }

  async function load(reset) {
    const mine = reset ? ++generation : generation;
    loading = true;
    more.disabled = true;
    try {
      const page = await api.history({ limit: PAGE, before: reset ? "" : nextBefore, ...filters });
      if (mine !== generation) return;
      rows = reset ? page.rows : rows.concat(page.rows.filter((r) => !rows.some((x) => x.run_id === r.run_id)));
      total = page.total;
      nextBefore = page.next_before;
      error = null;
    } catch (e) {
      if (mine !== generation) return;
      error = e;
    } finally {
      if (mine === generation) loading = false;
      more.disabled = false;
    }
    render(reset);
  }

  /** Add runs that finished since the first page was read. */
  async function refreshTop() {
    if (loading) return;
    if (!rows.length) return load(true);
    const mine = generation;
    try {
      const page = await api.history({ limit: 25, ...filters });
      if (mine !== generation) return;
      const known = new Set(rows.map((r) => r.run_id));
      const fresh = page.rows.filter((r) => !known.has(r.run_id));
      total = page.total;
      if (!fresh.length) return renderCounts();
      rows = fresh.concat(rows);
      for (const row of fresh.reverse()) list.prepend(item(row, true));
      renderCounts();
    } catch {
      // The next event or reconnect tries again.
    }
  }

  function item(row, fresh = false) {
    const sub = [h("span", { class: "mono" }, row.task_id), ` · ${row.agent || "default agent"}`];
    if (row.attempt > 1) sub.push(` · attempt ${row.attempt}`);
    if (row.heal_rounds) sub.push(` · ${row.heal_rounds} HEAL`);
    if (row.group) sub.push(" · ", h("span", { class: "group-chip group-chip-sm" }, row.group));
    const button = h("button", {
      type: "button", class: "history-row", "data-testid": "history-row",
      "data-run-id": row.run_id, "data-task-id": row.task_id, "data-outcome": row.outcome,
    },
    h("span", { class: "h-dots" }, phaseDots(historyStatuses(row.phase_results, row.outcome), { size: "sm" })),
    h("span", { class: "h-main" },
      h("span", { class: "h-title" }, row.title),
      h("span", { class: "h-sub" }, sub),
      row.outcome !== "succeeded" && row.reason ? h("span", { class: "h-reason" }, row.reason) : null),
    h("span", { class: "h-outcome" }, badge(words(row.outcome), stateTone(row.outcome))),
    h("span", { class: "num h-duration", title: "Duration" }, duration(row.duration_s)),
    h("span", { class: "num h-turns", title: "Turns" }, count(row.turns), h("span", { class: "unit" }, " turns")),
    h("span", { class: "num h-cost", title: "Cost" }, cost(row.cost_usd)),
    h("time", { class: "num h-when", datetime: row.ended_at, title: full(row.ended_at) }, when(row.ended_at)));
    button.addEventListener("click", () => openRun(row.run_id));
    return h("li", { class: fresh ? "arrived" : null }, button);
  }

  function renderCounts() {
    header.hidden = !rows.length;
    footer.hidden = !rows.length;
    const shown = root.querySelector("#history-shown");
    shown.textContent = rows.length ? `Showing ${count(rows.length)} of ${count(total)}` : "";
    more.hidden = !nextBefore;
    const filtered = filters.outcome || filters.agent || filters.search;
    meta.textContent = total ? `${count(total)} ${filtered ? "matching" : total === 1 ? "run" : "runs"}` : "";
  }

  function render(reset) {
    if (error && !rows.length) {
      replace(list, h("li", null, errorNote(error, "Build History")));
    } else if (!rows.length) {
      const filtered = filters.outcome || filters.agent || filters.search;
      replace(list, h("li", null, filtered
        ? empty("No builds match these filters.", "Clear the search or pick another outcome.")
        : empty("No finished builds yet.", "Every run shows up here when it closes, with its eight phases.")));
    } else if (reset) {
      replace(list, rows.map((r) => item(r)));
    } else {
      const present = list.querySelectorAll("[data-testid=history-row]").length;
      if (!present) replace(list);
      for (const row of rows.slice(present)) list.appendChild(item(row));
    }
    renderCounts();
  }

  return {
    load: () => load(true),
    refreshTop,
    /** The outcome and agent choices (from meta / status and /api/agents). */
    setChoices({ outcomes, agents }) {
      if (outcomes) options(outcome, outcomes, "All outcomes", filters.outcome, words);
      if (agents) options(agent, agents, "All agents", filters.agent);
    },
  };
}
