"""The Command Center in real headless Chromium (Debian's, driven by Playwright), against a
real `shipyard up` with the demo builder: what an operator sees, updating live."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Up
from tests.handlers import SCRIPTED

playwright_api = pytest.importorskip("playwright.async_api")

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SHOTS = os.environ.get("SHIPYARD_SCREENSHOTS", "")  # a folder: save the README's screenshots


def find_chromium() -> str | None:
    """Chromium, if installed; its absence fails the test only where it is required."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    if os.environ.get("SHIPYARD_REQUIRE_BROWSER") == "1":
        pytest.fail("Chromium is required here (SHIPYARD_REQUIRE_BROWSER=1) but is not installed")
    return None


def chromium() -> str:
    found = find_chromium()
    if found is None:
        pytest.skip("Chromium is not installed (apt-get install chromium)")
    return found


TOML = """
[handler]
default_agent = "demo"
workdir_roots = [{root}]
heartbeat_interval = 0.5
stale_after = 2.0
failed_after = 60.0
max_attempts = 1

[agents.silent]
kind = "command"
command = [{python}, {script}, "{{phase}}", "silent"]
env = {{ SHIPYARD_TEST_LAUNCHES = {launches} }}

[agents.backup]
kind = "command"
command = [{python}, {script}, "{{phase}}", "ok"]
"""


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Up]:
    """`shipyard up` with the demo builder (slowed so the phases can be watched)."""
    data = tmp_path / "data"
    data.mkdir()
    (tmp_path / "work").mkdir()
    q = json.dumps
    (data / "shipyard.toml").write_text(
        TOML.format(
            root=q(str(tmp_path / "work")),
            python=q(sys.executable),
            script=q(SCRIPTED),
            launches=q(str(tmp_path / "launches.txt")),
        )
    )
    running = Up(data, env={"SHIPYARD_DEMO_STEP": "0.5"})
    running.wait_ready()
    yield running
    running.stop()


def dashboard_link(up: Up) -> str:
    line = next(x for x in up.banner if "dashboard:" in x)
    return line.split("dashboard:", 1)[1].strip()


@pytest.fixture
async def page(stack: Up) -> AsyncIterator[Any]:
    async with playwright_api.async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=chromium(), args=CHROMIUM_ARGS)
        context = await browser.new_context(viewport={"width": 1280, "height": 900})
        tab = await context.new_page()
        errors: list[str] = []
        tab.on("pageerror", lambda e: errors.append(str(e)))
        await tab.goto(dashboard_link(stack))
        yield tab
        assert errors == [], f"the page threw: {errors}"
        await browser.close()


def demo_body(
    tmp: Path, name: str, agent: str = "demo", mode: str = "ok", group: str = "", size: int = 0
) -> str:
    work = tmp / "work" / name
    prompt = (
        f"## Task\nBuild {name}\n\n## Requirements\n- Write {name}.txt\n- Document it\n\n"
        f"## Environment\n- Working directory: {work}\n- Demo mode: {mode}\n"
        f"- Test: test -f {name}.txt\n\n## Deliverables\n1. {name}.txt\n2. README.md\n"
    )
    return json.dumps(
        {
            "request_type": "queue",
            "action": "create",
            "task_type": "build",
            "action_name": f"Build {name}",
            "priority": "normal",
            "agent": agent,
            **({"group": group} if group else {}),
            **({"group_size": size} if size else {}),
            "payload": {"prompt": prompt, "dispatcher": "tests", "task_title": f"Build {name}"},
        }
    )


async def shot(page: Any, name: str) -> None:
    if SHOTS:
        os.makedirs(SHOTS, exist_ok=True)
        await page.screenshot(path=str(Path(SHOTS) / f"{name}.png"), full_page=False)


async def test_a_build_animates_live_and_lands_in_history(
    page: Any, stack: Up, tmp_path: Path
) -> None:
    """Idle at first; a dispatched build appears, its phase dots light up in order, the bar
    fills, and the finished run lands in Build History without a reload; its breakdown
    shows all eight phases."""
    await page.wait_for_selector("[data-testid=connection][data-state=live]")
    await page.wait_for_selector("[data-testid=idle]")
    await shot(page, "command-center-idle")

    task_id = stack.cli("dispatch", "-", stdin=demo_body(tmp_path, "alpha")).stdout.strip()
    card = page.locator("[data-testid=live-run]")
    await card.wait_for()
    done = "[data-testid=phase-dot][data-phase={}][data-status=done]"
    for phase in ("context", "plan", "task_board"):
        await page.wait_for_selector(done.format(phase), timeout=20_000)
    await page.wait_for_selector(
        "[data-testid=phase-dot][data-phase=build][data-status=current]", timeout=20_000
    )
    # The bar may trail the dots by one re-read of the live runs (the phase changes before
    # BUILD land within a few milliseconds, before the card exists to take them as events).
    bar = "[data-testid=live-run] [data-testid=progress]"
    await page.wait_for_function(
        f"(() => {{ const n = Number(document.querySelector({bar!r})?.getAttribute("
        "'aria-valuenow')); return n > 0 && n < 100; })()",
        timeout=5_000,
    )
    await shot(page, "command-center-building")

    row = page.locator(f"[data-testid=history-row][data-task-id={task_id}]")
    if not await row.count():
        row = page.locator("[data-testid=history-row]").first
    await row.wait_for(timeout=30_000)
    await page.wait_for_selector("[data-testid=idle]", timeout=20_000)
    assert "Build alpha" in await page.locator("[data-testid=history-row]").first.inner_text()
    await shot(page, "command-center-after")

    await page.locator("[data-testid=history-row]").first.click()
    await page.wait_for_selector("[data-testid=breakdown]")
    # The drawer fills in once the run's detail arrives; expect() waits for it.
    await playwright_api.expect(page.locator("[data-testid=breakdown-phase]")).to_have_count(8)
    assert await page.locator("[data-testid=activity-row]").count() > 0


async def test_a_silent_build_shows_a_stale_badge(page: Any, stack: Up, tmp_path: Path) -> None:
    """When a run's heartbeats stop, its card gets the STALE badge live."""
    await page.wait_for_selector("[data-testid=connection][data-state=live]")
    stack.cli("dispatch", "-", stdin=demo_body(tmp_path, "quiet", agent="silent"))
    await page.wait_for_selector("[data-testid=live-run]")
    badge = page.locator("[data-testid=stale-badge]")
    await badge.wait_for(timeout=20_000)
    assert "STALE" in (await badge.inner_text()).upper()


async def test_the_dispatch_form_shows_every_problem(page: Any) -> None:
    """A dispatch the protocol refuses shows each problem inline in the form."""
    await page.goto(page.url.split("#")[0] + "#/dispatch")
    form = page.locator("[data-testid=dispatch-form]")
    await form.wait_for()
    await form.locator("#df-title").fill("Half a dispatch")
    prompt = form.locator("textarea").first
    await prompt.fill("## Task\nOnly a task section")
    await form.locator("button[type=submit]").click()
    problems = page.locator("[data-testid=dispatch-problems]")
    await problems.wait_for()
    text = await problems.inner_text()
    assert "## Requirements" in text
    assert "## Deliverables" in text


async def test_a_group_card_and_an_escalation_chain(page: Any, stack: Up, tmp_path: Path) -> None:
    """A parallel group shows one card on the Kanban with its merged outcome; a failed task
    escalated to another agent links both ways in the breakdown."""
    await page.wait_for_selector("[data-testid=connection][data-state=live]")
    # Its size, so the group stays open if the first task ends before the second is sent.
    ok = stack.cli("dispatch", "-", stdin=demo_body(tmp_path, "left", group="release-2", size=2))
    bad = stack.cli(
        "dispatch",
        "-",
        stdin=demo_body(tmp_path, "right", mode="fail", group="release-2", size=2),
    )
    assert ok.returncode == 0 and bad.returncode == 0, ok.stderr + bad.stderr
    failed_id = bad.stdout.strip()

    await page.goto(page.url.split("#")[0] + "#/kanban")
    card = page.locator("[data-testid=group-card][data-group=release-2]")
    await card.wait_for()
    # The builds' own pace (slow on a busy machine) is not the dashboard's: once both are
    # recorded as finished, the card must turn within the usual wait.
    for task_id in (ok.stdout.strip(), failed_id):
        assert await asyncio.to_thread(stack.wait_finished, task_id)
    await page.wait_for_selector(
        "[data-testid=group-card][data-group=release-2][data-state=failed]", timeout=20_000
    )
    text = await card.inner_text()
    assert "1/2 succeeded" in text and "1 failed" in text
    assert failed_id in text
    await shot(page, "kanban-group")

    escalated = stack.cli("escalate", failed_id, "--to", "backup", "--note", "Try again.")
    assert escalated.returncode == 0, escalated.stderr
    new_id = escalated.stdout.split(" as ")[-1].strip()
    await page.goto(page.url.split("#")[0] + f"#/?task={new_id}")
    back = page.locator("[data-testid=task-link]", has_text=failed_id)
    await back.wait_for()
    await back.click()
    await page.locator("[data-testid=task-link]", has_text=new_id).wait_for()
