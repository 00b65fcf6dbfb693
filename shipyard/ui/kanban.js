// The Kanban view: a column per board state (from /api/meta), a card per task, and under each
// task the cards of its plan steps, each with its own small status.

import { api } from "./api.js";
import { empty, errorNote, h, replace } from "./dom.js";
import { ago, full, words } from "./format.js";
import { openRun } from "./router.js";

function bar(fraction) {
  const fill = h("span");
  fill.style.width = `${Math.round(100 * fraction)}%`; // CSSOM, allowed under a strict CSP
  return h("span", { class: "steps-bar", "aria-hidden": "true" }, fill);
}

export function createKanban(root) {
  let columns = [];
  let cards = null;
  let error = null;

  let asked = 0; // replies to older requests are dropped

  async function refresh() {
    const mine = ++asked;
    try {
      const fresh = await api.kanban();
      if (mine !== asked) return;
      cards = fresh;
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
    replace(root, tasks.length ? null : empty("The board is empty.", "Dispatched tasks appear here, with a card for each step of their plan."), board);
    board.scrollLeft = scrollLeft;
  }

  return {
    refresh,
    setColumns(list) {
      columns = list;
    },
  };
}
