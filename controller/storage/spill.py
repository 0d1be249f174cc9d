"""Append-only spill files: where records wait while the database is unreachable.

Each recorder appends (and fsyncs) to a file of its own and holds an exclusive
lock on it for its lifetime. To replay, the recorder rotates its file aside
(still locked) and starts a fresh one, so appends never race the replay. A
file whose lock can be taken belongs to a recorder that died: any recorder
adopts and replays it, so a crash between spilling and replaying loses
nothing. Replay is idempotent (rows are keyed by their ids), so a crash
between committing a replay and deleting its file cannot insert a row twice.
"""

from __future__ import annotations

import fcntl
import itertools
import json
import os
import socket
import threading
import uuid
from pathlib import Path
from typing import Any, TextIO

import structlog

PATTERN = "spill-*.jsonl"

log = structlog.get_logger("cutover.spill")


def open_locked(path: Path, mode: str) -> TextIO:
    handle = open(path, mode, encoding="utf-8")  # noqa: SIM115 (kept open: it holds the lock)
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise
    return handle


class SpillBatch:
    """A locked spill file taken for replay: its rows, and `done()` to delete it afterwards."""

    def __init__(self, path: Path, handle: TextIO) -> None:
        self.path = path
        self._handle = handle
        handle.seek(0)
        self.rows: list[dict[str, Any]] = []
        for line in handle:
            try:
                self.rows.append(json.loads(line))
            except ValueError:  # a line cut short by its writer's death: never a whole row
                if line.strip():
                    log.warning("torn_line_skipped", file=str(path), chars=len(line))

    def done(self) -> None:
        self.path.unlink(missing_ok=True)
        self._handle.close()

    def keep(self) -> None:
        """Leave the file for a later replay (the database went away again)."""
        self._handle.close()


class SpillFile:
    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self._stem = f"spill-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._rotation = itertools.count(1)
        self._lock = threading.Lock()
        self.path = directory / f"{self._stem}.jsonl"
        self._file = open_locked(self.path, "a+")
        self._size = 0
        self.sweep_empty()

    def append(self, rows: list[dict[str, Any]]) -> None:
        """Durably add rows: they survive this process dying right after the call."""
        data = "".join(json.dumps(row, separators=(",", ":")) + "\n" for row in rows)
        with self._lock:
            self._file.write(data)
            self._file.flush()
            os.fsync(self._file.fileno())
            self._size += len(data)

    def pending(self) -> bool:
        return self._size > 0 or bool(self._orphans())

    def take(self) -> list[SpillBatch]:
        """Everything waiting for replay, oldest first: orphans of dead recorders, then our own file."""
        self.sweep_empty()
        batches = []
        for path in self._orphans():
            try:
                batches.append(SpillBatch(path, open_locked(path, "r")))
            except (BlockingIOError, FileNotFoundError):
                continue  # a live recorder's file, or adopted by someone else meanwhile
        with self._lock:
            if self._size:
                rotated = self.directory / f"{self._stem}.r{next(self._rotation)}.jsonl"
                os.replace(self.path, rotated)
                batches.append(SpillBatch(rotated, self._file))
                self._file = open_locked(self.path, "a+")
                self._size = 0
        return batches

    def sweep_empty(self) -> None:
        """Delete the empty files of recorders that died (nothing to replay, only clutter)."""
        for path in self.directory.glob(PATTERN):
            if path == self.path or _size(path) > 0:
                continue
            try:
                handle = open_locked(path, "r")
            except (BlockingIOError, FileNotFoundError):
                continue  # a live recorder's file
            try:
                if _size(path) == 0:
                    path.unlink(missing_ok=True)
            finally:
                handle.close()

    def _orphans(self) -> list[Path]:
        paths = (p for p in self.directory.glob(PATTERN) if p != self.path)
        return sorted((p for p in paths if _size(p) > 0), key=_mtime)

    def close(self) -> None:
        """Release the lock; an empty file is removed, a non-empty one waits for adoption."""
        with self._lock:
            self._file.close()
            if not self._size:
                self.path.unlink(missing_ok=True)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0
