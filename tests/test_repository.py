"""The repository keeps its promises: the README's commands and examples are real."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from shipyard.events import dispatch

ROOT = Path(__file__).resolve().parent.parent


def quick_start() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sh\n(.+?)\n```", section)


def test_quick_start_is_two_commands_and_ci_runs_the_test_one() -> None:
    """The quick start has exactly two commands; .ci/run calls the test one verbatim."""
    commands = quick_start()
    assert len(commands) == 2
    run, test = commands
    assert "shipyard demo" in run or "shipyard up" in run
    assert "pytest" in test
    assert test in (ROOT / ".ci" / "run").read_text().splitlines()


@pytest.mark.parametrize("path", sorted((ROOT / "examples").glob("*.json")), ids=lambda p: p.name)
def test_shipped_examples_are_valid_dispatches(path: Path) -> None:
    """Every example dispatch under examples/ passes validation."""
    _, event = dispatch.parse(path.read_bytes())
    assert event.working_dir.startswith("/")
    assert "README.md" in event.deliverable_files
