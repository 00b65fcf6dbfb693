"""Faults survived: restarts and bad disks.

The gateway stopped and started again while events keep coming: every SSE client, resuming
the way a browser's EventSource does, sees each event once, in order. The whole of
`shipyard up` stopped (SIGTERM, then SIGKILL) and started again between varied work: the
live read models equal a fresh replay. A data directory or NATS store that is read-only, full
or nearly full at start: `shipyard up` exits 1 at once with a sentence saying which directory
and what to do, never a hang or a traceback.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from shipyard.embedded import EmbeddedNats
from shipyard.errors import StorageError
from shipyard.projections.projector import ReadModels

START_BOUND = 60  # seconds: a `shipyard up` that has not exited by then hangs


# --- disks that cannot take writes ------------------------------------------------------------


def mount_tmpfs(path: Path, size: str, *, read_only: bool = False) -> None:
    """A tmpfs of ``size`` at ``path``; the test is skipped where mounting is not allowed."""
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        if os.geteuid() != 0 or "permission denied" in done.stderr.lower():
            pytest.skip(f"mounting a tmpfs needs root (EPERM): {done.stderr.strip()}")
        raise AssertionError(f"mount failed: {done.stderr}")


@pytest.fixture
def mounts() -> Iterator[list[Path]]:
    """Mount points a test makes; each is unmounted after it, whatever happened."""
    made: list[Path] = []
    yield made
    for path in reversed(made):
        done = subprocess.run(["umount", str(path)], capture_output=True)
        if done.returncode != 0:  # something still holds it open: detach it anyway
            subprocess.run(["umount", "-l", str(path)], check=True)


def small_disk(mounts: list[Path], path: Path, *, free: int | None, read_only: bool) -> None:
    """A 1 MiB file system at ``path``, read-only, or filled until ``free`` bytes are left
    (``None``: left empty)."""
    mounts.append(path)
    mount_tmpfs(path, "1m", read_only=read_only)
    if free is None:
        return
    st = os.statvfs(path)
    room = st.f_bavail * st.f_frsize - free
    with contextlib.suppress(OSError), (path / "filler").open("wb") as f:
        f.write(b"\0" * room)  # to the last byte, when ``free`` is 0
        f.flush()
        os.fsync(f.fileno())
    st = os.statvfs(path)
    assert st.f_bavail * st.f_frsize <= free


def up_exits(data: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`shipyard up` on ``data``, which must exit by itself within START_BOUND."""
    env = {**os.environ, "SHIPYARD_DATA_DIR": str(data), "SHIPYARD_PORT": "0"}
    env.pop("SHIPYARD_NATS_URL", None)
    try:
        return subprocess.run(
            [sys.executable, "-m", "shipyard.cli", "up", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=START_BOUND,
        )
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"shipyard up hung on a bad disk: {e.stderr!r}") from e


BAD_DISKS = {
    # case: (which directory is on the small disk, bytes left free or None, read-only)
    "data dir read-only": ("data", None, True),
    "data dir full": ("data", 0, False),
    "data dir with a few KB free": ("data", 8192, False),
    "NATS store read-only": ("store", None, True),
    "NATS store full": ("store", 0, False),
    "NATS store with a few KB free": ("store", 8192, False),
}
SAYS = {True: "read-only file system", 0: "full disk", 8192: "KiB free"}


@pytest.mark.parametrize("case", list(BAD_DISKS))
def test_up_on_a_bad_disk_exits_at_once_saying_what_to_fix(
    tmp_path: Path, mounts: list[Path], case: str
) -> None:
    """A data directory or NATS store that is read-only, full, or has a few KB left (a probe
    write fits, JetStream's and DuckDB's first blocks do not): `shipyard up` exits 1 by
    itself, naming the directory and the problem, with no traceback and no server left."""
    where, free, read_only = BAD_DISKS[case]
    data = tmp_path / "data"
    disk = data if where == "data" else data / "nats" / "store"
    small_disk(mounts, disk, free=free, read_only=read_only)

    done = up_exits(data)

    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    assert "is up" not in done.stdout
    message = done.stderr.strip()
    assert str(disk) in message
    assert ("NATS store" if where == "store" else "data directory") in message
    assert SAYS[True if read_only else free] in message
    assert not (data / "nats" / "nats.pid").exists(), "a nats-server was left running"


class _StoreUnchecked(EmbeddedNats):
    """A nats-server someone else runs: Shipyard's own start checks do not apply to it."""

    def _check_store_writable(self) -> None:
        return None


def test_up_against_a_nats_whose_store_is_full_says_so(tmp_path: Path, mounts: list[Path]) -> None:
    """`up --nats URL` against a server whose JetStream store has a few KB left: creating
    the stream fails, and `up` says which stream and what to check instead of a traceback."""
    server = _StoreUnchecked(tmp_path / "nats")
    small_disk(mounts, server.store_dir, free=4096, read_only=False)
    url = server.start()
    try:
        done = up_exits(tmp_path / "data", "--nats", url, "--roles", "projector")
    finally:
        server.stop()
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    assert "could not set up the SHIPYARD stream" in done.stderr
    assert "not full" in done.stderr


@pytest.mark.parametrize("read_only", [True, False], ids=["read-only", "full"])
async def test_read_models_on_a_bad_disk_are_a_storage_error(
    tmp_path: Path, mounts: list[Path], read_only: bool
) -> None:
    """DuckDB failing to create the read models file is a StorageError naming the file."""
    disk = tmp_path / "disk"
    small_disk(mounts, disk, free=None if read_only else 0, read_only=read_only)
    models = ReadModels(disk / "readmodels.duckdb")
    with pytest.raises(StorageError, match=r"cannot open the read models .*readmodels\.duckdb"):
        await models.open()
    await models.close()
