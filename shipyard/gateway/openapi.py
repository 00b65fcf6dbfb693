"""The OpenAPI 3.1 document served at ``/openapi.json``. A test checks it lists exactly the
routes the app serves."""

from __future__ import annotations

from typing import Any

JSON = "application/json"
ERROR = {"$ref": "#/components/schemas/Error"}
ROWS = {"type": "array", "items": {"type": "object"}}  # a list of read-model rows


def _ok(description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": schema or {"type": "object"}}}}


def _errors(*codes: int) -> dict[str, Any]:
    text = {
        401: "missing or unknown token",
        403: "the token's role may not do this",
        404: "no such thing",
        409: "the task's state does not allow it",
        413: "body too large",
        422: "invalid input; every problem is listed",
        503: "the event log is unreachable",
    }
    return {str(c): {"description": text[c], "content": {JSON: {"schema": ERROR}}} for c in codes}


def _query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "schema": schema,
        "description": description,
    }


def _path(name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}


READ_ERRORS = (401, 403, 422)


def _get(
    summary: str,
    *params: dict[str, Any],
    errors: tuple[int, ...] = READ_ERRORS,
    schema: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "get": {
            "summary": summary,
            "parameters": list(params),
            "responses": {"200": _ok(summary, schema), **_errors(*errors)},
        }
    }


def _post(
    summary: str, *params: dict[str, Any], created: bool = False, errors: tuple[int, ...]
) -> dict[str, Any]:
    status = "201" if created else "200"
    return {
        "post": {
            "summary": summary,
            "parameters": list(params),
            "requestBody": {
                "required": False,
                "content": {JSON: {"schema": {"type": "object"}}},
            },
            "responses": {status: _ok(summary), **_errors(*errors)},
        }
    }


def document(version: str) -> dict[str, Any]:
    limit = _query("limit", {"type": "integer", "minimum": 1}, "rows per page")
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Shipyard",
            "version": version,
            "description": "Dispatch build tasks, watch every phase, talk to agents.",
        },
        "security": [{"bearer": []}],
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["error"],
                    "properties": {
                        "error": {
                            "type": "object",
                            "required": ["code", "message", "problems"],
                            "properties": {
                                "code": {"type": "string"},
                                "message": {"type": "string"},
                                "problems": {"type": "array", "items": {"type": "string"}},
                                "template": {"type": "string"},
                            },
                        }
                    },
                }
            },
        },
        "paths": {
            "/": {
                "get": {
                    "summary": "The Command Center; ?token= logs the browser in",
                    "security": [],
                    "parameters": [_query("token", {"type": "string"}, "a dashboard token")],
                    "responses": {
                        "200": {"description": "the dashboard", "content": {"text/html": {}}},
                        "303": {"description": "logged in; redirect to /"},
                        "401": {"description": "not logged in", "content": {"text/html": {}}},
                    },
                }
            },
            "/healthz": {
                "get": {
                    "summary": "Liveness and projection progress",
                    "security": [],
                    "responses": {"200": _ok("healthy"), "503": _ok("NATS unreachable")},
                }
            },
            "/openapi.json": {
                "get": {
                    "summary": "This document",
                    "security": [],
                    "responses": {"200": _ok("OpenAPI 3.1")},
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics",
                    "responses": {
                        "200": {"description": "text format", "content": {"text/plain": {}}},
                        **_errors(401, 403),
                    },
                }
            },
            "/api/meta": _get("Phases, columns, priorities, message types and templates"),
            "/api/status": _get("Queue, running builds, stale runs, projection progress"),
            "/api/runs/live": _get("Runs in progress", schema=ROWS),
            "/api/runs/{run_id}": _get(
                "One run: phases, validations, plan", _path("run_id"), errors=(401, 403, 404)
            ),
            "/api/runs/{run_id}/log": _get(
                "The run's builder output, last lines",
                _path("run_id"),
                _query("tail", {"type": "integer", "minimum": 1}, "how many lines"),
                errors=(401, 403, 404, 422),
            ),
            "/api/runs/{run_id}/report": {
                "get": {
                    "summary": "The run's HTML report",
                    "parameters": [_path("run_id")],
                    "responses": {
                        "200": {"description": "report", "content": {"text/html": {}}},
                        **_errors(401, 403, 404),
                    },
                }
            },
            "/api/history": _get(
                "Build History, newest first",
                limit,
                _query("before", {"type": "string"}, "the last run id of the previous page"),
                _query("outcome", {"type": "string"}, "succeeded, failed or cancelled"),
                _query("agent", {"type": "string"}, "only this agent"),
                _query("search", {"type": "string"}, "title text or task id"),
            ),
            "/api/tasks": _get(
                "Tasks, newest first",
                _query("state", {"type": "string"}, "filter by state"),
                limit,
                schema=ROWS,
            ),
            "/api/tasks/{task_id}": _get(
                "One task with its runs", _path("task_id"), errors=(401, 403, 404)
            ),
            "/api/tasks/{task_id}/cancel": _post(
                "Cancel a queued or running task",
                _path("task_id"),
                errors=(401, 403, 404, 409, 422),
            ),
            "/api/tasks/{task_id}/retry": _post(
                "Queue a failed or cancelled task again",
                _path("task_id"),
                errors=(401, 403, 404, 409, 422),
            ),
            "/api/tasks/{task_id}/escalate": _post(
                'Hand a failed or cancelled task to another agent: {"to": "AGENT", "note": "…"}',
                _path("task_id"),
                created=True,
                errors=(401, 403, 404, 409, 413, 422),
            ),
            "/api/activity": _get(
                "The activity timeline, newest first",
                limit,
                _query("before", {"type": "integer", "minimum": 0}, "older than this sequence"),
                _query("task_id", {"type": "string"}, "only this task"),
                schema=ROWS,
            ),
            "/api/kanban": _get(
                "The Kanban board: task cards and their plan-step cards", schema=ROWS
            ),
            "/api/groups": _get(
                "Parallel groups: running ones with live counts, finished ones (last day) with "
                "their merged outcome",
                schema=ROWS,
            ),
            "/api/agents": _get("Agents and their runs", schema=ROWS),
            "/api/handlers": _get("Handlers and when they were last seen", schema=ROWS),
            "/api/threads": _get(
                "Message threads",
                _query("agent", {"type": "string"}, "only with this agent"),
                schema=ROWS,
            ),
            "/api/threads/{thread_id}": _get(
                "A thread's messages with read receipts",
                _path("thread_id"),
                errors=(401, 403, 404),
                schema=ROWS,
            ),
            "/api/inbox/{agent}": _get(
                "An agent's messages",
                _path("agent"),
                _query("unread", {"type": "string"}, "true: only unread"),
            ),
            "/api/dispatch": _post(
                "Put a build task on the queue (the dispatch protocol's JSON)",
                created=True,
                errors=(401, 403, 413, 422, 503),
            ),
            "/api/messages": _post(
                "Send a message to an agent", created=True, errors=(401, 403, 413, 422)
            ),
            "/api/messages/read": _post("Mark messages read", errors=(401, 403, 413, 422)),
            "/api/events": {
                "get": {
                    "summary": "The event log as Server-Sent Events (id = stream sequence)",
                    "parameters": [
                        _query("after", {"type": "integer", "minimum": 0}, "resume after this"),
                        _query("task", {"type": "string"}, "only this task"),
                        _query("type", {"type": "string"}, "only this event type"),
                    ],
                    "responses": {
                        "200": {
                            "description": "event stream",
                            "content": {"text/event-stream": {}},
                        },
                        **_errors(401, 403, 422),
                    },
                }
            },
        },
    }
