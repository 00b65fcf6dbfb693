"""Take the README's screenshots: `shipyard demo` in a scratch data dir, seen in headless
Chromium (Debian's, via Playwright). Run from the repository root:

    .venv/bin/python docs/screenshots.py

It writes docs/*.png. Needs `chromium` on PATH.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from playwright.async_api import async_playwright

HERE = Path(__file__).resolve().parent
ARGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]


def start_demo(data: Path) -> tuple[subprocess.Popen[str], str]:
    data.mkdir(parents=True)
    (data / "shipyard.toml").write_text("[handler]\nmax_attempts = 1\n")
    env = {**os.environ, "SHIPYARD_DATA_DIR": str(data), "SHIPYARD_PORT": "0"}
    env["SHIPYARD_DEMO_STEP"] = "1.2"
    proc = subprocess.Popen(
        [sys.executable, "-m", "shipyard.cli", "demo"], env=env, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        if "dashboard:" in line:
            return proc, line.split("dashboard:", 1)[1].strip()
    raise SystemExit("shipyard demo did not print a dashboard link")


async def main() -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        raise SystemExit("install chromium first (apt-get install chromium)")
    with tempfile.TemporaryDirectory() as tmp:
        proc, link = start_demo(Path(tmp) / "data")
        try:
            async with async_playwright() as pw:
                browser = await pw.chromium.launch(executable_path=chromium, args=ARGS)
                page = await browser.new_page(viewport={"width": 1280, "height": 860})
                await page.goto(link)
                await page.wait_for_selector("[data-testid=live-run]")
                await page.wait_for_timeout(4500)  # a moment mid-build, for the picture
                await page.screenshot(path=str(HERE / "command-center-building.png"))
                await page.goto(link.split("?")[0] + "#/kanban")
                await page.wait_for_timeout(1500)
                await page.screenshot(path=str(HERE / "kanban.png"))
                await page.goto(link.split("?")[0] + "#/")
                await page.wait_for_selector("[data-testid=idle]", timeout=120_000)
                await page.wait_for_timeout(1000)
                await page.screenshot(path=str(HERE / "command-center-after.png"))
                await (
                    page.locator("[data-testid=history-row]")
                    .filter(has_text="validation")
                    .first.click()
                )
                await page.wait_for_selector("[data-testid=breakdown-phase]")
                await page.wait_for_timeout(800)
                await page.screenshot(path=str(HERE / "breakdown.png"))
                phone = await browser.new_page(
                    viewport={"width": 390, "height": 844}, color_scheme="dark"
                )
                await phone.goto(link)
                await phone.wait_for_selector("[data-testid=history-row]")
                await phone.wait_for_timeout(800)
                await phone.screenshot(path=str(HERE / "command-center-phone-dark.png"))
                await browser.close()
        finally:
            proc.terminate()
            proc.wait(30)


if __name__ == "__main__":
    asyncio.run(main())
