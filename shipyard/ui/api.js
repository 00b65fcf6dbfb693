// The HTTP API, same-origin. Auth is a cookie the server sets when the operator opens the
// dashboard link printed by `shipyard up`; a 401 anywhere means that has not happened yet.

export class ApiError extends Error {
  constructor(status, error = {}) {
    super(error.message || (status ? `HTTP ${status}` : "Shipyard can't be reached"));
    this.status = status;
    this.code = error.code || "";
    this.problems = Array.isArray(error.problems) ? error.problems : [];
    this.template = error.template || "";
  }
}

const trackers = new Set(); // open trackers: each keeps the lowest position it has seen

/**
 * Start noting the read-model position of every answer from now on; `stop()` it and read
 * `min`: the stalest answer in between (Infinity if none came). A panel re-read while the
 * read models trail an event is only up to date if its own answer was served from beyond
 * that event, whatever other, newer answers say.
 */
export function trackApplied() {
  const tracker = { min: Infinity, stop: () => trackers.delete(tracker) };
  trackers.add(tracker);
  return tracker;
}

const unauthorizedListeners = new Set();
const offlineListeners = new Set();

/** Call `fn` whenever a request comes back 401. */
export function onUnauthorized(fn) {
  unauthorizedListeners.add(fn);
}

/** Call `fn` whenever a request cannot reach the server at all. */
export function onOffline(fn) {
  offlineListeners.add(fn);
}

function query(params) {
  const search = new URLSearchParams();
  for (const [key, value] of Object.entries(params || {})) {
    if (value !== undefined && value !== null && value !== "") search.set(key, String(value));
  }
  const text = search.toString();
  return text ? `?${text}` : "";
}

async function request(method, path, { params, body } = {}) {
  const init = {
    method,
    credentials: "same-origin",
    headers: { Accept: "application/json" },
  };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path + query(params), init);
  } catch {
    for (const fn of offlineListeners) fn();
    throw new ApiError(0);
  }
  if (response.status === 401) {
    for (const fn of unauthorizedListeners) fn();
    throw new ApiError(401, { code: "unauthorized", message: "not signed in" });
  }
  const seq = Number(response.headers.get("Shipyard-Applied-Seq") || 0);
  for (const tracker of trackers) tracker.min = Math.min(tracker.min, seq);
  const type = response.headers.get("Content-Type") || "";
  const data = type.includes("json") ? await response.json().catch(() => null) : null;
  if (!response.ok) throw new ApiError(response.status, (data && data.error) || {});
  return data;
}

const id = (value) => encodeURIComponent(value);

export const api = {
  meta: () => request("GET", "/api/meta"),
  status: () => request("GET", "/api/status"),
  liveRuns: () => request("GET", "/api/runs/live"),
  history: (params) => request("GET", "/api/history", { params }),
  run: (runId) => request("GET", `/api/runs/${id(runId)}`),
  runLog: (runId, tail = 200) => request("GET", `/api/runs/${id(runId)}/log`, { params: { tail } }),
  task: (taskId) => request("GET", `/api/tasks/${id(taskId)}`),
  activity: (params) => request("GET", "/api/activity", { params }),
  kanban: () => request("GET", "/api/kanban"),
  groups: () => request("GET", "/api/groups"),
  agents: () => request("GET", "/api/agents"),
  handlers: () => request("GET", "/api/handlers"),
  threads: () => request("GET", "/api/threads"),
  thread: (threadId) => request("GET", `/api/threads/${id(threadId)}`),
  inbox: (agent, unread = false) =>
    request("GET", `/api/inbox/${id(agent)}`, { params: { unread: unread ? "true" : "" } }),
  dispatch: (body) => request("POST", "/api/dispatch", { body }),
  cancel: (taskId, reason) => request("POST", `/api/tasks/${id(taskId)}/cancel`, { body: { reason } }),
  retry: (taskId) => request("POST", `/api/tasks/${id(taskId)}/retry`, { body: {} }),
  sendMessage: (message) => request("POST", "/api/messages", { body: message }),
  markRead: (receipt) => request("POST", "/api/messages/read", { body: receipt }),
};

export const reportUrl = (runId) => `/api/runs/${id(runId)}/report`;
export const eventsUrl = (after) => `/api/events${query({ after })}`;
