"""The chaos suite's faults, asserted: nothing lost, nothing twice, no double transition.

Each test runs one fault of bench/chaos.py on the session's Ray, with real kills (SIGKILL),
a real PostgreSQL refusing connections, SQLite's write lock held by another process, moto's
S3 server stalled behind a proxy, and a full tmpfs. An outage lasts until eight more
requests are answered (not a wall-clock time); kills land after a random number of
answers, or at a random line of the loop's log. `python -m bench.chaos` prints the table.
"""

from __future__ import annotations

import os

import pytest

from tests.conftest import postgres_admin_url

ANSWERS = 8


@pytest.fixture(scope="module")
def rig(ray_serve, tmp_path_factory):
    from bench.chaos import Rig

    rig = Rig(tmp_path_factory.mktemp("chaos"), port=ray_serve)
    yield rig
    rig.close()


def run(rig, fault: str, seed: int = 17) -> dict:
    from bench.chaos import run_fault, table

    result = run_fault(rig, fault, seconds=None, answers=ANSWERS, seed=seed)
    print(table([result]))
    return result


def promises_kept(result: dict) -> None:
    """What the docs promise for every fault (docs/sre-guide.md, "Faults and what they cost")."""
    assert result["lost"] == 0, result
    assert result["duplicated"] == 0, result
    assert result["refused recorded"] == 0, result  # a 4xx writes nothing
    assert result["transitions duplicated"] == 0, result
    assert result["recover s"] is not None, result
    assert result["4xx"] > 0 and result["2xx"] > 2 * ANSWERS, result


def test_a_router_replica_killed_mid_traffic_loses_no_record(rig):
    result = run(rig, "router_kill")
    promises_kept(result)
    # Only requests in flight on the killed replica fail (one per client at most).
    assert result["5xx"] + result["no answer"] <= 3, result


def test_a_model_replica_killed_mid_traffic_costs_no_user_an_error(rig):
    result = run(rig, "model_kill")
    promises_kept(result)
    assert result["5xx"] == 0 and result["no answer"] == 0, result  # the incumbent answers
    assert result["mirrors cut short"] == 0, result


def test_the_loop_killed_three_times_takes_no_transition_twice(rig):
    result = run(rig, "loop_kill")
    promises_kept(result)
    assert result["transitions"] > 0, result  # the rollout moved while its loop was killed
    assert result["5xx"] == 0, result


def test_postgresql_refusing_connections_loses_nothing(rig, monkeypatch):
    import bench.chaos

    monkeypatch.setattr(bench.chaos, "PG_ADMIN", postgres_admin_url())
    result = run(rig, "db_outage_pg")
    promises_kept(result)
    assert result["spilled"] > 0, result  # the outage bit: rows waited in the spill file
    assert result["5xx"] == 0, result


def test_sqlite_locked_by_another_writer_loses_nothing(rig):
    result = run(rig, "db_outage_sqlite")
    promises_kept(result)
    assert result["spilled"] > 0, result
    assert result["5xx"] == 0, result


def test_an_object_store_outage_loses_no_image(rig):
    result = run(rig, "object_store")
    promises_kept(result)  # `lost` counts images not in the bucket too
    assert result["5xx"] == 0, result


def test_a_full_spill_disk_during_a_database_outage_loses_nothing(rig):
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("the disk-full fault mounts a tmpfs, which needs root; CI runs as root")
        pytest.skip("the disk-full fault mounts a tmpfs: run as root")
    result = run(rig, "spill_disk_full")
    promises_kept(result)
    # Neither the journal nor the spill file could be written: the rows waited in memory.
    assert result["journal failures"] > 0 and result["spilled"] == 0, result
    assert result["dropped"] == 0 and result["5xx"] == 0, result
