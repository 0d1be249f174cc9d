"""The incremental judge: folded tick by tick, restarted and crashed half-way, it equals a
recomputation from the raw rows, and its reads do not grow with the attempt's history."""

from __future__ import annotations

import math
import random
import uuid
from datetime import timedelta

import pytest
from sqlalchemy import event, func, select

from controller.rollout import analysis
from controller.rollout.analysis import fold_new, output_facts, recompute
from controller.rollout.transitions import get_rollout
from controller.storage.store import Store
from controller.storage.tables import (
    JUDGE_DONE,
    Output,
    Request,
    Score,
    StoredJudgeState,
    utcnow,
)
from policies.judge import JudgeState, build_window, evaluate, state_of
from policies.policy import load_policy
from tests.conftest import base_config, prepare_rollout, write_config

GPUS = {"incumbent": 1.0, "candidate": 1.0}
STATUSES = ["ok"] * 14 + ["error", "timeout", "oom", "blank"]


def random_history(rng: random.Random, start, requests: int, ticks: int) -> list[list]:
    """Rows grouped by the tick they arrive in: a request, then each arm's images (some a
    few ticks late), then each ok image's scores (later still, some errored, some left out by
    the sampling, a few never settled by the end)."""
    arrivals: list[list] = [[] for _ in range(ticks + 6)]
    for k in range(requests):
        tick = k * ticks // requests
        created = start + timedelta(seconds=k)
        request_id = str(uuid.uuid4())
        mirrored = rng.random() < 0.8
        n = rng.choice((1, 1, 2))
        arrivals[tick].append(
            Request(
                id=request_id,
                stage="shadow",
                primary_role="incumbent",
                sticky_key=f"u{k % 7}",
                prompt='a sign that says "OPEN"',
                params={"n": n},
                seed=k,
                mirrored=mirrored,
                created_at=created,
            )
        )
        roles = ("incumbent", "candidate") if mirrored else ("incumbent",)
        for role in roles:
            late = tick + rng.choice((0, 0, 0, 1, 2))
            slow = 1.4 if role == "candidate" and rng.random() < 0.3 else 1.0
            for index in range(n):
                status = rng.choice(STATUSES)
                output_id = str(uuid.uuid4())
                unsettled = rng.random() < 0.03
                arrivals[late].append(
                    Output(
                        id=output_id,
                        request_id=request_id,
                        role=role,
                        image_index=index,
                        is_primary=role == "incumbent",
                        status=status,
                        latency_ms=rng.lognormvariate(5, 0.4) * slow,
                        queue_ms=rng.choice((0.0, rng.expovariate(0.1))),
                        batch_size=rng.choice((1, 2, 4)),
                        timeout_s=rng.choice((1.0, 60.0)),
                        created_at=created,
                        scored_at=created if status != "ok" else None,
                    )
                )
                if status == "ok" and not unsettled:
                    arrivals[late + rng.choice((0, 1, 3))].append(score_rows(rng, output_id))
    return arrivals


def score_rows(rng: random.Random, output_id: str) -> list:
    rows = []
    for probe, value in (
        ("typography_cer", rng.betavariate(1, 6)),
        ("colour_shift_de", rng.expovariate(0.3)),
    ):
        if rng.random() < 0.25:
            rows.append(Score(output_id=output_id, probe=probe, sampled=False))
        elif rng.random() < 0.02:
            rows.append(Score(output_id=output_id, probe=probe, error="OCR engine failed"))
        else:
            rows.append(Score(output_id=output_id, probe=probe, value=value))
    return rows


def insert(store: Store, rollout_id: int, rows: list) -> None:
    """One tick's arrivals; an output's scores settle it (`scored_at`), as the scorer does."""
    with store.session() as session:
        for row in rows:
            if isinstance(row, Request):
                row.rollout_id = rollout_id
                session.add(row)
                session.flush()
        for row in rows:
            if isinstance(row, Output):
                session.add(row)
        session.flush()
        for row in rows:
            if isinstance(row, list):
                session.add_all(row)
                output = session.get(Output, row[0].output_id)
                output.scored_at = output.created_at
        session.flush()


def same_results(incremental: JudgeState, full: JudgeState) -> None:
    got, want = evaluate(incremental), evaluate(full)
    assert [(r.name, r.decision, r.samples) for r in got] == [
        (r.name, r.decision, r.samples) for r in want
    ]
    for a, b in zip(got, want, strict=True):
        for field in ("estimate", "lower", "upper"):
            x, y = getattr(a, field), getattr(b, field)
            if x is None or y is None or not (math.isfinite(x) and math.isfinite(y)):
                assert x == y, (a.name, field)
            else:
                assert x == pytest.approx(y, rel=1e-9, abs=1e-12), (a.name, field)
    assert incremental.units == full.units and incremental.scored_units == full.scored_units
    assert incremental.to_json()["rates"] == full.to_json()["rates"]
    assert incremental.to_json()["quantiles"] == full.to_json()["quantiles"]
    assert incremental.to_json()["probes"] == full.to_json()["probes"]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_tick_by_tick_with_a_restart_and_a_crash_equals_a_recomputation(
    tmp_path, db_url, monkeypatch, seed
):
    if db_url.startswith("postgresql") and seed != 1:
        pytest.skip("one history is enough on PostgreSQL; the maths is the backend's")
    config, store = prepare_rollout(write_config(tmp_path, base_config(db_url)))
    policy = load_policy()
    rng = random.Random(seed)
    with store.reader() as session:
        rollout = get_rollout(session, config.name)
    arrivals = random_history(rng, utcnow() + timedelta(seconds=1), 400, 12)
    for tick, rows in enumerate(arrivals):
        insert(store, rollout.id, rows)
        if tick == 4:
            # A crash in the middle of a fold: the transaction rolls back, nothing is half-counted.
            def crash(self, unit, rows):
                raise RuntimeError("killed mid-fold")

            with monkeypatch.context() as patch:
                patch.setattr(JudgeState, "fold_scores", crash)
                with pytest.raises(RuntimeError):
                    fold_new(store, rollout, policy, GPUS, chunk=50)
        if tick == 6:
            # A restart: a new process with a new connection pool and nothing in memory.
            store.close()
            store = Store(config.resolved_database_url)
        # Small chunks and a cap: a backlog is caught up over several ticks.
        fold_new(store, rollout, policy, GPUS, chunk=50, max_chunks=3)
    incremental = fold_new(store, rollout, policy, GPUS, chunk=50)
    with store.reader() as session:
        full = recompute(session, rollout, policy, GPUS)
        window = build_window(*raw_rows(session, rollout.id), GPUS)
    same_results(incremental, full)
    assert full.units > 250 and full.scored_units < full.units  # some never settled
    # The window the judge used to build from every row, folded in one pass, agrees too.
    independent = state_of(policy, window)
    assert [(r.decision, r.samples) for r in evaluate(independent)][:4] == [
        (r.decision, r.samples) for r in evaluate(incremental)
    ][:4]
    store.close()


def raw_rows(session, rollout_id: int):
    """Every arm output of the attempt's mirrored requests, and their sampled score rows, as
    the judge read them before it was incremental (a load of the whole history)."""
    rows = session.execute(
        select(Output, Request.mirrored)
        .join(Request, Output.request_id == Request.id)
        .where(
            Request.rollout_id == rollout_id,
            Output.status != "lost",
            Output.role.in_(["incumbent", "candidate"]),
        )
        .order_by(Request.created_at, Request.id, Output.image_index)
    ).all()
    facts = [output_facts(o) for o, _ in rows]
    mirrored = {o.request_id for o, m in rows if m}
    scores = session.execute(
        select(Score.output_id, Score.probe, Score.value, Score.error).where(Score.sampled)
    ).all()
    return facts, mirrored, [tuple(s) for s in scores]


def test_a_tick_reads_only_what_is_new(tmp_path, sqlite_url, monkeypatch):
    """After the history is folded, a tick looks at the pending requests only: the rows its
    queries return do not depend on how many were folded before."""
    config, store = prepare_rollout(write_config(tmp_path, base_config(sqlite_url)))
    policy = load_policy()
    rng = random.Random(9)
    with store.reader() as session:
        rollout = get_rollout(session, config.name)
    start = utcnow() + timedelta(seconds=1)
    for rows in random_history(rng, start, 600, 3):
        insert(store, rollout.id, rows)
    fold_new(store, rollout, policy, GPUS)
    read: list[int] = []
    original = analysis._ready

    def counting(session, requests, gpus):
        read.append(len(requests))
        return original(session, requests, gpus)

    monkeypatch.setattr(analysis, "_ready", counting)
    with store.reader() as session:
        pending = session.scalar(
            select(func.count())
            .select_from(Request)
            .where(Request.rollout_id == rollout.id, Request.judge_progress < JUDGE_DONE)
        )
    with store.engine.begin() as conn:
        conn.exec_driver_sql("ANALYZE")  # the planner, told how few are pending, still must
    statements: list[tuple[str, object]] = []

    def capture(conn, cursor, statement, parameters, context, executemany):
        if "judge_progress <" in statement and statement.lstrip().startswith("SELECT"):
            statements.append((statement, parameters))

    event.listen(store.engine, "before_cursor_execute", capture)
    fold_new(store, rollout, policy, GPUS)
    event.remove(store.engine, "before_cursor_execute", capture)
    assert sum(read) == pending < 60  # the unsettled few, not the 600 folded
    # ... found through the pending index, not by walking the rollout's requests by time.
    with store.engine.connect() as conn:
        for statement, parameters in statements:
            plan = conn.exec_driver_sql("EXPLAIN QUERY PLAN " + statement, parameters).all()
            assert "ix_requests_judge_pending" in str(plan), plan
    for rows in random_history(rng, start + timedelta(hours=1), 30, 1):
        insert(store, rollout.id, rows)
    read.clear()
    fold_new(store, rollout, policy, GPUS)
    assert pending < sum(read) <= pending + 30
    store.close()


def test_a_changed_policy_starts_a_fresh_state_equal_to_a_recomputation(tmp_path, sqlite_url):
    config, store = prepare_rollout(write_config(tmp_path, base_config(sqlite_url)))
    policy = load_policy()
    rng = random.Random(4)
    with store.reader() as session:
        rollout = get_rollout(session, config.name)
    for rows in random_history(rng, utcnow() + timedelta(seconds=1), 200, 2):
        insert(store, rollout.id, rows)
    before = fold_new(store, rollout, policy, GPUS)
    stricter = policy.model_copy(update={"alpha": 0.01})
    after = fold_new(store, rollout, stricter, GPUS)
    with store.reader() as session:
        same_results(after, recompute(session, rollout, stricter, GPUS))
        stored = session.get(StoredJudgeState, rollout.id)
        assert stored.state["units"] == before.units == after.units
    store.close()


def test_the_stage_count_settles_old_requests_once_and_counts_only_the_new(tmp_path, db_url):
    """The `samples` gate from a stored count plus the requests newer than its mark equals
    a count of the whole stage, before and after the mark moves, and a new stage starts at 0."""
    from controller.rollout.analysis import judge_row
    from controller.rollout.stage_count import settle_stage_count, stage_samples
    from controller.rollout.state_machine import Command, Verb
    from controller.rollout.transitions import apply_command
    from tests.conftest import add_request

    config, store = prepare_rollout(write_config(tmp_path, base_config(db_url)))
    start = utcnow() + timedelta(seconds=1)
    with store.session() as session:
        row = get_rollout(session, config.name)
        for k in range(30):
            add_request(session, row.id, created_at=start + timedelta(minutes=k))
        judge_row(session, row.id)
    with store.session() as session:
        row = get_rollout(session, config.name)
        assert stage_samples(session, row) == 30
        settle_stage_count(session, row, start + timedelta(minutes=20))
    with store.session() as session:
        row = get_rollout(session, config.name)
        assert session.get(StoredJudgeState, row.id).stage_count["count"] == 20
        add_request(session, row.id, created_at=start + timedelta(minutes=40))
        assert stage_samples(session, row) == 31
        settle_stage_count(session, row, start + timedelta(minutes=10))  # a mark never goes back
        assert session.get(StoredJudgeState, row.id).stage_count["count"] == 20
    applied = apply_command(store, config, Command(Verb.ADVANCE, force=True, reason="t"), "t")
    with store.session() as session:
        row = get_rollout(session, config.name)
        assert row.stages[row.stage_index][0] == applied.to_stage != "shadow"
        assert stage_samples(session, row) == 0
        add_request(session, row.id, stage=applied.to_stage, created_at=utcnow())
        assert stage_samples(session, row) == 1
    store.close()
