"""Hostile dispatches reaching the handler: working directories that try to leave the
configured roots, and prompts full of shell metacharacters."""

from __future__ import annotations

import json
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from shipyard.errors import CommandRejected
from shipyard.events.commands import Commands
from shipyard.events.log import EventLog
from shipyard.events.types import Phase, PhaseStatus
from shipyard.handler import workspace
from shipyard.handler.service import Handler
from shipyard.settings import AgentSettings, HandlerSettings, Settings
from tests import handlers as h
from tests.samples import dispatch_body

HOSTILE = str(Path(__file__).parent / "builders" / "hostile.py")
PROMPT = """## Task
Write a greeting.

## Requirements
- hello.txt says hello
- README.md explains it

## Environment
- Working directory: {workdir}

## Deliverables
1. hello.txt
2. README.md
"""


def settings(tmp: Path) -> Settings:
    """One `hostile` builder that records its argv; working directories under tmp/work."""
    (tmp / "work").mkdir(exist_ok=True)
    agent = AgentSettings(
        kind="command",
        command=[sys.executable, HOSTILE, "{phase}", "{prompt}"],
        env={"SHIPYARD_TEST_ARGV": str(tmp / "argv.jsonl")},
    )
    options = HandlerSettings(
        workdir_roots=[tmp / "work"], default_agent="hostile", max_attempts=1, retry_backoff=0.0
    )
    return Settings(data_dir=tmp / "data", handler=options, agents={"hostile": agent})


def body(workdir: str, prompt: str = PROMPT) -> dict[str, Any]:
    b = dispatch_body()
    b["payload"]["prompt"] = prompt.replace("{workdir}", workdir)
    return b


def launches(tmp: Path) -> list[list[str]]:
    path = tmp / "argv.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture
async def handler(tmp_path: Path, event_log: EventLog) -> AsyncIterator[Handler]:
    running = Handler(event_log, settings(tmp_path))
    await running.start()
    yield running
    await running.stop()


def outside(tmp: Path) -> Path:
    (tmp / "outside").mkdir(exist_ok=True)
    (tmp / "outside" / "secret.txt").write_text("not yours\n")
    return tmp / "outside"


def dotdot(tmp: Path) -> str:
    return f"{tmp}/work/../outside"


def absolute(tmp: Path) -> str:
    return str(outside(tmp))


def symlink_root(tmp: Path) -> str:
    (tmp / "work" / "escape").symlink_to(outside(tmp))
    return f"{tmp}/work/escape"


def symlink_inside(tmp: Path) -> str:
    (tmp / "work" / "escape").symlink_to(outside(tmp))
    return f"{tmp}/work/escape/deeper"


def the_root(tmp: Path) -> str:
    return f"{tmp}/work"


def sibling_prefix(tmp: Path) -> str:
    (tmp / "work-evil").mkdir()
    return f"{tmp}/work-evil/app"


@pytest.mark.parametrize(
    "make",
    [dotdot, absolute, symlink_root, symlink_inside, the_root, sibling_prefix],
    ids=lambda f: f.__name__,
)
async def test_a_working_directory_outside_the_roots_is_refused_before_any_builder(
    tmp_path: Path, event_log: EventLog, handler: Handler, make: Callable[[Path], str]
) -> None:
    """`..`, an absolute path elsewhere, a symlink out of a root (as the directory or a
    parent of it), the root itself and a sibling sharing the root's prefix all fail CONTEXT
    with workdir_refused; no builder starts and nothing outside is touched."""
    workdir = make(tmp_path)
    result = await Commands(event_log).dispatch(body(workdir))
    done = await h.wait_for(event_log, h.finished(result.task_id))
    assert done.data.outcome == "failed"
    history = await event_log.history("task", result.task_id)
    types = [e.type for e in history]
    assert "builder_started" not in types
    context = [
        e.data for e in history if e.type == "phase_changed" and e.data.phase == Phase.CONTEXT
    ]
    assert context[-1].status == PhaseStatus.FAILED
    assert "working directory" in context[-1].result
    run = next(e.data for e in history if e.type == "run_finished")
    assert run.reason == "workdir_refused"
    assert launches(tmp_path) == []
    if (tmp_path / "outside").exists():
        assert sorted(p.name for p in (tmp_path / "outside").iterdir()) == ["secret.txt"]


@pytest.mark.parametrize(
    ("workdir", "words"),
    [
        ("relative/path", "absolute"),
        ("/srv/../../etc", "'..'"),
        ("/srv/app\x00/x", "control character"),
        ("/srv/app\n/x", "control character"),
    ],
)
def test_confine_refuses_paths_that_cannot_be_trusted(workdir: str, words: str) -> None:
    """Relative paths, `..` and control characters (a NUL would crash path resolution) are
    refused with a sentence, whatever the roots."""
    with pytest.raises(workspace.WorkdirRefused) as refused:
        workspace.confine(workdir, [Path("/srv")])
    assert words in refused.value.message


async def test_a_working_directory_with_control_characters_is_refused_at_dispatch(
    event_log: EventLog,
) -> None:
    """A NUL or escape in the working directory is refused when dispatched, not later."""
    for bad in ("/srv/app\x00x", "/srv/\x1b[31mapp"):
        with pytest.raises(CommandRejected) as refused:
            await Commands(event_log).dispatch(body(bad))
        assert any("control characters" in p for p in refused.value.problems)


SHELL = (
    "Keep these exactly: $(touch {marker}) `touch {marker}` ; touch {marker} && "
    "echo $HOME | cat > {marker} 'single' \"double\" \\back * ? ~ {{brace}} <in >out 2>&1 #"
)


async def test_shell_metacharacters_reach_the_builder_verbatim_as_one_argument(
    tmp_path: Path, event_log: EventLog, handler: Handler
) -> None:
    """A prompt full of shell syntax reaches the builder unchanged, as one argv element,
    and none of it is executed."""
    marker = tmp_path / "pwned"
    line = SHELL.format(marker=marker)
    prompt = PROMPT.replace("- README.md explains it", f"- README.md explains it\n- {line}")
    result = await Commands(event_log).dispatch(body(str(tmp_path / "work" / "app"), prompt))
    done = await h.wait_for(event_log, h.finished(result.task_id))
    assert done.data.outcome == "succeeded"
    seen = launches(tmp_path)
    assert seen
    for argv in seen:
        assert len(argv) == 3
        assert line in argv[2]
    assert not marker.exists()
    assert not (tmp_path / "work" / "app" / "out").exists()
