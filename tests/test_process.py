"""Builder processes under a guard started ahead of time."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import pytest

from shipyard.handler import process
from shipyard.handler.process import BuilderProcess, WaitingGuard
from tests.conftest import alive

pytestmark = pytest.mark.skipif(not process.PRESTART, reason="waiting guards need pidfd_open")

REPORT = """
import os, sys
print(repr(sys.argv[1:]))
print(os.getcwd())
print(os.environ.get("PROBE", "-"))
print(repr(sys.stdin.read()))
print(os.getpgid(0) == os.getppid())
"""


async def gone(pid: int, within: float = 5.0) -> bool:
    for _ in range(int(within / 0.05)):
        if not alive(pid):
            return True
        await asyncio.sleep(0.05)
    return False


async def test_a_builder_gets_its_argv_cwd_env_and_a_closed_stdin(tmp_path: Path) -> None:
    """The waiting guard runs the builder with exactly the argv, working directory and
    environment of the request, stdin at EOF, in the guard's own process group."""
    argv = [sys.executable, "-c", REPORT, "two words", "ünï", ""]
    proc = BuilderProcess(argv, cwd=tmp_path, env={"PROBE": "a=b c"}, grace=1.0)
    await proc.start()
    lines = [line async for line in proc.lines()]
    assert await proc.wait() == 0
    assert lines == [repr(["two words", "ünï", ""]), str(tmp_path), "a=b c", "''", "True"]


async def test_kill_takes_down_the_whole_group(tmp_path: Path) -> None:
    """kill() ends the builder and what it left running in its group."""
    script = "sleep 60 & echo $!; wait"
    proc = BuilderProcess(["/bin/sh", "-c", script], cwd=tmp_path, env={}, grace=0.5)
    await proc.start()
    child = int(await anext(proc.lines()))
    await proc.kill()
    assert await gone(child)
    assert await gone(proc.pid)


async def test_exit_codes_and_a_missing_program_come_back(tmp_path: Path) -> None:
    """The builder's exit status is the guard's; a program that cannot run gives 127."""
    proc = BuilderProcess(["/bin/sh", "-c", "exit 3"], cwd=tmp_path, env={}, grace=1.0)
    await proc.start()
    assert await proc.wait() == 3
    missing = BuilderProcess([str(tmp_path / "nope")], cwd=tmp_path, env={}, grace=1.0)
    await missing.start()
    assert await missing.wait() == 127
    assert any("cannot run" in line for line in missing.stderr_tail)


async def test_a_missing_working_directory_is_refused_before_any_start(tmp_path: Path) -> None:
    """A working directory that does not exist fails start() as exec would."""
    proc = BuilderProcess(["/bin/true"], cwd=tmp_path / "missing", env={}, grace=1.0)
    with pytest.raises(FileNotFoundError):
        await proc.start()


async def test_a_dead_waiting_guard_is_replaced(tmp_path: Path) -> None:
    """If the guard waiting for work was killed, the builder starts under a new one."""
    await BuilderProcess(["/bin/true"], cwd=tmp_path, env={}, grace=1.0).start()
    await asyncio.sleep(0)  # the next guard starts waiting
    waiting = process._waiting
    assert waiting is not None
    os.kill(waiting.pid, signal.SIGKILL)
    await asyncio.to_thread(os.waitpid, waiting.pid, 0)
    proc = BuilderProcess(["/bin/sh", "-c", "echo up"], cwd=tmp_path, env={}, grace=1.0)
    await proc.start()
    assert [line async for line in proc.lines()] == ["up"]
    assert proc.pid != waiting.pid
    assert await proc.wait() == 0


def test_an_unneeded_waiting_guard_exits_when_its_pipe_closes() -> None:
    """A waiting guard whose request pipe closes without a request exits at once."""
    waiting = WaitingGuard()
    waiting.discard()
    assert not alive(waiting.pid)
