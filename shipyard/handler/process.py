"""A builder process: started under the guard, read line by line, killed as a group.

One guard is kept started and waiting (see :mod:`shipyard.handler.guard`), so a builder
starts with a pipe write instead of a Python start-up; each start leaves a new one waiting.
Where that cannot work (no ``pidfd_open``, not Linux) each builder gets a guard of its own,
started through asyncio.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
import sys
from collections import deque
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from shipyard.handler import guard

GUARD = str(Path(guard.__file__).resolve())
LINE_LIMIT = 32 * 1024 * 1024  # one stream-json line can carry a whole file's content
STDERR_TAIL = 200  # lines of stderr kept for the error report
PRESTART = sys.platform.startswith("linux") and hasattr(os, "pidfd_open")


class WaitingGuard:
    """A guard started ahead of time, blocked reading its request; no event loop involved,
    so it can wait across loops (each test has its own) and needs no clean-up: closing the
    request pipe, or the handler's death, ends it."""

    def __init__(self) -> None:
        request_r, self.request_w = os.pipe()
        self.stdout_r, stdout_w = os.pipe()
        self.stderr_r, stderr_w = os.pipe()
        try:
            self.pid = os.posix_spawn(
                sys.executable,
                [sys.executable, "-S", "-I", GUARD],
                os.environ,
                file_actions=[
                    (os.POSIX_SPAWN_DUP2, request_r, 0),
                    (os.POSIX_SPAWN_DUP2, stdout_w, 1),
                    (os.POSIX_SPAWN_DUP2, stderr_w, 2),
                ],
                setsid=True,  # the guard leads the session and group the builder runs in
                setsigdef=(signal.SIGPIPE, signal.SIGXFSZ),  # as subprocess restores them
            )
        except OSError:
            for fd in (self.request_w, self.stdout_r, self.stderr_r):
                os.close(fd)
            raise
        finally:
            for fd in (request_r, stdout_w, stderr_w):
                os.close(fd)

    def send(self, argv: Sequence[str], cwd: Path, env: Mapping[str, str], grace: float) -> None:
        """Hand the guard its builder. Raises OSError if the guard is gone."""
        data = memoryview(guard.request(argv, str(cwd), env, grace))
        try:
            while data:
                data = data[os.write(self.request_w, data) :]
        finally:
            os.close(self.request_w)
            self.request_w = -1

    def discard(self) -> None:
        """End a guard that will not be used (it exits when its request pipe closes)."""
        for fd in (self.request_w, self.stdout_r, self.stderr_r):
            if fd >= 0:
                os.close(fd)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)


_waiting: WaitingGuard | None = None


def _take_guard() -> WaitingGuard:
    """The waiting guard (or a new one if none waits); another starts waiting right after."""
    global _waiting
    taken, _waiting = _waiting, None
    asyncio.get_running_loop().call_soon(_refill)
    return taken or WaitingGuard()


def _refill() -> None:
    global _waiting
    if _waiting is None:
        with contextlib.suppress(OSError):  # then the next start makes its own
            _waiting = WaitingGuard()


class _Started:
    """A started guard's pipes and exit status on the running loop."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self.stdout = asyncio.StreamReader(limit=LINE_LIMIT)
        self.stderr = asyncio.StreamReader(limit=LINE_LIMIT)
        self._transports: list[asyncio.BaseTransport] = []
        self._exited: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def attach(self, stdout_fd: int, stderr_fd: int) -> None:
        loop = asyncio.get_running_loop()
        for reader, fd in ((self.stdout, stdout_fd), (self.stderr, stderr_fd)):
            pipe = os.fdopen(fd, "rb", buffering=0)
            transport, _ = await loop.connect_read_pipe(
                functools.partial(asyncio.StreamReaderProtocol, reader), pipe
            )
            self._transports.append(transport)
        pidfd = os.pidfd_open(self.pid)

        def exited() -> None:
            loop.remove_reader(pidfd)
            os.close(pidfd)
            try:
                _, status = os.waitpid(self.pid, 0)
                code = os.waitstatus_to_exitcode(status)
            except ChildProcessError:  # reaped elsewhere: the status is lost
                code = 255
            self.returncode = code
            if not self._exited.done():
                self._exited.set_result(code)

        loop.add_reader(pidfd, exited)

    async def wait(self) -> int:
        return await asyncio.shield(self._exited)

    def close(self) -> None:
        for transport in self._transports:
            transport.close()


class BuilderProcess:
    """One builder invocation. ``pgid`` is the group to kill; it equals the guard's pid."""

    def __init__(self, argv: Sequence[str], *, cwd: Path, env: Mapping[str, str], grace: float):
        self.argv = list(argv)
        self.cwd = cwd
        self.env = dict(env)
        self.grace = grace
        self.proc: Any = None  # an asyncio Process, or a _Started of the same shape
        self.stderr_tail: deque[str] = deque(maxlen=STDERR_TAIL)
        self._stderr_task: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return int(self.proc.pid)

    @property
    def pgid(self) -> int:
        return self.pid  # the guard leads its own session and group

    async def start(self) -> None:
        if PRESTART:
            await self._start_waiting()
        else:
            env = {**self.env, guard.GRACE_ENV: str(self.grace)}
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                *("-S", "-I", GUARD, "--", *self.argv),
                cwd=self.cwd,
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True,
                limit=LINE_LIMIT,
            )
        self._stderr_task = asyncio.create_task(self._drain_stderr())

    async def _start_waiting(self) -> None:
        if not self.cwd.is_dir():  # as exec with a missing cwd would say, before any start
            raise FileNotFoundError(2, "No such directory", str(self.cwd))
        for attempt in (1, 2):
            waiting = _take_guard()
            try:
                waiting.send(self.argv, self.cwd, self.env, self.grace)
            except OSError:  # it died while waiting (killed by someone): use a new one
                waiting.discard()
                if attempt == 2:
                    raise
                continue
            started = _Started(waiting.pid)
            await started.attach(waiting.stdout_r, waiting.stderr_r)
            self.proc = started
            return

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
        code = int(await self.proc.wait())
        if self._stderr_task is not None:
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
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
        code = await self.wait()
        if isinstance(self.proc, _Started):
            self.proc.close()  # a member that escaped the group may still hold the pipes
        return code
