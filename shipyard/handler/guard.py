"""Run a builder so that it cannot outlive its handler.

The handler starts ``python -S -I guard.py -- ARGV...`` as the leader of a new session and
process group. The guard asks the kernel to send it SIGTERM when its parent (the handler)
dies, starts the builder in the same group, and on SIGTERM or SIGINT takes the whole group
down: SIGTERM, then SIGKILL after a grace period. It exits with the builder's status.

Standard library only, and run without ``site``, so it starts in a few milliseconds.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys

GRACE_ENV = "SHIPYARD_KILL_GRACE"
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):
            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def main(argv: list[str]) -> int:
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        print("guard: nothing to run", file=sys.stderr)
        return 2
    parent = os.getppid()
    _die_with_parent()
    if os.getppid() != parent:  # the handler died before the request took effect
        return 1
    grace = float(os.environ.pop(GRACE_ENV, "3"))
    try:
        pid = os.fork()
    except OSError as e:
        print(f"guard: cannot start {argv[0]}: {e}", file=sys.stderr)
        return 127
    if pid == 0:
        try:
            os.execvp(argv[0], argv)
        except OSError as e:
            print(f"guard: cannot run {argv[0]}: {e.strerror}", file=sys.stderr)
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
