"""The operator's walk through a rollout with the `cutover` CLI, exit codes included."""

from __future__ import annotations

import getpass
import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from controller.cli import app
from controller.config import load_config
from controller.storage.store import Store
from controller.storage.tables import Rollout, Verdict
from tests.conftest import add_request, base_config, write_config

runner = CliRunner()


def cutover(path, *args, actor="alice"):
    return runner.invoke(app, ["-c", str(path), "--actor", actor, *args], catch_exceptions=False)


def status_json(path):
    """The only rollout's entry of `status --json` (the whole has every route and rollout)."""
    result = cutover(path, "status", "--json")
    assert result.exit_code == 0, result.output
    overview = json.loads(result.stdout)
    assert [r["route"] for r in overview["routes"]] == ["generate"]
    (status,) = overview["rollouts"]
    assert overview["routes"][0]["rollout"] == status["rollout"]
    return status


def add_evidence(path, samples, decision, checks=None):
    """What the router and the judge would have written during the current stage."""
    config = load_config(path)
    store = Store(config.resolved_database_url)
    with store.session() as session:
        row = session.scalars(select(Rollout).where(Rollout.name == config.name)).one()
        stage = row.stages[row.stage_index][0]
        now = datetime.now(UTC) + timedelta(milliseconds=5)
        for i in range(samples):
            add_request(
                session,
                row.id,
                id=f"{stage}-{row.version}-{i}",
                stage=stage,
                sticky_key=f"u{i}",
                prompt="p",
                seed=i,
                created_at=now,
            )
        session.add(
            Verdict(
                rollout_id=row.id,
                stage=stage,
                evaluated_at=now,
                decision=decision,
                samples=samples,
                checks=checks
                or [
                    {
                        "name": "error_rate",
                        "decision": decision,
                        "estimate": 0.01,
                        "lower": -0.01,
                        "upper": 0.005,
                        "reason": "candidate error rate 1.0% vs 1.0%",
                    }
                ],
            )
        )
    store.close()


@pytest.fixture
def config_path(tmp_path, db_url):
    path = write_config(tmp_path, base_config(db_url, min_samples=5))
    assert cutover(path, "init", "--skip-validation", "--reason", "test").exit_code == 0
    return path


def test_walk_from_shadow_to_finalized(config_path):
    status = status_json(config_path)
    assert (status["state"], status["stage"], status["weights"]) == (
        "shadowing",
        "shadow",
        {"incumbent": 100, "candidate": 0},
    )
    refused = cutover(config_path, "advance")
    assert refused.exit_code == 2
    assert "samples 0/5" in refused.stderr and "latest verdict none yet" in refused.stderr

    add_evidence(config_path, samples=5, decision="INCONCLUSIVE")
    refused = cutover(config_path, "advance")
    assert (
        refused.exit_code == 2
        and "INCONCLUSIVE" in refused.stderr
        and "held by error_rate" in refused.stderr
    )

    broken_probe = {
        "name": "colour_shift",
        "decision": "INCONCLUSIVE",
        "estimate": None,
        "lower": None,
        "upper": None,
        "probe_error": True,
        "reason": "probe colour_shift_de errored on 30/30 outputs it scored",
    }
    add_evidence(config_path, samples=0, decision="INCONCLUSIVE", checks=[broken_probe])
    refused = cutover(config_path, "advance")
    assert refused.exit_code == 2 and "colour_shift (its probe is failing" in refused.stderr
    assert "[-inf, inf]" not in cutover(config_path, "status").stdout  # no bounds: none shown

    add_evidence(config_path, samples=0, decision="PASS")
    status = status_json(config_path)
    assert status["ready_to_advance"] and status["checks"][0]["name"] == "error_rate"
    assert cutover(config_path, "advance").exit_code == 0
    status = status_json(config_path)
    assert (status["state"], status["stage"], status["weights"]["candidate"]) == (
        "canary",
        "10",
        10,
    )
    assert status["gates"]["samples"]["have"] == 0, "samples count from the new stage only"

    add_evidence(config_path, samples=5, decision="PASS")
    assert cutover(config_path, "promote", "--full").exit_code == 0
    assert status_json(config_path)["state"] == "promoted"
    refused = cutover(config_path, "advance")
    assert refused.exit_code == 2 and "finalize" in refused.stderr
    assert cutover(config_path, "finalize", actor="bob").exit_code == 0
    assert status_json(config_path)["weights"] == {"incumbent": 0, "candidate": 100}

    history = cutover(config_path, "history", "--json")
    events = [json.loads(line) for line in history.stdout.splitlines()]
    assert [(e["verb"], e["to_state"], e["to_stage"]) for e in events] == [
        ("init", "shadowing", "shadow"),
        ("advance", "canary", "10"),
        ("advance", "promoted", "100"),
        ("finalize", "finalized", "100"),
    ]
    assert events[1]["verdict"]["decision"] == "PASS" and events[-1]["actor"] == "bob"


def test_pause_resume_rollback_retry_abort(config_path):
    assert cutover(config_path, "pause", "--reason", "lunch").exit_code == 0
    assert status_json(config_path)["state"] == "paused"
    refused = cutover(config_path, "advance", "--force", "--reason", "x")
    assert refused.exit_code == 2 and "resume" in refused.stderr
    assert cutover(config_path, "resume").exit_code == 0
    assert (
        cutover(config_path, "advance", "--to", "30", "--force", "--reason", "skip ahead").exit_code
        == 0
    )
    assert status_json(config_path)["stage"] == "30"
    refused = cutover(config_path, "rollback")
    assert refused.exit_code == 2
    assert cutover(config_path, "rollback", "--reason", "colour drift").exit_code == 0
    status = status_json(config_path)
    assert (status["state"], status["weights"]["candidate"], status["mirror_percent"]) == (
        "rolled_back",
        0,
        0,
    )
    assert cutover(config_path, "advance").exit_code == 2
    assert cutover(config_path, "retry", "--skip-validation", "--reason", "test").exit_code == 0
    assert status_json(config_path)["stage"] == "shadow"
    assert cutover(config_path, "abort", "--reason", "candidate withdrawn").exit_code == 0
    refused = cutover(config_path, "retry")
    assert refused.exit_code == 2 and "aborted" in refused.stderr
    events = [json.loads(x) for x in cutover(config_path, "history", "--json").stdout.splitlines()]
    assert [e["verb"] for e in events] == [
        "init",
        "pause",
        "resume",
        "advance",
        "rollback",
        "retry",
        "abort",
    ]
    assert events[3]["forced"] and events[3]["reason"] == "skip ahead"


def test_init_is_idempotent(config_path):
    again = cutover(config_path, "init", "--skip-validation", "--reason", "test")
    assert again.exit_code == 0 and "already exists" in again.stdout
    events = [json.loads(x) for x in cutover(config_path, "history", "--json").stdout.splitlines()]
    assert len(events) == 1


def test_human_status_and_history_render(config_path):
    add_evidence(config_path, samples=2, decision="FAIL")
    result = cutover(config_path, "status")
    assert result.exit_code == 0
    for words in ("shadowing", "incumbent 100%", "2/5", "FAIL", "error_rate"):
        assert words in result.stdout
    assert "init" in cutover(config_path, "history").stdout


def test_actor_defaults_to_os_user_and_real_process_exit_codes(tmp_path, sqlite_url):
    path = write_config(tmp_path, base_config(sqlite_url))
    run = [sys.executable, "-m", "controller", "-c", str(path)]
    assert (
        subprocess.run(
            [*run, "init", "--skip-validation", "--reason", "test"], capture_output=True, timeout=60
        ).returncode
        == 0
    )
    refused = subprocess.run([*run, "finalize"], capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "finalize needs the rollout promoted" in refused.stderr
    history = subprocess.run(
        [*run, "history", "--json"], capture_output=True, text=True, timeout=60
    )
    assert json.loads(history.stdout.splitlines()[0])["actor"] == getpass.getuser()
