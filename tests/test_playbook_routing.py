"""Several rollouts under one controller: splits per route from the stored tables, one loop with
a lease per rollout, the fallback_rate check, and the metric registry in the shadow log."""

from __future__ import annotations

import math

import pytest

from controller.config import Route, load_config
from controller.review.shadow_log import _fails, _side
from controller.rollout import lease
from controller.rollout.loop import ControllerLoop
from controller.rollout.transitions import create_rollout, get_rollout
from controller.serving.api import ImagesRequest
from controller.serving.asks import generation_ask
from controller.serving.routing import primary_role
from controller.serving.table_source import TableSource
from controller.storage.store import Store
from controller.storage.tables import Output, utcnow
from policies.judge import OutputFacts, build_window, evaluate, state_of
from policies.metrics import Observed
from policies.policy import Check, Policy
from policies.vocabulary import Arm
from tests.conftest import write_config
from tests.test_playbook_config import playbook

USERS = [f"user-{i}" for i in range(2000)]


@pytest.fixture
def two_rollouts(tmp_path, db_url):
    data = playbook(database_url=db_url)
    data["rollouts"]["gen-next"]["stages"] = [30, 100]
    data["routes"]["thumbnail"]["match"] = {"max_side": 64}
    path = write_config(tmp_path, data)
    config = load_config(path)
    store = Store(config.resolved_database_url)
    store.upgrade()
    for name in config.plans():
        create_rollout(store, config, "tester", name)
    yield config, store
    store.close()


def within_binomial(hits: int, n: int, p: float, z: float = 4.0) -> bool:
    return abs(hits / n - p) <= z * math.sqrt(p * (1 - p) / n)


def test_each_route_splits_its_own_users_from_the_stored_tables(two_rollouts):
    config, store = two_rollouts
    source = TableSource(config)
    try:
        gen, edit = source.for_route(Route.GENERATE), source.for_route(Route.EDIT)
        assert (gen.candidate_weight, edit.candidate_weight) == (30, 1)
        assert source.for_route(Route.UPSCALE) is None  # no rollout: the route's model serves
        # The router's own path: the request's route, then that route's table.
        body = ImagesRequest.model_validate(
            {"prompt": "a fox", "size": "128x128"}, context={"limits": config.server}
        )
        assert generation_ask(body, config).route is Route.GENERATE
        on_gen = {u for u in USERS if primary_role(gen, u) is Arm.CANDIDATE}
        on_edit = {u for u in USERS if primary_role(edit, u) is Arm.CANDIDATE}
        assert within_binomial(len(on_gen), len(USERS), 0.30), len(on_gen)
        assert within_binomial(len(on_edit), len(USERS), 0.01), len(on_edit)
        # A user stays on one side per route, whichever replica asks again ...
        again = TableSource(config)
        try:
            assert on_gen == {
                u
                for u in USERS
                if primary_role(again.for_route(Route.GENERATE), u) is Arm.CANDIDATE
            }
        finally:
            again.close()
        # ... and the two routes draw their users independently.
        both = len(on_gen & on_edit)
        assert within_binomial(both, len(USERS), 0.30 * 0.01), both
    finally:
        source.close()


def test_small_generations_go_to_the_thumbnail_route(two_rollouts):
    config, _ = two_rollouts
    small = ImagesRequest.model_validate(
        {"prompt": "a fox", "size": "64x64"}, context={"limits": config.server}
    )
    assert generation_ask(small, config).route is Route.THUMBNAIL


def test_one_loop_ticks_every_rollout_each_under_its_own_lease(two_rollouts):
    config, store = two_rollouts
    loop = ControllerLoop(config, store, holder="loop-a")
    results = loop.tick()
    assert set(results) == {"gen-next", "edit-v2"}
    assert all(r is not None and r.leader for r in results.values())
    with store.reader() as session:
        ids = {name: get_rollout(session, name).id for name in results}
    assert all(lease.holder_of(store, i)[0] == "loop-a" for i in ids.values())
    # Another loop stands by on both; releasing one rollout's lease lets it take that one only.
    other = ControllerLoop(config, store, holder="loop-b")
    assert not any(r.leader for r in other.tick().values())
    loop.controller("edit-v2").release()
    taken = other.tick()
    assert taken["edit-v2"].leader and not taken["gen-next"].leader


def test_a_rollout_whose_tick_fails_does_not_stop_the_others(two_rollouts, tmp_path):
    config, store = two_rollouts
    (tmp_path / "broken.yaml").write_text("checks: [")
    data = playbook(database_url=config.database_url)
    data["rollouts"]["edit-v2"]["policy"] = "broken.yaml"
    broken = load_config(write_config(tmp_path, data))
    results = ControllerLoop(broken, store).tick()
    assert results["edit-v2"] is None and results["gen-next"].leader


def fallback_policy() -> Policy:
    return Policy.model_validate(
        {
            "alpha": 0.05,
            "checks": [
                {
                    "name": "fallback_rate",
                    "kind": "fallback_rate",
                    "metric": "fallback",
                    "tolerance": {"ratio": 1.2, "absolute": 0.01},
                    "min_samples": 50,
                }
            ],
        }
    )


def test_fallback_rate_fails_a_candidate_that_would_send_users_to_the_fallback():
    facts, mirrored = [], set()
    for i in range(600):
        request = f"r{i}"
        mirrored.add(request)
        cand = "timeout" if i % 4 == 0 else "ok"  # 25% would fall back; the incumbent 1%
        inc = "oom" if i % 100 == 0 else "ok"
        facts += [
            OutputFacts(f"{request}c", request, "candidate", 0, cand, 50.0, timeout_s=1.5),
            OutputFacts(f"{request}i", request, "incumbent", 0, inc, 50.0, timeout_s=60),
            # The fallback's answer to the candidate's timeout is the user's, not evidence.
            *(
                [OutputFacts(f"{request}f", request, "fallback", 0, "ok", 9.0)]
                if cand != "ok"
                else []
            ),
        ]
    arms = [f for f in facts if f.role != "fallback"]  # analysis.load_window keeps arms only
    (result,) = evaluate(state_of(fallback_policy(), build_window(arms, mirrored, [], {})))
    assert result.decision == "FAIL", result.reason


def test_fallback_rate_takes_only_the_fallback_metric():
    with pytest.raises(ValueError, match="does not fit kind fallback_rate"):
        Check.model_validate(
            {
                "name": "x",
                "kind": "fallback_rate",
                "metric": "error",
                "tolerance": {"absolute": 0.1},
            }
        )


def test_the_shadow_log_judges_a_quantile_check_by_its_own_metric(tmp_path):
    """Before the registry, every quantile check read latency_ms whatever its metric."""
    queue_check = Check.model_validate(
        {
            "name": "queue_p95",
            "kind": "quantile",
            "metric": "queue_ms",
            "quantile": 0.95,
            "tolerance": {"ratio": 1.5},
        }
    )

    def row(latency: tuple[float, float], queue: tuple[float, float]) -> dict:
        sides = {}
        for arm, ms, q in zip(("candidate", "incumbent"), latency, queue, strict=True):
            output = Output(
                id=arm,
                request_id="r",
                role=arm,
                image_index=0,
                is_primary=True,
                status="ok",
                latency_ms=ms,
                queue_ms=q,
                created_at=utcnow(),
            )
            sides[arm] = _side(output, {}, tmp_path, {})
        return sides

    slow_but_not_queued = row(latency=(900.0, 100.0), queue=(10.0, 10.0))
    queued = row(latency=(100.0, 100.0), queue=(90.0, 10.0))
    assert not _fails(queue_check, slow_but_not_queued)
    assert _fails(queue_check, queued)
    assert queue_check.pair_fails(
        Observed("ok", {"queue_ms": 16.0}, {}), Observed("ok", {"queue_ms": 10.0}, {})
    )


def test_verbs_take_rollout_and_refuse_to_guess(two_rollouts, tmp_path):
    import json

    from typer.testing import CliRunner

    from controller.cli import app

    config, _ = two_rollouts
    path = write_config(tmp_path, playbook(database_url=config.database_url), "two.yaml")

    def cutover(*args):
        return CliRunner().invoke(app, ["-c", str(path), "--actor", "alice", *args])

    guessed = cutover("pause", "--reason", "x")
    assert guessed.exit_code == 2 and "say which with --rollout NAME" in guessed.output
    paused = cutover("pause", "--rollout", "edit-v2", "--reason", "look at edits")
    assert paused.exit_code == 0, paused.output
    overview = json.loads(cutover("status", "--json").stdout)
    states = {r["route"]: r["state"] for r in overview["routes"]}
    assert states["edit"] == "paused" and states["generate"] == "canary"
    assert states["upscale"] is None  # served by its model, no rollout
    history = cutover("history", "-r", "edit-v2", "--json")
    assert [json.loads(line)["verb"] for line in history.stdout.splitlines()] == ["init", "pause"]
    one = json.loads(cutover("status", "--json", "-r", "gen-next").stdout)
    assert (one["rollout"], one["route"], one["models"]) == (
        "gen-next",
        "generate",
        {"incumbent": "sd", "candidate": "sd-next"},
    )


def test_an_action_decided_on_a_stale_read_is_refused_by_the_version(two_rollouts):
    """The tick reads the row once and swaps on its version: an operator's verb in between
    (pause then resume: same stage, new version) makes the tick's action a conflict."""
    from controller.rollout.state_machine import Command, Refusal, Verb
    from controller.rollout.transitions import apply_command, read_rollout

    config, store = two_rollouts
    with store.reader() as session:
        stale = read_rollout(session, config, "gen-next")
    for verb in (Verb.PAUSE, Verb.RESUME):
        assert not isinstance(
            apply_command(store, config, Command(verb, reason="op"), "bob", rollout="gen-next"),
            Refusal,
        )
    late = apply_command(
        store, config, Command(Verb.ROLLBACK, reason="tick"), "controller@x", seen=stale
    )
    assert isinstance(late, Refusal) and late.kind == "conflict"
    with store.reader() as session:
        assert get_rollout(session, "gen-next").state == "canary"
