"""A builder process: started under the guard, read line by line, killed as a group."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections import deque
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path

from shipyard.handler import guard

GUARD = str(Path(guard.__file__).resolve())
LINE_LIMIT = 32 * 1024 * 1024  # one stream-json line can carry a whole file's content
STDERR_TAIL = 200  # lines of stderr kept for the error report


class BuilderProcess:
    """One builder invocation. ``pgid`` is the group to kill; it equals the guard's pid."""

    def __init__(self, argv: Sequence[str], *, cwd: Path, env: Mapping[str, str], grace: float):
        self.argv = list(argv)
        self.cwd = cwd
        self.env = dict(env)
        self.grace = grace
        self.proc: asyncio.subprocess.Process | None = None
        self.stderr_tail: deque[str] = deque(maxlen=STDERR_TAIL)
        self._stderr_task: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def pgid(self) -> int:
        return self.pid  # the guard leads its own session and group

    async def start(self) -> None:
        env = {**self.env, guard.GRACE_ENV: str(self.grace)}
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-S",
            "-I",
            GUARD,
            "--",
            *self.argv,
            cwd=self.cwd,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
            limit=LINE_LIMIT,
        )
        self._stderr_task = asyncio.create_task(self._drain_stderr())

    async def _drain_stderr(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        async for raw in self.proc.stderr:
            self.stderr_tail.append(raw.decode("utf-8", "replace").rstrip("\n"))

    async def lines(self) -> AsyncIterator[str]:
        """Each line the builder prints on stdout, until it closes it."""
        assert self.proc is not None and self.proc.stdout is not None
        while True:
            try:
                raw = await self.proc.stdout.readline()
            except ValueError:  # a line over LINE_LIMIT: skip what is buffered, go on
                continue
            if not raw:
                return
            yield raw.decode("utf-8", "replace").rstrip("\r\n")

    async def wait(self) -> int:
        assert self.proc is not None
        code = await self.proc.wait()
        if self._stderr_task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(self._stderr_task, 2)
        return code

    def signal_group(self, sig: int) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pgid, sig)

    async def kill(self) -> int:
        """Stop the whole group: SIGTERM, then SIGKILL after the grace period."""
        if self.proc is None:
            return -1
        if self.proc.returncode is None:
            self.signal_group(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), self.grace + 1)
            except TimeoutError:
                self.signal_group(signal.SIGKILL)
        # Members the guard could not reach (it died first) are taken down too.
        self.signal_group(signal.SIGKILL)
        return await self.wait()
