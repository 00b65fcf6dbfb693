"""The rebuild worker: ``python -m shipyard.projections.worker DB_FILE`` folds the events it
reads on stdin into a new read-model database (see :mod:`shipyard.projections.rebuild`).

Its input is a series of frames: ``<count: u32> <size: u32>``, then ``count`` stream
sequences (i64), ``count`` payload lengths (u32) and the payloads (each one event's JSON),
``size`` bytes in all after the header. A frame with ``count`` 0 ends the input; an end of
input without it means the sender is gone, and the worker exits without reporting success.
It reports on stdout, as one JSON line: ``{"seq": last applied, "cpu_s": …, "peak_mb": …}``
or ``{"error": class name, "message": …}``.

It imports no NATS client: it starts in a fraction of a second.
"""

from __future__ import annotations

import argparse
import gc
import json
import queue
import resource
import struct
import sys
import threading
from array import array
from collections.abc import Iterator, Sequence
from typing import Any, BinaryIO

from shipyard.errors import UnknownEventType
from shipyard.events.envelope import Event, decode
from shipyard.projections.fold import Batch
from shipyard.projections.models import ReadModels

CHUNK = 50_000  # events decoded before they are applied
ROW_CAP = 200_000  # read-model rows held in memory (about 1.3 KB each) before they are written out
QUEUED_FRAMES = 64  # frames read ahead while a chunk is applied
_HEADER = struct.Struct("<II")
END = _HEADER.pack(0, 0)  # the frame that ends the input


def frame(seqs: array[int], payloads: Sequence[bytes]) -> bytes:
    """One frame holding ``payloads`` with their stream sequences."""
    lengths = array("I", map(len, payloads))
    body = b"".join([seqs.tobytes(), lengths.tobytes(), *payloads])
    return _HEADER.pack(len(payloads), len(body)) + body


def read_frames(stream: BinaryIO) -> Iterator[tuple[int, bytes]]:
    """Each frame's ``count`` and body, up to the end frame; ``EOFError`` if the input ends
    before it."""
    while True:
        header = stream.read(_HEADER.size)
        if len(header) < _HEADER.size:
            raise EOFError("the events stopped coming before their end")
        count, size = _HEADER.unpack(header)
        if count == 0:
            return
        body = stream.read(size)
        if len(body) < size:
            raise EOFError("the events stopped coming in the middle of a frame")
        yield count, body


def unpack(count: int, body: bytes) -> Iterator[tuple[int, bytes]]:
    """``(sequence, payload)`` for each event in a frame's body."""
    seqs = array("q")
    seqs.frombytes(body[: 8 * count])
    lengths = array("I")
    lengths.frombytes(body[8 * count : 12 * count])
    offset = 12 * count
    for seq, length in zip(seqs, lengths, strict=True):
        yield seq, body[offset : offset + length]
        offset += length


Frames = queue.Queue[tuple[int, bytes] | BaseException | None]


def _receive(stream: BinaryIO, frames: Frames) -> None:
    """In a thread of its own: every frame into ``frames``, then ``None`` (or the error
    that ended the input)."""
    try:
        for item in read_frames(stream):
            frames.put(item)
    except BaseException as e:  # handed to the fold's thread, which raises it
        frames.put(e)
    else:
        frames.put(None)


def received(stream: BinaryIO) -> Iterator[tuple[int, bytes]]:
    """``(sequence, payload)`` of every event in ``stream``'s frames. The frames are read
    by a thread of their own, so that the sender can go on while a chunk is applied:
    reading a pipe waits without the interpreter lock."""
    frames: Frames = queue.Queue(QUEUED_FRAMES)
    threading.Thread(target=_receive, args=(stream, frames), daemon=True).start()
    while (item := frames.get()) is not None:
        if isinstance(item, BaseException):
            raise item
        yield from unpack(*item)


class Rebuild:
    """The live projector's :class:`~shipyard.projections.fold.Batch`, kept for a whole
    rebuild.

    Its rows stay in memory from one chunk of events to the next, so nothing is looked up
    in the (new, empty) database, and each row is written once, at the end. Activity lines
    never change once made: each chunk's go out at once. Should more than :data:`ROW_CAP`
    rows pile up, they are all written out and dropped, and from then on each chunk loads
    the rows it touches that memory does not hold, as a live batch does.
    """

    def __init__(self, models: ReadModels, *, row_cap: int = ROW_CAP) -> None:
        assert models.con is not None
        self.models = models
        self.row_cap = row_cap
        self.batch = Batch(models.con, models.columns)
        self.spilled = False  # rows have been written out: the database holds some

    def apply(self, events: list[Event[Any]]) -> None:
        batch = self.batch
        if self.spilled:
            batch.preload(events)
        for event in events:
            batch.apply(event)
        batch.write_activity("insert")  # one line per event at most, keyed by its sequence
        if sum(map(len, batch.rows.values())) > self.row_cap:
            self._write_rows()
            for rows in batch.rows.values():
                rows.clear()
            self.spilled = True

    def _write_rows(self) -> None:
        self.batch.write("upsert" if self.spilled else "insert")

    def finish(self) -> int:
        """Write what is held and the checkpoint; return the last sequence applied."""
        con = self.batch.con
        con.execute("BEGIN")
        self._write_rows()
        self.models.save_checkpoint_sync(self.batch)
        con.execute("COMMIT")
        return self.batch.last_seq


def work(path: str, stream: BinaryIO, *, chunk_size: int = CHUNK, row_cap: int = ROW_CAP) -> int:
    """Apply every event in ``stream``'s frames to a new database at ``path``; return the
    last sequence applied."""
    models = ReadModels(path)
    models.open_sync()
    try:
        fold = Rebuild(models, row_cap=row_cap)
        chunk: list[Event[Any]] = []
        for seq, payload in received(stream):
            chunk.append(decode(payload, seq=seq))
            if len(chunk) >= chunk_size:
                fold.apply(chunk)
                chunk = []
        fold.apply(chunk)
        return fold.finish()
    finally:
        models.close_sync()


def _report(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


def main() -> int:
    # The fold makes millions of objects and next to no reference cycles: the collector's
    # passes over the rows held made a rebuild of a million events take a third longer.
    gc.disable()
    parser = argparse.ArgumentParser(prog="python -m shipyard.projections.worker")
    parser.add_argument("path", help="the new database file")
    parser.add_argument("--chunk", type=int, default=CHUNK, help="events applied at a time")
    parser.add_argument("--row-cap", type=int, default=ROW_CAP, help="rows held in memory")
    args = parser.parse_args()
    try:
        last = work(args.path, sys.stdin.buffer, chunk_size=args.chunk, row_cap=args.row_cap)
    except (UnknownEventType, EOFError) as e:
        _report(error=type(e).__name__, message=str(e))
        return 1
    usage = resource.getrusage(resource.RUSAGE_SELF)
    _report(seq=last, cpu_s=usage.ru_utime + usage.ru_stime, peak_mb=usage.ru_maxrss / 1024)
    return 0


if __name__ == "__main__":
    sys.exit(main())
