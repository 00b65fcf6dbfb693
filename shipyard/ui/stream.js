// The live event stream: GET /api/events as Server-Sent Events. Each message is one event of
// the log, named by its type. EventSource resends Last-Event-ID when it reconnects by itself;
// when the server closes it for good (a restart, a 401), we open a new one after the last seq.

import { eventsUrl } from "./api.js";

// EventSource only delivers named events to listeners registered by name, so it needs the
// list. /api/meta may serve it as `event_types`; these are the ones known today.
const KNOWN_TYPES = [
  "task_dispatched", "dispatch_rejected", "task_claimed", "task_cancel_requested",
  "task_requeued", "builder_started", "phase_changed", "work_progress", "plan_recorded",
  "card_added", "card_moved", "validation_checked", "run_stale", "report_written",
  "run_finished", "task_finished", "message_sent", "message_read", "handler_heartbeat",
];

const MAX_BACKOFF_MS = 15000;
const RESTART_GAP_MS = 3000;
// A gateway that sends a `ping` event now and then lets us notice a stream that went quiet
// without closing (a hung proxy, a server stuck shutting down). Without pings, quiet is
// just an idle system.
const PING_SILENCE_MS = 45000;

/**
 * Follow the log after `after`. `onEvent(event)` gets each parsed event; `onState(state)`
 * gets "live" or "reconnecting"; `onResync()` is called after a reconnect, when events may
 * have been missed. Returns {close(), lastSeq()}.
 */
export function follow({ after = 0, types = [], onEvent, onState, onResync, probe }) {
  let lastSeq = after;
  let source = null;
  let retryTimer = 0;
  let backoff = 1000;
  let everOpen = false;
  let closed = false;
  let pings = false;
  let lastHeard = Date.now();
  let lastRestart = 0;
  const names = [...new Set([...KNOWN_TYPES, ...types])];

  const handle = (message) => {
    lastHeard = Date.now();
    let event;
    try {
      event = JSON.parse(message.data);
    } catch {
      return;
    }
    const seq = Number(event.seq || message.lastEventId || 0);
    if (seq && seq <= lastSeq) return; // a replay after reconnecting
    if (seq) lastSeq = seq;
    if (!event.type && message.type !== "message") event.type = message.type;
    onEvent(event);
  };

  const open = () => {
    if (closed) return;
    source = new EventSource(eventsUrl(lastSeq || undefined), { withCredentials: true });
    source.addEventListener("ping", () => {
      pings = true;
      lastHeard = Date.now();
    });
    source.addEventListener("open", () => {
      lastHeard = Date.now();
      backoff = 1000;
      onState("live");
      if (everOpen) onResync();
      everOpen = true;
    });
    source.addEventListener("error", () => {
      onState("reconnecting");
      if (source.readyState === EventSource.CLOSED) {
        // The browser gave up (an HTTP error or a bad content type): reopen it ourselves.
        source = null;
        everOpen = true;
        if (probe) probe();
        retryTimer = setTimeout(open, backoff);
        backoff = Math.min(backoff * 2, MAX_BACKOFF_MS);
      }
    });
    source.addEventListener("message", handle);
    for (const name of names) source.addEventListener(name, handle);
  };

  /** Drop the connection and open a new one after the last event seen. */
  const restart = () => {
    if (closed || Date.now() - lastRestart < RESTART_GAP_MS) return;
    lastRestart = Date.now();
    clearTimeout(retryTimer);
    if (source) source.close();
    source = null;
    everOpen = true;
    onState("reconnecting");
    retryTimer = setTimeout(open, 500);
  };

  const watchdog = setInterval(() => {
    if (pings && source && source.readyState === EventSource.OPEN && Date.now() - lastHeard > PING_SILENCE_MS) restart();
  }, 5000);

  onState("reconnecting");
  open();

  return {
    close() {
      closed = true;
      clearTimeout(retryTimer);
      clearInterval(watchdog);
      if (source) source.close();
    },
    restart,
    lastSeq: () => lastSeq,
  };
}
