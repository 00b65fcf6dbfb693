// The eight phase dots. The phase list comes from /api/meta (never copied into the UI);
// dot statuses are done | current | failed | skipped | pending.

import { h } from "./dom.js";

let PHASES = [];

export function setPhases(phases) {
  PHASES = phases.map((p) => ({ name: p.name, label: p.label }));
}

export function phases() {
  return PHASES;
}

export function phaseLabel(name) {
  const found = PHASES.find((p) => p.name === name);
  return found ? found.label : String(name || "").toUpperCase();
}

export function phaseIndex(name) {
  return PHASES.findIndex((p) => p.name === name);
}

/** A recorded phase status (started, succeeded, failed, skipped, "") as a dot status. */
export function dotStatus(recorded, { running = false, outcome = "" } = {}) {
  switch (recorded) {
    case "succeeded":
      return "done";
    case "failed":
      return "failed";
    case "skipped":
      return "skipped";
    case "started":
      if (running) return "current";
      return outcome === "succeeded" ? "done" : "failed";
    default:
      return "pending";
  }
}

/** Dot statuses for a history row's `phase_results` (one per phase, in order). */
export function historyStatuses(results, outcome) {
  return PHASES.map((_, i) => dotStatus((results || [])[i] || "", { outcome }));
}

/**
 * Dot statuses for a running run: what we know per phase (`known`, name → recorded status),
 * else everything before the current phase is done and everything after pending.
 */
export function liveStatuses(current, known = {}) {
  const at = phaseIndex(current);
  return PHASES.map((p, i) => {
    const recorded = known[p.name];
    if (recorded) return dotStatus(recorded, { running: true });
    if (i < at) return "done";
    if (i === at) return "current";
    return "pending";
  });
}

const STATUS_WORDS = {
  done: "done", current: "in progress", failed: "failed", skipped: "skipped", pending: "pending",
};

/**
 * The row of dots. `labels`: show the phase label under each dot (the live card);
 * otherwise the label is in the tooltip and for screen readers.
 */
export function phaseDots(statuses, { labels = false, size = "md" } = {}) {
  const list = h("ol", { class: `dots dots-${size}${labels ? " dots-labelled" : ""}` });
  PHASES.forEach((p, i) => {
    const status = statuses[i] || "pending";
    list.appendChild(h("li", {
      class: "dot",
      "data-testid": "phase-dot",
      "data-phase": p.name,
      "data-status": status,
      title: `${p.label}: ${STATUS_WORDS[status]}`,
    },
    h("span", { class: "dot-mark", "aria-hidden": "true" }),
    labels
      ? h("span", { class: "dot-label" }, p.label, h("span", { class: "visually-hidden" }, `: ${STATUS_WORDS[status]}`))
      : h("span", { class: "visually-hidden" }, `${p.label}: ${STATUS_WORDS[status]}`)));
  });
  return list;
}

/** Update dots in place, so a pulsing dot keeps its animation; returns the list. */
export function updateDots(list, statuses) {
  const items = list.querySelectorAll(".dot");
  if (items.length !== PHASES.length) {
    const fresh = phaseDots(statuses, { labels: list.classList.contains("dots-labelled") });
    list.replaceWith(fresh);
    return fresh;
  }
  items.forEach((item, i) => {
    const status = statuses[i] || "pending";
    if (item.dataset.status === status) return;
    item.dataset.status = status;
    const p = PHASES[i];
    item.title = `${p.label}: ${STATUS_WORDS[status]}`;
    const hidden = item.querySelector(".visually-hidden");
    if (hidden) hidden.textContent = item.querySelector(".dot-label") ? `: ${STATUS_WORDS[status]}` : `${p.label}: ${STATUS_WORDS[status]}`;
  });
  return list;
}
