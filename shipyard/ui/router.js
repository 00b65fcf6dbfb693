// Views and the breakdown drawer live in the URL hash, so every screen can be linked to and
// the back button works: #/, #/kanban, #/comms?thread=…, #/dispatch, and ?run=… or ?task=…
// for the breakdown of a run or a task on top of any view.

const VIEWS = { "": "center", kanban: "kanban", comms: "comms", dispatch: "dispatch" };
const PATHS = Object.fromEntries(Object.entries(VIEWS).map(([path, view]) => [view, path]));

export function current() {
  const raw = location.hash.replace(/^#\/?/, "");
  const [path, search = ""] = raw.split("?");
  return { view: VIEWS[path] || "center", params: new URLSearchParams(search) };
}

function hashFor(view, params) {
  const search = new URLSearchParams();
  for (const [key, value] of Object.entries(params)) if (value) search.set(key, value);
  const text = search.toString();
  return `#/${PATHS[view] || ""}${text ? `?${text}` : ""}`;
}

/** Show `view` with `params` (replacing them all). */
export function go(view, params = {}) {
  const hash = hashFor(view, params);
  if (location.hash !== hash) location.hash = hash;
}

/** Change some params of the current view; a null value removes one. */
export function setParams(changes, { replace = false } = {}) {
  const { view, params } = current();
  const next = Object.fromEntries(params.entries());
  for (const [key, value] of Object.entries(changes)) {
    if (value) next[key] = value;
    else delete next[key];
  }
  const hash = hashFor(view, next);
  if (location.hash === hash) return;
  if (replace) history.replaceState(null, "", hash);
  else location.hash = hash;
  if (replace) window.dispatchEvent(new HashChangeEvent("hashchange"));
}

export function openRun(runId, taskId = "") {
  if (runId) setParams({ run: runId, task: null });
  else if (taskId) setParams({ task: taskId, run: null });
}

export function onRoute(fn) {
  window.addEventListener("hashchange", () => fn(current()));
}
