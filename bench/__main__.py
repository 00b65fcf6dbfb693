"""``python -m bench [NAME…] [--quick] [--json]``: the benchmark suite.

Each benchmark runs as its own process (``python -m bench.NAME --json``), so that one's
memory, threads and child processes cannot colour the next one's figures; its progress
lines become the progress display on stderr, and its figures go into one table: figure,
value, the raw baseline measured in the same run, their ratio, the target and the verdict.
A missed target does not fail the run (CI runs ``--quick`` to catch breakage, never to judge
speed); a benchmark that cannot measure does.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from bench import _common as c

BENCHMARKS = {
    "append": "append throughput vs raw publish_async; dispatch round trip",
    "handler": "dispatch → claimed / builder started; 200 concurrent runs: false STALE, CPU",
    "cluster": "dispatch throughput and dispatch → claimed on a 3-node cluster vs embedded",
    "replay": "replay of 1,000,000 events into DuckDB vs a raw ordered consumer",
    "queries": "history and Kanban queries at 100,000 runs vs a bare DuckDB count",
    "sse": "append → 100 SSE clients vs ordered consumers",
    "footprint": "idle RSS of shipyard up and cold start to /healthz vs bare Python + nats-server",
    "paint": "Command Center first paint with 100,000 runs in headless Chromium vs a static copy",
}
TIMEOUT = 600.0  # seconds one benchmark may take before it is stopped (full runs take < 120)


class Progress:
    """One line on stderr, rewritten in place on a terminal; plain lines otherwise."""

    def __init__(self) -> None:
        self.live = sys.stderr.isatty()
        self.width = 0

    def show(self, text: str) -> None:
        if not self.live:
            print(text, file=sys.stderr, flush=True)
            return
        columns = os.get_terminal_size(sys.stderr.fileno()).columns - 1
        text = text[:columns]
        sys.stderr.write("\r" + text.ljust(self.width))
        sys.stderr.flush()
        self.width = len(text)

    def done(self, text: str) -> None:
        if self.live:
            sys.stderr.write("\r" + " " * self.width + "\r")
            self.width = 0
        print(text, file=sys.stderr, flush=True)


async def run_one(
    name: str, position: str, quick: bool, parent: str | None, progress: Progress
) -> dict[str, Any]:
    argv = [sys.executable, "-m", f"bench.{name}", "--json"]
    argv += ["--quick"] if quick else []
    argv += ["--dir", parent] if parent else []
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    assert proc.stdout is not None and proc.stderr is not None
    lines: list[str] = []

    async def follow(stream: asyncio.StreamReader) -> None:
        async for raw in stream:
            line = raw.decode(errors="replace").rstrip()
            if line:
                lines.append(line)
                elapsed = time.monotonic() - started
                progress.show(f"{position} {name} {elapsed:5.0f}s  {line.strip()}")

    stdout = asyncio.create_task(proc.stdout.read())
    try:
        await asyncio.wait_for(follow(proc.stderr), TIMEOUT)
        out = await stdout
        code = await proc.wait()
    except (TimeoutError, asyncio.CancelledError):
        proc.terminate()
        await proc.wait()
        raise
    seconds = time.monotonic() - started
    if code != 0:
        tail = "\n".join(lines[-15:])
        progress.done(f"{position} {name}: FAILED (exit {code}) after {seconds:.0f}s\n{tail}")
        return {"name": name, "error": f"exit {code}", "log": lines[-50:], "figures": []}
    result: dict[str, Any] = json.loads(out)
    misses = sum(1 for f in result["figures"] if f["passed"] is False)
    verdict = f"{misses} target(s) missed" if misses else "all targets met"
    progress.done(f"{position} {name}: {seconds:.0f}s, {verdict}")
    return result


async def run_suite(names: Sequence[str], quick: bool, parent: str | None) -> dict[str, Any]:
    progress = Progress()
    results: dict[str, Any] = {}
    for i, name in enumerate(names, start=1):
        results[name] = await run_one(name, f"[{i}/{len(names)}]", quick, parent, progress)
    return {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "quick": quick,
        "environment": c.environment(),
        "benchmarks": results,
        "broken": [n for n, r in results.items() if "error" in r],
    }


def suite_table(suite: dict[str, Any]) -> str:
    figures = [
        {**f, "name": f"{name}: {f['name']}"}
        for name, result in suite["benchmarks"].items()
        for f in result["figures"]
    ]
    env = suite["environment"]
    head = (
        f"Shipyard benchmarks{' (quick: smoke sizes, not figures)' if suite['quick'] else ''} — "
        f"{env['cpus']} × {env['cpu'] or 'CPU'}, Python {env['python']}, {env['nats_server']}"
    )
    return "\n".join([head, "", c.table(figures)])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Run Shipyard's benchmarks and print each figure beside the raw baseline "
        "measured in the same run.",
        epilog="benchmarks: " + "; ".join(f"{k} ({v})" for k, v in BENCHMARKS.items()),
    )
    parser.add_argument("names", nargs="*", metavar="NAME", help="benchmarks to run (all)")
    parser.add_argument("--quick", action="store_true", help="smoke-run sizes (for CI)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--dir", help="where to create temporary stores (default: $TMPDIR)")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"no benchmark named {', '.join(unknown)}; there are {', '.join(BENCHMARKS)}")
    names = args.names or list(BENCHMARKS)
    try:
        suite = asyncio.run(run_suite(names, args.quick, args.dir))
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(suite, indent=2, ensure_ascii=False))
    else:
        print(suite_table(suite))
    if suite["broken"]:
        print(f"bench: could not measure: {', '.join(suite['broken'])}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
