"""The recorder loses nothing and writes nothing twice, whatever the database does."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import threading
import time
import uuid

import pytest
import structlog
from sqlalchemy import create_engine, func, select, text
from sqlalchemy.engine import make_url

from controller.storage.artifacts import artifact_path
from controller.storage.recorder import Recorder, _Rows
from controller.storage.records import OutputRecord, RequestRecord
from controller.storage.store import Store
from controller.storage.tables import Output, Request, utcnow
from tests.conftest import (
    base_config,
    postgres_admin_url,
    prepare_rollout,
    wait_until,
    write_config,
)


@pytest.fixture
def prepared(tmp_path, db_url):
    config, store = prepare_rollout(write_config(tmp_path, base_config(db_url)))
    yield config, store
    store.close()


@pytest.fixture(autouse=True)
def _close_recorders(monkeypatch):
    """A failed assertion must not leave a writer thread retrying a dropped database."""
    yield
    while _made:
        recorder = _made.pop()
        if recorder._thread.is_alive():
            recorder.close(timeout=5)


def make_recorder(config, tmp_path, **kwargs):
    recorder = Recorder(
        config.resolved_database_url,
        tmp_path / "artifacts",
        tmp_path / "spill",
        flush_interval=0.05,
        retry_interval=0.2,
        **kwargs,
    )
    _made.append(recorder)
    return recorder


_made: list[Recorder] = []


def pair(config, i, png=b"\x89PNG fake"):
    request_id = str(uuid.uuid4())
    request = RequestRecord(
        id=request_id,
        rollout=config.name,
        route="generate",
        stage="shadow",
        primary_role="incumbent",
        sticky_key=f"u{i}",
        prompt=f"prompt {i}",
        params={"size": "64x64"},
        seed=i,
        mirrored=True,
        created_at=utcnow(),
    )
    outputs = [
        OutputRecord(
            id=str(uuid.uuid4()),
            request_id=request_id,
            role=role,
            image_index=0,
            is_primary=role == "incumbent",
            status="ok",
            created_at=utcnow(),
            latency_ms=12.5,
        )
        for role in ("incumbent", "candidate")
    ]
    return request, outputs, png + str(i).encode()


def send(recorder, config, start, count):
    ids = []
    for i in range(start, start + count):
        request, outputs, png = pair(config, i)
        recorder.record(request)
        for output in outputs:
            recorder.record(output, png=png)
        ids.append(request.id)
    return ids


def counts(store):
    with store.reader() as session:
        return (
            session.scalar(select(func.count()).select_from(Request)),
            session.scalar(select(func.count()).select_from(Output)),
            session.scalar(select(func.count(func.distinct(Output.id))).select_from(Output)),
        )


def test_images_are_stored_before_record_returns_and_rows_share_transactions(
    tmp_path, prepared, monkeypatch
):
    """The writer thread only talks SQL: an image's file is written by the caller of
    `record`, so it is on disk before the request is answered (a killed replica's journal
    names only images that exist). Rows that queue up while a transaction commits go in
    the next one together."""
    from controller.storage import artifact_store as module

    config, store = prepared
    writers: set[str] = set()
    original_store = module.store_artifact

    def spying_store(root, data):
        writers.add(threading.current_thread().name)
        return original_store(root, data)

    monkeypatch.setattr(module, "store_artifact", spying_store)
    first_commit, released = threading.Event(), threading.Event()
    original_insert = Recorder._insert

    first_rows = []

    def slow_first_insert(self, rows):
        if not first_commit.is_set():
            first_rows.append(len(rows))
            first_commit.set()
            released.wait(30)  # the database is busy: the rest queue up meanwhile
        original_insert(self, rows)

    monkeypatch.setattr(Recorder, "_insert", slow_first_insert)
    recorder = make_recorder(config, tmp_path)
    send(recorder, config, 0, 1)
    assert first_commit.wait(30)
    send(recorder, config, 1, 99)
    assert wait_until(
        lambda: recorder._queue.qsize() + first_rows[0] == 300 and not recorder._artifacts_pending
    )
    released.set()
    assert recorder.flush(30)
    recorder.close()
    assert counts(store) == (100, 200, 200)
    assert writers == {threading.current_thread().name}, writers
    assert recorder.counters.batches == 2  # the first rows, then all that queued behind them
    with store.reader() as session:
        shas = set(session.scalars(select(Output.artifact_sha256)))
    assert None not in shas  # identical images stored by two writers at once: both named
    assert all(artifact_path(tmp_path / "artifacts", s).exists() for s in shas)


def test_batches_land_in_sql_with_content_addressed_artifacts(tmp_path, prepared):
    config, store = prepared
    recorder = make_recorder(config, tmp_path)
    send(recorder, config, 0, 200)
    assert recorder.flush(30)
    recorder.close()
    assert counts(store) == (200, 400, 400)
    assert recorder.counters.recorded == 600 and recorder.counters.batches < 600
    with store.reader() as session:
        sha = session.scalars(select(Output.artifact_sha256)).first()
    assert artifact_path(tmp_path / "artifacts", sha).exists()
    assert recorder.counters.spilled == 0


def test_sqlite_locked_during_traffic_then_released(tmp_path, sqlite_url):
    config, store = prepare_rollout(write_config(tmp_path, base_config(sqlite_url)))
    recorder = make_recorder(config, tmp_path, sqlite_busy=0.2)
    send(recorder, config, 0, 20)
    assert recorder.flush(30)

    lock = sqlite3.connect(make_url(config.resolved_database_url).database, isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")
    send(recorder, config, 20, 30)
    deadline = time.monotonic() + 20
    while recorder.counters.spilled < 90 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert recorder.counters.spilled == 90, recorder.counters
    lock.execute("COMMIT")
    lock.close()

    send(recorder, config, 50, 10)
    assert recorder.flush(30, include_spill=True)
    recorder.close()
    assert counts(store) == (60, 120, 120)
    # Rows written after the lock lifted may queue behind the spill (order is kept): all replayed once.
    assert recorder.counters.replayed == recorder.counters.spilled >= 90
    assert recorder.counters.recorded + recorder.counters.replayed == 180
    store.close()


@pytest.mark.postgres
def test_postgres_down_during_traffic_then_back(tmp_path, postgres_url):
    config, store = prepare_rollout(write_config(tmp_path, base_config(postgres_url)))
    store.close()
    database = make_url(postgres_url).database
    admin = create_engine(postgres_admin_url(), isolation_level="AUTOCOMMIT")
    recorder = make_recorder(config, tmp_path)
    send(recorder, config, 0, 20)
    assert recorder.flush(30)
    with (
        admin.connect() as conn
    ):  # the database goes away: no new connections, existing ones killed
        conn.execute(text(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS false'))
        conn.execute(
            text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :d"),
            {"d": database},
        )
    try:
        send(recorder, config, 20, 30)
        deadline = time.monotonic() + 20
        while recorder.counters.spilled < 90 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert recorder.counters.spilled == 90, recorder.counters
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true'))
    send(recorder, config, 50, 10)
    assert recorder.flush(30, include_spill=True)
    recorder.close()
    admin.dispose()
    store = Store(config.resolved_database_url)
    assert counts(store) == (60, 120, 120)
    store.close()


def test_replay_after_a_crash_mid_replay_inserts_nothing_twice(tmp_path, prepared):
    """Rows already committed (the crash came before the spill file was cleared) are skipped."""
    config, store = prepared
    recorder = make_recorder(config, tmp_path)
    request, outputs, _ = pair(config, 1)
    rows = _Rows.of([recorder._item(r, None) for r in [request, *outputs]])
    recorder._write(rows)
    recorder.spill.append(rows.as_spill())  # as if the same rows had also been spilled
    assert recorder.flush(30, include_spill=True)
    recorder.close()
    assert counts(store) == (1, 2, 2)
    assert recorder.counters.replay_duplicates == 3 and recorder.counters.replayed == 0


DEAD_RECORDER = """
import sys, os, uuid
from controller.storage.recorder import _Rows
from controller.storage.spill import SpillFile
from pathlib import Path
import json
spill = SpillFile(Path(sys.argv[1]))
spill.append(json.loads(sys.argv[2]))
os._exit(0)  # dies without replaying or cleaning up
"""


def test_spill_of_a_dead_recorder_is_adopted_and_replayed(tmp_path, prepared):
    config, store = prepared
    probe = make_recorder(config, tmp_path)
    request, outputs, _ = pair(config, 5)
    rows = _Rows.of([probe._item(r, None) for r in [request, *outputs]])
    probe.close()
    import json

    subprocess.run(
        [sys.executable, "-c", DEAD_RECORDER, str(tmp_path / "spill"), json.dumps(rows.as_spill())],
        check=True,
        env=os.environ | {"PYTHONPATH": os.getcwd()},
    )
    orphans = list((tmp_path / "spill").glob("spill-*.jsonl"))
    assert len(orphans) == 1 and orphans[0].stat().st_size > 0
    recorder = make_recorder(config, tmp_path)
    assert recorder.flush(30, include_spill=True)
    recorder.close()
    assert counts(store) == (1, 2, 2)
    assert not list((tmp_path / "spill").glob("spill-*.jsonl"))


def test_record_never_blocks_and_overflow_spills(tmp_path, prepared):
    config, store = prepared
    recorder = make_recorder(config, tmp_path, max_queue=5)
    started = time.perf_counter()
    threads = [threading.Thread(target=send, args=(recorder, config, i * 50, 50)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert time.perf_counter() - started < 30
    assert recorder.flush(30, include_spill=True)
    recorder.close()
    assert counts(store) == (200, 400, 400)


def spill_files(tmp_path):
    return sorted((tmp_path / "spill").glob("spill-*.jsonl"))


@pytest.mark.postgres
def test_postgres_stalled_without_refusing_spills_within_the_write_timeout(tmp_path, postgres_url):
    """A partition: the server accepts the connection, then nothing comes back. Records must
    spill within the write timeout, and land exactly once after the network heals."""
    from controller.config import DatabaseConfig
    from tests.stall_proxy import StallProxy

    config, store = prepare_rollout(write_config(tmp_path, base_config(postgres_url)))
    url = make_url(postgres_url)
    proxy = StallProxy((url.host, url.port or 5432))
    through_proxy = url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    timeouts = DatabaseConfig(connect_timeout=2, write_timeout=1.5)
    recorder = make_recorder(config, tmp_path, timeouts=timeouts)
    recorder.store.close()
    recorder.store = Store(through_proxy, timeouts, pre_ping=False)
    with structlog.testing.capture_logs() as logs:
        send(recorder, config, 0, 20)
        assert recorder.flush(30)
        proxy.stall()
        stalled = time.monotonic()
        send(recorder, config, 20, 30)
        assert wait_until(lambda: recorder.counters.spilled >= 90, 20), recorder.counters
        took = time.monotonic() - stalled
        # Let it retry through the stall a few times: one spill file, one unavailable event.
        assert wait_until(lambda: recorder.counters.db_failures >= 4, 30), recorder.counters
        assert len(spill_files(tmp_path)) == 1
        proxy.resume()
        send(recorder, config, 50, 10)
        assert recorder.flush(60, include_spill=True)
    recorder.close()
    proxy.close()
    assert took < 1.5 + 2 + 2, f"spilling took {took:.1f}s after the stall began"
    assert counts(store) == (60, 120, 120)  # nothing lost, nothing twice
    events = [e["event"] for e in logs]
    assert events.count("database_unavailable") == 1 and events.count("database_recovered") == 1
    recovered = next(e for e in logs if e["event"] == "database_recovered")
    assert recovered["spilled"] >= 90 and recovered["replayed"] + recovered["duplicates"] >= 90
    store.close()


def test_an_outage_logs_a_few_lines_and_leaves_one_spill_file(tmp_path, sqlite_url):
    """Before: each 1 s retry rotated a new spill file and retried all of them, each logging
    once (154 lines in a 20 s outage). Now: one file, one event at each end, reminders
    rate-limited, however many retries the outage lasts."""
    config, store = prepare_rollout(write_config(tmp_path, base_config(sqlite_url)))
    recorder = make_recorder(config, tmp_path, sqlite_busy=0.05, reminder_interval=3600)
    recorder._retry_interval = 0.02
    lock = sqlite3.connect(make_url(config.resolved_database_url).database, isolation_level=None)
    with structlog.testing.capture_logs() as logs:
        lock.execute("BEGIN EXCLUSIVE")
        for batch in range(5):
            send(recorder, config, batch * 10, 10)
            failures = recorder.counters.db_failures
            assert wait_until(lambda f=failures: recorder.counters.db_failures >= f + 5)
        assert len(spill_files(tmp_path)) == 1
        lock.execute("COMMIT")
        assert recorder.flush(30, include_spill=True)
    lock.close()
    recorder.close()
    assert counts(store) == (50, 100, 100)
    assert recorder.counters.db_failures >= 25
    warnings = [e["event"] for e in logs if e["log_level"] in ("warning", "error")]
    assert warnings == ["database_unavailable", "database_recovered"], warnings
    assert not spill_files(tmp_path)
    store.close()


def test_empty_spill_files_of_dead_recorders_are_removed(tmp_path, prepared):
    config, _ = prepared
    spill = tmp_path / "spill"
    spill.mkdir()
    dead = spill / "spill-deadhost-1-abc.jsonl"
    dead.write_text("")
    live = make_recorder(config, tmp_path)
    assert not dead.exists()
    # A live recorder's empty file is locked: another recorder leaves it alone.
    other = make_recorder(config, tmp_path)
    assert live.spill.path.exists() and other.spill.path.exists()


def test_only_a_mirrored_request_of_a_rollout_waits_for_the_judge(tmp_path, prepared):
    """The recorder writes each request's judge progress itself (COPY applies no defaults)."""
    import dataclasses

    from controller.storage.tables import JUDGE_DONE, JUDGE_PENDING

    config, store = prepared
    recorder = make_recorder(config, tmp_path)
    mirrored, _, _ = pair(config, 0)
    unmirrored = dataclasses.replace(pair(config, 1)[0], mirrored=False)
    no_rollout = dataclasses.replace(pair(config, 2)[0], rollout=None, stage="none")
    for request in (mirrored, unmirrored, no_rollout):
        recorder.record(request)
    assert recorder.flush(30)
    recorder.close()
    with store.reader() as session:
        progress = dict(session.execute(select(Request.id, Request.judge_progress)).all())
    assert progress == {
        mirrored.id: JUDGE_PENDING,
        unmirrored.id: JUDGE_DONE,
        no_rollout.id: JUDGE_DONE,
    }


KILLED_RECORDER = """
import json, sys, threading, types
from pathlib import Path
from controller.storage.recorder import Recorder
from tests.test_recorder import send
url, artifacts, spill, name = sys.argv[1:5]
config = types.SimpleNamespace(name=name)
recorder = Recorder(url, Path(artifacts), Path(spill), flush_interval=0.05)
committed = send(recorder, config, 0, 10)
assert recorder.flush(30)
never = threading.Event()
Recorder._insert = lambda self, rows: never.wait()  # the database stops answering
waiting = send(recorder, config, 10, 40)
print(json.dumps({"committed": committed, "waiting": waiting}), flush=True)
never.wait()
"""


def test_a_recorder_killed_with_rows_in_memory_loses_none_and_writes_none_twice(tmp_path, prepared):
    """kill -9 of a replica whose writer holds 40 pairs not yet committed (10 are): the next
    recorder on the node adopts the dead one's journal, inserts exactly what SQL lacks, and
    deletes it. A line cut short by the kill is skipped, not fatal."""
    config, store = prepared
    child = subprocess.Popen(
        [sys.executable, "-c", KILLED_RECORDER, config.resolved_database_url,
         str(tmp_path / "artifacts"), str(tmp_path / "spill"), config.name],
        stdout=subprocess.PIPE,
        text=True,
        env=os.environ | {"PYTHONPATH": os.getcwd()},
    )  # fmt: skip
    import json
    import signal

    ids = json.loads(child.stdout.readline())  # every record has been handed over
    child.send_signal(signal.SIGKILL)
    child.wait(30)
    assert counts(store) == (10, 20, 20)
    (journal,) = [p for p in (tmp_path / "spill").glob("journal-*.jsonl") if p.stat().st_size]
    with journal.open("a") as handle:
        handle.write('{"kind": "output", "id": "torn')
    recorder = make_recorder(config, tmp_path)
    assert wait_until(lambda: counts(store) == (50, 100, 100))
    assert recorder.flush(30, include_spill=True)
    assert recorder.counters.journal_replayed == 40 * 3
    assert not journal.exists()
    with store.reader() as session:
        recorded = set(session.scalars(select(Request.id)))
        shas = set(session.scalars(select(Output.artifact_sha256)))
    assert recorded == set(ids["committed"]) | set(ids["waiting"])
    assert None not in shas and len(shas) == 50  # the two images of a pair are the same
    assert all(artifact_path(tmp_path / "artifacts", s).exists() for s in shas)


def test_the_journal_forgets_what_is_committed(tmp_path):
    """A segment is emptied once all its rows are done, and a rotated one deleted: a
    replica's journal holds only what is still in memory."""
    from controller.storage.journal import Journal

    journal = Journal(tmp_path, rotate_bytes=200)
    segments = [
        journal.append({"kind": "request", "id": f"r{i}", "pad": "x" * 40}) for i in range(8)
    ]
    files = sorted(tmp_path.glob("journal-*.jsonl"))
    assert len(files) == 3 and len(set(map(id, segments))) == 3
    for segment in segments[:4]:  # the first segment's rows (3) and one of the second's
        journal.done(segment)
    assert not files[0].exists() and files[1].exists()
    for segment in segments[4:]:
        journal.done(segment)
    assert not files[1].exists()
    assert files[2].exists() and files[2].stat().st_size == 0  # the current one, emptied
    assert journal.orphans() == []  # its own files are locked: never adopted by itself
    journal.close()
    assert not list(tmp_path.glob("journal-*.jsonl"))


def test_rows_wait_in_memory_while_neither_sql_nor_the_spill_disk_takes_them(
    tmp_path, sqlite_url, monkeypatch
):
    """A database outage on a full disk: the journal and the spill file both fail with
    ENOSPC, so the rows stay in the recorder's memory and go to SQL once it is back; one
    log line each way, none dropped. (tests/test_chaos.py does this with a real full tmpfs.)"""
    import errno

    from controller.storage.journal import Journal
    from controller.storage.spill import SpillFile

    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    config, store = prepare_rollout(write_config(tmp_path, base_config(sqlite_url)))
    recorder = make_recorder(config, tmp_path, sqlite_busy=0.05)
    lock = sqlite3.connect(make_url(config.resolved_database_url).database, isolation_level=None)
    with structlog.testing.capture_logs() as logs:
        lock.execute("BEGIN EXCLUSIVE")
        monkeypatch.setattr(SpillFile, "append", full)
        monkeypatch.setattr(Journal, "append", full)
        send(recorder, config, 0, 20)
        assert wait_until(lambda: recorder.counters.db_failures >= 3)
        assert len(recorder._held) == 60 and not recorder.flush(0.2)
        lock.execute("COMMIT")
        assert recorder.flush(30)
    lock.close()
    recorder.close()
    assert counts(store) == (20, 40, 40)
    assert recorder.counters.spilled == 0 and recorder.counters.dropped == 0
    assert recorder.counters.journal_failures == 60
    events = [e["event"] for e in logs if e["log_level"] in ("warning", "error", "info")]
    assert events.count("spill_write_failed") == 1 and "spill_write_recovered" in events
    assert events.count("journal_write_failed") == 1
    store.close()
