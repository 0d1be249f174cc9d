"""Revisions 0005 to 0008 carry a database of the 0004 schema forward: its rollout becomes
the `generate` route's rollout, no row is lost, the incremental judge folds its old pairs
once, and the two-model config keeps working on it."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import func, select, text

from controller.config import load_config
from controller.review.status import deployment_status
from controller.rollout.loop import RolloutController
from controller.rollout.state_machine import Command, Verb
from controller.rollout.transitions import apply_command, get_rollout
from controller.storage.store import Store
from controller.storage.tables import (
    JUDGE_DONE,
    Output,
    Request,
    Rollout,
    RolloutEvent,
    Score,
    StoredJudgeState,
    Verdict,
    utcnow,
)
from tests.conftest import base_config, write_config

TABLES = (Rollout, RolloutEvent, Request, Output, Score, Verdict)


def fill_previous_schema(store: Store, name: str, requests: int) -> None:
    """What a 0004 database holds after some shadow traffic: written with that schema's
    columns only (no route, no model, no fallback link)."""
    now = utcnow() - timedelta(minutes=5)
    with store.engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO rollouts (id, name, state, stage_index, stages, stage_entered_at, "
                "incumbent, candidate, version, created_at, updated_at) VALUES (1, :name, "
                "'shadowing', 0, :stages, :now, 'org/a', 'org/b', 1, :now, :now)"
            ),
            {"name": name, "stages": '[["shadow", 0], ["10", 10], ["100", 100]]', "now": now},
        )
        conn.execute(
            text(
                "INSERT INTO rollout_events (rollout_id, version, at, actor, verb, to_state, "
                "to_stage, reason, forced) VALUES (1, 1, :now, 'alice', 'init', 'shadowing', "
                "'shadow', 'start', false)"
            ),
            {"now": now},
        )
        for i in range(requests):
            conn.execute(
                text(
                    "INSERT INTO requests (id, rollout_id, stage, primary_role, sticky_key, prompt, "
                    "params, seed, mirrored, created_at) VALUES (:id, 1, 'shadow', 'incumbent', "
                    ":user, 'a fox', '{}', :i, true, :now)"
                ),
                {"id": f"r{i}", "user": f"u{i}", "i": i, "now": now},
            )
            for role in ("incumbent", "candidate"):
                conn.execute(
                    text(
                        "INSERT INTO outputs (id, request_id, role, image_index, is_primary, status, "
                        "latency_ms, oom_count, batch_ooms, created_at, timeout_s) VALUES "
                        "(:id, :rid, :role, 0, :primary, 'ok', 100, 0, 0, :now, 60)"
                    ),
                    {
                        "id": f"o{i}{role[0]}",
                        "rid": f"r{i}",
                        "role": role,
                        "primary": role == "incumbent",
                        "now": now,
                    },
                )
            conn.execute(
                text(
                    "INSERT INTO scores (output_id, probe, value, created_at) "
                    "VALUES (:o, 'colour_shift_de', 1.5, :now)"
                ),
                {"o": f"o{i}c", "now": now},
            )
        conn.execute(
            text(
                "INSERT INTO verdicts (rollout_id, stage, evaluated_at, decision, samples, checks) "
                "VALUES (1, 'shadow', :now, 'INCONCLUSIVE', 3, '[]')"
            ),
            {"now": now},
        )


def counts(store: Store) -> dict[str, int]:
    with store.reader() as session:
        return {
            t.__tablename__: session.scalar(select(func.count()).select_from(t)) for t in TABLES
        }


def test_a_database_of_the_previous_schema_is_carried_forward(tmp_path, db_url):
    path = write_config(tmp_path, base_config(db_url, stages=["shadow", 10, 100]))
    config = load_config(path)
    store = Store(config.resolved_database_url)
    store.upgrade("0004")
    fill_previous_schema(store, config.name, requests=12)
    before = {
        "rollouts": 1,
        "rollout_events": 1,
        "requests": 12,
        "outputs": 24,
        "scores": 12,
        "verdicts": 1,
    }
    assert counts(store) == before

    store.upgrade()
    assert store.current_revision() == "0009"
    assert counts(store) == before  # no row lost
    with store.reader() as session:
        row = get_rollout(session, config.name)
        assert row.route == "generate"
        assert set(session.scalars(select(Request.route))) == {"generate"}
        assert set(session.scalars(select(Output.model))) == {None}
        overview = deployment_status(session, config)
    # The two-model config reads the migrated rollout as its generate route's.
    (route,) = overview["routes"]
    assert (route["route"], route["rollout"], route["state"]) == (
        "generate",
        config.name,
        "shadowing",
    )
    assert overview["rollouts"][0]["gates"]["samples"]["have"] == 12

    # ... and acts on it: the loop judges the old pairs, a verb moves it with a CAS.
    result = RolloutController(config, store).tick()
    assert result.leader and result.verdict is not None
    with store.reader() as session:
        assert set(session.scalars(select(Request.judge_progress))) == {JUDGE_DONE}
        assert session.get(StoredJudgeState, row.id).state["units"] == 12
    applied = apply_command(
        store, config, Command(Verb.ADVANCE, force=True, reason="migrated"), "alice"
    )
    assert applied.to_stage == "10"
    store.close()
