// The Kanban view: a column per board state (from /api/meta), a card per task, and under each
// task the cards of its plan steps, each with its own small status.

import { api } from "./api.js";
import { badge, empty, errorNote, h, replace } from "./dom.js";
import { ago, full, words } from "./format.js";
import { openRun } from "./router.js";

function bar(fraction) {
  const fill = h("span");
  fill.style.width = `${Math.round(100 * fraction)}%`; // CSSOM, allowed under a strict CSP
  return h("span", { class: "steps-bar", "aria-hidden": "true" }, fill);
}

const GROUP_TONE = { running: "info", passed: "ok", failed: "bad" };

function groupCard(group) {
  const parts = [`${group.succeeded}/${group.total} succeeded`];
  if (group.failed) parts.push(`${group.failed} failed`);
  if (group.running) parts.push(`${group.running} running`);
  const failed = group.failed_tasks.map((id) => {
    const link = h("button", { type: "button", class: "linklike mono" }, id);
    link.addEventListener("click", () => openRun("", id));
    return link;
  });
  const verdict = group.state === "running" ? "running" : group.state === "passed" ? "all passed" : "failed";
  return h("li", null, h("article", {
    class: "group-card", "data-testid": "group-card", "data-group": group.group, "data-state": group.state,
  },
  h("div", { class: "group-card-head" },
    h("span", { class: "group-chip" }, group.group),
    badge(verdict, GROUP_TONE[group.state] || "info")),
  h("p", { class: "group-card-counts" }, parts.join(" · "), bar(group.total ? group.succeeded / group.total : 0)),
  failed.length ? h("p", { class: "group-card-failed" }, "Failed: ", ...failed.flatMap((el, i) => (i ? [", ", el] : [el]))) : null,
  h("p", { class: "kanban-meta" }, group.finished_at
    ? h("time", { datetime: group.finished_at, title: full(group.finished_at) }, `finished ${ago(group.finished_at)}`)
    : h("time", { datetime: group.started_at, title: full(group.started_at) }, `started ${ago(group.started_at)}`))));
}

export function createKanban(root) {
  let columns = [];
  let cards = null;
  let groups = [];
  let error = null;

  let asked = 0; // replies to older requests are dropped

  async function refresh() {
    const mine = ++asked;
    try {
      const [fresh, freshGroups] = await Promise.all([api.kanban(), api.groups()]);
      if (mine !== asked) return;
      cards = fresh;
      groups = freshGroups;
      error = null;
    } catch (e) {
      error = e;
    }
    render();
  }

  function stepCard(step) {
    return h("li", {
      class: "kanban-step", "data-testid": "kanban-card", "data-kind": "step",
      "data-card-id": step.card_id, "data-column": step.column,
    },
    h("span", { class: "step-mark", "aria-hidden": "true" }),
    h("span", { class: "step-title" }, step.title),
    h("span", { class: "step-status" }, words(step.column)));
  }

  function taskCard(card, steps) {
    const done = steps.filter((s) => s.column === "done").length;
    const open = h("button", { type: "button", class: "kanban-title linklike" }, card.title);
    open.addEventListener("click", () => openRun(card.run_id, card.task_id));
    return h("li", null, h("article", {
      class: "kanban-card", "data-testid": "kanban-card", "data-kind": "task",
      "data-card-id": card.card_id, "data-task-id": card.task_id, "data-column": card.column,
      "data-priority": card.priority,
    },
    h("div", { class: "kanban-chips" },
      h("span", { class: "priority-chip", "data-priority": card.priority }, card.priority),
      card.group ? h("span", { class: "group-chip group-chip-sm" }, card.group) : null),
    open,
    h("p", { class: "kanban-meta" },
      h("span", { class: "mono" }, card.task_id),
      ` · ${card.agent || "default agent"} · `,
      h("time", { datetime: card.updated_at, title: full(card.updated_at) }, ago(card.updated_at))),
    steps.length
      ? h("div", { class: "kanban-steps" },
        h("p", { class: "steps-head" }, `Plan · ${done}/${steps.length} done`,
          bar(done / steps.length)),
        h("ol", { class: "steps" }, steps.map(stepCard)))
      : null));
  }

  function render() {
    if (error && !cards) {
      replace(root, errorNote(error, "the board"));
      return;
    }
    if (!cards) return;
    const tasks = cards.filter((c) => c.kind === "task");
    const steps = new Map();
    for (const c of cards) {
      if (c.kind !== "step") continue;
      if (!steps.has(c.parent)) steps.set(c.parent, []);
      steps.get(c.parent).push(c);
    }
    for (const list of steps.values()) list.sort((a, b) => a.position - b.position);
    const board = h("div", { class: "kanban" }, columns.map((col) => {
      const inColumn = tasks.filter((c) => c.column === col);
      return h("section", { class: "kanban-column", "data-testid": "kanban-column", "data-column": col, "aria-label": words(col) },
        h("header", { class: "kanban-column-head" },
          h("h2", null, words(col)), h("span", { class: "count" }, String(inColumn.length))),
        inColumn.length
          ? h("ol", { class: "kanban-cards" }, inColumn.map((c) => taskCard(c, steps.get(c.task_id) || [])))
          : h("p", { class: "kanban-empty" }, "—"));
    }));
    const old = root.querySelector(".kanban");
    const scrollLeft = old ? old.scrollLeft : 0;
    const strip = groups.length
      ? h("section", { class: "group-strip", "aria-label": "Parallel groups" },
        h("h2", { class: "group-strip-head" }, "Parallel groups"),
        h("ol", { class: "group-cards" }, groups.map(groupCard)))
      : null;
    replace(root, strip, tasks.length ? null : empty("The board is empty.", "Dispatched tasks appear here, with a card for each step of their plan."), board);
    board.scrollLeft = scrollLeft;
  }

  return {
    refresh,
    setColumns(list) {
      columns = list;
    },
  };
}
