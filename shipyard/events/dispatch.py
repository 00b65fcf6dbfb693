"""The dispatch protocol: the JSON a dispatcher sends to put a build task on the queue.

The seed's format is accepted verbatim::

    {"request_type": "queue", "action": "create", "task_type": "build",
     "action_name": "Fix: login loop", "priority": "high",
     "payload": {"prompt": "## Task ...", "dispatcher": "openclaw",
                 "task_title": "Fix: login loop", "max_turns": 100}}

plus, beside ``payload``: ``after`` (task ids this one waits for), ``group`` (parallel tasks
shown together), ``agent`` (which builder), ``idempotency_key`` and ``escalated_from``.

The prompt must hold four Markdown sections: ``## Task``, ``## Requirements``,
``## Environment`` (naming the working directory) and ``## Deliverables`` (README.md among
them); a rework (title starting ``Fix:``) also ``## Current State (Broken)``. Every problem
is reported at once.
"""

from __future__ import annotations

import hashlib
import posixpath
import re
import unicodedata
from typing import Annotated, Any, Literal

import msgspec
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError

from shipyard.errors import CommandRejected
from shipyard.events.envelope import b32, short_id, valid_id
from shipyard.events.types import Priority, TaskDispatched

MAX_DISPATCH_BYTES = 512 * 1024  # a whole dispatch request, as JSON
MAX_PROMPT_CHARS = 200_000
MAX_TURNS_LIMIT = 10_000

REQUIRED_SECTIONS = ("Task", "Requirements", "Environment", "Deliverables")
REWORK_SECTION = "Current State (Broken)"

TEMPLATE = """\
## Task
<One sentence: what to build>

## Requirements
- <What it must do, one requirement a line>

## Environment
- Working directory: /absolute/path/to/project
- Test: <command that exits 0 when the work is right, e.g. pytest -q>

## Deliverables
1. <The files or features expected>
2. README.md"""

REWORK_TEMPLATE = """\
## Task
<One sentence: what to fix>

## Current State (Broken)
<What's failing, error messages, screenshots>

## Requirements
<What the fixed version should do>

## Environment
- Working directory: /absolute/path/to/project
- Existing codebase — read README.md first
- Test: <command that exits 0 when the fix works>

## Deliverables
1. Fixed feature, passing validation
2. Updated README.md"""

# Placeholders from the published templates: a dispatch still holding one was not filled in.
_PLACEHOLDERS = (
    "<One sentence: what to fix>",
    "<One sentence: what to build>",
    "<What's failing, error messages, screenshots>",
    "<What the fixed version should do>",
    "<What it must do, one requirement a line>",
    "<describe what broke>",
    "<paste or reference>",
    "<openclaw_agent_name>",
    "/absolute/path/to/project",
    "/path/to/app/",
)

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$"
SLUG_PATTERN = r"^[a-z][a-z0-9_-]{0,31}$"

_HEADING = re.compile(r"^##[ \t]+(?P<name>[^\n#].*?)[ \t]*#*[ \t]*$", re.MULTILINE)
_WORKDIR = re.compile(
    r"^[ \t]*(?:[-*+]|\d+[.)])?[ \t]*(?:\*\*)?"
    r"(?:working[ \t_-]*dir(?:ectory)?|work[ \t_-]*dir|cwd|directory)(?:\*\*)?[ \t]*:(?:\*\*)?"
    r"[ \t]*(?P<path>.+?)[ \t]*$",
    re.IGNORECASE | re.MULTILINE,
)
_TESTCMD = re.compile(
    r"^[ \t]*(?:[-*+]|\d+[.)])?[ \t]*(?:\*\*)?"
    r"(?:test|tests|validate|validation|validation[ \t]+command|check)(?:\*\*)?[ \t]*:(?:\*\*)?"
    r"[ \t]*(?P<cmd>.+?)[ \t]*$",
    re.IGNORECASE | re.MULTILINE,
)
_LIST_ITEM = re.compile(r"^[ \t]*(?:[-*+]|\d+[.)])[ \t]+(?P<item>.+?)[ \t]*$", re.MULTILINE)
_FILE_NAME = re.compile(
    r"(?<![\w/.-])(?P<path>(?:[\w.-]+/)*[\w-][\w.-]*\.[A-Za-z][A-Za-z0-9]{0,7})(?![\w/-])"
)
_FILE_ALLOWED_EXTS = frozenset(
    (
        "md",
        "txt",
        "rst",
        "py",
        "pyi",
        "js",
        "mjs",
        "cjs",
        "ts",
        "tsx",
        "jsx",
        "json",
        "toml",
        "yaml",
        "yml",
        "ini",
        "cfg",
        "html",
        "htm",
        "css",
        "scss",
        "sql",
        "sh",
        "bash",
        "go",
        "rs",
        "java",
        "kt",
        "rb",
        "php",
        "c",
        "h",
        "cpp",
        "hpp",
        "cs",
        "swift",
        "lock",
        "xml",
        "csv",
        "svg",
        "png",
        "pdf",
        "env",
        "conf",
        "dockerfile",
        "tf",
        "proto",
        "graphql",
        "vue",
        "svelte",
        "lua",
        "r",
        "jl",
        "ex",
        "exs",
        "erl",
        "hs",
        "ml",
        "zig",
        "nim",
        "dart",
    )
)


def _no_control(value: str) -> str:
    for ch in value:
        if unicodedata.category(ch) == "Cc":
            raise ValueError(f"must not contain control characters (found U+{ord(ch):04X})")
    return value


Name = Annotated[str, Field(pattern=NAME_PATTERN)]
Title = Annotated[str, Field(min_length=1, max_length=200)]
TaskId = Annotated[str, Field(min_length=1, max_length=64)]


class DispatchPayload(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS)]
    dispatcher: Name
    task_title: Title | None = None
    max_turns: Annotated[StrictInt, Field(ge=1, le=MAX_TURNS_LIMIT)] = 100


class DispatchRequest(BaseModel):
    """The dispatch JSON, field for field."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    request_type: Literal["queue"] = "queue"
    action: Literal["create"] = "create"
    task_type: Annotated[str, Field(pattern=SLUG_PATTERN)] = "build"
    action_name: Title | None = None
    priority: Priority = Priority.NORMAL
    payload: DispatchPayload
    after: Annotated[list[TaskId], Field(max_length=100)] = []
    group: Annotated[str, Field(max_length=64)] = ""
    group_size: Annotated[StrictInt, Field(ge=0, le=1000)] = 0
    agent: Annotated[str, Field(max_length=64)] = ""
    idempotency_key: Annotated[str, Field(max_length=200)] = ""
    escalated_from: Annotated[str, Field(max_length=64)] = ""


class DispatchInvalid(CommandRejected):
    """The dispatch was refused: fix each problem listed and send it again."""

    def __init__(self, problems: list[str], *, dispatcher: str = "", rework: bool = False):
        super().__init__(
            f"dispatch rejected: {len(problems)} problem{'s' if len(problems) != 1 else ''}",
            problems,
            code="invalid_dispatch",
            template=REWORK_TEMPLATE if rework else TEMPLATE,
        )
        self.dispatcher = dispatcher


class Sections(msgspec.Struct, frozen=True):
    by_name: dict[str, str]
    duplicates: list[str]

    def get(self, name: str) -> str | None:
        return self.by_name.get(name.casefold())


def split_sections(prompt: str) -> Sections:
    """The prompt's ``## Heading`` sections, keyed by heading (case-insensitive)."""
    found: dict[str, str] = {}
    duplicates: list[str] = []
    matches = list(_HEADING.finditer(prompt))
    for i, m in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(prompt)
        key = m.group("name").strip().casefold()
        if key in found:
            duplicates.append(m.group("name").strip())
        found[key] = prompt[m.end() : end].strip()
    return Sections(found, duplicates)


def _unquote(text: str) -> str:
    text = text.strip()
    while len(text) >= 2 and text[0] == text[-1] and text[0] in "`'\"":
        text = text[1:-1].strip()
    return text


def find_working_dir(environment: str) -> str:
    m = _WORKDIR.search(environment)
    return _unquote(m.group("path")) if m else ""


def find_validation_command(environment: str) -> str:
    m = _TESTCMD.search(environment)
    return _unquote(m.group("cmd")) if m else ""


def list_items(section: str) -> list[str]:
    items = [m.group("item").strip() for m in _LIST_ITEM.finditer(section)]
    return items or [line.strip() for line in section.splitlines() if line.strip()]


def named_files(items: list[str]) -> list[str]:
    """File paths named in deliverables (``README.md``, ``src/app.py``), in order, once."""
    seen: dict[str, None] = {}
    for item in items:
        for m in _FILE_NAME.finditer(item):
            path = m.group("path")
            ext = path.rsplit(".", 1)[-1].lower()
            if ext in _FILE_ALLOWED_EXTS and not path.startswith("."):
                seen.setdefault(path, None)
    return list(seen)


def _pydantic_problems(exc: ValidationError) -> list[str]:
    problems = []
    for err in exc.errors(include_url=False):
        where = ".".join(str(p) for p in err["loc"]) or "body"
        kind = err["type"]
        if kind == "extra_forbidden":
            problems.append(f"{where}: unknown field; remove it (see the dispatch protocol)")
        elif kind == "missing":
            problems.append(f"{where}: required field is missing")
        elif kind == "literal_error" and where == "request_type":
            problems.append('request_type: must be "queue"')
        elif kind == "literal_error" and where == "action":
            problems.append('action: must be "create"')
        elif kind == "enum" and where == "priority":
            problems.append("priority: must be one of low, normal, high, urgent")
        elif kind == "string_pattern_mismatch" and where in ("payload.dispatcher", "agent"):
            problems.append(
                f"{where}: must be a name of letters, digits, '_', '.', '@' or '-' "
                "(at most 64, starting with a letter or digit)"
            )
        elif kind == "string_pattern_mismatch" and where == "task_type":
            problems.append('task_type: must be a lowercase word such as "build"')
        else:
            problems.append(f"{where}: {err['msg']}")
    return problems


class MalformedBody(ValueError):
    """The body is not a JSON document; the message says why and where."""


def decode_json(raw: bytes) -> Any:
    """Any JSON document, or :class:`MalformedBody`: invalid UTF-8 and nesting too deep for
    the decoder are refused with a sentence, like malformed JSON."""
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise MalformedBody(
            f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start})"
        ) from None
    try:
        return msgspec.json.decode(raw)
    except msgspec.DecodeError as e:
        raise MalformedBody(f"not valid JSON ({e})") from e
    except RecursionError:
        raise MalformedBody("not valid JSON (nested too deeply)") from None


def _decode_body(body: object) -> tuple[dict[str, Any] | None, list[str]]:
    if isinstance(body, dict):
        return body, []
    if not isinstance(body, bytes | str):
        # Already decoded (the gateway reads the body itself): any JSON value but an object.
        return None, [f"body: must be a JSON object, not {type(body).__name__}"]
    if isinstance(body, str):
        body = body.encode("utf-8", "surrogatepass")
    if len(body) > MAX_DISPATCH_BYTES:
        return None, [
            f"body: {len(body):,} bytes is too large; a dispatch may be at most "
            f"{MAX_DISPATCH_BYTES:,} bytes (put large context in files in the working directory)"
        ]
    if not body.strip():
        return None, ["body: empty; send the dispatch JSON"]
    try:
        value = decode_json(body)
    except MalformedBody as e:
        return None, [f"body: {e}"]
    if not isinstance(value, dict):
        return None, [f"body: must be a JSON object, not {type(value).__name__}"]
    return value, []


def parse(body: object) -> tuple[DispatchRequest, TaskDispatched]:
    """Validate a dispatch (raw bytes or text, or JSON already decoded) and build the event
    that records it.

    Raises :class:`DispatchInvalid` naming every problem found.
    """
    value, problems = _decode_body(body)
    if value is None:
        raise DispatchInvalid(problems)
    dispatcher = ""
    payload = value.get("payload")
    if isinstance(payload, dict) and isinstance(payload.get("dispatcher"), str):
        dispatcher = payload["dispatcher"][:64]
    titles = (
        value.get("action_name"),
        payload.get("task_title") if isinstance(payload, dict) else None,
    )
    rework = any(isinstance(t, str) and t.strip().lower().startswith("fix:") for t in titles)
    for where, text in zip(("action_name", "payload.task_title"), titles, strict=True):
        if isinstance(text, str):
            problems.extend(_placeholder_problems(where, text))

    request: DispatchRequest | None = None
    try:
        request = DispatchRequest.model_validate(value)
    except ValidationError as e:
        problems.extend(_pydantic_problems(e))

    prompt = payload.get("prompt") if isinstance(payload, dict) else None
    facts: dict[str, Any] = {}
    if isinstance(prompt, str):
        problems.extend(_check_prompt(prompt, rework, facts))
    if request is not None:
        problems.extend(_check_request(request))
    if problems or request is None:
        raise DispatchInvalid(problems, dispatcher=dispatcher, rework=rework)

    title = (request.payload.task_title or "").strip() or (request.action_name or "").strip()
    event = TaskDispatched(
        title=title,
        prompt=request.payload.prompt,
        dispatcher=request.payload.dispatcher,
        priority=request.priority,
        task_type=request.task_type,
        max_turns=request.payload.max_turns,
        working_dir=facts["working_dir"],
        deliverables=facts["deliverables"],
        deliverable_files=facts["files"],
        validation_command=facts["validation_command"],
        rework=rework,
        after=list(dict.fromkeys(request.after)),
        group=request.group,
        group_size=request.group_size,
        agent=request.agent,
        idempotency_key=request.idempotency_key,
        escalated_from=request.escalated_from,
    )
    return request, event


def _check_request(request: DispatchRequest) -> list[str]:
    problems: list[str] = []
    if not ((request.payload.task_title or "").strip() or (request.action_name or "").strip()):
        problems.append("action_name or payload.task_title: give the task a title")
    for field, text in (
        ("action_name", request.action_name),
        ("payload.task_title", request.payload.task_title),
        ("group", request.group),
        ("idempotency_key", request.idempotency_key),
    ):
        if text:
            try:
                _no_control(text)
            except ValueError as e:
                problems.append(f"{field}: {e}")
    if request.group and not valid_id(request.group):
        problems.append("group: use letters, digits, '_' or '-' only (at most 64)")
    if request.group_size and not request.group:
        problems.append("group_size: only with group (how many tasks the group will have)")
    if request.agent and not re.match(NAME_PATTERN, request.agent):
        problems.append("agent: must be the name of a configured agent")
    for tid in request.after:
        if not valid_id(tid):
            problems.append(f"after: {tid!r} is not a task id")
    if request.escalated_from and not valid_id(request.escalated_from):
        problems.append(f"escalated_from: {request.escalated_from!r} is not a task id")
    return problems


def _placeholder_problems(where: str, text: str) -> list[str]:
    return [
        f"{where}: still holds the template placeholder `{p}`; replace it with the real value"
        for p in _PLACEHOLDERS
        if p in text
    ]


def _check_prompt(prompt: str, rework: bool, facts: dict[str, Any]) -> list[str]:
    problems: list[str] = []
    sections = split_sections(prompt)
    required = list(REQUIRED_SECTIONS)
    if rework:
        required.insert(1, REWORK_SECTION)
    for name in required:
        body = sections.get(name)
        if body is None:
            why = (
                " (a rework, titled `Fix: …`, must say what is broken)"
                if rework and (name == REWORK_SECTION)
                else ""
            )
            problems.append(f"payload.prompt: missing section `## {name}`{why}")
        elif not body:
            problems.append(f"payload.prompt: section `## {name}` is empty")
    for dup in sections.duplicates:
        problems.append(f"payload.prompt: section `## {dup}` appears more than once")
    problems.extend(_placeholder_problems("payload.prompt", prompt))

    environment = sections.get("Environment") or ""
    working_dir = find_working_dir(environment)
    if environment and not working_dir:
        problems.append(
            "payload.prompt: `## Environment` must name the working directory, "
            "e.g. `- Working directory: /home/me/app`"
        )
    elif working_dir and not working_dir.startswith("/"):
        problems.append(
            f"payload.prompt: working directory {working_dir!r} must be an absolute path"
        )
    if working_dir:
        try:
            _no_control(working_dir)
        except ValueError as e:
            problems.append(f"payload.prompt: working directory: {e}")
    deliverables_text = sections.get("Deliverables") or ""
    items = list_items(deliverables_text)
    if deliverables_text and "readme.md" not in deliverables_text.casefold():
        problems.append("payload.prompt: `## Deliverables` must include README.md")
    files = named_files(items)
    if deliverables_text and not any(f.casefold().endswith("readme.md") for f in files):
        files.append("README.md")
    facts["working_dir"] = posixpath.normpath(working_dir) if working_dir else ""
    facts["deliverables"] = items
    facts["files"] = files
    facts["validation_command"] = find_validation_command(environment)
    return problems


def task_id_for(dispatcher: str, idempotency_key: str) -> str:
    """A new task id; the same for the same dispatcher and idempotency key."""
    if not idempotency_key:
        return short_id("t-")
    digest = hashlib.sha256(f"{dispatcher}\0{idempotency_key}".encode()).digest()
    return "t-" + b32(int.from_bytes(digest[:8], "big") >> 4, 12)
