"""The scorer pool: scorers claim disjoint batches, a dead one's claims expire, the sampling
is recorded and the judge counts only what was sampled, the pool runs in Ray actors, and a
lagging scorer holds the rollout with a reason."""

from __future__ import annotations

import os
import threading
import uuid
from datetime import timedelta

import pytest
from sqlalchemy import func, select

from controller.config import load_config
from controller.rollout import scorer_pool
from controller.rollout.analysis import fold_new
from controller.rollout.scorer_pool import ScorerPool, ScorerWorker
from controller.rollout.scoring import Scorer, claim, sampled
from controller.rollout.state_machine import Command, Refusal, Verb
from controller.rollout.transitions import apply_command, get_rollout, read_rollout
from controller.storage.artifacts import store_artifact
from controller.storage.tables import Output, Score, utcnow
from policies.judge import evaluate
from policies.policy import load_policy
from tests.conftest import add_request, base_config, prepare_rollout, wait_until, write_config
from tests.test_scorer import OPEN_SIGN, poster_png


def add_pairs(store, rollout_id, count, *, status="error", artifacts=None, at=None):
    """`count` mirrored requests, both arms recorded with `status` (ok ones with a poster)."""
    at = at or utcnow()
    png = store_artifact(artifacts, poster_png("OPEN")) if artifacts else None
    ids = []
    with store.session() as session:
        for k in range(count):
            request = add_request(
                session, rollout_id, prompt=OPEN_SIGN, mirrored=True, seed=k, created_at=at
            )
            for role in ("incumbent", "candidate"):
                output = Output(
                    id=str(uuid.uuid4()),
                    request_id=request.id,
                    role=role,
                    image_index=0,
                    is_primary=role == "incumbent",
                    status=status,
                    latency_ms=100.0,
                    created_at=at + timedelta(microseconds=k),
                    artifact_sha256=png if status == "ok" else None,
                )
                session.add(output)
                ids.append(output.id)
    return ids


def test_scorers_claim_disjoint_batches_and_settle_everything_once(tmp_path, db_url, monkeypatch):
    config, store = prepare_rollout(
        write_config(tmp_path, base_config(db_url) | {"scorer": {"batch": 5}})
    )
    with store.reader() as session:
        rollout_id = get_rollout(session, config.name).id
    ids = add_pairs(store, rollout_id, 60)
    claims: dict[str, list[str]] = {}
    original = scorer_pool.claim

    def recording(store, holder, *args, **kwargs):
        got = original(store, holder, *args, **kwargs)
        claims.setdefault(holder, []).extend(i for batch in got.values() for i in batch)
        return got

    monkeypatch.setattr(scorer_pool, "claim", recording)
    workers = [ScorerWorker(config, index) for index in range(3)]
    start = threading.Barrier(3)

    def drain(worker):
        start.wait()
        while worker.step():
            pass

    threads = [threading.Thread(target=drain, args=(w,)) for w in workers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    taken = [i for got in claims.values() for i in got]
    assert sorted(taken) == sorted(ids)  # every output claimed once: no two scorers overlap
    assert sum(w.scored for w in workers) == len(ids)
    with store.reader() as session:
        assert session.scalar(select(func.count()).where(Output.scored_at.is_(None))) == 0
        assert session.scalar(select(func.count()).where(Output.claimed_by.is_not(None))) == 0
    store.close()


def test_a_dead_scorers_claims_expire_and_are_taken_over(tmp_path, db_url):
    config, store = prepare_rollout(write_config(tmp_path, base_config(db_url)))
    with store.reader() as session:
        rollout_id = get_rollout(session, config.name).id
    ids = add_pairs(store, rollout_id, 4)
    now = utcnow()
    ttl = timedelta(minutes=2)
    dead = claim(store, "dead-scorer", [rollout_id], 100, now, ttl)
    assert sorted(dead[rollout_id]) == sorted(ids)
    assert claim(store, "alive", [rollout_id], 100, now + timedelta(seconds=30), ttl) == {}
    later = now + ttl + timedelta(seconds=1)
    taken = claim(store, "alive", [rollout_id], 100, later, ttl)
    assert sorted(taken[rollout_id]) == sorted(ids)
    alive = Scorer(load_policy(), tmp_path / "artifacts", holder="alive")
    assert alive.score(store, taken[rollout_id], later) == len(ids)
    # The dead scorer's late write changes nothing: its claim is gone.
    ghost = Scorer(load_policy(), tmp_path / "artifacts", holder="dead-scorer")
    assert ghost.score(store, dead[rollout_id], later) == 0
    store.close()


def test_sampling_is_per_request_recorded_and_the_judge_counts_only_sampled_pairs(tmp_path):
    """typography_cer scores half the requests: both arms of a request or neither, the rest
    recorded as not sampled, and the check's samples are the sampled pairs."""
    policy_path = tmp_path / "policy.yaml"
    policy_path.write_text(
        load_policy_text().replace(
            "sample_rate: 1.0", "sample_rate: 1.0\nsample_rates: {typography_cer: 0.5}"
        )
    )
    data = base_config(f"sqlite:///{tmp_path / 'db.sqlite'}") | {"policy": str(policy_path)}
    config, store = prepare_rollout(write_config(tmp_path, data))
    policy = load_policy(policy_path)
    assert policy.rate_for("typography_cer") == 0.5 and policy.rate_for("colour_shift_de") == 1
    artifacts = config.artifact_path
    with store.reader() as session:
        rollout = get_rollout(session, config.name)
    add_pairs(store, rollout.id, 12, status="ok", artifacts=artifacts)
    scorer = Scorer(policy, artifacts)
    while scorer.score_pending(store, rollout.id):
        pass
    with store.reader() as session:
        rows = session.execute(
            select(Output.request_id, Output.role, Score.sampled, Score.value)
            .join(Score, Score.output_id == Output.id)
            .where(Score.probe == "typography_cer")
        ).all()
    by_request: dict[str, set[bool]] = {}
    for request_id, _, is_sampled, value in rows:
        by_request.setdefault(request_id, set()).add(is_sampled)
        assert (value is None) == (not is_sampled)
    assert len(by_request) == 12 and all(len(s) == 1 for s in by_request.values())
    chosen = {r for r, s in by_request.items() if s == {True}}
    assert chosen == {r for r in by_request if sampled(r, "typography_cer", 0.5)}
    assert 0 < len(chosen) < 12
    results = {r.name: r for r in evaluate(fold_new(store, rollout, policy, {}))}
    assert results["typography_cer"].samples == len(chosen)
    assert "the probe scores 50% of requests" in results["typography_cer"].reason
    assert results["colour_shift"].samples == 12  # sampled at 100%
    store.close()


def load_policy_text() -> str:
    from policies.policy import DEFAULT_POLICY

    return DEFAULT_POLICY.read_text()


def test_a_lagging_scorer_holds_the_rollout_with_a_reason(tmp_path, sqlite_url):
    data = base_config(sqlite_url, max_scorer_lag="2m", min_samples=0)
    config, store = prepare_rollout(write_config(tmp_path, data))
    with store.reader() as session:
        rollout_id = get_rollout(session, config.name).id
    add_pairs(store, rollout_id, 3, at=utcnow() - timedelta(minutes=5))
    now = utcnow()
    with store.reader() as session:
        seen = read_rollout(session, config, config.name, now)
    held = [h for h in seen.evidence.unmet() if h.startswith("scorer lag")]
    assert held and "over max_scorer_lag 2m" in held[0], seen.evidence.unmet()
    refused = apply_command(store, config, Command(Verb.ADVANCE), "alice", seen=seen, now=now)
    assert isinstance(refused, Refusal) and "scorer lag" in refused.reason
    from controller.review.status import rollout_status

    with store.reader() as session:
        status = rollout_status(session, get_rollout(session, config.name), config, now)
    assert status["gates"]["scorer_lag_s"]["met"] is False
    assert status["gates"]["scorer_lag_s"]["have"] >= 300
    Scorer(load_policy(), config.artifact_path).score_pending(store, rollout_id)
    with store.reader() as session:
        caught_up = read_rollout(session, config, config.name, utcnow())
    assert not any(h.startswith("scorer lag") for h in caught_up.evidence.unmet())
    store.close()


@pytest.mark.usefixtures("ray_serve")
def test_the_pool_scores_in_ray_actors_of_their_own(tmp_path, sqlite_url):
    data = base_config(sqlite_url) | {
        "scorer": {"actors": 2, "num_cpus": 0.25, "batch": 4, "poll_interval": 0.05}
    }
    config, store = prepare_rollout(write_config(tmp_path, data))
    with store.reader() as session:
        rollout_id = get_rollout(session, config.name).id
    ids = add_pairs(store, rollout_id, 20)
    pool = ScorerPool(load_config(config.base_dir / "cutover.yaml"))
    pool.start()
    try:

        def settled() -> bool:
            with store.reader() as session:
                return not session.scalar(select(func.count()).where(Output.scored_at.is_(None)))

        assert wait_until(settled, timeout=120)
        stats = pool.stats()
    finally:
        scored = pool.stop()
    assert scored == len(ids) == sum(s["scored"] for s in stats)
    # Each actor is a process of its own, not the test's (nor the loop's).
    assert all(f":{os.getpid()}:" not in s["holder"] for s in stats) and len(stats) == 2
    store.close()
