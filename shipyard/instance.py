"""One Shipyard per data directory, and how other commands find it.

``shipyard up`` holds an exclusive ``flock`` on ``<data dir>/shipyard.lock`` for as long as
it runs. The kernel drops the lock when the process dies, however it dies, so a stale lock
never blocks the next start. ``instance.json`` beside it tells the CLI where NATS is.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from pathlib import Path
from typing import Any

from shipyard import storage
from shipyard.errors import AlreadyRunning, ConfigError

LOCK_FILE = "shipyard.lock"
INFO_FILE = "instance.json"


class InstanceLock:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.path = data_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            raise ConfigError(
                f"cannot use data directory {self.data_dir}: {e.strerror or e}. "
                "Fix its permissions or pass another --data-dir."
            ) from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise AlreadyRunning(
                f"Shipyard is already running on {self.data_dir} (pid {holder}). "
                "Stop it first, or pass a different --data-dir."
            ) from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as e:
            os.close(fd)
            raise storage.unwritable(self.data_dir, "the data directory", e) from e
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            (self.data_dir / INFO_FILE).unlink()
        os.ftruncate(self._fd, 0)
        os.close(self._fd)  # closing drops the flock
        self._fd = None

    def __enter__(self) -> InstanceLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def is_running(data_dir: Path) -> bool:
    """Whether some process holds the data directory's lock right now."""
    try:
        fd = os.open(data_dir / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def write_private(path: Path, text: str) -> None:
    """Replace ``path`` atomically with ``text``, readable by its owner only."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_info(data_dir: Path, info: dict[str, Any]) -> None:
    try:
        write_private(data_dir / INFO_FILE, json.dumps(info, indent=2))
    except OSError as e:
        raise storage.unwritable(data_dir, "the data directory", e) from e


def read_info(data_dir: Path) -> dict[str, Any] | None:
    """What the running instance on ``data_dir`` published, or None if none runs."""
    if not is_running(data_dir):
        return None
    try:
        info: dict[str, Any] = json.loads((data_dir / INFO_FILE).read_text())
    except (OSError, ValueError):
        return None
    return info
