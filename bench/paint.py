"""Benchmark: how soon the Command Center shows a long history in a real browser.

A fresh embedded server is filled with a workload (:mod:`bench.workload`), which is
replayed into the read models' file under a data directory and grown to R finished runs
(100,000; :func:`bench.queries.grown`); then ``shipyard up --roles projector,gateway`` serves
that data directory. Headless Chromium (Debian's, driven by Playwright, as the browser
tests drive it) opens the dashboard link ``shipyard up`` prints, each time in a new browser
context (empty cache, as a first visit), and the page stamps, with its own clock
(``performance.now()``, from navigation start), the first animation frame at which Build
History has rows and the live panel has rendered (a running run or the idle notice).

The baseline is the browser alone drawing the same result: the page's final DOM, taken
once after a real load, with its scripts removed and a ``<base href>`` at the gateway (so
its stylesheet and icons come from the same server), served as one static file by a
loopback HTTP server in the bench, and timed to the same frame by the same stamp. The ratio
says what Shipyard's modules, its API calls and the queries behind them add to a browser
painting that page. Target: first paint ≤ 1 s (p90 of the loads).
``python -m bench paint`` runs it in the suite.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from playwright import async_api as pw

from bench import _common as c
from bench import queries, workload
from shipyard.projections.projector import DB_FILE

TARGET_MS = 1000.0  # navigation start → history rows and live panel drawn, at most
LOAD_TIMEOUT_MS = 30_000
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-sync"]
CHROMIUM_ARGS += ["--disable-background-networking", "--disable-component-update"]

# Stamps the first frame that shows both panels; reads only the DOM, so it works unchanged
# on the static copy.
STAMP = """
(() => {
  const ready = () =>
    document.querySelector("[data-testid=history-row]") &&
    document.querySelector("[data-testid=live-run], [data-testid=idle]");
  const watch = new MutationObserver(() => {
    if (!ready()) return;
    watch.disconnect();
    requestAnimationFrame(() => { window.__painted = performance.now(); });
  });
  watch.observe(document, { childList: true, subtree: true });
})();
"""


@dataclass(frozen=True)
class Sizes:
    events: int  # written and replayed: enough finished runs to copy up to R
    runs: int  # R: finished runs in the history
    loads: int  # page loads of each kind, interleaved
    days: float


QUICK = Sizes(events=20_000, runs=5_000, loads=2, days=3.0)
FULL = Sizes(events=250_000, runs=100_000, loads=10, days=30.0)


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    raise c.BenchError("Chromium is not installed (apt-get install chromium)")


async def load(browser: pw.Browser, url: str) -> tuple[float, str]:
    """One first visit: milliseconds to the stamped frame, and the DOM by then."""
    context = await browser.new_context(viewport={"width": 1280, "height": 900})
    try:
        page = await context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        await page.add_init_script(STAMP)
        await page.goto(url, wait_until="commit")
        await page.wait_for_function("window.__painted !== undefined", timeout=LOAD_TIMEOUT_MS)
        if errors:
            raise c.BenchError(f"the page threw: {errors}")
        painted = float(await page.evaluate("window.__painted"))
        return painted, await page.content()
    finally:
        await context.close()


def static_copy(html: str, base: str) -> str:
    """The page as drawn, without its scripts, its relative links resolved at ``base``."""
    html = re.sub(r"<script\b.*?</script>", "", html, flags=re.S | re.I)
    return re.sub(r"<head([^>]*)>", rf'<head\1><base href="{base}/">', html, count=1)


@contextlib.asynccontextmanager
async def serving(html: str) -> AsyncIterator[str]:
    """One static page on a loopback port; its address."""

    async def page(_: web.Request) -> web.Response:
        return web.Response(text=html, content_type="text/html")

    app = web.Application()
    app.router.add_get("/", page)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        await runner.cleanup()


async def measure(quick: bool, parent: str | None) -> dict[str, Any]:
    sizes = QUICK if quick else FULL
    executable = chromium()
    async with (
        workload.stored(parent, "paint", sizes.events, sizes.days) as (root, server),
        contextlib.AsyncExitStack() as stack,
    ):
        data = root / "data"
        data.mkdir()
        models, rows = await queries.grown(server.url, data / DB_FILE, sizes.runs, sizes.days)
        await models.close()  # the gateway opens it: one process per DuckDB file

        c.note("starting the gateway: shipyard up --roles projector,gateway")
        up = c.ShipyardUp(
            ["--roles", "projector,gateway", "--nats", server.url, "--data-dir", str(data)],
            root,
            {"SHIPYARD_PORT": "0"},
        )
        await up.start(ready="dashboard:")
        stack.push_async_callback(up.stop)
        dashboard = f"{up.url}/?token={up.token}"

        playwright = await stack.enter_async_context(pw.async_playwright())
        browser = await playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        stack.push_async_callback(browser.close)
        _, html = await load(browser, dashboard)  # warms the gateway's caches and DuckDB's
        copy = static_copy(html, up.url)
        url = await stack.enter_async_context(serving(copy))
        await load(browser, url)

        shipyard: list[float] = []
        static: list[float] = []
        for i in range(sizes.loads):
            shipyard.append((await load(browser, dashboard))[0])
            static.append((await load(browser, url))[0])
            c.note(
                f"  load {i + 1}/{sizes.loads}: {shipyard[-1]:.0f} ms, static {static[-1]:.0f} ms"
            )
        warnings = up.warnings()

    what = f"first paint, {rows['history']:,} runs"
    figures = [
        c.latency(f"{what} p50", 50, shipyard, static, None),
        c.latency(f"{what} p90", 90, shipyard, static, TARGET_MS),
    ]
    return {
        "sizes": vars(sizes),
        "figures": figures,
        "paint_ms": {"shipyard": shipyard, "static": static},
        "details": [
            "",
            f"{rows['history']:,} finished runs, {rows['tasks']:,} tasks; {sizes.loads} first",
            "visits of each, interleaved, each in a new browser context. Baseline: the same",
            f"page as drawn ({len(copy) // 1024} kB, no scripts) served as one static file.",
            f"gateway warnings logged: {len(warnings)}",
        ],
    }


def main(argv: Sequence[str] | None = None) -> int:
    return c.main(
        "paint",
        "Command Center first paint with a 100,000-run history in headless Chromium.",
        measure,
        argv,
    )


if __name__ == "__main__":
    sys.exit(main())
