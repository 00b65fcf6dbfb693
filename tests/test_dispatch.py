"""Unit tests of the dispatch protocol validator, ``shipyard.events.dispatch`` (no NATS)."""

from __future__ import annotations

import copy
import json
import re
from typing import Any

import pytest

from shipyard.errors import CommandRejected
from shipyard.events.dispatch import (
    MAX_DISPATCH_BYTES,
    MAX_PROMPT_CHARS,
    MAX_TURNS_LIMIT,
    REWORK_TEMPLATE,
    TEMPLATE,
    DispatchInvalid,
    DispatchRequest,
    find_validation_command,
    find_working_dir,
    list_items,
    named_files,
    parse,
    split_sections,
    task_id_for,
)
from shipyard.events.types import Priority, TaskDispatched

# --- sample dispatches -----------------------------------------------------------------------

# The seed's rework example, structure and wording kept, its placeholders filled in.
SEED_REWORK_JSON = r"""{
"request_type": "queue",
"action": "create",
"task_type": "build",
"action_name": "Fix: login loops back to the sign-in page",
"priority": "high",
"payload": {
"prompt": "## Task\nMake a correct sign-in land on the dashboard instead of looping back to /login.\n\n## Current State (Broken)\nAfter a correct password the app redirects to /login again; auth.log shows `session cookie missing` on every request.\n\n## Requirements\nA correct password lands on /dashboard and the session survives a page reload.\n\n## Environment\n- Working directory: /srv/apps/login-app/\n- Existing codebase — read README.md first\n- Error log: logs/auth.log, lines 120-180\n\n## Deliverables\n1. Fixed feature, passing validation\n2. Updated README.md\n3. ClawBuddy logs showing fix\n4. HTML report with before/after",
"dispatcher": "openclaw-main",
"task_title": "Fix: login loops back to the sign-in page",
"max_turns": 100
}
}"""  # noqa: E501 (the seed keeps the prompt on one line)

# The seed's example exactly as published, placeholders and all.
SEED_UNFILLED_JSON = r"""{
"request_type": "queue",
"action": "create",
"task_type": "build",
"action_name": "Fix: <describe what broke>",
"priority": "high",
"payload": {
"prompt": "## Task\n<One sentence: what to fix>\n\n## Current State (Broken)\n<What's failing, error messages, screenshots>\n\n## Requirements\n<What the fixed version should do>\n\n## Environment\n- Working directory: /path/to/app/\n- Existing codebase — read README.md first\n- Error log: <paste or reference>\n\n## Deliverables\n1. Fixed feature, passing validation\n2. Updated README.md\n3. ClawBuddy logs showing fix\n4. HTML report with before/after",
"dispatcher": "<openclaw_agent_name>",
"task_title": "Fix: <describe what broke>",
"max_turns": 100
}
}"""  # noqa: E501 (the seed keeps the prompt on one line)

BUILD_SECTIONS: dict[str, str] = {
    "Task": "Add a /health endpoint to the orders service.",
    "Requirements": '- GET /health answers 200 with {"ok": true}\n- The endpoint is documented',
    "Environment": "- Working directory: /srv/orders\n- Test: python -m pytest -q",
    "Deliverables": "1. src/orders/health.py\n2. tests/test_health.py\n3. README.md",
}

REWORK_SECTIONS: dict[str, str] = {
    "Task": "Stop the orders export from dropping the last row.",
    "Current State (Broken)": "The CSV export has 99 rows for 100 orders; no error is logged.",
    "Requirements": "- The export holds one row per order",
    "Environment": (
        "- Working directory: /srv/orders\n- Test: python -m pytest -q tests/test_export.py"
    ),
    "Deliverables": "1. Fixed src/orders/export.py\n2. Updated README.md",
}


def prompt_of(sections: dict[str, str]) -> str:
    """A prompt made of ``## Name`` sections, in the order given."""
    return "\n\n".join(f"## {name}\n{text}" for name, text in sections.items()) + "\n"


def build_body(sections: dict[str, str] | None = None, **top: Any) -> dict[str, Any]:
    """A valid plain build dispatch; ``top`` replaces top-level fields."""
    body: dict[str, Any] = {
        "request_type": "queue",
        "action": "create",
        "task_type": "build",
        "action_name": "Add a health endpoint",
        "priority": "normal",
        "payload": {
            "prompt": prompt_of(BUILD_SECTIONS if sections is None else sections),
            "dispatcher": "openclaw",
            "task_title": "Add a health endpoint",
            "max_turns": 40,
        },
    }
    body.update(top)
    return body


def rework_body(sections: dict[str, str] | None = None, **top: Any) -> dict[str, Any]:
    """A valid rework (``Fix:``) dispatch."""
    top.setdefault("action_name", "Fix: export drops the last row")
    body = build_body(REWORK_SECTIONS if sections is None else sections, **top)
    body["payload"]["task_title"] = body["action_name"]
    return body


def with_payload(body: dict[str, Any], **fields: Any) -> dict[str, Any]:
    """``body`` with payload fields replaced."""
    body = copy.deepcopy(body)
    body["payload"].update(fields)
    return body


def rejected(body: bytes | str | dict[str, Any]) -> DispatchInvalid:
    """The DispatchInvalid that parsing ``body`` raises."""
    with pytest.raises(DispatchInvalid) as info:
        parse(body)
    return info.value


def problems_of(body: bytes | str | dict[str, Any]) -> list[str]:
    return rejected(body).problems


# --- the seed's format -------------------------------------------------------------------------


def test_seed_rework_example_is_accepted_verbatim() -> None:
    """The seed's rework JSON, filled in, is accepted and becomes a rework TaskDispatched."""
    request, event = parse(SEED_REWORK_JSON.encode())
    assert isinstance(request, DispatchRequest)
    assert isinstance(event, TaskDispatched)
    assert event.title == "Fix: login loops back to the sign-in page"
    assert event.dispatcher == "openclaw-main"
    assert event.priority is Priority.HIGH
    assert event.max_turns == 100
    assert event.task_type == "build"
    assert event.rework is True
    assert event.working_dir == "/srv/apps/login-app"
    assert event.deliverables == [
        "Fixed feature, passing validation",
        "Updated README.md",
        "ClawBuddy logs showing fix",
        "HTML report with before/after",
    ]
    assert "README.md" in event.deliverable_files
    assert event.validation_command == ""
    assert event.prompt == json.loads(SEED_REWORK_JSON)["payload"]["prompt"]
    assert (event.after, event.group, event.agent) == ([], "", "")


@pytest.mark.parametrize(
    "body",
    [
        SEED_REWORK_JSON.encode(),
        SEED_REWORK_JSON,
        json.loads(SEED_REWORK_JSON),
    ],
    ids=["bytes", "str", "dict"],
)
def test_seed_rework_example_parses_the_same_from_bytes_str_and_dict(body: Any) -> None:
    """The dispatch may arrive as bytes, text or an already-decoded dict, with one result."""
    _, event = parse(body)
    _, reference = parse(SEED_REWORK_JSON.encode())
    assert event == reference


def test_seed_example_left_unfilled_is_refused_naming_each_placeholder() -> None:
    """The seed's example sent as published is refused: every placeholder is named."""
    err = rejected(SEED_UNFILLED_JSON)
    text = "\n".join(err.problems)
    for placeholder in (
        "<One sentence: what to fix>",
        "<What's failing, error messages, screenshots>",
        "<What the fixed version should do>",
        "<paste or reference>",
        "/path/to/app/",
        "<describe what broke>",
    ):
        assert f"`{placeholder}`" in text, placeholder
    assert any(p.startswith("payload.dispatcher:") for p in err.problems)
    assert err.template == REWORK_TEMPLATE


@pytest.mark.parametrize("template", [TEMPLATE, REWORK_TEMPLATE], ids=["plain", "rework"])
def test_published_templates_are_refused_as_they_stand(template: str) -> None:
    """A prompt that is just the published template is refused for its placeholders."""
    problems = problems_of(with_payload(build_body(), prompt=template))
    assert any("/absolute/path/to/project" in p for p in problems)
    assert any("template placeholder `<One sentence" in p for p in problems)


# --- a plain build dispatch --------------------------------------------------------------------


def test_plain_build_dispatch_is_accepted() -> None:
    """A build dispatch with the four sections is accepted with its facts extracted."""
    request, event = parse(json.dumps(build_body()))
    assert request.payload.max_turns == 40
    assert event.title == "Add a health endpoint"
    assert event.dispatcher == "openclaw"
    assert event.priority is Priority.NORMAL
    assert event.max_turns == 40
    assert event.rework is False
    assert event.working_dir == "/srv/orders"
    assert event.validation_command == "python -m pytest -q"
    assert event.deliverables == ["src/orders/health.py", "tests/test_health.py", "README.md"]
    assert event.deliverable_files == ["src/orders/health.py", "tests/test_health.py", "README.md"]


def test_request_type_and_action_may_be_omitted() -> None:
    """Without request_type and action the dispatch is still a queue/create request."""
    body = build_body()
    del body["request_type"], body["action"]
    request, event = parse(body)
    assert (request.request_type, request.action) == ("queue", "create")
    assert event.title == "Add a health endpoint"


def test_minimal_dispatch_gets_the_defaults() -> None:
    """Only prompt, dispatcher and a title are needed: normal priority, 100 turns, build."""
    body = {"payload": {"prompt": prompt_of(BUILD_SECTIONS), "dispatcher": "oc"}}
    body["payload"]["task_title"] = "Health endpoint"
    _, event = parse(body)
    assert event.priority is Priority.NORMAL
    assert event.max_turns == 100
    assert event.task_type == "build"
    assert event.title == "Health endpoint"


@pytest.mark.parametrize(
    ("field", "value", "problem"),
    [
        ("request_type", "enqueue", 'request_type: must be "queue"'),
        ("request_type", "QUEUE", 'request_type: must be "queue"'),
        ("action", "delete", 'action: must be "create"'),
        ("action", "", 'action: must be "create"'),
    ],
)
def test_request_type_and_action_when_present_must_be_queue_and_create(
    field: str, value: str, problem: str
) -> None:
    """request_type, if given, must be "queue"; action, if given, must be "create"."""
    assert problems_of(build_body(**{field: value})) == [problem]


def test_title_from_action_name_alone_is_used() -> None:
    """Without payload.task_title the event's title is action_name."""
    body = build_body(action_name="  Health endpoint  ")
    del body["payload"]["task_title"]
    _, event = parse(body)
    assert event.title == "Health endpoint"


def test_task_title_wins_over_action_name() -> None:
    """When both titles are given, payload.task_title is the event's title."""
    _, event = parse(with_payload(build_body(action_name="queue name"), task_title="Real title"))
    assert event.title == "Real title"


@pytest.mark.parametrize(
    ("title", "problem"),
    [
        (None, "action_name or payload.task_title: give the task a title"),
        ("   ", "action_name or payload.task_title: give the task a title"),
        ("", "payload.task_title: String should have at least 1 character"),
    ],
    ids=["absent", "blank", "empty"],
)
def test_a_title_is_required(title: str | None, problem: str) -> None:
    """A dispatch without a title, or with only a blank one, is refused."""
    body = build_body()
    del body["action_name"], body["payload"]["task_title"]
    if title is not None:
        body["payload"]["task_title"] = title
    assert problems_of(body) == [problem]


def test_missing_dispatcher_is_reported() -> None:
    """payload.dispatcher is required."""
    body = build_body()
    del body["payload"]["dispatcher"]
    assert problems_of(body) == ["payload.dispatcher: required field is missing"]


@pytest.mark.parametrize("dispatcher", ["open claw", "-oc", "oc/1", "x" * 65])
def test_dispatcher_must_be_a_name(dispatcher: str) -> None:
    """The dispatcher must be a short name of letters, digits and _ . @ -."""
    problems = problems_of(with_payload(build_body(), dispatcher=dispatcher))
    assert len(problems) == 1
    assert problems[0].startswith("payload.dispatcher: must be a name")


@pytest.mark.parametrize("task_type", ["Build", "build task", "", "1build"])
def test_task_type_must_be_a_lowercase_word(task_type: str) -> None:
    """task_type must be a lowercase slug such as "build"."""
    assert problems_of(build_body(task_type=task_type)) == [
        'task_type: must be a lowercase word such as "build"'
    ]


# --- sections --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["Task", "Requirements", "Environment", "Deliverables"])
def test_missing_section_is_reported(name: str) -> None:
    """Leaving out any of the four sections is reported as exactly that problem."""
    sections = {k: v for k, v in BUILD_SECTIONS.items() if k != name}
    assert problems_of(build_body(sections)) == [f"payload.prompt: missing section `## {name}`"]


def test_fix_title_requires_current_state_section() -> None:
    """A `Fix:` dispatch must also have `## Current State (Broken)`."""
    sections = {k: v for k, v in REWORK_SECTIONS.items() if k != "Current State (Broken)"}
    err = rejected(rework_body(sections))
    assert len(err.problems) == 1
    assert err.problems[0].startswith("payload.prompt: missing section `## Current State (Broken)`")
    assert "rework" in err.problems[0]


def test_plain_build_does_not_need_current_state_section() -> None:
    """A title that merely starts with "Fix" (no colon) is not a rework."""
    _, event = parse(with_payload(build_body(action_name="Fixture loader"), task_title="Fixtures"))
    assert event.rework is False


@pytest.mark.parametrize(
    ("action_name", "task_title"),
    [
        ("Fix: export", None),
        ("fix: export", None),
        ("  FIX: export", None),
        (None, "Fix: export"),
        ("Export drops a row", "Fix: export drops a row"),
        ("Fix: export drops a row", "Export drops a row"),
    ],
)
def test_fix_title_in_either_field_makes_a_rework(
    action_name: str | None, task_title: str | None
) -> None:
    """A title starting `Fix:` (any case, either title field) makes the dispatch a rework."""
    body = build_body()
    body.pop("action_name")
    body["payload"].pop("task_title")
    if action_name is not None:
        body["action_name"] = action_name
    if task_title is not None:
        body["payload"]["task_title"] = task_title
    err = rejected(body)
    assert any("`## Current State (Broken)`" in p for p in err.problems)
    assert err.template == REWORK_TEMPLATE
    body["payload"]["prompt"] = prompt_of(REWORK_SECTIONS)
    _, event = parse(body)
    assert event.rework is True


@pytest.mark.parametrize("name", ["Task", "Requirements", "Environment", "Deliverables"])
def test_empty_section_is_reported(name: str) -> None:
    """A section whose heading is present but whose body is empty is reported."""
    sections = {**BUILD_SECTIONS, name: ""}
    assert problems_of(build_body(sections)) == [f"payload.prompt: section `## {name}` is empty"]


def test_empty_current_state_section_is_reported_for_a_rework() -> None:
    """A rework's `## Current State (Broken)` may not be empty either."""
    sections = {**REWORK_SECTIONS, "Current State (Broken)": "   "}
    assert problems_of(rework_body(sections)) == [
        "payload.prompt: section `## Current State (Broken)` is empty"
    ]


@pytest.mark.parametrize("heading", ["Requirements", "requirements", "REQUIREMENTS"])
def test_duplicated_section_is_reported(heading: str) -> None:
    """A section heading given twice (in any case) is reported."""
    prompt = prompt_of(BUILD_SECTIONS) + f"\n## {heading}\n- and one more thing\n"
    assert problems_of(with_payload(build_body(), prompt=prompt)) == [
        f"payload.prompt: section `## {heading}` appears more than once"
    ]


def test_section_headings_are_case_insensitive_and_may_have_closing_hashes() -> None:
    """`## task`, `## REQUIREMENTS ##` and the like name the same sections."""
    prompt = (
        "## task\nAdd a health endpoint.\n\n"
        "## REQUIREMENTS ##\n- answers 200\n\n"
        "##  Environment\n- Working directory: /srv/orders\n\n"
        "## deliverables\n- README.md\n"
    )
    _, event = parse(with_payload(build_body(), prompt=prompt))
    assert event.working_dir == "/srv/orders"
    assert event.deliverables == ["README.md"]


def test_deeper_headings_stay_inside_their_section() -> None:
    """`### Sub` headings are part of the enclosing section, not sections of their own."""
    sections = split_sections("## Task\nDo it.\n### Detail\nmore\n## Requirements\n- r")
    assert sections.by_name == {"task": "Do it.\n### Detail\nmore", "requirements": "- r"}
    assert sections.duplicates == []
    assert sections.get("TASK") == "Do it.\n### Detail\nmore"
    assert sections.get("Environment") is None


def test_crlf_prompt_is_accepted_with_clean_facts() -> None:
    """A prompt with Windows line endings gives the same facts as one with plain newlines."""
    prompt = prompt_of(BUILD_SECTIONS).replace("\n", "\r\n")
    _, event = parse(with_payload(build_body(), prompt=prompt))
    _, reference = parse(build_body())
    assert event.working_dir == reference.working_dir
    assert event.validation_command == reference.validation_command
    assert event.deliverables == reference.deliverables
    assert event.deliverable_files == reference.deliverable_files


# --- Environment: the working directory ---------------------------------------------------------


def test_environment_must_name_a_working_directory() -> None:
    """An Environment section without a working directory line is refused."""
    sections = {**BUILD_SECTIONS, "Environment": "- Python 3.12\n- Test: pytest -q"}
    problems = problems_of(build_body(sections))
    assert len(problems) == 1
    assert "`## Environment` must name the working directory" in problems[0]


@pytest.mark.parametrize("path", ["srv/orders", "./orders", "~/orders", "orders", "C:\\orders"])
def test_relative_working_directory_is_refused(path: str) -> None:
    """A working directory that is not an absolute POSIX path is refused."""
    sections = {**BUILD_SECTIONS, "Environment": f"- Working directory: {path}"}
    assert problems_of(build_body(sections)) == [
        f"payload.prompt: working directory {path!r} must be an absolute path"
    ]


@pytest.mark.parametrize(
    "line",
    [
        "- Working directory: /srv/orders",
        "- Working directory: `/srv/orders`",
        '- Working directory: "/srv/orders"',
        "- Working directory: '/srv/orders'",
        "- Working directory: `'/srv/orders'`",
        "- **Working directory:** `/srv/orders`",
        "- Working dir: /srv/orders/",
        "* workdir: /srv/orders",
        "1. cwd: /srv/orders",
        "Directory: /srv/orders   ",
        "- WORKING DIRECTORY: /srv/x/../orders/./",
    ],
)
def test_working_directory_is_unquoted_and_normalised(line: str) -> None:
    """Backticks/quotes around the path are stripped and the path is normalised."""
    sections = {**BUILD_SECTIONS, "Environment": f"- Node 20\n{line}\n- Test: npm test"}
    _, event = parse(build_body(sections))
    assert event.working_dir == "/srv/orders"


@pytest.mark.parametrize(
    ("environment", "expected"),
    [
        ("- Working directory: `/srv/app`", "/srv/app"),
        ("- Python 3.12", ""),
        ("", ""),
    ],
)
def test_find_working_dir(environment: str, expected: str) -> None:
    """find_working_dir returns the unquoted path, or "" when none is named."""
    assert find_working_dir(environment) == expected


# --- Environment: the validation command ----------------------------------------------------


@pytest.mark.parametrize(
    ("line", "command"),
    [
        ("- Test: pytest -q", "pytest -q"),
        ("- **Test:** `npm test`", "npm test"),
        ("- Tests: go test ./...", "go test ./..."),
        ("Validation command: make check", "make check"),
        ("1. Check: ruff check .", "ruff check ."),
        ("- validate: 'cargo test'", "cargo test"),
    ],
)
def test_find_validation_command_reads_the_test_line(line: str, command: str) -> None:
    """A `Test:`-style line in Environment gives the validation command, unquoted."""
    environment = f"- Working directory: /srv/app\n{line}\n- Node 20"
    assert find_validation_command(environment) == command


@pytest.mark.parametrize("environment", ["- Working directory: /srv/app", "- Testing: manual", ""])
def test_find_validation_command_is_empty_without_a_test_line(environment: str) -> None:
    """Without a test line there is no validation command."""
    assert find_validation_command(environment) == ""


def test_validation_command_is_carried_into_the_event() -> None:
    """The Environment's Test: line becomes the event's validation_command."""
    _, event = parse(rework_body())
    assert event.validation_command == "python -m pytest -q tests/test_export.py"


# --- Deliverables ----------------------------------------------------------------------------


def test_deliverables_must_include_readme() -> None:
    """Deliverables that do not mention README.md are refused."""
    sections = {**BUILD_SECTIONS, "Deliverables": "1. src/orders/health.py\n2. Docs page"}
    assert problems_of(build_body(sections)) == [
        "payload.prompt: `## Deliverables` must include README.md"
    ]


def test_readme_in_any_case_satisfies_the_deliverables_rule() -> None:
    """`readme.md` in lower case counts as README.md."""
    sections = {**BUILD_SECTIONS, "Deliverables": "- app.py\n- an updated readme.md"}
    _, event = parse(build_body(sections))
    assert event.deliverable_files == ["app.py", "readme.md"]


def test_readme_is_listed_among_files_even_when_not_named_as_a_file() -> None:
    """When README.md is mentioned but not picked up as a file, it is still a deliverable file."""
    sections = {**BUILD_SECTIONS, "Deliverables": "- health endpoint\n- README.mdx style docs"}
    _, event = parse(build_body(sections))
    assert event.deliverable_files == ["README.md"]


def test_deliverables_without_list_markers_are_read_line_by_line() -> None:
    """A Deliverables section that is not a list gives one deliverable per non-blank line."""
    assert list_items("The endpoint\n\nAn updated README.md\n") == [
        "The endpoint",
        "An updated README.md",
    ]


def test_list_items_reads_bullets_and_numbers() -> None:
    """Bulleted (- * +) and numbered (1. 2)) items are all read, indented or not."""
    assert list_items("- a\n* b\n+ c\n1. d\n2) e\n  - f\nnot an item") == [
        "a",
        "b",
        "c",
        "d",
        "e",
        "f",
    ]


def test_named_files_extracts_each_file_once_in_order() -> None:
    """named_files finds paths like src/app.py and README.md, in order, once each."""
    items = [
        "Create src/app.py and tests/test_app.py",
        "Updated README.md",
        "README.md again, and `src/app.py` again",
        "`web/index.html`, then config.yaml.",
    ]
    assert named_files(items) == [
        "src/app.py",
        "tests/test_app.py",
        "README.md",
        "web/index.html",
        "config.yaml",
    ]


@pytest.mark.parametrize(
    "item",
    [
        "version 1.2 of the thing, e.g. faster",
        "see https://example.com/page.html",
        "notes.xyz with an unknown extension",
        "a Dockerfile",
        ".env",
        "Fixed feature, passing validation",
    ],
)
def test_named_files_ignores_non_files(item: str) -> None:
    """Version numbers, abbreviations, URLs, unknown extensions and dotfiles are not files."""
    assert named_files([item]) == []


# --- priority and max_turns ---------------------------------------------------------------------


@pytest.mark.parametrize("priority", ["low", "normal", "high", "urgent"])
def test_priority_accepts_the_four_levels(priority: str) -> None:
    """priority may be low, normal, high or urgent."""
    _, event = parse(build_body(priority=priority))
    assert event.priority is Priority(priority)


@pytest.mark.parametrize("priority", ["medium", "HIGH", "", 1, None, "critical"])
def test_priority_rejects_anything_else(priority: Any) -> None:
    """Any other priority is refused with the list of allowed values."""
    assert problems_of(build_body(priority=priority)) == [
        "priority: must be one of low, normal, high, urgent"
    ]


@pytest.mark.parametrize("max_turns", [1, 100, MAX_TURNS_LIMIT])
def test_max_turns_accepts_positive_ints_up_to_the_limit(max_turns: int) -> None:
    """max_turns may be any int from 1 to 10000."""
    _, event = parse(with_payload(build_body(), max_turns=max_turns))
    assert event.max_turns == max_turns


@pytest.mark.parametrize(
    "max_turns",
    [0, -1, True, False, "10", 10001, 10.0, 1.5, None],
    ids=repr,
)
def test_max_turns_rejects_non_positive_non_int_and_too_large(max_turns: Any) -> None:
    """max_turns must be a real int in 1..10000: no bools, strings, floats or 10001."""
    problems = problems_of(with_payload(build_body(), max_turns=max_turns))
    assert len(problems) == 1
    assert problems[0].startswith("payload.max_turns: ")


# --- unknown fields ------------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["callback_url", "priorty", "task"])
def test_unknown_top_level_field_is_refused(field: str) -> None:
    """An unknown top-level field is refused with a message naming it."""
    assert problems_of(build_body(**{field: "x"})) == [
        f"{field}: unknown field; remove it (see the dispatch protocol)"
    ]


@pytest.mark.parametrize("field", ["model", "max_turn", "title"])
def test_unknown_payload_field_is_refused(field: str) -> None:
    """An unknown payload field is refused with a message naming payload.<field>."""
    assert problems_of(with_payload(build_body(), **{field: "x"})) == [
        f"payload.{field}: unknown field; remove it (see the dispatch protocol)"
    ]


# --- bodies that are not a dispatch at all --------------------------------------------------


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"not json", "body: not valid JSON"),
        (b'{"payload": ', "body: not valid JSON"),
        (b'{"a": 1} trailing', "body: not valid JSON"),
        (b"[" * 100_000, "body: not valid JSON"),
        (b"[1, 2]", "body: must be a JSON object, not list"),
        (b'"a dispatch"', "body: must be a JSON object, not str"),
        (b"42", "body: must be a JSON object, not int"),
        (b"null", "body: must be a JSON object"),
        (b"", "body: empty; send the dispatch JSON"),
        (b" \n\t ", "body: empty; send the dispatch JSON"),
        ("", "body: empty; send the dispatch JSON"),
        (b"\xff\xfe{}", "body: not valid UTF-8 (byte 0xff at offset 0)"),
        (b'{"a": "\xc3"}', "body: not valid UTF-8 (byte 0xc3 at offset 7)"),
        ("{\ud800}", "body: not valid UTF-8"),
    ],
    ids=[
        "garbage",
        "truncated",
        "trailing",
        "deeply-nested",
        "list",
        "string",
        "number",
        "null",
        "empty-bytes",
        "whitespace",
        "empty-str",
        "bad-utf8",
        "truncated-utf8",
        "lone-surrogate",
    ],
)
def test_undecodable_body_gives_one_clear_problem(body: bytes | str, expected: str) -> None:
    """A body that is not a JSON object gives exactly one problem, as DispatchInvalid."""
    err = rejected(body)
    assert len(err.problems) == 1
    assert err.problems[0].startswith(expected)
    assert err.template == TEMPLATE
    assert err.dispatcher == ""


@pytest.mark.parametrize("as_text", [False, True], ids=["bytes", "str"])
def test_oversized_body_gives_one_clear_problem(as_text: bool) -> None:
    """A body over MAX_DISPATCH_BYTES is refused before decoding, with one problem."""
    raw = json.dumps(build_body()).encode()
    raw += b" " * (MAX_DISPATCH_BYTES + 1 - len(raw))
    assert len(raw) == MAX_DISPATCH_BYTES + 1
    err = rejected(raw.decode() if as_text else raw)
    assert err.problems == [
        f"body: {MAX_DISPATCH_BYTES + 1:,} bytes is too large; a dispatch may be at most "
        f"{MAX_DISPATCH_BYTES:,} bytes (put large context in files in the working directory)"
    ]


def test_body_of_exactly_the_size_limit_is_accepted() -> None:
    """A body of exactly MAX_DISPATCH_BYTES is not refused for its size."""
    raw = json.dumps(build_body()).encode()
    raw += b" " * (MAX_DISPATCH_BYTES - len(raw))
    _, event = parse(raw)
    assert event.title == "Add a health endpoint"


def test_oversized_text_body_is_measured_in_utf8_bytes() -> None:
    """A text body's size is its UTF-8 length, not its character count."""
    raw = json.dumps(build_body())
    pad = MAX_DISPATCH_BYTES // 2  # two-byte characters: under the limit in chars, over in bytes
    body = raw[:-1] + ', "group": "' + "é" * pad + '"}'
    assert len(body) < MAX_DISPATCH_BYTES < len(body.encode())
    problems = problems_of(body)
    assert len(problems) == 1
    assert problems[0].startswith(f"body: {len(body.encode()):,} bytes is too large")


def test_prompt_longer_than_the_limit_is_refused() -> None:
    """A prompt over MAX_PROMPT_CHARS is refused."""
    prompt = prompt_of(BUILD_SECTIONS) + "x" * MAX_PROMPT_CHARS
    problems = problems_of(with_payload(build_body(), prompt=prompt))
    assert problems == [f"payload.prompt: String should have at most {MAX_PROMPT_CHARS} characters"]


@pytest.mark.parametrize("payload", ["a prompt", ["a prompt"], 5, None, True], ids=repr)
def test_payload_that_is_not_an_object_is_refused_cleanly(payload: Any) -> None:
    """A payload that is not an object is one problem about payload, never a crash."""
    body = build_body(payload=payload)
    del body["action_name"]
    problems = problems_of(body)
    assert len(problems) == 1
    assert problems[0].startswith("payload: ")


def test_missing_payload_is_reported() -> None:
    """A dispatch without a payload is refused as missing one."""
    body = build_body()
    del body["payload"]
    assert "payload: required field is missing" in problems_of(body)


# --- control characters and placeholders ----------------------------------------------------


@pytest.mark.parametrize("field", ["action_name", "task_title"])
@pytest.mark.parametrize(
    "char", ["\x00", "\n", "\t", "\x1b", "\x7f", "\x85"], ids=lambda c: f"U+{ord(c):04X}"
)
def test_control_characters_in_the_title_are_refused(field: str, char: str) -> None:
    """A title holding a control character is refused, naming the character."""
    title = f"Add a {char}health endpoint"
    body = build_body(action_name=title) if field == "action_name" else build_body()
    if field == "task_title":
        body["payload"]["task_title"] = title
    where = "action_name" if field == "action_name" else "payload.task_title"
    assert problems_of(body) == [
        f"{where}: must not contain control characters (found U+{ord(char):04X})"
    ]


@pytest.mark.parametrize(
    ("section", "text", "placeholder"),
    [
        ("Current State (Broken)", "<describe what broke>", "<describe what broke>"),
        (
            "Environment",
            "- Working directory: /srv/orders\n- Error log: <paste or reference>",
            "<paste or reference>",
        ),
        (
            "Requirements",
            "- <What it must do, one requirement a line>",
            "<What it must do, one requirement a line>",
        ),
        ("Environment", "- Working directory: /path/to/app/", "/path/to/app/"),
        (
            "Environment",
            "- Working directory: /absolute/path/to/project",
            "/absolute/path/to/project",
        ),
    ],
)
def test_unfilled_placeholders_in_the_prompt_are_refused(
    section: str, text: str, placeholder: str
) -> None:
    """A prompt still holding a template placeholder is refused, naming it."""
    problems = problems_of(rework_body({**REWORK_SECTIONS, section: text}))
    assert problems == [
        f"payload.prompt: still holds the template placeholder `{placeholder}`; "
        "replace it with the real value"
    ]


@pytest.mark.parametrize("field", ["action_name", "payload.task_title"])
def test_unfilled_placeholder_in_the_title_is_refused(field: str) -> None:
    """A title left as `Fix: <describe what broke>` is refused, naming the placeholder."""
    body = rework_body()
    if field == "action_name":
        body["action_name"] = "Fix: <describe what broke>"
    else:
        body["payload"]["task_title"] = "Fix: <describe what broke>"
    assert problems_of(body) == [
        f"{field}: still holds the template placeholder `<describe what broke>`; "
        "replace it with the real value"
    ]


# --- all problems at once, and the error itself ---------------------------------------------


def test_every_problem_is_reported_at_once() -> None:
    """A dispatch with several mistakes gets all of them in one DispatchInvalid."""
    sections = {
        "Task": "Add a health endpoint.",
        "Environment": "- Working directory: srv/orders",
        "Deliverables": "- src/orders/health.py",
    }
    body = build_body(sections, priority="asap", colour="blue")
    body["payload"]["max_turns"] = 0
    err = rejected(body)
    assert sorted(err.problems) == sorted(
        [
            "priority: must be one of low, normal, high, urgent",
            "colour: unknown field; remove it (see the dispatch protocol)",
            "payload.max_turns: Input should be greater than or equal to 1",
            "payload.prompt: missing section `## Requirements`",
            "payload.prompt: working directory 'srv/orders' must be an absolute path",
            "payload.prompt: `## Deliverables` must include README.md",
        ]
    )
    assert str(err).startswith("dispatch rejected: 6 problems\n")
    assert all(f"  - {p}" in str(err) for p in err.problems)


def test_every_request_level_problem_is_reported_at_once() -> None:
    """Problems in titles, group, agent, after and escalated_from are all listed together."""
    body = rework_body(group="wave 2", agent="claude code", after=["t.1"], escalated_from="t 2")
    body["payload"]["task_title"] = "Fix:\texport"
    assert sorted(problems_of(body)) == sorted(
        [
            "payload.task_title: must not contain control characters (found U+0009)",
            "group: use letters, digits, '_' or '-' only (at most 64)",
            "agent: must be the name of a configured agent",
            "after: 't.1' is not a task id",
            "escalated_from: 't 2' is not a task id",
        ]
    )


@pytest.mark.parametrize(
    ("body", "template"),
    [
        (rework_body(priority="asap"), REWORK_TEMPLATE),
        (build_body(priority="asap"), TEMPLATE),
        (build_body(priority="asap", action_name="fix: it"), REWORK_TEMPLATE),
        (build_body(priority="asap", action_name="Fixture"), TEMPLATE),
    ],
    ids=["rework", "build", "lowercase-fix", "fix-without-colon"],
)
def test_template_matches_the_kind_of_dispatch(body: dict[str, Any], template: str) -> None:
    """DispatchInvalid.template is the rework template for `Fix:` titles, else the plain one."""
    assert rejected(body).template == template


def test_dispatch_invalid_is_a_command_rejection_naming_the_dispatcher() -> None:
    """DispatchInvalid is a CommandRejected with code invalid_dispatch and the dispatcher."""
    err = rejected(build_body(priority="asap"))
    assert isinstance(err, CommandRejected)
    assert err.code == "invalid_dispatch"
    assert err.dispatcher == "openclaw"
    assert err.message == "dispatch rejected: 1 problem"
    assert str(err) == (
        "dispatch rejected: 1 problem\n  - priority: must be one of low, normal, high, urgent"
    )


# --- fields beyond the seed -------------------------------------------------------------------


def test_fields_beyond_the_seed_are_carried_into_the_event() -> None:
    """after, group, agent, idempotency_key and escalated_from reach the event; after deduped."""
    body = build_body(
        after=["t-0123456789ab", "t-abcdefghjkmn", "t-0123456789ab"],
        group="wave-2",
        agent="claude-code",
        idempotency_key="nightly build 2024-06-01",
        escalated_from="t-zyxwvtsrqpnm",
    )
    request, event = parse(body)
    assert request.after == ["t-0123456789ab", "t-abcdefghjkmn", "t-0123456789ab"]
    assert event.after == ["t-0123456789ab", "t-abcdefghjkmn"]
    assert event.group == "wave-2"
    assert event.agent == "claude-code"
    assert event.idempotency_key == "nightly build 2024-06-01"
    assert event.escalated_from == "t-zyxwvtsrqpnm"


@pytest.mark.parametrize("tid", ["t.1", "t 1", "t-*", "t>", "t-1/2"])
def test_invalid_task_ids_in_after_are_refused(tid: str) -> None:
    """An `after` entry that is not a task id is refused, naming it."""
    assert problems_of(build_body(after=["t-0123456789ab", tid])) == [
        f"after: {tid!r} is not a task id"
    ]


@pytest.mark.parametrize(
    ("after", "prefix"),
    [
        ([""], "after.0: "),
        (["t" * 65], "after.0: "),
        ("t-0123456789ab", "after: "),
        ([f"t-{i}" for i in range(101)], "after: "),
    ],
    ids=["empty-id", "long-id", "not-a-list", "too-many"],
)
def test_malformed_after_is_refused(after: Any, prefix: str) -> None:
    """`after` must be a list of at most 100 ids of 1 to 64 characters."""
    problems = problems_of(build_body(after=after))
    assert len(problems) == 1
    assert problems[0].startswith(prefix)


def test_idempotency_key_with_control_characters_is_refused() -> None:
    """idempotency_key may not hold control characters."""
    assert problems_of(build_body(idempotency_key="key\n2")) == [
        "idempotency_key: must not contain control characters (found U+000A)"
    ]


# --- task ids ----------------------------------------------------------------------------------

TASK_ID = re.compile(r"^t-[0-9a-z]{12}$")


def test_task_id_for_is_stable_for_the_same_dispatcher_and_key() -> None:
    """The same dispatcher and idempotency key always give the same task id."""
    first = task_id_for("openclaw", "nightly-2024-06-01")
    assert TASK_ID.match(first)
    assert task_id_for("openclaw", "nightly-2024-06-01") == first


def test_task_id_for_differs_between_keys_and_dispatchers() -> None:
    """Different keys, or the same key from different dispatchers, give different ids."""
    ids = {
        task_id_for("openclaw", "nightly-2024-06-01"),
        task_id_for("openclaw", "nightly-2024-06-02"),
        task_id_for("other-agent", "nightly-2024-06-01"),
    }
    assert len(ids) == 3
    assert all(TASK_ID.match(tid) for tid in ids)


def test_task_id_for_without_a_key_is_fresh_each_call() -> None:
    """Without an idempotency key every call gives a new id."""
    ids = [task_id_for("openclaw", "") for _ in range(5)]
    assert len(set(ids)) == 5
    assert all(TASK_ID.match(tid) for tid in ids)
