"""Rebuilding the read models with two processes: this one receives, a worker folds.

Receiving a stream through nats-py takes a core's worth of Python by itself, and the fold
and DuckDB as much again; threads would take turns on one interpreter lock. So a long
replay runs as a pipeline: this process receives the events (``EventLog.follow_raw``) and
passes their JSON on in frames, through a pipe, to ``python -m shipyard.projections.worker``,
which decodes them, applies them with the live projector's fold and writes the database
file (see :mod:`.worker`).

When the worker falls behind, the pipe and then ``SEND_BUFFER`` fill, receiving waits, and
JetStream's flow control holds the rest of the stream back on the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import sys
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import shipyard
from shipyard.errors import ShipyardError, UnknownEventType
from shipyard.events.log import EventLog
from shipyard.projections.worker import END, frame

FRAME_EVENTS = 1000  # events per frame
PIPE_SIZE = 1024 * 1024  # bytes the pipe to the worker holds (Linux; the default is 64 KiB)
SEND_BUFFER = 1024 * 1024  # bytes waiting to go into the pipe before receiving pauses


class RebuildFailed(ShipyardError):
    """Rebuilding the read models failed in the worker process: the message holds its last
    words. Run `shipyard replay` again; if it fails the same way, report it with them."""


@dataclass(frozen=True)
class Report:
    """What the worker did: the last sequence it applied, its CPU time and peak memory."""

    seq: int
    cpu_s: float
    peak_mb: float


def _worker_env() -> dict[str, str]:
    """This environment, with the directory this ``shipyard`` was imported from first on
    the path, so that the worker runs the same code."""
    env = dict(os.environ)
    root = str(Path(shipyard.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return env


async def rebuild(
    events: EventLog,
    path: Path | str,
    stop: int,
    *,
    progress: Callable[[int], None] | None = None,
    worker_args: Sequence[str] = (),
) -> Report:
    """Project events 1 to ``stop`` into a new database file at ``path`` with a worker
    process; the file is committed and closed when this returns. ``progress`` is told the
    last sequence handed to the worker, frame by frame; ``worker_args``: options for the
    worker (``--chunk``, ``--row-cap``)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "shipyard.projections.worker",
        str(path),
        *worker_args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=_worker_env(),
    )
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    # A pipe write moves at most a pipe's worth, and the rest of a buffer is shifted down
    # after each: a bigger pipe and a small buffer make fewer, cheaper writes.
    with contextlib.suppress(AttributeError, OSError):  # F_SETPIPE_SZ is Linux's
        pipe = proc.stdin.transport.get_extra_info("pipe")
        fcntl.fcntl(pipe.fileno(), fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    proc.stdin.transport.set_write_buffer_limits(high=SEND_BUFFER)
    output = asyncio.gather(proc.stdout.read(), proc.stderr.read())
    try:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            await _send(events, proc, stop, progress)  # a dead worker says why on stderr
        out, err = await output
        await proc.wait()
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
        output.cancel()
    return _verdict(out, err, stop)


async def _send(
    events: EventLog,
    proc: asyncio.subprocess.Process,
    stop: int,
    progress: Callable[[int], None] | None,
) -> None:
    """Receive events 1 to ``stop`` and write them to the worker's input, in frames; return
    early if the worker exits."""
    exited: asyncio.Future[Any] = asyncio.ensure_future(proc.wait())
    sending = asyncio.ensure_future(_pipe(events, proc, stop, progress))
    try:
        await asyncio.wait([sending, exited], return_when=asyncio.FIRST_COMPLETED)
    finally:
        exited.cancel()
        if not sending.done():  # the worker exited first: its output says why
            sending.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sending
    if not sending.cancelled():
        sending.result()


async def _pipe(
    events: EventLog,
    proc: asyncio.subprocess.Process,
    stop: int,
    progress: Callable[[int], None] | None,
) -> None:
    assert proc.stdin is not None
    stdin = proc.stdin
    seqs: array[int] = array("q")
    payloads: list[bytes] = []
    # follow_raw, not a callback: nats-py answers JetStream's flow control for a callback
    # subscription when a message arrives, not when the callback is done with it, so a
    # callback that waits for the worker lets the messages pile up until nats-py drops them.
    async for seq, payload in events.follow_raw(start=1):
        seqs.append(seq)
        payloads.append(payload)
        if seq >= stop:
            break
        if len(payloads) >= FRAME_EVENTS:
            stdin.write(frame(seqs, payloads))
            seqs, payloads = array("q"), []
            if progress is not None:
                progress(seq)
            await stdin.drain()
    stdin.write(frame(seqs, payloads) + END)
    stdin.close()
    await stdin.wait_closed()
    if progress is not None:
        progress(stop)


def _verdict(out: bytes, err: bytes, stop: int) -> Report:
    """The worker's report, if it applied every event up to ``stop``; else raise."""
    lines = out.decode(errors="replace").strip().splitlines()
    try:
        result: dict[str, Any] = json.loads(lines[-1]) if lines else {}
    except ValueError:
        result = {}
    if result.get("error") == UnknownEventType.__name__:
        raise UnknownEventType(str(result.get("message", "")))
    if result.get("seq") == stop:
        return Report(int(result["seq"]), float(result["cpu_s"]), float(result["peak_mb"]))
    said = str(result.get("message") or "") or err.decode(errors="replace").strip()[-2000:]
    raise RebuildFailed(f"rebuilding the read models failed in the worker: {said or 'no output'}")
