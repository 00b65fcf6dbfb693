"""bench/report.py: the README's Performance section written from a suite's results."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bench import _common as c
from bench import report

ROOT = Path(__file__).resolve().parent.parent


def suite() -> dict[str, Any]:
    return {
        "when": "2026-11-23T12:00:00+00:00",
        "quick": False,
        "environment": {
            "cpus": 2,
            "cpu": "Example CPU @ 2.0GHz",
            "memory_gb": 8.0,
            "os": "Debian GNU/Linux 13, Linux 6.1",
            "platform": "Linux-6.1",
            "python": "3.11.9",
            "nats_server": "nats-server: v2.12.0",
            "nats_py": "2.16.0",
            "duckdb": "1.4.0",
        },
        "benchmarks": {
            "handler": {
                "figures": [
                    {
                        "name": "dispatch → claimed p99",
                        "unit": "ms",
                        "value": 4.2,
                        "baseline": 1.5,
                        "ratio": 2.8,
                        "target": "≤ 10 ms",
                        "passed": True,
                        "baseline_unit": "",
                    }
                ]
            },
            "paint": {"error": "exit 1", "figures": []},
        },
        "broken": ["paint"],
    }


def test_section_has_the_table_the_machine_and_says_what_could_not_be_measured() -> None:
    """One table row per figure with value, baseline, ratio, target and verdict; the machine
    line names CPU, cores, RAM, OS, Python and the date; a broken benchmark is listed."""
    text = report.section(suite(), plotted=False)
    assert text.startswith(report.BEGIN) and text.endswith(report.END)
    row = "| `handler` | dispatch → claimed p99 | 4.20 ms | 1.50 ms | 2.80 | ≤ 10 ms | pass |"
    assert row in text
    assert "| `paint` | could not measure (exit 1) |" in text
    for fact in ("2 × Example CPU", "8 GB RAM", "Debian GNU/Linux 13", "Python 3.11.9"):
        assert fact in text
    assert "2026-11-23" in text
    assert "performance.png" not in text


def test_rewrite_replaces_only_what_lies_between_the_markers() -> None:
    """Text before and after the markers is kept byte for byte."""
    readme = f"# Title\n\nbefore\n\n{report.BEGIN}\nold table\n{report.END}\n\nafter\n"
    body = report.section(suite(), plotted=True)
    out = report.rewrite(readme, body)
    assert out.startswith("# Title\n\nbefore\n\n")
    assert out.endswith("\n\nafter\n")
    assert "old table" not in out
    assert "docs/performance.png" in out
    assert report.rewrite(out, body) == out


def test_rewrite_without_markers_says_so() -> None:
    """A README without the markers is an error that names them, not a silent append."""
    with pytest.raises(c.BenchError, match="performance markers"):
        report.rewrite("# Title\n", "x")


def test_the_readme_has_the_markers() -> None:
    """The repository's README carries both markers, in order, once each."""
    text = (ROOT / "README.md").read_text()
    assert text.count(report.BEGIN) == 1 and text.count(report.END) == 1
    assert text.index(report.BEGIN) < text.index(report.END)
