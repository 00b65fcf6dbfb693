"""Hostile text end to end, on a real `shipyard up`: secrets a builder prints stay out of the
log, the API, the pages and the data dir; HTML and script in every text field are shown as
text in the Command Center (real Chromium) and in Telegram alerts."""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest

from shipyard.events import types as t
from shipyard.events.envelope import make
from shipyard.events.log import EventLog
from shipyard.gateway import alerts
from tests.conftest import Up
from tests.fakes.telegram_api import FakeTelegram, plain_text
from tests.test_dashboard import CHROMIUM_ARGS, chromium, dashboard_link, playwright_api

HOSTILE = str(Path(__file__).parent / "builders" / "hostile.py")
CHAT = 4242
SECRETS = {
    "SHIPYARD_ADMIN_TOKEN": "sy_admin-secret-0123456789abcdef",
    "ANTHROPIC_API_KEY": "sk-ant-fake-key-0123456789abcdef",
    "SHIPYARD_TELEGRAM_TOKEN": "987654321:fake-telegram-token-0123456789",
    "SHIPYARD_OPENCLAW_TOKEN": "openclaw-secret-token-0123456789",
}
# Each of these sets window.__pwned or opens a dialog if it ever runs as markup.
XSS = (
    '<script>window.__pwned="script";alert(1)</script>'
    "<img src=x onerror=\"window.__pwned='img';alert(2)\">"
)
TITLE = f"Build {XSS} now"

TOML = """
[handler]
default_agent = "hostile"
workdir_roots = [{root}]
max_attempts = 1

[agents.hostile]
kind = "command"
command = [{python}, {script}, "{{phase}}", "{{prompt}}", "fail"]
env = {{ SHIPYARD_TEST_SECRETS = {secrets}, SHIPYARD_TEST_HTML = {html} }}

[telegram]
chat_ids = [{chat}]
poll_timeout = 1
"""


def dispatch_json(work: Path) -> str:
    prompt = (
        f"## Task\nWrite {XSS}\n\n## Requirements\n- Show {XSS}\n\n"
        f"## Environment\n- Working directory: {work}\n\n"
        "## Deliverables\n1. hello.txt\n2. README.md\n"
    )
    return json.dumps(
        {
            "action_name": TITLE,
            "payload": {"prompt": prompt, "dispatcher": "tests", "task_title": TITLE},
        }
    )


@dataclass
class Stack:
    up: Up
    telegram: FakeTelegram
    url: str
    task_id: str
    run_id: str

    def get(self, path: str) -> tuple[int, str]:
        req = urllib.request.Request(
            self.url + path,
            headers={
                "Authorization": f"Bearer {SECRETS['SHIPYARD_ADMIN_TOKEN']}",
                "Cookie": f"shipyard_token={SECRETS['SHIPYARD_ADMIN_TOKEN']}",
            },
        )
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, r.read().decode("utf-8", "replace")
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode("utf-8", "replace")


def wait_until(what: str, check: Any, up: Up, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while not (found := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        assert up.proc.poll() is None, "shipyard up exited"
        time.sleep(0.1)
    return found


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """`shipyard up` with secrets in its environment, a Telegram stand-in, one failed build
    whose builder printed every secret and some HTML, and a message with HTML in it."""
    tmp = tmp_path_factory.mktemp("pages")
    data, work = tmp / "data", tmp / "work"
    data.mkdir()
    work.mkdir()
    (tmp / "secrets.json").write_text(json.dumps(list(SECRETS.values())))
    q = json.dumps
    (data / "shipyard.toml").write_text(
        TOML.format(
            root=q(str(work)),
            python=q(sys.executable),
            script=q(HOSTILE),
            secrets=q(str(tmp / "secrets.json")),
            html=q(XSS),
            chat=CHAT,
        )
    )
    with FakeTelegram(token=SECRETS["SHIPYARD_TELEGRAM_TOKEN"]) as telegram:
        up = Up(data, env={**SECRETS, "SHIPYARD_TELEGRAM_API_BASE": telegram.url})
        up.wait_ready()
        try:
            done = up.cli("dispatch", "-", stdin=dispatch_json(work / "app"))
            assert done.returncode == 0, done.stderr
            task_id = done.stdout.strip()
            sent = up.cli("send", "--from", "tests", "--to", "hostile", "--type", "comment", XSS)
            assert sent.returncode == 0, sent.stderr
            info = json.loads((data / "instance.json").read_text())
            stack = Stack(up, telegram, info["gateway_url"], task_id, "")

            def run_failed() -> str:
                status, text = stack.get(f"/api/tasks/{task_id}")
                if status != 200:
                    return ""
                task = json.loads(text)
                runs = task.get("runs") or []
                done = task["task"]["state"] == "failed" and runs
                return str(runs[0]["run_id"]) if done else ""

            stack.run_id = wait_until("the build to fail", run_failed, up)
            wait_until(
                "the failure alert", lambda: any("failed" in t for t in telegram.texts(CHAT)), up
            )
            yield stack
        finally:
            up.stop()


def leaks(text: str) -> list[str]:
    return [name for name, value in SECRETS.items() if value in text]


async def test_no_secret_lands_in_any_event(stack: Stack) -> None:
    """Every event in the stream, read whole from NATS, is free of every secret, although
    the builder printed them all."""
    nc = await stack.up.connect(name="hostile-test")
    try:
        log = EventLog(nc)
        found = {}
        async for event in log.read():
            raw = json.dumps({"type": event.type, "actor": event.actor, "data": repr(event.data)})
            if leaks(raw):
                found[f"#{event.seq} {event.type}"] = leaks(raw)
        assert event.seq > 10
    finally:
        await nc.close()
    assert found == {}, sorted(found)


# Routes that show a failed phase's result, which the handler posts unredacted (below).
PHASE_RESULT_ROUTES = (
    "/api/runs/{run}",
    "/api/runs/{run}/report",
    "/api/tasks/{task}",
    "/api/activity",
)
READ_ROUTES = (
    "/",
    "/metrics",
    "/api/meta",
    "/api/status",
    "/api/runs/live",
    "/api/runs/{run}/log",
    "/api/history",
    "/api/tasks",
    "/api/kanban",
    "/api/groups",
    "/api/agents",
    "/api/handlers",
    "/api/threads",
    "/api/inbox/hostile",
)


def leaking_routes(stack: Stack, routes: tuple[str, ...]) -> dict[str, list[str]]:
    found = {}
    for route in routes:
        path = route.format(run=stack.run_id, task=stack.task_id)
        status, text = stack.get(path)
        assert status == 200, (path, status, text[:200])
        if leaks(text):
            found[path] = leaks(text)
    return found


def test_no_secret_in_the_api_the_pages_or_telegram(stack: Stack) -> None:
    """No read route, the dashboard page, the run's log, nor any Telegram message carries a
    secret the builder printed."""
    found = leaking_routes(stack, READ_ROUTES)
    for message in stack.telegram.sent(CHAT):
        if leaks(message["html"]):
            found[f"telegram: {message['text'][:40]}"] = leaks(message["html"])
    assert stack.telegram.sent(CHAT)
    assert found == {}, sorted(found)


def test_no_secret_in_a_failed_phases_result(stack: Stack) -> None:
    """The run's breakdown, its report, the task and the activity timeline carry no secret
    the builder printed."""
    assert leaking_routes(stack, PHASE_RESULT_ROUTES) == {}


def test_no_secret_in_the_embedded_servers_log(stack: Stack) -> None:
    """The embedded nats-server's log holds no secret."""
    text = (stack.up.data_dir / "nats" / "nats.log").read_text("utf-8", "replace")
    assert text
    assert leaks(text) == []


def test_no_secret_in_the_run_logs_or_reports(stack: Stack) -> None:
    """The builder's run log and the run's report on disk hold no secret."""
    data = stack.up.data_dir
    files = [p for p in [*data.glob("logs/**/*"), *data.glob("reports/**/*")] if p.is_file()]
    assert files
    found = {str(p.relative_to(data)): leaks(p.read_text("utf-8", "replace")) for p in files}
    assert {k: v for k, v in found.items() if v} == {}


# --- HTML and script shown as text ----------------------------------------------------------


async def test_html_in_every_field_is_shown_as_text_on_the_dashboard(stack: Stack) -> None:
    """The title, prompt, builder output and a message body full of <script> and
    <img onerror> appear literally in each view of the Command Center; none of it runs."""
    async with playwright_api.async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=chromium(), args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 900})
            dialogs: list[str] = []
            errors: list[str] = []

            async def dismiss(dialog: Any) -> None:
                dialogs.append(dialog.message)
                await dialog.dismiss()

            page.on("dialog", dismiss)
            page.on("pageerror", lambda e: errors.append(str(e)))
            await page.goto(dashboard_link(stack.up))
            base = page.url.split("#")[0]
            views = {
                "history": "#/",
                "breakdown": f"#/?run={stack.run_id}",
                "task": f"#/?task={stack.task_id}",
                "kanban": "#/kanban",
                "comms": "#/comms",
            }
            for name, where in views.items():
                await page.goto(base + where)
                shown = page.get_by_text(XSS, exact=False).filter(visible=True).first
                await shown.wait_for(timeout=20_000)
                assert XSS in await shown.inner_text(), name
                assert await page.evaluate("window.__pwned") is None, name
            assert await page.locator("img[src=x]").count() == 0
            assert dialogs == []
            assert errors == []
        finally:
            await browser.close()


def test_html_in_agent_text_is_escaped_in_telegram(stack: Stack) -> None:
    """The failure alert shows the title and the builder's output literally: Telegram
    parses it as text, with no tag of the builder's own."""
    alert = next(m for m in stack.telegram.sent(CHAT) if "failed" in m["text"])
    assert "<script>" not in alert["html"]
    assert "&lt;script&gt;" in alert["html"]
    assert TITLE in alert["text"]
    assert XSS in alert["text"]


def _alert_events() -> list[t.EventData]:
    failed = t.TaskState.FAILED
    return [
        t.TaskClaimed(run_id="r-1", handler=XSS, agent=XSS),
        t.RunFinished(run_id="r-1", outcome=failed, reason=XSS, error=XSS, phase=t.Phase.BUILD),
        t.RunFinished(run_id="r-1", outcome=failed, reason="agent_silent", summary=XSS),
        t.RunFinished(run_id="r-1", outcome=t.TaskState.SUCCEEDED),
        t.TaskFinished(outcome=failed, reason=XSS),
        t.TaskEscalated(task_id="t-2", to_agent=XSS, from_agent=XSS, note=XSS),
        t.GroupFinished(group=XSS, tasks=["t-1", "t-2"]),
        t.PhaseChanged(run_id="r-1", phase=t.Phase.PLAN, status=t.PhaseStatus.FAILED, result=XSS),
    ]


@pytest.mark.parametrize("data", _alert_events(), ids=lambda d: d.TYPE)
def test_every_alert_escapes_agent_text(data: t.EventData) -> None:
    """Each kind of alert, with HTML in the title and in every text field it shows, is HTML
    Telegram accepts, and shows that text literally."""
    at = datetime(2026, 5, 1, tzinfo=UTC)
    title = make(
        t.TaskDispatched(title=TITLE, prompt="…", dispatcher="x"), aggregate_id="t-1", actor="x"
    )
    history = [msgspec.structs.replace(title, seq=1)]
    event = msgspec.structs.replace(make(data, aggregate_id="t-1", actor="x", at=at), seq=2)
    kind = alerts.kind_of(event)
    assert kind is not None
    titles = {"t-1": TITLE, "t-2": TITLE}
    alert = alerts.render(event, kind, history=history, titles=titles, base_url="http://x")
    shown, problem = plain_text(alert.text)
    assert problem == ""
    assert "<script>" not in alert.text
    assert XSS in shown or TITLE in shown
