// Building DOM from API data. Everything an agent wrote is untrusted, so text only ever
// goes in as text nodes: there is no innerHTML anywhere in the dashboard.

/**
 * h("div", {class: "x", "data-testid": "y", onclick: fn}, "text", child, [more])
 * Strings and numbers become text nodes; null, undefined and false are skipped.
 */
export function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on") && typeof value === "function") {
      el.addEventListener(key.slice(2), value);
    } else if (key === "class") {
      el.className = value;
    } else if (key === "text") {
      el.textContent = value;
    } else if (key === "hidden" || key === "disabled" || key === "checked" || key === "selected") {
      el[key] = Boolean(value);
    } else if (key === "value") {
      el.value = value;
    } else {
      el.setAttribute(key, value === true ? "" : String(value));
    }
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children) {
    if (child === undefined || child === null || child === false) continue;
    if (Array.isArray(child)) append(el, child);
    else if (child instanceof Node) el.appendChild(child);
    else el.appendChild(document.createTextNode(String(child)));
  }
}

/** Replace all of `el`'s children. */
export function replace(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

export function debounce(fn, ms) {
  let timer = 0;
  const run = (...args) => {
    clearTimeout(timer);
    timer = setTimeout(() => fn(...args), ms);
  };
  run.cancel = () => clearTimeout(timer);
  return run;
}

/** A small chip: `tone` picks its colour (ok, warn, bad, info, muted). */
export function badge(text, tone = "muted", attrs = {}) {
  return h("span", { class: `badge badge-${tone}`, ...attrs }, text);
}

/** The tone of a run or task state. */
export function stateTone(state) {
  switch (state) {
    case "succeeded":
    case "done":
      return "ok";
    case "failed":
      return "bad";
    case "running":
    case "in_progress":
    case "validating":
      return "info";
    case "blocked":
    case "stale":
      return "warn";
    default:
      return "muted";
  }
}

/** An empty state: a calm sentence, optionally a second line. */
export function empty(title, detail, attrs = {}) {
  return h("div", { class: "empty", ...attrs }, h("p", { class: "empty-title" }, title),
    detail ? h("p", { class: "empty-detail" }, detail) : null);
}

export function errorNote(error, what) {
  const message = error && error.status === 0
    ? "Shipyard can't be reached. Is `shipyard up` still running?"
    : `Couldn't load ${what}: ${(error && error.message) || "unknown error"}`;
  return h("p", { class: "load-error", role: "alert" }, message);
}

let toastHost = null;

/** A short notice at the corner of the screen. */
export function toast(text, tone = "info") {
  toastHost = toastHost || document.getElementById("toasts");
  if (!toastHost) return;
  const el = h("div", { class: `toast toast-${tone}` }, text);
  toastHost.appendChild(el);
  setTimeout(() => el.classList.add("toast-out"), 4200);
  setTimeout(() => el.remove(), 4700);
}
