"""The recorder's journal: every record is on disk before its request is answered.

The recorder commits rows to SQL in batches, off the response path, so until a batch
commits its rows live in the replica's memory; a router replica killed with kill -9
(or by the out-of-memory killer, or a node drain that does not wait) would take them with
it. So `record()` first appends each row to the replica's journal, a plain `write(2)`
with no fsync: the page cache outlives the process, so a killed process loses nothing
(a machine that loses power can lose the last moments; see docs/sre-guide.md). The
writer tells the journal when a row is committed or spilled, and the journal forgets
it: a segment whose rows are all done is emptied, and a full one is rotated and
deleted once done.

Each segment holds an exclusive lock for its recorder's lifetime, like a spill file. A
segment whose lock can be taken belongs to a recorder that died: any recorder on the node
adopts it and replays it, and replay inserts only the rows SQL lacks, so what the dead
replica had already committed is not written twice.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from controller.storage.spill import SpillBatch, open_locked

PATTERN = "journal-*.jsonl"
ROTATE_BYTES = 8 << 20


@dataclass(eq=False)
class Segment:
    """One journal file: its rows not yet committed or spilled, and whether more may come."""

    path: Path
    fd: int
    size: int = 0
    outstanding: int = 0
    closed: bool = False


class Journal:
    def __init__(self, directory: Path, rotate_bytes: int = ROTATE_BYTES) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self._stem = f"journal-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._rotate_bytes = rotate_bytes
        self._lock = threading.Lock()
        self._count = 0
        self._open: list[Segment] = []
        self._current = self._new_segment()

    def append(self, row: dict[str, Any]) -> Segment:
        """Write one row (a spill line); the segment to tell `done` about once it is safe."""
        data = (json.dumps(row, separators=(",", ":")) + "\n").encode()
        with self._lock:
            segment = self._current
            view = memoryview(data)
            while view:
                view = view[os.write(segment.fd, view) :]
            segment.size += len(data)
            segment.outstanding += 1
            if segment.size >= self._rotate_bytes:
                segment.closed = True
                self._current = self._new_segment()
        return segment

    def done(self, segment: Segment, rows: int = 1) -> None:
        """`rows` of the segment are committed or spilled: they need the journal no more."""
        with self._lock:
            segment.outstanding -= rows
            if segment.outstanding:
                return
            if segment.closed:
                self._drop(segment)
            elif segment.size:
                os.ftruncate(segment.fd, 0)  # appends are O_APPEND: the next lands at 0
                segment.size = 0

    def orphans(self) -> list[SpillBatch]:
        """Journals of recorders that died, locked for replay (`done()` deletes one)."""
        batches = []
        mine = {s.path for s in self._open}
        for path in sorted(self.directory.glob(PATTERN)):
            if path in mine:
                continue
            try:
                batches.append(SpillBatch(path, open_locked(path, "r")))
            except (BlockingIOError, FileNotFoundError):
                continue  # a live recorder's journal, or adopted by another meanwhile
        return batches

    def close(self) -> None:
        """Release every segment: an empty one is deleted, the rest wait for adoption."""
        with self._lock:
            for segment in list(self._open):
                if segment.outstanding:
                    os.close(segment.fd)
                    self._open.remove(segment)
                else:
                    self._drop(segment)

    def _new_segment(self) -> Segment:
        self._count += 1
        path = self.directory / f"{self._stem}-{self._count}.jsonl"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a fresh name: nobody else holds it
        segment = Segment(path, fd)
        self._open.append(segment)
        return segment

    def _drop(self, segment: Segment) -> None:
        segment.path.unlink(missing_ok=True)
        os.close(segment.fd)
        self._open.remove(segment)
