"""Requests whose router died get a `lost` outcome, so counts add up; a late real output
replaces it; the judge never counts it as evidence."""

from __future__ import annotations

import uuid
from datetime import timedelta

from sqlalchemy import select

from controller.rollout.analysis import load_window
from controller.rollout.loop import RolloutController
from controller.rollout.transitions import get_rollout
from controller.storage.recorder import Recorder, _Rows
from controller.storage.records import OutputRecord
from controller.storage.tables import Output, StoredJudgeState, utcnow
from tests.conftest import add_request, base_config, prepare_rollout, write_config


def add_mirrored(session, rollout_id, created_at, *, n=1, outputs=()):
    """A mirrored request of `n` images with the given (role, index) outputs recorded."""
    request_id = add_request(
        session, rollout_id, params={"n": n}, mirrored=True, created_at=created_at
    ).id
    for role, index in outputs:
        session.add(
            Output(
                id=str(uuid.uuid4()),
                request_id=request_id,
                role=role,
                image_index=index,
                is_primary=role == "incumbent",
                status="ok",
                latency_ms=100.0,
                created_at=created_at,
            )
        )
    return request_id


def outcomes(store, request_id):
    with store.reader() as session:
        rows = session.scalars(select(Output).where(Output.request_id == request_id)).all()
        return sorted((o.role, o.image_index, o.status) for o in rows)


def test_requests_whose_router_died_end_as_lost_and_a_late_output_replaces_it(tmp_path, db_url):
    config, store = prepare_rollout(write_config(tmp_path, base_config(db_url)))
    old = utcnow() + timedelta(seconds=1)  # inside the attempt that prepare_rollout began
    now = old + timedelta(minutes=30)
    recent = now - timedelta(seconds=30)
    with store.session() as session:
        rollout_id = get_rollout(session, config.name).id
        # The router died after the primary's first image: image 1 and both mirrors are missing.
        died = add_mirrored(session, rollout_id, old, n=2, outputs=[("incumbent", 0)])
        whole = add_mirrored(session, rollout_id, old, outputs=[("incumbent", 0), ("candidate", 0)])
        in_flight = add_mirrored(session, rollout_id, recent)  # may still be on its way
    loop = RolloutController(config, store)
    assert loop.tick(now).lost == 3
    assert outcomes(store, died) == [
        ("candidate", 0, "lost"),
        ("candidate", 1, "lost"),
        ("incumbent", 0, "ok"),
        ("incumbent", 1, "lost"),
    ]
    assert [s for _, _, s in outcomes(store, whole)] == ["ok", "ok"]
    assert outcomes(store, in_flight) == []
    assert loop.tick(now).lost == 0  # once only
    loop.release()
    restarted = RolloutController(config, store)
    assert restarted.tick(now).leader and restarted.tick(now).lost == 0  # a restarted loop too

    with store.reader() as session:
        window = load_window(session, get_rollout(session, config.name), {})
    # `lost` is no evidence: the request whose router died has no candidate side left, so
    # only the whole request is judged.
    assert [u.request_id for u in window.units] == [whole]
    assert window.units[0].arms["candidate"].statuses == ["ok"]

    # The mirror's real output was in a spill file after all: replay puts it in place of `lost`.
    recorder = Recorder(config.resolved_database_url, tmp_path / "artifacts", tmp_path / "spill")
    late = OutputRecord(
        id=str(uuid.uuid4()),
        request_id=died,
        role="candidate",
        image_index=0,
        is_primary=False,
        status="ok",
        created_at=now,
        latency_ms=120.0,
    )
    rows = _Rows(outputs=[late.__dict__ | {}])
    recorder.spill.append(rows.as_spill())
    assert recorder.flush(30, include_spill=True)
    recorder.close()
    assert recorder.counters.dead_letters == 0 and recorder.counters.replayed == 1
    assert ("candidate", 0, "ok") in outcomes(store, died)
    assert ("candidate", 0, "lost") not in outcomes(store, died)
    with store.reader() as session:
        window = load_window(session, get_rollout(session, config.name), {})
    # Replayed, the died request pairs again on its image 0 (image 1 of both arms stays lost).
    assert sorted(u.request_id for u in window.units) == sorted([died, whole])
    # ... and the loop's judge, which had dropped it for want of a candidate, folds it now.
    assert restarted.tick(now).leader
    with store.reader() as session:
        stored = session.get(StoredJudgeState, rollout_id)
        assert stored.state["units"] == 2
    store.close()
