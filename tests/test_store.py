"""Migrations and the compare-and-swap, on SQLite and PostgreSQL."""

from __future__ import annotations

import subprocess
import sys
import threading
from datetime import UTC, datetime

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, select

from controller.rollout.state_machine import Command, Refusal, Verb, decide
from controller.rollout.transitions import (
    CONFLICT,
    Applied,
    _persist,
    apply_command,
    evidence_for,
    view_of,
)
from controller.storage.store import Store
from controller.storage.tables import Base, Rollout, RolloutEvent
from tests.conftest import base_config, prepare_rollout, write_config

TABLES = {
    "rollouts",
    "rollout_events",
    "requests",
    "outputs",
    "scores",
    "verdicts",
    "controller_leases",
}


def test_migrations_upgrade_from_empty_and_downgrade_to_base(db_url):
    store = Store(db_url)
    try:
        assert not TABLES & set(inspect(store.engine).get_table_names())
        store.upgrade()
        assert TABLES <= set(inspect(store.engine).get_table_names())
        assert store.current_revision() is not None
        with store.engine.connect() as connection:
            diff = compare_metadata(
                MigrationContext.configure(connection, opts={"compare_type": False}), Base.metadata
            )
        assert diff == [], f"tables.py and migrations/ disagree: {diff}"
        store.downgrade("base")
        assert not TABLES & set(inspect(store.engine).get_table_names())
        assert store.current_revision() is None
        store.upgrade()  # and back up again, so downgrade left nothing behind that blocks it
        assert TABLES <= set(inspect(store.engine).get_table_names())
    finally:
        store.close()


def test_sqlite_runs_in_wal_mode_with_busy_timeout(sqlite_url):
    store = Store(sqlite_url)
    with store.engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert connection.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 5000
    store.close()


def _prepared(tmp_path, db_url):
    path = write_config(tmp_path, base_config(db_url))
    config, store = prepare_rollout(path)
    return path, config, store


def _rollout(store, name):
    with store.reader() as session:
        row = session.scalars(select(Rollout).where(Rollout.name == name)).one()
        events = session.scalars(
            select(RolloutEvent).where(RolloutEvent.rollout_id == row.id)
        ).all()
        return row, events


def test_transition_writes_one_cas_update_and_one_event(tmp_path, db_url):
    _, config, store = _prepared(tmp_path, db_url)
    result = apply_command(store, config, Command(Verb.ADVANCE, force=True, reason="test"), "alice")
    assert isinstance(result, Applied)
    row, events = _rollout(store, config.name)
    assert (row.state, row.stage_index, row.version) == ("canary", 1, 2)
    last = max(events, key=lambda e: e.version)
    assert (last.actor, last.verb, last.from_stage, last.to_stage, last.forced, last.reason) == (
        "alice",
        "advance",
        "shadow",
        "10",
        True,
        "test",
    )
    assert last.at.tzinfo is not None and last.at <= datetime.now(UTC)
    store.close()


def test_ten_concurrent_threads_move_exactly_one_stage(tmp_path, db_url):
    _, config, store = _prepared(tmp_path, db_url)
    barrier = threading.Barrier(10)
    results: list[Applied | Refusal] = []
    lock = threading.Lock()

    def worker(i: int) -> None:
        barrier.wait()
        result = apply_command(
            store,
            config,
            Command(Verb.ADVANCE, force=True, reason=f"thread {i}"),
            f"op{i}",
            expected_stage="shadow",
        )
        with lock:
            results.append(result)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    winners = [r for r in results if isinstance(r, Applied)]
    losers = [r for r in results if isinstance(r, Refusal)]
    assert len(results) == 10 and len(winners) == 1
    assert all(
        r.kind == "conflict" and "state changed" in r.reason and "re-read" in r.reason
        for r in losers
    )
    row, events = _rollout(store, config.name)
    assert (row.stage_index, row.version) == (1, 2)
    assert [e.verb for e in sorted(events, key=lambda e: e.version)] == ["init", "advance"]
    store.close()


def test_ten_concurrent_processes_move_exactly_one_stage(tmp_path, db_url):
    path, config, store = _prepared(tmp_path, db_url)
    cmd = [
        sys.executable,
        "-m",
        "controller",
        "-c",
        str(path),
        "advance",
        "--from",
        "shadow",
        "--force",
        "--reason",
        "race",
    ]
    procs = [
        subprocess.Popen(
            [*cmd[:3], *cmd[3:5], "--actor", f"proc{i}", *cmd[5:]],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(10)
    ]
    outcomes = [(p.wait(timeout=120), p.stdout.read(), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _, _ in outcomes)
    assert codes == [0] + [2] * 9, outcomes
    for code, _, stderr in outcomes:
        if code == 2:
            assert "state changed" in stderr and "re-read" in stderr.replace("\n", " "), stderr
        assert "Traceback" not in stderr
    row, events = _rollout(store, config.name)
    assert (row.stage_index, row.version, len(events)) == (1, 2, 2)
    store.close()


def test_conflict_message_is_returned_when_version_moved(tmp_path, sqlite_url):
    _, config, store = _prepared(tmp_path, sqlite_url)
    with store.reader() as session:
        stale = session.scalars(select(Rollout)).one()
        evidence = evidence_for(session, stale, config)
    apply_command(store, config, Command(Verb.PAUSE), "bob")
    view = view_of(stale)
    decision = decide(view, Command(Verb.ROLLBACK, reason="x"), evidence)
    result = _persist(
        store,
        config.notifications,
        stale,
        view,
        Command(Verb.ROLLBACK, reason="x"),
        decision,
        evidence,
        "carol",
        datetime.now(UTC),
    )
    assert isinstance(result, Refusal) and result.reason == CONFLICT
    row, events = _rollout(store, config.name)
    assert row.state == "paused" and len(events) == 2
    store.close()


@pytest.mark.parametrize("verb", ["advance", "rollback"])
def test_unprepared_database_gets_a_clear_message(tmp_path, verb):
    path = write_config(tmp_path, base_config(f"sqlite:///{tmp_path / 'empty.db'}"))
    result = subprocess.run(
        [sys.executable, "-m", "controller", "-c", str(path), verb, "--reason", "x"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "cutover init" in result.stderr and "Traceback" not in result.stderr


def test_a_transaction_past_its_timeout_is_interrupted_by_the_shared_watchdog(sqlite_url):
    """A statement that would run for many seconds ends with TransactionTimeout at its deadline."""
    from sqlalchemy import text

    from controller.storage.store import TransactionTimeout

    store = Store(sqlite_url)
    # Bounded, so a watchdog that never fires fails this test in seconds, never hangs it.
    slow = text(
        "WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n WHERE x < 100000000) "
        "SELECT count(*) FROM n"
    )
    with pytest.raises(TransactionTimeout, match="within 0.2s"):
        with store.session(timeout=0.2) as session:
            session.execute(slow)
    with store.session(timeout=5) as session:  # the pool gave back a working connection
        assert session.execute(text("SELECT 1")).scalar() == 1
    store.close()


def test_disarmed_watches_never_fire_and_are_dropped_when_reached():
    from controller.storage.watchdog import Watchdog

    fired = []

    class Connection:  # what interrupt() is given; a real one is tested above
        pass

    now = [0.0]
    dog = Watchdog(clock=lambda: now[0], threaded=False)  # the test alone calls due()
    watches = [dog.watch(Connection(), timeout) for timeout in (100.0, 200.0, 300.0)]
    for watch in watches:
        watch.fire = lambda w=watch: fired.append(w)  # type: ignore[method-assign]
    assert watches[0].stop() is False  # disarmed before its deadline
    now[0] = 250.0
    due = dog.due()
    assert due == [watches[1]]  # the armed one past its deadline; the disarmed one dropped
    assert dog.pending() == 1  # the third, not due yet
    now[0] = 400.0
    watches[2].stop()
    assert dog.due() == [] and dog.pending() == 0
