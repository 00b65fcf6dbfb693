"""``python -m bench.report``: run the whole suite and publish its figures.

Writes ``bench/results.json`` (the suite's JSON, as ``python -m bench --json`` prints it),
rewrites the README's Performance section between its two markers (the table, the machine,
how to reproduce) and draws ``docs/performance.png``: the dispatch latency distribution
(claimed, builder running) and replay progress against the raw ordered consumer.
``--from FILE`` publishes an earlier results file instead of running the suite. Drawing
needs matplotlib (``pip install -e '.[bench]'``); without it the plot is skipped, said so.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from bench import _common as c
from bench.__main__ import BENCHMARKS, run_suite

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results.json"
README = ROOT / "README.md"
PLOT = ROOT / "docs" / "performance.png"
BEGIN = "<!-- performance:begin (written by python -m bench.report) -->"
END = "<!-- performance:end -->"
VERDICT = {True: "pass", False: "**miss**", None: "—"}


def markdown_table(suite: dict[str, Any]) -> str:
    lines = [
        "| benchmark | figure | value | baseline | ratio | target | verdict |",
        "|---|---|--:|--:|--:|---|---|",
    ]
    for name, result in suite["benchmarks"].items():
        if "error" in result:
            lines.append(f"| `{name}` | could not measure ({result['error']}) | | | | | |")
        for f in result["figures"]:
            cells = [
                f"`{name}`",
                f["name"],
                c.number(f["value"], f["unit"]),
                c.number(f["baseline"], f.get("baseline_unit") or f["unit"]),
                c.number(f["ratio"], ""),
                f["target"] or "—",
                VERDICT[f["passed"]],
            ]
            lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines)


def machine(suite: dict[str, Any]) -> str:
    env = suite["environment"]
    when = datetime.fromisoformat(suite["when"]).strftime("%Y-%m-%d")
    return (
        f"{env['cpus']} × {env['cpu'] or 'unknown CPU'}, {env['memory_gb']:g} GB RAM, "
        f"{env.get('os') or env['platform']}, Python {env['python']}, {env['nats_server']}, "
        f"nats-py {env['nats_py']}, DuckDB {env['duckdb']}; run on {when}"
    )


def section(suite: dict[str, Any], plotted: bool) -> str:
    """What goes between the markers."""
    parts = [
        BEGIN,
        "",
        f"Measured on {machine(suite)}"
        + (" (smoke sizes: not figures to quote)." if suite["quick"] else "."),
        "",
        markdown_table(suite),
        "",
    ]
    if plotted:
        parts += [
            "![Dispatch latency distribution, and replay progress against the raw ordered "
            "consumer](docs/performance.png)",
            "",
        ]
    parts += [END]
    return "\n".join(parts)


def rewrite(readme: str, body: str) -> str:
    """``readme`` with everything between the markers (included) replaced by ``body``."""
    start, end = readme.find(BEGIN), readme.find(END)
    if start < 0 or end < start:
        raise c.BenchError(f"README.md has no performance markers ({BEGIN} … {END})")
    return readme[:start] + body + readme[end + len(END) :]


def plot(suite: dict[str, Any], path: Path) -> bool:
    """Two panels: the dispatch latency distribution and replay progress. False when
    matplotlib is missing or the suite lacks the figures."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        c.note("matplotlib is not installed (pip install -e '.[bench]'): no plot drawn")
        return False
    handler = suite["benchmarks"].get("handler", {})
    replay = suite["benchmarks"].get("replay", {})
    if "latency_ms" not in handler or "curves" not in replay:
        c.note("the plot needs the handler and replay benchmarks' results: no plot drawn")
        return False

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.6), dpi=110)
    series = (
        ("started_process", "dispatch → builder running", "tab:orange"),
        ("claimed", "dispatch → claimed", "tab:blue"),
        ("raw", "baseline: plain publish → consumer", "tab:gray"),
    )
    for key, label, colour in series:
        samples = sorted(handler["latency_ms"][key])
        if samples:
            share = [(i + 1) / len(samples) for i in range(len(samples))]
            left.step(samples, share, where="post", label=label, color=colour)
    for target, colour in ((10, "tab:blue"), (20, "tab:orange")):
        left.axvline(target, color=colour, linestyle=":", linewidth=1)
    left.axhline(0.99, color="black", linestyle=":", linewidth=0.8)
    left.set_xscale("log")
    left.set_xlabel("milliseconds after the dispatch is stored (log scale)")
    left.set_ylabel("share of dispatches")
    left.set_title("Dispatch latency (dotted: targets and p99)")
    left.legend(loc="lower right", fontsize=8)

    rates = {f["name"]: f["value"] for f in replay["figures"]}
    for key, label, colour in (
        ("raw", "raw ordered consumer", "tab:gray"),
        ("replay", "replay into DuckDB (build)", "tab:green"),
    ):
        points = replay["curves"][key]
        right.plot([p[0] for p in points], [p[1] / 1000 for p in points], label=label, color=colour)
    right.set_xlabel("seconds")
    right.set_ylabel("thousand events")
    right.set_title(
        f"Replay: {rates.get('replay: build()', 0):,.0f} ev/s vs raw "
        f"{rates.get('raw ordered consumer', 0):,.0f} msg/s"
    )
    right.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return True


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.report",
        description="Run every benchmark, then write bench/results.json, the README's "
        "Performance section and docs/performance.png.",
    )
    parser.add_argument("--quick", action="store_true", help="smoke sizes (not for the README)")
    parser.add_argument("--from", dest="source", type=Path, help="publish this results file")
    parser.add_argument("--dir", help="where to create temporary stores (default: $TMPDIR)")
    args = parser.parse_args(argv)
    if args.source:
        suite = json.loads(args.source.read_text())
    else:
        suite = asyncio.run(run_suite(list(BENCHMARKS), args.quick, args.dir))
        RESULTS.write_text(json.dumps(suite, indent=2, ensure_ascii=False) + "\n")
        print(f"wrote {RESULTS.relative_to(ROOT)}")
    try:
        plotted = plot(suite, PLOT)
        README.write_text(rewrite(README.read_text(), section(suite, plotted)))
    except c.BenchError as e:
        print(f"bench.report: {e}", file=sys.stderr)
        return 1
    print(f"rewrote the Performance section of {README.name}" + (f"; drew {PLOT.name}" * plotted))
    if suite["broken"]:
        print(f"bench.report: could not measure: {', '.join(suite['broken'])}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
