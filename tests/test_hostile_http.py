"""Hostile HTTP: every route of /openapi.json fuzzed against a real `shipyard up`, huge and
malformed bodies, and the role policy checked route by route."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from starlette.routing import Mount, Route

from shipyard import __version__
from shipyard.gateway import openapi
from shipyard.gateway.app import create_app
from shipyard.gateway.auth import TokenStore
from tests.conftest import Up

ADMIN = "sy_admin-token-for-the-hostile-tests"
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
# The event stream never ends, so a fuzzer cannot read a whole response; its parameters and
# role checks are covered by test_gateway and the role table below.
STREAMING = "/api/events"

schema = schemathesis.openapi.from_dict(openapi.document(__version__)).exclude(path=STREAMING)


class Stack:
    """A running `shipyard up` with a token per role."""

    def __init__(self, up: Up) -> None:
        self.up = up
        info = json.loads((up.data_dir / "instance.json").read_text())
        self.url: str = info["gateway_url"]
        store = TokenStore(up.data_dir)
        self.tokens = {"admin": ADMIN}
        for role in ("dispatcher", "builder", "viewer"):
            self.tokens[role] = store.create(role, f"hostile-{role}")  # type: ignore[arg-type]

    def request(
        self, method: str, path: str, token: str = "", body: bytes | None = None
    ) -> tuple[int, Any]:
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                status, raw = r.status, r.read()
        except urllib.error.HTTPError as e:
            status, raw = e.code, e.read()
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw.decode("utf-8", "replace")

    def last_seq(self) -> int:
        status, body = self.request("GET", "/metrics", self.tokens["viewer"])
        assert status == 200
        for line in body.splitlines():
            if line.startswith("shipyard_events_appended_total "):
                return int(float(line.split()[1]))
        raise AssertionError(f"no shipyard_events_appended_total in /metrics:\n{body}")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One `shipyard up` for the module; no builder can start (no roots are configured), so
    fuzzed dispatches that pass validation stay harmless."""
    data = tmp_path_factory.mktemp("hostile") / "data"
    data.mkdir()
    running = Up(data, env={"SHIPYARD_ADMIN_TOKEN": ADMIN})
    running.wait_ready()
    yield Stack(running)
    running.stop()


@pytest.fixture(params=["admin", "viewer"])
def role(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@schema.parametrize()
@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
)
def test_every_route_answers_within_its_document(case: Any, stack: Stack, role: str) -> None:
    """Generated requests to every documented route, with an admin and a viewer token, never
    get a 5xx, and each answer has a documented status, content type and body schema."""
    with requests.Session() as session:
        case.call_and_validate(
            base_url=stack.url,
            session=session,
            headers={"Authorization": f"Bearer {stack.tokens[role]}"},
            checks=CHECKS,
            timeout=30,
        )


# --- bodies no client should send ------------------------------------------------------------

BODY_ROUTES = [
    "/api/dispatch",
    "/api/tasks/t-x/cancel",
    "/api/tasks/t-x/escalate",
    "/api/messages",
    "/api/messages/read",
]
TEN_MB = 10 * 1024 * 1024


@pytest.mark.parametrize("path", BODY_ROUTES)
def test_a_ten_megabyte_body_is_refused_with_413(stack: Stack, path: str) -> None:
    """A 10 MB body, announced by Content-Length or streamed in chunks, is refused with 413
    before it is read, and nothing is appended."""
    before = stack.last_seq()
    body = b'{"x": "' + b"a" * TEN_MB + b'"}'
    status, err = stack.request("POST", path, stack.tokens["admin"], body)
    assert status == 413
    assert "at most" in err["error"]["message"]

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(body), 64 * 1024):
            yield body[i : i + 64 * 1024]

    headers = {"Authorization": f"Bearer {stack.tokens['admin']}"}
    try:
        r = requests.post(stack.url + path, data=chunks(), headers=headers, timeout=30)
    except requests.ConnectionError:
        pass  # the server may answer and close before the last chunk is sent
    else:
        assert r.status_code == 413
    assert stack.last_seq() == before


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


@pytest.mark.parametrize(
    ("path", "body", "words"),
    [
        ("/api/dispatch", nested(10_000), "nested too deeply"),
        ("/api/dispatch", b'{"payload": ' + nested(10_000) + b"}", "nested too deeply"),
        ("/api/messages", b'{"body": ' + nested(10_000) + b"}", "nested too deeply"),
        ("/api/tasks/t-x/escalate", nested(10_000), "nested too deeply"),
        ("/api/dispatch", b'{"action_name": "caf\xe9"}', "UTF-8"),
        ("/api/dispatch", b"\xff\xfe{}", "UTF-8"),
        ("/api/messages", b'{"body": "\xc3\x28"}', "UTF-8"),
        ("/api/messages/read", b"\xed\xa0\x80", "UTF-8"),
        ("/api/dispatch", b"", "empty"),
        ("/api/dispatch", b"null", "JSON object"),
        ("/api/dispatch", b'"a string"', "JSON object"),
        ("/api/dispatch", b"[1, 2]", "JSON object"),
        ("/api/messages", b"[1, 2]", "JSON object"),
    ],
)
def test_malformed_bodies_get_a_clear_422(stack: Stack, path: str, body: bytes, words: str) -> None:
    """Deeply nested JSON, invalid UTF-8, empty bodies and JSON that is not an object are
    refused with 422 and a message saying so; only a dispatch's refusal is recorded."""
    before = stack.last_seq()
    status, err = stack.request("POST", path, stack.tokens["admin"], body)
    assert status == 422, err
    text = err["error"]["message"] + " ".join(err["error"]["problems"])
    assert words in text
    assert stack.last_seq() == before + (1 if path == "/api/dispatch" else 0)


# --- the role policy, route by route ---------------------------------------------------------

PUBLIC = {"/healthz", "/openapi.json", "/ui"}
OPERATORS = {"admin", "dispatcher"}
TALKERS = {"admin", "dispatcher", "builder"}
READERS = {"admin", "dispatcher", "builder", "viewer"}
# Who may call each route, written down apart from the code so a change to either shows.
POLICY: dict[tuple[str, str], set[str]] = {
    ("/api/dispatch", "POST"): OPERATORS,
    ("/api/tasks/{task_id}/cancel", "POST"): OPERATORS,
    ("/api/tasks/{task_id}/retry", "POST"): OPERATORS,
    ("/api/tasks/{task_id}/escalate", "POST"): OPERATORS,
    ("/api/messages", "POST"): TALKERS,
    ("/api/messages/read", "POST"): TALKERS,
}
# A builder may write only as itself: a body in its name gets past that check to validation.
AS_BUILDER = b'{"sender": "hostile-builder", "reader": "hostile-builder"}'
CALLERS = ("admin", "dispatcher", "builder", "viewer", "none", "wrong")


def served_routes() -> list[tuple[str, str]]:
    """Every (path, method) the app serves, read from the Starlette app itself."""
    app = create_app(None)  # type: ignore[arg-type]
    out = []
    for r in app.routes:
        if isinstance(r, Route):
            out.extend((r.path, m) for m in sorted(r.methods or ()) if m != "HEAD")
        else:
            assert isinstance(r, Mount)
            out.append((r.path, "GET"))
    return sorted(out)


def allowed(path: str, method: str) -> set[str]:
    if path in PUBLIC:
        return {*READERS, "none", "wrong"}
    return POLICY.get((path, method), READERS)


def concrete(path: str) -> str:
    """A real URL for a route: path parameters filled in, a file under a mount."""
    if path == "/ui":
        return "/ui/app.js"
    path = path.replace("{agent}", "hostile-builder")
    for name, value in (("task_id", "t-x"), ("run_id", "r-x"), ("thread_id", "th-x")):
        path = path.replace("{" + name + "}", value)
    return path


def status_only(stack: Stack, method: str, path: str, token: str) -> int:
    """The status of one call; the token goes as a bearer header and as the dashboard's
    cookie. The body is not read, so the event stream answers too."""
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
        headers["Cookie"] = f"shipyard_token={token}"
    body = (
        b'{"sender": "hostile-builder", "reader": "hostile-builder"}' if method == "POST" else None
    )
    req = urllib.request.Request(stack.url + path, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return e.code


@pytest.mark.parametrize(("path", "method"), served_routes())
def test_every_route_enforces_its_role_policy(stack: Stack, path: str, method: str) -> None:
    """For every route the app serves and every caller (each role, no token, a wrong token):
    a caller the policy leaves out gets 401 (no or wrong token) or 403 (wrong role); one it
    lets in gets past both, and never a 5xx."""
    if path == "/":
        # The dashboard logs a browser in by cookie and has no API role of its own.
        assert status_only(stack, method, path, "") == 401
    who = allowed(path, method)
    seen = {}
    for caller in CALLERS:
        token = {"none": "", "wrong": "sy_not-a-real-token"}.get(caller) or stack.tokens.get(
            caller, ""
        )
        status = status_only(stack, method, concrete(path), token)
        seen[caller] = status
        assert status < 500, (caller, status)
        if path == "/" and caller in ("none", "wrong"):
            assert status == 401
        elif caller in who or path == "/":
            assert status not in (401, 403), (caller, status)
        elif caller in ("none", "wrong"):
            assert status == 401, (caller, status)
        else:
            assert status == 403, (caller, status)
    assert len(seen) == len(CALLERS)
