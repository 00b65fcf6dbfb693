// The Dispatch view: a form that sends the seed's dispatch JSON to POST /api/dispatch and
// shows the new task id, or every problem the server named, next to the field it is about.

import { api } from "./api.js";
import { h, replace } from "./dom.js";
import { phaseLabel } from "./phases.js";
import { go, openRun } from "./router.js";

const DISPATCHER_KEY = "shipyard.dispatcher";
const TITLE_MAX = 200;
const OUTPUT_LINES = 60; // of the last validation output carried into a rework

// Which form field a problem is about, by the field path the server puts before the colon.
const FIELD_OF = {
  action_name: "title",
  "payload.task_title": "title",
  "action_name or payload.task_title": "title",
  "payload.prompt": "prompt",
  "payload.dispatcher": "dispatcher",
  priority: "priority",
  "payload.max_turns": "max_turns",
  agent: "agent",
  group: "group",
  after: "after",
};

function newKey() {
  const random = globalThis.crypto && crypto.randomUUID
    ? crypto.randomUUID()
    : `${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 12)}`;
  return `dashboard-${random}`;
}

/** Replace the body of `## name` in a Markdown prompt (or append the section). */
export function setSection(prompt, name, body) {
  const lines = prompt.split("\n");
  const start = lines.findIndex((l) => l.replace(/^##\s+/, "").trim().toLowerCase() === name.toLowerCase() && l.startsWith("## "));
  if (start < 0) return `${prompt.trimEnd()}\n\n## ${name}\n${body}\n`;
  let end = lines.findIndex((l, i) => i > start && l.startsWith("## "));
  if (end < 0) end = lines.length;
  const tail = lines.slice(end);
  return [...lines.slice(0, start + 1), body.trimEnd(), ...(tail.length ? ["", ...tail] : [])].join("\n");
}

export function createDispatch(root) {
  let meta = null;
  let key = newKey();
  let agents = [];
  let busy = false;

  const field = (name, label, control, hint, extra) => {
    const error = h("div", { class: "field-error", id: `df-${name}-error`, hidden: true });
    control.id = `df-${name}`;
    control.name = name;
    control.setAttribute("aria-describedby", `df-${name}-error${hint ? ` df-${name}-hint` : ""}`);
    return {
      control, error,
      el: h("div", { class: `field field-${name}` },
        extra
          ? h("div", { class: "field-label-row" }, h("label", { for: `df-${name}` }, label), extra)
          : h("label", { for: `df-${name}` }, label),
        control,
        hint ? h("p", { class: "hint", id: `df-${name}-hint` }, hint) : null,
        error),
    };
  };

  const templateButtons = h("div", { class: "template-buttons" },
    h("button", { type: "button", class: "btn btn-quiet btn-sm", onclick: () => useTemplate(false) }, "Build template"),
    h("button", { type: "button", class: "btn btn-quiet btn-sm", onclick: () => useTemplate(true) }, "Rework template"));
  const f = {
    title: field("title", "Title", h("input", { class: "input", type: "text", maxlength: String(TITLE_MAX), required: true, autocomplete: "off", placeholder: "Add a /health endpoint" }),
      "Start with “Fix:” for a rework; it then needs a Current State (Broken) section."),
    priority: field("priority", "Priority", h("select", { class: "input" })),
    dispatcher: field("dispatcher", "Dispatcher", h("input", { class: "input", type: "text", autocomplete: "off", required: true })),
    agent: field("agent", "Agent", h("input", { class: "input", type: "text", autocomplete: "off", list: "df-agents", placeholder: "default" })),
    max_turns: field("max_turns", "Max turns", h("input", { class: "input", type: "number", min: "1", step: "1", value: "100", inputmode: "numeric" })),
    group: field("group", "Group", h("input", { class: "input", type: "text", autocomplete: "off", placeholder: "optional" }),
      "Tasks with the same group run in parallel and show as one."),
    after: field("after", "Runs after", h("input", { class: "input mono", type: "text", autocomplete: "off", placeholder: "task ids, optional" }),
      "Waits until these tasks succeed."),
    prompt: field("prompt", "Prompt", h("textarea", { class: "input prompt", rows: "18", spellcheck: "true" }),
      "Four sections: ## Task, ## Requirements, ## Environment (the working directory, and a Test: command run in VALIDATE), ## Deliverables (README.md among them).",
      templateButtons),
  };
  const datalist = h("datalist", { id: "df-agents" });
  const problemsTitle = h("p", { class: "problems-title" });
  const problemList = h("ul", { "data-testid": "dispatch-problems" });
  const problems = h("div", { class: "problems", role: "alert", hidden: true }, problemsTitle, problemList);
  const result = h("div", { class: "dispatch-result", "data-testid": "dispatch-result", hidden: true, role: "status" });
  const preview = h("pre", { class: "pre pre-json" });
  const submit = h("button", { type: "submit", class: "btn btn-primary" }, "Dispatch");

  const form = h("form", { class: "dispatch-form", "data-testid": "dispatch-form", novalidate: true },
    result,
    h("div", { class: "form-grid" },
      f.title.el, f.priority.el, f.dispatcher.el, f.agent.el, f.max_turns.el, f.group.el, f.after.el),
    f.prompt.el,
    problems,
    h("div", { class: "form-actions" },
      submit,
      h("button", { type: "button", class: "btn btn-quiet", onclick: () => reset(true) }, "Start over")),
    h("details", { class: "json-preview" }, h("summary", null, "The dispatch JSON this sends"), preview),
    datalist);

  form.addEventListener("submit", (e) => {
    e.preventDefault();
    send();
  });
  form.addEventListener("input", () => renderPreview());
  f.title.control.addEventListener("change", () => {
    if (!meta) return;
    const fix = f.title.control.value.trim().toLowerCase().startsWith("fix:");
    const prompt = f.prompt.control.value;
    if (fix && prompt === meta.template) useTemplate(true);
    if (!fix && prompt === meta.rework_template) useTemplate(false);
  });
  replace(root, form);

  function useTemplate(rework) {
    const text = rework ? meta.rework_template : meta.template;
    const current = f.prompt.control.value;
    if (current && current !== meta.template && current !== meta.rework_template
        && !confirm("Replace the prompt with the template?")) return;
    f.prompt.control.value = text;
    renderPreview();
  }

  function body() {
    const title = f.title.control.value.trim();
    const turns = Number(f.max_turns.control.value);
    const request = {
      request_type: "queue",
      action: "create",
      task_type: "build",
      action_name: title,
      priority: f.priority.control.value,
      payload: {
        prompt: f.prompt.control.value,
        dispatcher: f.dispatcher.control.value.trim(),
        task_title: title,
        max_turns: Number.isInteger(turns) && f.max_turns.control.value !== "" ? turns : f.max_turns.control.value,
      },
    };
    const agent = f.agent.control.value.trim();
    const group = f.group.control.value.trim();
    const after = f.after.control.value.split(/[\s,]+/).filter(Boolean);
    if (agent) request.agent = agent;
    if (group) request.group = group;
    if (after.length) request.after = after;
    request.idempotency_key = key;
    return request;
  }

  function renderPreview() {
    preview.textContent = JSON.stringify(body(), null, 2);
  }

  function clearProblems() {
    problems.hidden = true;
    replace(problemList);
    for (const { control, error } of Object.values(f)) {
      control.removeAttribute("aria-invalid");
      error.hidden = true;
      replace(error);
    }
  }

  function showProblems(list, message) {
    clearProblems();
    const byField = {};
    for (const problem of list) {
      const at = problem.indexOf(": ");
      const where = at > 0 ? problem.slice(0, at) : "";
      const name = FIELD_OF[where];
      if (name) (byField[name] = byField[name] || []).push(problem.slice(at + 2));
    }
    problemsTitle.textContent = message || `The dispatch was refused: ${list.length === 1 ? "1 problem" : `${list.length} problems`} to fix.`;
    replace(problemList, list.map((p) => h("li", null, p)));
    problems.hidden = false;
    let first = null;
    for (const [name, messages] of Object.entries(byField)) {
      const { control, error } = f[name];
      control.setAttribute("aria-invalid", "true");
      if (messages.length === 1) replace(error, messages[0]);
      else replace(error, h("ul", null, messages.map((m) => h("li", null, m))));
      error.hidden = false;
      first = first || control;
    }
    problems.scrollIntoView({ block: "nearest", behavior: "smooth" });
    if (first) first.focus({ preventScroll: true });
  }

  async function send() {
    if (busy) return;
    clearProblems();
    result.hidden = true;
    const request = body();
    const missing = [];
    if (!request.action_name) missing.push("action_name or payload.task_title: give the task a title");
    if (!request.payload.dispatcher) missing.push("payload.dispatcher: say who is dispatching (your name, or the agent's)");
    if (missing.length) {
      showProblems(missing, "Fill these in first:");
      return;
    }
    busy = true;
    submit.disabled = true;
    submit.textContent = "Dispatching…";
    try {
      const reply = await api.dispatch(request);
      localStorage.setItem(DISPATCHER_KEY, request.payload.dispatcher);
      showResult(reply, request.action_name);
      key = newKey();
      reset(false);
    } catch (e) {
      if (e.problems && e.problems.length) showProblems(e.problems);
      else showProblems([e.message], e.status === 0 ? "Shipyard can't be reached." : "The dispatch didn't go through.");
    } finally {
      busy = false;
      submit.disabled = false;
      submit.textContent = "Dispatch";
    }
  }

  function showResult(reply, title) {
    const taskId = reply.task_id;
    replace(result,
      h("p", { class: "result-title" }, reply.duplicate ? "Already on the queue" : "Dispatched",
        " — ", h("strong", { class: "mono", "data-testid": "dispatch-task-id" }, taskId)),
      h("p", { class: "muted" }, reply.duplicate
        ? `This idempotency key was used before, so no second task was made: “${(reply.task && reply.task.title) || title}”.`
        : `“${title}” is queued. A handler claims it and the Live build panel lights up.`),
      h("p", { class: "result-actions" },
        h("button", { type: "button", class: "btn btn-primary btn-sm", onclick: () => go("center") }, "Watch it on the Command Center"),
        h("button", { type: "button", class: "btn btn-quiet btn-sm", onclick: () => openRun("", taskId) }, "Task details")));
    result.hidden = false;
    result.scrollIntoView({ block: "nearest", behavior: "smooth" });
  }

  function reset(clearResult) {
    if (!meta) return;
    if (clearResult) {
      result.hidden = true;
      key = newKey();
    }
    clearProblems();
    f.title.control.value = "";
    f.priority.control.value = meta.priorities.includes("normal") ? "normal" : meta.priorities[0];
    f.dispatcher.control.value = localStorage.getItem(DISPATCHER_KEY) || "operator";
    f.agent.control.value = "";
    f.max_turns.control.value = "100";
    f.group.control.value = "";
    f.after.control.value = "";
    f.prompt.control.value = meta.template;
    renderPreview();
  }

  return {
    setMeta(m) {
      meta = m;
      replace(f.priority.control, m.priorities.map((p) => h("option", { value: p }, p)));
      reset(true);
    },
    setAgents(names) {
      if (names.join() === agents.join()) return;
      agents = names;
      replace(datalist, names.map((n) => h("option", { value: n })));
    },
    /** Open the form holding a rework of a failed run: "Fix: <title>", with what broke. */
    rework(run, task) {
      reset(true);
      const title = run.title.toLowerCase().startsWith("fix:") ? run.title : `Fix: ${run.title}`;
      f.title.control.value = title.slice(0, TITLE_MAX);
      if (meta.priorities.includes("high")) f.priority.control.value = "high";
      f.agent.control.value = run.agent || "";
      const where = run.failed_phase ? ` in ${phaseLabel(run.failed_phase)}` : "";
      let prompt = meta.rework_template;
      prompt = setSection(prompt, "Task",
        `Fix “${run.title}”: run ${run.run_id} (attempt ${run.attempt}) failed${where}${run.reason ? ` (${run.reason})` : ""}.`);
      prompt = setSection(prompt, "Current State (Broken)", brokenState(run, where));
      if (task && task.working_dir) prompt = prompt.replace("/absolute/path/to/project", task.working_dir);
      const checked = (run.validations || []).find((v) => v.command);
      if (checked) prompt = prompt.replace(/^(- Test: )<[^>\n]*>$/m, (_, lead) => lead + checked.command);
      f.prompt.control.value = prompt;
      renderPreview();
      go("dispatch");
      // Put the cursor on the first placeholder left to fill in.
      setTimeout(() => {
        const text = f.prompt.control.value;
        const at = text.indexOf("<");
        const end = at >= 0 ? text.indexOf(">", at) : -1;
        f.prompt.control.focus();
        if (at >= 0 && end > at) f.prompt.control.setSelectionRange(at, end + 1);
      }, 50);
    },
  };
}

// Indented, not fenced: a line of output starting "## " must not read as a new section.
function block(text) {
  return text.trimEnd().split("\n").map((l) => `    ${l}`).join("\n");
}

function brokenState(run, where) {
  const lines = [`The previous run failed${where}${run.reason ? `: ${run.reason}` : "."}`];
  if (run.error) lines.push("", "Error:", "", block(run.error));
  const rounds = run.validations || [];
  const last = rounds[rounds.length - 1];
  if (last) {
    lines.push("", `Last validation (${last.round === 0 ? "VALIDATE" : `HEAL round ${last.round}`}): ${last.passed ? "passed" : "failed"}`
      + `${last.command ? `, \`${last.command}\` exited ${last.exit_code}` : ""}.`);
    if (last.missing && last.missing.length) lines.push(`Missing: ${last.missing.join(", ")}`);
    if (last.output) {
      const output = last.output.trimEnd().split("\n").slice(-OUTPUT_LINES).join("\n");
      lines.push("", block(output));
    }
  }
  return lines.join("\n");
}
