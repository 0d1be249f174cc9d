"""Interrupting transactions that outlive their timeout, from one thread per process.

`Store.session(timeout=…)` bounds every transaction of the recorder and the loop. The
first version started a `threading.Timer` per transaction: a thread start and a join
for every commit, about 4% of a router replica's CPU at a few hundred requests a second
(py-spy, bench/router_overhead.py). One long-lived thread now keeps the deadlines in a
heap. Disarming a watch is a flag under a lock; the thread drops disarmed watches when
it reaches them, so it wakes about once per timeout, not once per transaction.
"""

from __future__ import annotations

import heapq
import itertools
import os
import socket
import sqlite3
import threading
import time
from typing import Any


def interrupt(dbapi_connection: Any) -> None:
    """Make a call blocked on this connection fail now, from another thread.

    SQLite aborts the running statement. For PostgreSQL the socket is shut down: a server
    that stopped answering cannot be asked to cancel, so the blocked read must end here.
    """
    if isinstance(dbapi_connection, sqlite3.Connection):
        dbapi_connection.interrupt()
        return
    fd = dbapi_connection.pgconn.socket
    with socket.socket(fileno=os.dup(fd)) as sock:
        sock.shutdown(socket.SHUT_RDWR)


class Watch:
    """One armed transaction: interrupted at its deadline unless disarmed first."""

    def __init__(self, dbapi_connection: Any, deadline: float) -> None:
        self.deadline = deadline
        self._connection = dbapi_connection
        self._lock = threading.Lock()
        self._stopped = False
        self._fired = False

    def fire(self) -> None:
        with self._lock:
            if not self._stopped:
                self._fired = True
                interrupt(self._connection)

    def stop(self) -> bool:
        """Disarm; True if it had already fired (the connection is unusable)."""
        with self._lock:
            self._stopped = True
            return self._fired

    @property
    def stopped(self) -> bool:
        return self._stopped


class Watchdog:
    """The deadlines of every armed transaction in this process, and the thread that acts
    on them. The thread starts with the first watch and is a daemon.

    `threaded=False` leaves the thread out, so a test that moves `clock` by hand is the
    only one calling `due()`: a thread that started late would otherwise take the watches
    the test expects.
    """

    def __init__(self, clock: Any = time.monotonic, threaded: bool = True) -> None:
        self._clock = clock
        self._threaded = threaded
        self._wake = threading.Condition()
        self._heap: list[tuple[float, int, Watch]] = []
        self._order = itertools.count()
        self._thread: threading.Thread | None = None

    def watch(self, dbapi_connection: Any, timeout: float) -> Watch:
        watch = Watch(dbapi_connection, self._clock() + timeout)
        with self._wake:
            heapq.heappush(self._heap, (watch.deadline, next(self._order), watch))
            if self._threaded and self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="cutover-db-watchdog", daemon=True
                )
                self._thread.start()
            elif self._heap[0][2] is watch:  # earlier than what the thread sleeps towards
                self._wake.notify()
        return watch

    def due(self) -> list[Watch]:
        """Take the armed watches whose deadline has passed, dropping disarmed ones on the way."""
        now = self._clock()
        due = []
        with self._wake:
            while self._heap and (self._heap[0][2].stopped or self._heap[0][0] <= now):
                _, _, watch = heapq.heappop(self._heap)
                if not watch.stopped:
                    due.append(watch)
        return due

    def pending(self) -> int:
        with self._wake:
            return len(self._heap)

    def _run(self) -> None:
        while True:
            for watch in self.due():
                watch.fire()
            with self._wake:
                if not self._heap:
                    self._wake.wait()
                else:
                    self._wake.wait(max(self._heap[0][0] - self._clock(), 0.0))


WATCHDOG = Watchdog()
