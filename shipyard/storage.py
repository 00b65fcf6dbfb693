"""Whether a directory Shipyard keeps data in can take writes, said before anything starts.

A full or read-only disk found at start is a sentence naming the directory and what to do.
Found later, it is worse: JetStream stops acknowledging appends (each caller waits out its
timeout) and DuckDB fails mid-transaction. So ``shipyard up`` checks the data directory and
the NATS store first, and refuses to start on a disk too full to hold the first blocks.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path

from shipyard.errors import StorageError

# Less free space than this and a start soon fails to write: a DuckDB block is 256 KiB, a
# JetStream message block several MiB. Refusing now is clearer than failing later.
MIN_FREE = 32 * 1024 * 1024  # bytes
_PROBE = ".write-test"


def check_writable(path: Path, what: str) -> None:
    """Make ``path`` if need be and prove a synced write lands there, with room to spare;
    ``what`` names the directory in the message (``the data directory``)."""
    probe = path / _PROBE
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, b"x")
            os.fsync(fd)  # a full disk may only say so here
        finally:
            os.close(fd)
        free = shutil.disk_usage(path).free  # what an unprivileged writer may still use
    except OSError as e:
        raise unwritable(path, what, e) from e
    finally:
        with contextlib.suppress(OSError):  # not the error to report
            probe.unlink(missing_ok=True)
    if free < MIN_FREE:
        raise StorageError(
            f"{what} {path} is on a disk with only {_size(free)} free; Shipyard needs at "
            f"least {_size(MIN_FREE)} there. Free some space, or pass another --data-dir."
        )


def unwritable(path: Path, what: str, error: OSError) -> StorageError:
    """The sentence for a write to ``path`` that failed with ``error``."""
    reason = error.strerror or str(error)
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = f"{what} {path} is on a full disk ({reason}). Free some space there"
    elif error.errno == errno.EROFS:
        fix = f"{what} {path} is on a read-only file system. Remount it read-write"
    elif error.errno in (errno.EACCES, errno.EPERM):
        fix = f"{what} {path} is not writable ({reason}). Fix its permissions"
    else:
        fix = f"cannot write to {what} {path}: {reason}. Fix it"
    return StorageError(f"{fix}, or pass another --data-dir.")


def _size(n: int) -> str:
    if n >= 1024 * 1024:
        return f"{n / (1024 * 1024):.0f} MiB"
    return f"{n / 1024:.0f} KiB"
