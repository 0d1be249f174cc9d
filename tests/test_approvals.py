"""Stage approvals: a webhook's deny or silence never lets a stage advance; an approval does."""

from __future__ import annotations

from datetime import timedelta

import pytest
import yaml
from sqlalchemy import select

from controller.operations import approvals
from controller.review.status import rollout_status
from controller.rollout.loop import RolloutController
from controller.rollout.state_machine import Command, Refusal, Verb
from controller.rollout.transitions import apply_command, get_rollout
from controller.storage.tables import NotificationEvent, utcnow
from tests.conftest import base_config, prepare_rollout, write_config
from tests.receiver import Receiver
from tests.test_loop import RATE_POLICY, record_traffic


@pytest.fixture
def webhook():
    receiver = Receiver()
    yield receiver
    receiver.close()


@pytest.fixture
def setup(tmp_path, db_url, webhook):
    (tmp_path / "policy.yaml").write_text(yaml.safe_dump(RATE_POLICY))
    data = base_config(db_url, min_samples=50, auto_advance=True, evaluation_interval=0.2)
    data["rollout"]["approval"] = {"shadow": {"url": webhook.url, "timeout": "60s"}}
    data["policy"] = "policy.yaml"
    config, store = prepare_rollout(write_config(tmp_path, data))
    yield config, store
    store.close()


def stage_of(store, config):
    with store.reader() as session:
        row = get_rollout(session, config.name)
        return row.stage_name


def test_a_denying_webhook_holds_the_stage_and_an_operator_approval_releases_it(setup, webhook):
    config, store = setup
    webhook.answer = lambda body: (200, {"decision": "deny", "by": "cab", "reason": "freeze"})
    record_traffic(store, config, 400)
    loop = RolloutController(config, store)
    for _ in range(3):
        result = loop.tick()
        assert result.verdict == "PASS" and result.action is None
    assert stage_of(store, config) == "shadow"
    assert len(webhook.received) == 1, "a decision is stored: the webhook is not asked again"
    asked = webhook.received[0]["body"]
    assert asked["rollout"] == config.name and asked["next_stage"] == "10"
    # An operator's advance is held by the same gate; only --force overrides it.
    refused = apply_command(store, config, Command(Verb.ADVANCE), "someone")
    assert isinstance(refused, Refusal) and "approval denied by cab: freeze" in refused.reason
    with store.reader() as session:
        status = rollout_status(session, get_rollout(session, config.name), config)
    assert status["gates"]["approval"]["met"] is False
    assert not status["ready_to_advance"]

    with store.reader() as session:
        row = get_rollout(session, config.name)
        session.expunge(row)
    approvals.decide(store, config, row, "approve", "token:otto", "freeze lifted", utcnow())
    result = loop.tick()
    assert getattr(result.action, "to_stage", None) == "10"
    with store.reader() as session:
        kinds = session.scalars(
            select(NotificationEvent.key).where(NotificationEvent.kind == "approval")
        ).all()
    assert kinds == [
        f"approval:{config.name}:1:pending",
        f"approval:{config.name}:1:denied",
        f"approval:{config.name}:1:approved",
    ]


def test_an_approval_that_times_out_holds_and_never_advances(setup, webhook):
    config, store = setup
    webhook.answer = lambda body: (503, {"error": "the approver is down"})
    record_traffic(store, config, 400)
    loop = RolloutController(config, store)
    start = utcnow()
    for seconds in (0, 30, 59):
        assert loop.tick(start + timedelta(seconds=seconds)).action is None
    assert len(webhook.received) == 3, "pending: asked again each tick"
    for seconds in (61, 120, 3600):
        assert loop.tick(start + timedelta(seconds=seconds)).action is None
    assert len(webhook.received) == 3, "timed out: no longer asked"
    assert stage_of(store, config) == "shadow"
    with store.reader() as session:
        row = get_rollout(session, config.name)
        hold = approvals.approval_hold(session, config, row)
    assert hold.startswith("approval timed out after 60s")


def test_an_approving_webhook_lets_the_gates_advance_the_stage(setup, webhook):
    config, store = setup
    webhook.answer = lambda body: (200, {"decision": "approve"})
    loop = RolloutController(config, store)
    assert loop.tick().action is None  # no traffic yet: nothing is asked
    assert webhook.received == []
    record_traffic(store, config, 400)
    result = loop.tick()
    assert getattr(result.action, "to_stage", None) == "10"
    assert len(webhook.received) == 1


def test_a_person_decides_by_cli_or_api_by_role_and_only_where_a_stage_asks(
    setup, webhook, tmp_path
):
    from fastapi.testclient import TestClient
    from typer.testing import CliRunner

    from controller.cli import app as cli
    from controller.operations import tokens
    from controller.operations.console import build_console

    config, store = setup
    path = tmp_path / "cutover.yaml"
    runner = CliRunner()
    denied = runner.invoke(cli, ["-c", str(path), "--actor", "cab", "deny", "--reason", "freeze"])
    assert denied.exit_code == 0 and "approval denied by cab" in denied.output
    client = TestClient(build_console(config, store))
    viewer = tokens.create(store, "vera", "viewer", "tester")
    operator = tokens.create(store, "otto", "operator", "tester")
    url = f"/api/rollouts/{config.name}/approval"
    body = {"decision": "approve", "reason": "lifted"}
    assert (
        client.post(url, json=body, headers={"authorization": f"Bearer {viewer}"}).status_code
        == 403
    )
    answer = client.post(url, json=body, headers={"authorization": f"Bearer {operator}"})
    assert answer.json() == {"state": "approved", "actor": "token:otto"}
    with store.reader() as session:
        row = get_rollout(session, config.name)
        assert approvals.approval_hold(session, config, row) == ""
    moved = apply_command(store, config, Command(Verb.ADVANCE, force=True, reason="t"), "t")
    assert getattr(moved, "to_stage", None) == "10"
    refused = runner.invoke(cli, ["-c", str(path), "approve"])
    assert refused.exit_code == 2 and "stage 10 of test-rollout needs no approval" in refused.output
    wrong = client.post(url, json=body, headers={"authorization": f"Bearer {operator}"})
    assert wrong.status_code == 422
