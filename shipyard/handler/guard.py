"""Run a builder so that it cannot outlive its handler.

The handler starts ``python -S -I guard.py`` as the leader of a new session and process
group, ahead of time: the guard asks the kernel to send it SIGTERM when its parent (the
handler) dies, then waits for one request on stdin — the builder's argv, working directory,
environment and kill grace period, written by :func:`request` and ended by closing the pipe.
It starts the builder in its own group, and on SIGTERM or SIGINT takes the whole group
down: SIGTERM, then SIGKILL after the grace period. It exits with the builder's status.

Waiting for the request is what makes a builder start fast: Python's own start-up (about
25 ms) is paid before a task arrives, so starting a builder costs a pipe write and a
fork/exec. ``guard.py -- ARGV...`` runs ARGV at once instead, in the guard's own working
directory and environment.

Standard library only, and run without ``site``, so it starts in a few milliseconds.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
from collections.abc import Mapping, Sequence

GRACE_ENV = "SHIPYARD_KILL_GRACE"
_PR_SET_PDEATHSIG = 1


def request(argv: Sequence[str], cwd: str, env: Mapping[str, str], grace: float) -> bytes:
    """What the handler writes to a waiting guard: NUL-separated fields (argv and env may
    hold any bytes but NUL, as on exec): grace, cwd, the argv count, argv, ``KEY=VALUE``s."""
    fields = [str(grace), cwd, str(len(argv)), *argv, *(f"{k}={v}" for k, v in env.items())]
    return b"\0".join(os.fsencode(f) for f in fields)


def _parse(raw: bytes) -> tuple[list[bytes], bytes, dict[bytes, bytes], float]:
    fields = raw.split(b"\0")
    grace, cwd, count = float(fields[0]), fields[1], int(fields[2])
    argv = fields[3 : 3 + count]
    env = {}
    for entry in fields[3 + count :]:
        key, _, value = entry.partition(b"=")
        env[key] = value
    return argv, cwd, env, grace


def _read_request() -> bytes:
    chunks = []
    while chunk := os.read(0, 1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):
            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def main(argv: list[str]) -> int:
    parent = os.getppid()
    _die_with_parent()
    if os.getppid() != parent:  # the handler died before the request took effect
        return 1
    if argv[:1] == ["--"]:
        if len(argv) < 2:
            print("guard: nothing to run", file=sys.stderr)
            return 2
        args = [os.fsencode(a) for a in argv[1:]]
        env = {os.fsencode(k): os.fsencode(v) for k, v in os.environ.items() if k != GRACE_ENV}
        grace = float(os.environ.get(GRACE_ENV, "3"))
    else:
        raw = _read_request()
        if not raw:  # the handler closed the pipe without a request: not needed
            return 0
        args, cwd, env, grace = _parse(raw)
        try:
            os.chdir(cwd)
        except OSError as e:
            print(f"guard: cannot enter {os.fsdecode(cwd)}: {e.strerror}", file=sys.stderr)
            return 127
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)  # the builder's stdin is closed, as for any builder
        os.close(devnull)
    return _run(args, env, grace)


def _run(argv: list[bytes], env: dict[bytes, bytes], grace: float) -> int:
    try:
        pid = os.fork()
    except OSError as e:
        print(f"guard: cannot start {os.fsdecode(argv[0])}: {e}", file=sys.stderr)
        return 127
    if pid == 0:
        try:
            os.execvpe(argv[0], argv, env)
        except OSError as e:
            print(f"guard: cannot run {os.fsdecode(argv[0])}: {e.strerror}", file=sys.stderr)
            os._exit(127)
    # Only the builder may hold the output pipes, so the handler sees EOF when it ends.
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)

    # Only a guard that leads its own group may signal the group; otherwise just the builder.
    group = os.getpgid(0) == os.getpid()

    def kill(sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            if group:
                os.killpg(0, sig)
            else:
                os.kill(pid, sig)

    def take_down(signum: int, frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        kill(signal.SIGTERM)
        import threading  # only now: it costs milliseconds at every start

        timer = threading.Timer(grace, kill, args=(signal.SIGKILL,))
        timer.daemon = True
        timer.start()

    signal.signal(signal.SIGTERM, take_down)
    signal.signal(signal.SIGINT, take_down)
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except InterruptedError:
            continue
        except ChildProcessError:
            return 1
    code = os.waitstatus_to_exitcode(status)
    # The builder is gone; anything it left running in its group goes with it.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if group:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(0, signal.SIGTERM)
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
