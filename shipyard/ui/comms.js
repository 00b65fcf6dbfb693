// The Comms view: agent threads, unread counts for whoever the operator reads as, a thread
// with its read receipts, and a form to reply or start a new thread.

import { api } from "./api.js";
import { badge, empty, errorNote, h, replace, toast } from "./dom.js";
import { ago, full, plural, when, words } from "./format.js";
import { setParams } from "./router.js";

const READER_KEY = "shipyard.reader";
const EVERYONE = "*";

export function createComms(root, { onUnread }) {
  let types = [];
  let threads = null;
  let error = null;
  let unread = new Map();
  let reader = localStorage.getItem(READER_KEY) || "operator";
  let names = [];
  let selected = ""; // a thread id, "new", or ""
  let messages = [];
  let threadError = null;
  let draft = { sender: "", recipient: "", type: "", body: "", task_id: "" };

  const readerInput = h("input", {
    class: "input input-sm", type: "text", list: "comms-names", value: reader,
    placeholder: "agent name", "aria-label": "Read as agent", autocomplete: "off",
  });
  readerInput.addEventListener("change", () => {
    reader = readerInput.value.trim();
    localStorage.setItem(READER_KEY, reader);
    refresh();
  });
  const namesList = h("datalist", { id: "comms-names" });
  const list = h("ul", { class: "thread-list", role: "list" });
  const pane = h("section", { class: "comms-thread", "aria-live": "polite" });
  const layout = h("div", { class: "comms", "data-mode": "list" },
    h("aside", { class: "comms-side", "aria-label": "Threads" },
      h("div", { class: "comms-toolbar" },
        h("label", { class: "reader" }, h("span", null, "Reading as"), readerInput),
        h("button", { type: "button", class: "btn btn-sm", onclick: () => setParams({ thread: "new" }) }, "New message")),
      list),
    pane, namesList);
  replace(root, layout);

  async function refresh() {
    try {
      const [rows, inbox] = await Promise.all([
        api.threads(),
        reader ? api.inbox(reader, true).catch(() => null) : Promise.resolve(null),
      ]);
      threads = rows;
      unread = new Map();
      for (const m of (inbox && inbox.messages) || []) unread.set(m.thread_id, (unread.get(m.thread_id) || 0) + 1);
      onUnread(inbox ? inbox.unread ?? (inbox.messages || []).length : 0);
      error = null;
      collectNames();
    } catch (e) {
      error = e;
    }
    renderList();
    if (selected && selected !== "new") await loadThread();
  }

  function collectNames() {
    const set = new Set(names);
    for (const t of threads || []) for (const p of t.participants) if (p !== EVERYONE) set.add(p);
    names = [...set].sort();
    replace(namesList, names.map((n) => h("option", { value: n })));
  }

  async function loadThread() {
    const id = selected;
    try {
      const rows = await api.thread(id);
      if (id !== selected) return;
      messages = rows;
      threadError = null;
    } catch (e) {
      threadError = e;
    }
    renderThread();
  }

  function unreadFor(who) {
    return messages.filter((m) => (m.recipient === who || m.recipient === EVERYONE) && m.sender !== who && !m.read_by.includes(who));
  }

  // Read receipts are facts agents act on, so the operator marks them on purpose, never by
  // merely looking at a thread while reading as some agent.
  async function markRead(threadId, button) {
    const ids = unreadFor(reader).map((m) => m.message_id);
    if (!reader || !ids.length) return;
    button.disabled = true;
    try {
      await api.markRead({ reader, thread_id: threadId, message_ids: ids });
      toast(`Marked ${ids.length} read for ${reader}`, "ok");
      refresh();
    } catch (e) {
      button.disabled = false;
      toast(`Couldn't mark them read: ${e.message}`, "bad");
    }
  }

  function renderList() {
    if (error && !threads) {
      replace(list, h("li", null, errorNote(error, "the threads")));
      return;
    }
    if (!threads) return;
    if (!threads.length) {
      replace(list, h("li", null, empty("No messages yet.", "Agents talk here: comments, questions, status requests and directives.")));
      return;
    }
    replace(list, threads.map((t) => {
      const count = unread.get(t.thread_id) || 0;
      const button = h("button", {
        type: "button", class: "thread-item", "data-testid": "thread-row", "data-thread-id": t.thread_id,
        "aria-current": t.thread_id === selected ? "true" : null,
      },
      h("span", { class: "thread-top" },
        h("span", { class: "thread-who" }, t.participants.map((p) => (p === EVERYONE ? "everyone" : p)).join(", ")),
        h("time", { class: "thread-when", datetime: t.last_at, title: full(t.last_at) }, ago(t.last_at))),
      h("span", { class: "thread-body" }, t.first_body),
      h("span", { class: "thread-bottom" },
        h("span", { class: "muted" }, plural(t.messages, "message")),
        t.task_id ? h("span", { class: "mono muted" }, t.task_id) : null,
        count ? h("span", { class: "unread", "data-testid": "unread-count", "aria-label": `${count} unread` }, String(count)) : null));
      button.addEventListener("click", () => setParams({ thread: t.thread_id }));
      return h("li", null, button);
    }));
  }

  let formFor = ""; // the thread the reply form on screen belongs to

  function renderThread() {
    layout.dataset.mode = selected ? "thread" : "list";
    const back = h("button", { type: "button", class: "btn btn-quiet btn-sm comms-back", onclick: () => setParams({ thread: null }) }, "← Threads");
    if (!selected) {
      formFor = "";
      replace(pane, empty("Pick a thread", "or start a new message to an agent."));
      return;
    }
    if (selected === "new") {
      formFor = "new";
      replace(pane, h("header", { class: "comms-thread-head" }, back, h("h2", null, "New message")), form(null));
      return;
    }
    const thread = (threads || []).find((t) => t.thread_id === selected);
    if (threadError) {
      formFor = "";
      replace(pane, back, errorNote(threadError, "this thread"));
      return;
    }
    const waiting = reader ? unreadFor(reader).length : 0;
    const mark = waiting
      ? h("button", { type: "button", class: "btn btn-quiet btn-sm comms-mark", "data-testid": "mark-read" }, `Mark ${waiting} read for ${reader}`)
      : null;
    if (mark) mark.addEventListener("click", () => markRead(selected, mark));
    const head = h("header", { class: "comms-thread-head" }, back,
      h("div", { class: "comms-thread-title" },
        h("h2", null, thread ? thread.participants.map((p) => (p === EVERYONE ? "everyone" : p)).join(" · ") : "Thread"),
        h("p", { class: "muted mono" }, selected, thread && thread.task_id ? ` · task ${thread.task_id}` : "")),
      mark);
    const list = h("ol", { class: "messages" }, messages.map((m) => h("li", {
      class: `message${m.sender === reader ? " mine" : ""}`, "data-testid": "message", "data-type": m.type,
    },
    h("p", { class: "message-head" },
      h("strong", null, m.sender), " → ", m.recipient === EVERYONE ? "everyone" : m.recipient, " ",
      badge(words(m.type), m.type === "directive" ? "warn" : m.type === "question" || m.type === "status_request" ? "info" : "muted"),
      h("time", { class: "muted", datetime: m.sent_at, title: full(m.sent_at) }, when(m.sent_at))),
    h("p", { class: "message-body" }, m.body),
    reader && m.sender !== reader && (m.recipient === reader || m.recipient === EVERYONE) && !m.read_by.includes(reader)
      ? h("p", { class: "message-unread" }, `Unread by ${reader}`) : null,
    m.read_by.length ? h("p", { class: "message-read muted" }, `Read by ${m.read_by.join(", ")}`) : null)));
    // Keep the reply form (and what is being typed in it) when new messages arrive.
    const keep = formFor === selected && pane.querySelector(".reply-form");
    if (keep) {
      pane.querySelector(".comms-thread-head").replaceWith(head);
      pane.querySelector(".messages").replaceWith(list);
      return;
    }
    formFor = selected;
    replace(pane, head, list, form(thread));
  }

  function form(thread) {
    const last = formFor === "new" ? null : messages[messages.length - 1] || null;
    const sender = draft.sender || reader;
    let recipient = draft.recipient;
    if (!recipient && last) recipient = last.sender !== sender ? last.sender : last.recipient;
    const fields = {
      sender: h("input", { class: "input input-sm", type: "text", list: "comms-names", value: sender, required: true, autocomplete: "off" }),
      recipient: h("input", { class: "input input-sm", type: "text", list: "comms-names", value: recipient, required: true, autocomplete: "off", placeholder: "agent, or * for everyone" }),
      type: h("select", { class: "input input-sm" }, types.map((t) => h("option", { value: t, selected: t === (draft.type || types[0]) }, words(t)))),
      body: h("textarea", { class: "input", rows: "3", required: true, placeholder: last ? "Reply…" : "Message…", value: draft.body }),
    };
    const task = h("input", { class: "input input-sm mono", type: "text", value: draft.task_id || (thread && thread.task_id) || "", placeholder: "task id, optional", autocomplete: "off" });
    const problem = h("p", { class: "field-error", role: "alert", hidden: true });
    for (const [key, el] of Object.entries(fields)) el.addEventListener("input", () => { draft[key] = el.value; });
    task.addEventListener("input", () => { draft.task_id = task.value; });
    const labelled = (text, el) => h("label", { class: "mini-field" }, h("span", null, text), el);
    const el = h("form", { class: "reply-form", "data-testid": "reply-form" },
      h("div", { class: "reply-row" }, labelled("From", fields.sender), labelled("To", fields.recipient), labelled("Type", fields.type),
        last ? null : labelled("Task", task)),
      labelled(last ? "Reply" : "Message", fields.body),
      problem,
      h("div", { class: "form-actions" }, h("button", { type: "submit", class: "btn btn-primary btn-sm" }, last ? "Send reply" : "Send")));
    el.addEventListener("submit", async (e) => {
      e.preventDefault();
      const newest = formFor === "new" ? null : messages[messages.length - 1] || null;
      const message = {
        sender: fields.sender.value.trim(),
        recipient: fields.recipient.value.trim(),
        type: fields.type.value,
        body: fields.body.value,
        thread_id: newest ? newest.thread_id : "",
        reply_to: newest ? newest.message_id : "",
        task_id: task.value.trim(),
      };
      try {
        const reply = await api.sendMessage(message);
        draft = { sender: "", recipient: "", type: "", body: "", task_id: "" };
        toast("Message sent", "ok");
        if (!reader && message.sender) {
          reader = message.sender;
          readerInput.value = reader;
          localStorage.setItem(READER_KEY, reader);
        }
        if (selected === "new") {
          setParams({ thread: reply.thread_id }, { replace: true });
        } else {
          fields.body.value = "";
          refresh();
        }
      } catch (err) {
        problem.textContent = err.problems.length ? err.problems.join(" ") : err.message;
        problem.hidden = false;
      }
    });
    return el;
  }

  return {
    refresh,
    setTypes(list) {
      types = list;
    },
    setNames(list) {
      names = [...new Set([...names, ...list])];
      collectNames();
    },
    /** Show a thread (from the URL), "new" for the new-message form, or "" for none. */
    select(id) {
      if (id === selected) return;
      selected = id;
      messages = [];
      threadError = null;
      draft = { sender: "", recipient: "", type: "", body: "", task_id: "" };
      formFor = "";
      renderList();
      if (selected && selected !== "new") {
        layout.dataset.mode = "thread";
        replace(pane, h("p", { class: "muted" }, "Loading the thread…"));
        loadThread();
      } else {
        renderThread();
      }
    },
  };
}
