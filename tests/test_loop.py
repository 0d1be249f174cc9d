"""The controller loop on SQLite and PostgreSQL: rollback, advance, lease, restart."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from datetime import timedelta

import pytest
import structlog
import yaml
from rich.console import Console
from sqlalchemy import insert, select

from controller.review.status import render_status, rollout_status
from controller.rollout import lease
from controller.rollout.loop import ControllerLoop, Facts, RolloutController, plan_action
from controller.rollout.state_machine import Evidence, RolloutView, State, Verb
from controller.rollout.transitions import get_rollout
from controller.storage.store import Store
from controller.storage.tables import Output, Request, RolloutEvent, utcnow
from policies.policy import load_policy
from tests.conftest import base_config, prepare_rollout, write_config

RATE_POLICY = {
    "alpha": 0.05,
    "checks": [
        {
            "name": "error_rate",
            "kind": "rate",
            "metric": "failure",
            "tolerance": {"absolute": 0.05},
            "critical": True,
            "min_samples": 50,
        },
        {
            "name": "latency_p50",
            "kind": "quantile",
            "metric": "latency_ms",
            "quantile": 0.5,
            "tolerance": {"ratio": 1.5},
            "critical": True,
            "min_samples": 50,
        },
    ],
}


@pytest.fixture
def setup(tmp_path, db_url):
    (tmp_path / "policy.yaml").write_text(yaml.safe_dump(RATE_POLICY))
    data = base_config(
        db_url, min_samples=50, auto_advance=True, evaluation_interval=0.2, lease_ttl=1
    )
    data["policy"] = "policy.yaml"
    path = write_config(tmp_path, data)
    config, store = prepare_rollout(path)
    yield path, config, store
    store.close()


def record_traffic(store, config, requests, candidate_error=0.0, incumbent_error=0.0, seed=0):
    """What the router records: each request mirrored, one output per role."""
    import random

    rng = random.Random(seed)
    with store.session() as session:
        row = get_rollout(session, config.name)
        stage = row.stages[row.stage_index][0]
        now = utcnow()
        request_rows, output_rows = [], []
        for i in range(requests):
            request_id = str(uuid.uuid4())
            request_rows.append(
                {
                    "id": request_id,
                    "rollout_id": row.id,
                    "stage": stage,
                    "primary_role": "incumbent",
                    "sticky_key": f"u{i}",
                    "prompt": "a fox",
                    "params": {},
                    "seed": i,
                    "mirrored": True,
                    "created_at": now,
                }
            )
            for role, error in (("incumbent", incumbent_error), ("candidate", candidate_error)):
                failed = rng.random() < error
                output_rows.append(
                    {
                        "id": str(uuid.uuid4()),
                        "request_id": request_id,
                        "role": role,
                        "image_index": 0,
                        "is_primary": role == "incumbent",
                        "status": "error" if failed else "ok",
                        "created_at": now,
                        "latency_ms": rng.uniform(90, 110),
                        "oom_count": 0,
                        "batch_ooms": 0,
                        "error": "boom" if failed else None,
                    }
                )
        session.execute(insert(Request), request_rows)
        session.execute(insert(Output), output_rows)


def events(store, config):
    with store.reader() as session:
        row = get_rollout(session, config.name)
        return session.scalars(
            select(RolloutEvent)
            .where(RolloutEvent.rollout_id == row.id)
            .order_by(RolloutEvent.version)
        ).all()


def test_injected_regression_rolls_back_within_one_evaluation(setup):
    _, config, store = setup
    record_traffic(store, config, 400, candidate_error=0.4, incumbent_error=0.0)
    loop = RolloutController(config, store)
    result = loop.tick()
    assert result.leader and result.verdict == "FAIL"
    last = events(store, config)[-1]
    # The audit trail names the loop that acted (host:pid:id), not only that a loop did.
    assert (last.verb, last.to_state) == ("rollback", "rolled_back")
    assert last.actor == f"controller@{loop.holder}" and str(os.getpid()) in last.actor
    assert "error_rate" in last.reason and "automatic rollback" in last.reason
    assert last.verdict["decision"] == "FAIL"
    # `cutover status` leads with why the rollout stopped: who, when and the reason.
    with store.reader() as session:
        status = rollout_status(session, get_rollout(session, config.name), config)
    why = status["why"]
    assert why["automatic"] and why["verb"] == "rollback" and "error_rate" in why["reason"]
    console = Console(width=200, record=True)
    console.print(render_status(status))
    shown = console.export_text()
    assert f"rollback automatically by controller@{loop.holder}" in shown
    assert shown.index("why") < shown.index("traffic")  # near the top, under the state


def test_status_shows_the_alpha_each_check_ran_at(setup):
    """Too few samples to decide: the verdict is stored, and `status --json` rows say at which
    alpha each check ran (the policy's 0.05 shared by its two critical checks)."""
    _, config, store = setup
    record_traffic(store, config, 10)
    assert RolloutController(config, store).tick().verdict == "INCONCLUSIVE"
    with store.reader() as session:
        status = rollout_status(session, get_rollout(session, config.name), config)
    assert {c["name"]: (c["alpha"], c["critical"]) for c in status["checks"]} == {
        "error_rate": (pytest.approx(0.025), True),
        "latency_p50": (pytest.approx(0.025), True),
    }


def test_every_event_of_a_tick_names_the_rollout(setup):
    """The scorer and judge log without knowing the rollout's name; the tick binds it."""
    import logging

    import structlog

    _, config, store = setup
    record_traffic(store, config, 10)
    previous = structlog.get_config()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG))
    try:
        with structlog.testing.capture_logs(
            processors=[structlog.contextvars.merge_contextvars]
        ) as logs:
            RolloutController(config, store).tick()
    finally:
        structlog.configure(**previous)
    skipped = [e for e in logs if e["event"] == "probe_skipped"]  # logged by the scorer
    assert skipped and all(e["rollout"] == config.name for e in logs)


def test_healthy_run_advances_through_every_stage(setup):
    _, config, store = setup
    loop = RolloutController(config, store)
    seen = []
    for stage_seed in range(len(config.plan().stages)):
        record_traffic(store, config, 400, seed=stage_seed)
        result = loop.tick()
        seen.append((result.verdict, getattr(result.action, "to_stage", None)))
    assert [to for _, to in seen[:4]] == ["10", "30", "60", "100"], seen
    with store.reader() as session:
        assert get_rollout(session, config.name).state == "promoted"
    assert [e.verb for e in events(store, config)] == [
        "init",
        "advance",
        "advance",
        "advance",
        "advance",
    ]


def test_two_loops_only_the_lease_holder_acts(setup):
    _, config, store = setup
    first, second = (
        RolloutController(config, store, holder="a"),
        RolloutController(config, store, holder="b"),
    )
    record_traffic(store, config, 400, candidate_error=0.4)
    # One clock for both loops: on a slow machine a tick (scoring 64 outputs) can outlast the
    # 1 s TTL, and the second loop would rightly take an expired lease.
    now = utcnow()
    assert not (first.tick(now).leader and second.tick(now).leader)
    assert second.tick(now).leader is False
    assert [e.verb for e in events(store, config)] == ["init", "rollback"]
    # The holder stops renewing; after the TTL the other takes over.
    later = utcnow() + timedelta(seconds=first.lease_ttl.total_seconds() + 1)
    with store.reader() as session:
        rollout_id = get_rollout(session, config.name).id
    assert lease.acquire(store, rollout_id, "b", second.lease_ttl, later)
    assert lease.holder_of(store, rollout_id)[0] == "b"


def test_kill_and_restart_mid_stage_repeats_nothing(setup):
    path, config, store = setup
    record_traffic(store, config, 200)
    command = [sys.executable, "-m", "controller", "-c", str(path), "control"]
    env = os.environ | {"CUTOVER_LOG_LEVEL": "info"}
    for round_ in range(3):
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        time.sleep(3 + round_)  # the next loop takes over once the killed one's 1 s lease expires
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        record_traffic(store, config, 200, seed=round_ + 10)
    history = [(e.verb, e.from_stage, e.to_stage) for e in events(store, config)]
    assert len(history) == len(set(history)), history
    assert history[0][0] == "init" and len(history) >= 2
    versions = [e.version for e in events(store, config)]
    assert versions == list(range(1, len(versions) + 1))


@pytest.mark.parametrize(
    ("state", "verdict", "elapsed", "auto", "expected"),
    [
        (State.CANARY, "FAIL", 10, False, Verb.ROLLBACK),
        (State.PROMOTED, "FAIL", 10, True, Verb.ROLLBACK),
        (State.CANARY, "PASS", 10, True, Verb.ADVANCE),
        (State.CANARY, "PASS", 10, False, None),
        (State.CANARY, "INCONCLUSIVE", 10, True, None),
        (State.CANARY, "INCONCLUSIVE", 9999, True, Verb.PAUSE),
        (State.PAUSED, "FAIL", 10, True, None),
        (State.ROLLED_BACK, "FAIL", 10, True, None),
    ],
)
def test_plan_action_table(state, verdict, elapsed, auto, expected):
    from controller.config import parse_stages

    stages = tuple(parse_stages(["shadow", 10, 100]))
    index = 2 if state is State.PROMOTED else 1
    evidence = Evidence(
        samples=100, min_samples=10, elapsed_s=elapsed, min_duration_s=0, verdict=verdict
    )
    facts = Facts(
        RolloutView(state, index, stages), evidence, verdict, ("error_rate: worse",), auto, 3600
    )
    command = plan_action(facts)
    assert (command.verb if command else None) == expected


def test_control_once_and_status_show_the_verdict(setup):
    path, config, store = setup
    record_traffic(store, config, 300)
    once = subprocess.run(
        [sys.executable, "-m", "controller", "-c", str(path), "control", "--once"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert once.returncode == 0 and "leader=True" in once.stdout, once.stderr
    status = json.loads(
        subprocess.run(
            [
                sys.executable,
                "-m",
                "controller",
                "-c",
                str(path),
                "status",
                "--json",
                "-r",
                config.name,
            ],
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout
    )
    assert status["stage"] == "10"  # auto-advance moved it ...
    assert status["last_event"]["actor"].startswith("controller@")  # ... a loop, named
    # --once handed its lease back on exit: another loop may act at once, not after the TTL.
    with store.reader() as session:
        rollout_id = get_rollout(session, config.name).id
    assert lease.acquire(store, rollout_id, "serve-loop", timedelta(seconds=60))
    relied_on = status["last_event"]["verdict"]
    assert relied_on["decision"] == "PASS"
    assert {c["name"] for c in relied_on["checks"]} == {"error_rate", "latency_p50"}
    # Each check shows the share of alpha it ran at: two critical checks, 0.05 between them.
    assert {c["name"]: c["alpha"] for c in relied_on["checks"]} == {
        "error_rate": pytest.approx(0.025),
        "latency_p50": pytest.approx(0.025),
    }


def test_default_policy_loads_and_bad_policy_names_the_line(tmp_path):
    assert len(load_policy().checks) >= 5
    bad = tmp_path / "p.yaml"
    bad.write_text(
        "alpha: 0.05\nchecks:\n  - name: x\n    kind: rate\n    metric: latency_ms\n"
        "    tolerance: {absolute: 0.1}\n"
    )
    from policies.yaml_source import SourceError

    with pytest.raises(SourceError) as caught:
        load_policy(bad)
    assert "does not fit kind rate" in str(caught.value) and f"{bad}:3" in str(caught.value)


def test_a_standby_loop_says_so_once(setup, captured_logs):
    _, config, store = setup
    leader, standby = (
        RolloutController(config, store, holder="a"),
        RolloutController(config, store, holder="b"),
    )
    assert leader.tick().leader
    assert not standby.tick().leader and not standby.tick().leader
    said = [e for e in captured_logs if e["event"] == "controller_standby"]
    assert len(said) == 1 and said[0]["leader"] == "a" and said[0]["holder"] == "b"


class _StopAfter(threading.Event):
    """A stop event that sets itself after `n` waits: drives run() tick by tick, no sleeping."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.left = n

    def wait(self, timeout=None):
        self.left -= 1
        if self.left <= 0:
            self.set()
        return self.is_set()


def test_a_failing_tick_logs_one_line_with_its_cause(tmp_path, setup):
    _, config, _ = setup
    empty = Store(f"sqlite:///{tmp_path / 'empty.db'}")  # no tables: every tick fails
    loop = ControllerLoop(config, empty)
    with structlog.testing.capture_logs() as logs:
        loop.run(_StopAfter(3))
    failed = [e for e in logs if e["event"] == "controller_tick_failed"]
    assert len(failed) == 3
    assert all("no such table" in e["error"] and "exc_info" not in e for e in failed)
    assert all(len(e["error"]) < 400 for e in failed)
    empty.close()
