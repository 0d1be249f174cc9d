"""The recorder: every request and output reaches SQL, off the response path, once.

Callers hand records over and return at once: each image is written to its
content-addressed file, each row appended to the replica's journal (so a replica
killed with kill -9 loses nothing, `journal.py`), and the row joins a bounded
in-memory queue. With an object store, a small pool of uploaders sends the image
first, so a row with an image reaches SQL once any node can fetch it; the writer
thread only ever talks SQL. The writer inserts rows in batches, one transaction per
batch: it lingers up to 50 ms after the first row for others, so under load a
transaction carries many rows (the commit, not the row, is what costs). When the
database cannot take a batch the rows go to a spill file (fsync'd) and are replayed,
in order and exactly once, before anything newer is written. When the spill file
cannot be written either (a full disk), the rows wait in memory and are tried again.
"""

from __future__ import annotations

import contextlib
import json
import math
import queue
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import structlog
from sqlalchemy import false, insert, select, update
from sqlalchemy.exc import DBAPIError, IntegrityError

from controller.config import DatabaseConfig
from controller.storage.artifact_store import Artifacts
from controller.storage.bulk_insert import insert_rows
from controller.storage.journal import Journal, Segment
from controller.storage.lost import supersede_lost
from controller.storage.records import OutputRecord, RequestRecord
from controller.storage.spill import SpillBatch, SpillFile
from controller.storage.store import Store, TransactionTimeout
from controller.storage.tables import Output, Request, Rollout, judge_progress_of, utcnow
from workers.logs import one_line

# Core tables, not ORM entities: a batch skips the ORM's bulk-persistence layer, which was
# half the writer's CPU in a router replica's profile (bench/router_overhead.py).
REQUESTS = Request.__table__
OUTPUTS = Output.__table__

log = structlog.get_logger("cutover.recorder")

ORPHAN_TTL = timedelta(minutes=10)


@dataclass
class Counters:
    recorded: int = 0
    spilled: int = 0
    replayed: int = 0
    replay_duplicates: int = 0
    dead_letters: int = 0
    queue_full: int = 0
    journal_replayed: int = 0  # rows of dead replicas' journals that SQL lacked
    journal_failures: int = 0  # rows the journal could not take (a full disk)
    dropped: int = 0  # rows neither the queue nor the spill file could take
    batches: int = 0
    db_failures: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(eq=False)
class _Item:
    kind: str  # "request" or "output"
    row: dict[str, Any]
    segment: Segment | None = None  # its journal segment, until it is committed or spilled
    upload: str | None = None  # an image to send to the object store before the row goes


@dataclass
class _Rows:
    requests: list[dict[str, Any]] = field(default_factory=list)
    outputs: list[dict[str, Any]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.requests) + len(self.outputs)

    def as_spill(self) -> list[dict[str, Any]]:
        return [{"kind": "request", **_jsonable(r)} for r in self.requests] + [
            {"kind": "output", **_jsonable(o)} for o in self.outputs
        ]

    @classmethod
    def of(cls, items: list[_Item]) -> _Rows:
        rows = cls()
        for item in items:
            (rows.requests if item.kind == "request" else rows.outputs).append(item.row)
        return rows

    @classmethod
    def from_spill(cls, lines: list[dict[str, Any]]) -> _Rows:
        rows = cls()
        for line in lines:
            kind = line.pop("kind")
            line["created_at"] = datetime.fromisoformat(line["created_at"])
            (rows.requests if kind == "request" else rows.outputs).append(line)
        return rows


def _jsonable(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v.isoformat() if isinstance(v, datetime) else v for k, v in row.items()}


class Recorder:
    def __init__(
        self,
        database_url: str,
        artifact_dir: Path,
        spill_dir: Path,
        *,
        batch_size: int = 500,
        flush_interval: float = 0.2,
        linger: float = 0.05,
        artifact_writers: int = 4,
        max_queue: int = 50_000,
        retry_interval: float = 1.0,
        reminder_interval: float = 60.0,
        timeouts: DatabaseConfig | None = None,
        sqlite_busy: float = 2.0,
        artifacts: Artifacts | None = None,
    ) -> None:
        # A short SQLite busy timeout: past it the batch spills rather than stalls. No pre-ping:
        # a ping has no client-side bound, and a stale connection fails the write fast anyway.
        timeouts = (timeouts or DatabaseConfig()).model_copy(
            update={"sqlite_busy_timeout": sqlite_busy}
        )
        self.store = Store(database_url, timeouts, pre_ping=False)
        self._write_timeout = timeouts.write_timeout
        self.outage = OutageLog(reminder_interval)
        # With an object store, `artifacts_for(config)`: images are uploaded too.
        self.artifacts = artifacts or Artifacts(artifact_dir)
        self.spill = SpillFile(spill_dir)
        self.journal = Journal(spill_dir)
        where = {"directory": str(spill_dir)}
        self._journal_trouble = _Trouble("journal_write_failed", "journal_recovered", where)
        self._spill_trouble = _Trouble("spill_write_failed", "spill_write_recovered", where)
        self._held: list[_Item] = []  # rows neither SQL nor the spill file could take yet
        self.counters = Counters()
        self._batch_size = batch_size
        self._flush_interval = flush_interval
        self._linger = linger
        # Images waiting for an uploader; None tells one to stop.
        self._images: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._artifacts_pending = 0
        self._artifacts_lock = threading.Lock()
        self._writers = [
            threading.Thread(target=self._upload_images, name=f"cutover-uploads-{k}", daemon=True)
            for k in range(artifact_writers if self.artifacts.store is not None else 0)
        ]
        for writer in self._writers:
            writer.start()
        self._retry_interval = retry_interval
        self._queue: queue.Queue[_Item] = queue.Queue(maxsize=max_queue)
        self._rollout_ids: dict[str, int] = {}
        self._next_db_attempt = 0.0
        self._next_adoption = 0.0
        self._busy = threading.Event()
        self._stop = threading.Event()
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cutover-recorder", daemon=True)
        self._thread.start()

    # -- called on the request path: never blocks, never raises --------------------------

    def record(self, record: RequestRecord | OutputRecord, png: bytes | None = None) -> None:
        """Store the image, journal the row, queue it. On the response path: no SQL."""
        try:
            item = self._item(record, png)
            self._journal(item)
            if item.upload is not None and self._writers and not self._closing.is_set():
                with self._artifacts_lock:
                    self._artifacts_pending += 1
                self._images.put(item)
                return
            if item.upload is not None:
                self.artifacts.send(item.upload)
            self._enqueue(item)
        except Exception:  # pragma: no cover - recording must never fail a request
            log.exception(
                "record_failed",
                request_id=getattr(record, "request_id", getattr(record, "id", None)),
            )

    def _item(self, record: RequestRecord | OutputRecord, png: bytes | None) -> _Item:
        row = dict(vars(record))  # a shallow copy: records are not changed after
        if isinstance(record, RequestRecord):
            return _Item("request", row)
        item = _Item("output", row)
        if png is not None:
            stored = self._store(record, png)
            if isinstance(stored, str):
                row["artifact_sha256"] = stored
                item.upload = stored if self.artifacts.store is not None else None
            else:
                row["error"] = f"{row['error'] or ''} (image not stored: {stored})".strip()
        return item

    def _journal(self, item: _Item) -> None:
        try:
            item.segment = self.journal.append({"kind": item.kind, **_jsonable(item.row)})
        except OSError as exc:  # a full disk: the row still goes on, without its safety net
            self.counters.journal_failures += 1
            self._journal_trouble.failed(
                error=str(exc),
                note="records are still written to SQL; a replica killed now loses "
                "the ones not yet committed",
            )
            return
        self._journal_trouble.cleared()

    def _upload_images(self) -> None:
        """An uploader: each image to the object store (or held), then the row that names it."""
        while (item := self._images.get()) is not None:
            try:
                assert item.upload is not None
                self.artifacts.send(item.upload)
                self._enqueue(item)
            finally:
                with self._artifacts_lock:
                    self._artifacts_pending -= 1

    def _enqueue(self, item: _Item) -> None:
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            # Overload: write this one straight to the spill file rather than lose it.
            self.counters.queue_full += 1
            try:
                self._spill_rows(_Rows.of([item]))
            except OSError as exc:
                self.counters.dropped += 1
                log.error(
                    "record_dropped",
                    request_id=item.row.get("request_id", item.row["id"]),
                    error=str(exc),
                    why="the queue is full and the spill file cannot be written",
                )
                return
            self._forget([item])

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        """Records waiting for the writer, images waiting for their file included."""
        return self._queue.qsize() + self._images.qsize()

    def flush(self, timeout: float = 30.0, include_spill: bool = False) -> bool:
        """Wait until queued records are written (and, if asked, the spill replayed)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            idle = (
                self._queue.empty()
                and not self._busy.is_set()
                and not self._artifacts_pending
                and not self._held
            )
            if idle and not (include_spill and self.spill.pending()):
                return True
            time.sleep(0.02)
        return False

    def close(self, timeout: float = 30.0) -> None:
        self._closing.set()  # from now on an image is stored by the writer thread itself
        self.flush(timeout)
        for _ in self._writers:
            self._images.put(None)
        for writer in self._writers:
            writer.join(timeout)
        self._stop.set()
        self._thread.join(timeout)
        self.journal.close()
        self.spill.close()
        self.store.close()

    # -- the writer thread -----------------------------------------------------------------

    def _run(self) -> None:
        while not (self._stop.is_set() and self._queue.empty()):
            items = self._take_batch()
            self._busy.set()
            try:
                self._replay_if_due()
                self._adopt_if_due()
                if items or self._held:
                    self._save(self._held + items)
            except Exception:  # keep the writer alive whatever happens; rows are spilled above
                with contextlib.suppress(Exception):
                    log.exception("recorder_loop_error")
            finally:
                self._busy.clear()

    def _take_batch(self) -> list[_Item]:
        try:
            items = [self._queue.get(timeout=self._flush_interval)]
        except queue.Empty:
            return []
        self._busy.set()
        # Linger briefly for more: one commit for many rows is what keeps up under load.
        until = time.monotonic() + self._linger
        while len(items) < self._batch_size:
            try:
                items.append(self._queue.get_nowait())
                continue
            except queue.Empty:
                pass
            left = until - time.monotonic()
            if left <= 0:
                break
            try:
                items.append(self._queue.get(timeout=left))
            except queue.Empty:
                break
        return items

    def _save(self, items: list[_Item]) -> None:
        """SQL, or else the spill file, or else (a full disk) memory until the next round."""
        rows = _Rows.of(items)
        self._held = []
        if self.spill.pending() or not self._write(rows):
            try:
                self._spill_rows(rows)
            except OSError as exc:
                self._held = items
                self._spill_trouble.failed(
                    rows=len(rows), error=str(exc), note="rows wait in memory and are tried again"
                )
                return
        self._spill_trouble.cleared()
        self._forget(items)

    def _forget(self, items: list[_Item]) -> None:
        """These rows are committed or spilled: their journal lines are no longer needed."""
        for item in items:
            if item.segment is not None:
                self.journal.done(item.segment)
                item.segment = None

    def _store(self, record: OutputRecord, png: bytes) -> str | OSError:
        """The image's sha256 once its file is written, or why it could not be."""
        try:
            return self.artifacts.write(png)
        except OSError as exc:
            log.error(
                "artifact_write_failed",
                request_id=record.request_id,
                role=record.role,
                error=str(exc),
            )
            return exc

    def _write(self, rows: _Rows) -> bool:
        """Insert a batch in one transaction; False if the database could not take it."""
        if time.monotonic() < self._next_db_attempt:
            return False
        try:
            self._insert(rows)
        except UNAVAILABLE as exc:
            self._db_down(exc)
            return False
        self.counters.recorded += len(rows)
        self.counters.batches += 1
        self._db_up()
        return True

    def _insert(self, rows: _Rows) -> None:
        with self.store.session(self._write_timeout) as session:
            insert_rows(session, REQUESTS, [self._request_row(session, r) for r in rows.requests])
            insert_rows(session, OUTPUTS, rows.outputs)

    def _request_row(self, session: Any, record: dict[str, Any]) -> dict[str, Any]:
        """The `requests` row of a record: the rollout's id for its name, and where the judge
        starts with it (written here, since COPY applies no column defaults)."""
        name = record["rollout"]
        if name is not None and name not in self._rollout_ids:
            found = session.scalar(select(Rollout.id).where(Rollout.name == name))
            if found is not None:  # not `init`ed yet: asked again next time, never cached
                self._rollout_ids[name] = found
        row = {k: v for k, v in record.items() if k != "rollout"}
        row["rollout_id"] = self._rollout_ids.get(name) if name is not None else None
        row["judge_progress"] = judge_progress_of(row)
        return row

    def _spill_rows(self, rows: _Rows) -> None:
        if not len(rows):
            return
        self.spill.append(rows.as_spill())
        self.counters.spilled += len(rows)
        self.outage.spilled(len(rows), str(self.spill.path))

    def _replay_if_due(self) -> None:
        """Replay spilled rows once the database answers again.

        The database is asked first with a write that changes nothing (on SQLite a read
        succeeds under another writer's lock): while it cannot write, the spill file is left
        as it is, so an outage leaves one file per recorder, not one per retry.
        """
        if time.monotonic() < self._next_db_attempt or not self.spill.pending():
            return
        if self.outage.active:
            try:
                with self.store.session(self._write_timeout) as session:
                    session.execute(update(Rollout).where(false()).values(name=Rollout.name))
            except UNAVAILABLE as exc:
                self._db_down(exc)
                return
        if self._replay_files(self.spill.take(), "spill"):
            self._db_up()

    def _adopt_if_due(self) -> None:
        """Replay the journals of dead replicas on this node (each retry interval)."""
        now = time.monotonic()
        if now < self._next_adoption or now < self._next_db_attempt:
            return
        self._next_adoption = now + self._retry_interval
        self._replay_files(self.journal.orphans(), "journal")

    def _replay_files(self, batches: list[SpillBatch], source: str) -> bool:
        """Replay taken files in order, each deleted once done; False (the rest kept for
        later) if the database went away meanwhile."""
        for k, batch in enumerate(batches):
            try:
                waiting = self._replay(_Rows.from_spill(batch.rows), source)
            except UNAVAILABLE as exc:
                for kept in batches[k:]:
                    kept.keep()
                self._db_down(exc)
                return False
            if len(waiting):
                self.spill.append(waiting.as_spill())
            batch.done()
        return True

    def _replay(self, rows: _Rows, source: str = "spill") -> _Rows:
        """Insert what is not in SQL yet; return outputs whose request row has not arrived yet.

        An output can reach the spill before its request row (the queue overflowed while the
        request was still queued); it waits for a later replay rather than failing the batch.
        """
        try:
            with self.store.session(self._write_timeout) as session:
                requests, skipped_r = _new_only(
                    session, Request, [self._request_row(session, r) for r in rows.requests]
                )
                if requests:
                    session.execute(insert(Request), requests)
                parents = {r["id"] for r in rows.requests} | _existing(
                    session, Request, {o["request_id"] for o in rows.outputs}
                )
                ready = [o for o in rows.outputs if o["request_id"] in parents]
                waiting = _Rows(outputs=[o for o in rows.outputs if o["request_id"] not in parents])
                outputs, skipped_o = _new_only(session, Output, ready)
                if outputs:
                    supersede_lost(session, outputs)  # a late real outcome replaces `lost`
                    session.execute(insert(Output), outputs)
        except IntegrityError as exc:
            self._dead_letter(rows, exc)
            return _Rows()
        expired = _Rows(
            outputs=[o for o in waiting.outputs if utcnow() - o["created_at"] > ORPHAN_TTL]
        )
        if expired.outputs:
            self._dead_letter(expired, "no request row arrived for these outputs")
            waiting.outputs = [o for o in waiting.outputs if o not in expired.outputs]
        inserted = len(requests) + len(outputs)
        if source == "journal":  # a dead replica's journal: most of it was committed already
            self.counters.journal_replayed += inserted
            log.info(
                "journal_replayed",
                rows=inserted,
                already_in_sql=skipped_r + skipped_o,
                waiting=len(waiting),
            )
            return waiting
        self.counters.replayed += inserted
        self.counters.replay_duplicates += skipped_r + skipped_o
        self.outage.replayed(inserted, skipped_r + skipped_o)
        log.info(
            "spill_replayed", rows=inserted, duplicates=skipped_r + skipped_o, waiting=len(waiting)
        )
        return waiting

    def _dead_letter(self, rows: _Rows, why: object) -> None:
        """Rows SQL will never take (schema drift, a lost parent): kept in a file, loudly."""
        self.counters.dead_letters += len(rows)
        dead = self.spill.directory / "dead-letters.jsonl"
        with dead.open("a", encoding="utf-8") as handle:
            handle.write("".join(json.dumps(r) + "\n" for r in rows.as_spill()))
        log.error(
            "replay_dead_letters",
            rows=len(rows),
            file=str(dead),
            error=str(getattr(why, "orig", why)),
        )

    def _db_down(self, exc: Exception) -> None:
        self._next_db_attempt = time.monotonic() + self._retry_interval
        self.counters.db_failures += 1
        self.outage.down(one_line(exc))

    def _db_up(self) -> None:
        # Only during an outage: `pending` scans the spill directory, too dear for every batch.
        if self.outage.active and not self.spill.pending():
            self.outage.up()


# What "the database cannot take this now" looks like: a driver error, or a transaction the
# watchdog interrupted because the database stopped answering.
UNAVAILABLE = (DBAPIError, TransactionTimeout)


class _Trouble:
    """A failure that may repeat on every call: logged once (an error) when it starts, and
    once (a warning) when a call succeeds again."""

    def __init__(self, failed: str, recovered: str, keys: dict[str, Any]) -> None:
        self._events = (failed, recovered)
        self._keys = keys
        self.active = False

    def failed(self, **fields: Any) -> None:
        if not self.active:
            self.active = True
            log.error(self._events[0], **self._keys, **fields)

    def cleared(self) -> None:
        if self.active:
            self.active = False
            log.warning(self._events[1], **self._keys)


class OutageLog:
    """The story of a database outage in a few events, however long it lasts.

    One `database_unavailable` when it starts, a `database_still_unavailable` reminder at most
    once per `reminder_interval`, and one `database_recovered` with the counts once every
    spilled row is back in SQL. Spills outside an outage (a full queue) are rate-limited the
    same way.
    """

    def __init__(self, reminder_interval: float) -> None:
        self.reminder_interval = reminder_interval
        self.active = False
        self._since = 0.0
        self._last_said = -math.inf
        self._spilled = 0
        self._replayed = 0
        self._duplicates = 0
        self._failures = 0

    def down(self, error: str) -> None:
        now = time.monotonic()
        self._failures += 1
        if not self.active:
            self.active = True
            self._since = now
            self._last_said = now
            self._spilled = self._replayed = self._duplicates = 0
            self._failures = 1
            log.warning("database_unavailable", error=error)
        elif now - self._last_said >= self.reminder_interval:
            self._last_said = now
            log.warning(
                "database_still_unavailable",
                error=error,
                down_s=round(now - self._since, 1),
                spilled=self._spilled,
                attempts=self._failures,
            )

    def spilled(self, rows: int, path: str) -> None:
        self._spilled += rows
        now = time.monotonic()
        if self.active:
            return  # counted, and said by the outage's own events
        if now - self._last_said >= self.reminder_interval:
            self._last_said = now
            log.warning("records_spilled", rows=rows, spill=path, reason="queue_full")

    def replayed(self, rows: int, duplicates: int) -> None:
        self._replayed += rows
        self._duplicates += duplicates

    def up(self) -> None:
        if not self.active:
            return
        self.active = False
        log.warning(
            "database_recovered",
            down_s=round(time.monotonic() - self._since, 1),
            spilled=self._spilled,
            replayed=self._replayed,
            duplicates=self._duplicates,
            attempts=self._failures,
        )


def _existing(session: Any, table: type[Request] | type[Output], ids: set[str]) -> set[str]:
    found: set[str] = set()
    ordered = sorted(ids)
    for start in range(0, len(ordered), 500):
        chunk = ordered[start : start + 500]
        found |= set(session.scalars(select(table.id).where(table.id.in_(chunk))))
    return found


def _new_only(
    session: Any, table: type[Request] | type[Output], rows: list[dict[str, Any]]
) -> tuple[list[dict[str, Any]], int]:
    """Rows whose ids are not in the database yet (replay must not insert twice)."""
    existing = _existing(session, table, {r["id"] for r in rows})
    fresh = [r for r in rows if r["id"] not in existing]
    return fresh, len(rows) - len(fresh)
