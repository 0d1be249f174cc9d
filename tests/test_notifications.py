"""Notifications: the outbox written with what it reports, and delivered at least once, in
order per rollout, past a receiver that is down, without holding up the others."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import func, select

from controller.operations.dispatcher import Dispatcher, delivery_summary, slack_body
from controller.operations.outbox import Event, emit
from controller.rollout.state_machine import Command, Verb
from controller.rollout.transitions import apply_command
from controller.storage.tables import NotificationDelivery, NotificationEvent, utcnow
from tests.conftest import base_config, prepare_rollout, write_config
from tests.receiver import Receiver


@pytest.fixture
def receivers():
    made = [Receiver(), Receiver()]
    yield made
    for receiver in made:
        receiver.close()


@pytest.fixture
def setup(tmp_path, db_url, receivers):
    flaky, steady = receivers
    data = base_config(db_url)
    data["notifications"] = {
        "receivers": [
            {"name": "flaky", "url": flaky.url},
            {"name": "steady", "url": steady.url, "format": "slack"},
            {"name": "pages", "url": steady.url, "min_severity": "critical"},
        ],
        "initial_backoff": "1s",
        "max_backoff": "8s",
    }
    config, store = prepare_rollout(write_config(tmp_path, data))
    yield config, store
    store.close()


def moves(store, config, verbs):
    for verb, reason in verbs:
        result = apply_command(store, config, Command(verb, reason=reason), "tester")
        assert hasattr(result, "to_state"), result


def other_rollouts_events(store, config, count=3):
    """Events of a second rollout, as its own ticks would write them."""
    with store.session() as session:
        for i in range(count):
            emit(
                session,
                config.notifications,
                Event(f"other:{i}", "verdict", "info", f"other {i}", rollout="other"),
            )


class Clock:
    def __init__(self):
        self.now = utcnow()

    def __call__(self):
        return self.now


def test_a_receiver_down_30s_gets_every_event_once_in_order_and_blocks_no_one(setup, receivers):
    config, store = setup
    flaky, steady = receivers
    # Two rollouts' events: this one's transitions, and another rollout's, interleaved.
    moves(store, config, [(Verb.PAUSE, "p1"), (Verb.RESUME, "r1")])
    other_rollouts_events(store, config)
    moves(store, config, [(Verb.PAUSE, "p2"), (Verb.ROLLBACK, "bad")])
    with store.reader() as session:
        ids = session.scalars(select(NotificationEvent.id).order_by(NotificationEvent.id)).all()
    assert len(ids) == 8  # init, pause, resume, 3 others, pause, rollback

    clock = Clock()
    flaky.answer = lambda body: (503, {"error": "down"})
    dispatcher = Dispatcher(store, config.notifications, clock=clock)
    try:
        for _ in range(31):  # 30 s of a receiver that answers 503, a pass a second
            dispatcher.run_once()
            clock.now += timedelta(seconds=1)
        # The steady receiver got everything meanwhile; the flaky one only failed attempts.
        steady_ids = [int(r["headers"]["X-Cutover-Event-Id"]) for r in steady.received]
        assert sorted(steady_ids) == sorted(ids + [ids[-1]])  # `pages`: the rollback only
        assert any("attachments" in r["body"] for r in steady.received)  # the Slack form
        failed = len(flaky.received)
        assert failed <= 2 * 6, "backoff: a 503 queue is not hammered every second"
        summary = {r["receiver"]: r for r in delivery_summary(store, config.notifications)}
        assert summary["flaky"]["pending"] == 8 and "HTTP 503" in summary["flaky"]["last_error"]
        assert summary["steady"]["pending"] == 0 and summary["steady"]["delivered"] == 8

        flaky.answer = lambda body: (200, {})
        for _ in range(40):
            dispatcher.run_once()
            clock.now += timedelta(seconds=1)
    finally:
        dispatcher.close()
    delivered = [r for r in flaky.received[failed:]]
    first_seen: list[int] = []
    for r in delivered:
        if r["body"]["id"] not in first_seen:
            first_seen.append(r["body"]["id"])
        assert r["headers"]["X-Cutover-Event-Id"] == str(r["body"]["id"])
    assert sorted(first_seen) == ids, "every event, once after deduplication by id"
    for rollout in ("test-rollout", "other"):
        order = [r["body"]["id"] for r in delivered if r["body"]["rollout"] == rollout]
        assert order == sorted(order), f"in order for {rollout}"
    assert delivery_summary(store, config.notifications)[0]["pending"] == 0


def test_an_event_is_written_with_its_transition_and_once_per_key(setup):
    config, store = setup
    with store.reader() as session:
        before = session.scalar(select(func.count()).select_from(NotificationEvent))
    # A refused verb (resume while not paused) writes nothing.
    apply_command(store, config, Command(Verb.RESUME), "tester")
    moves(store, config, [(Verb.PAUSE, "why")])
    with store.session() as session:
        rows = session.scalars(select(NotificationEvent).order_by(NotificationEvent.id)).all()
        assert len(rows) == before + 1
        assert rows[-1].key == "transition:test-rollout:2"
        assert rows[-1].severity == "warning" and "pause by tester" in rows[-1].summary
        again = Event(rows[-1].key, "transition", "warning", "again", rollout="test-rollout")
        assert emit(session, config.notifications, again) is None
        # Per receiver, as each one's filter says: `pages` wants only critical events.
        receivers = session.scalars(
            select(NotificationDelivery.receiver).where(
                NotificationDelivery.event_id == rows[-1].id
            )
        ).all()
        assert sorted(receivers) == ["flaky", "steady"]


def test_slack_form_is_a_text_line_with_the_event_id(setup):
    config, store = setup
    with store.reader() as session:
        event = session.scalars(select(NotificationEvent)).first()
        body = slack_body(event)
    assert body["text"].startswith("[info] test-rollout init by tester")
    assert {"title": "event id", "value": str(event.id), "short": True} in body["attachments"][0][
        "fields"
    ]


@pytest.fixture
def loop_setup(tmp_path, db_url):
    import yaml

    from tests.test_loop import RATE_POLICY

    (tmp_path / "policy.yaml").write_text(yaml.safe_dump(RATE_POLICY))
    data = base_config(db_url, min_samples=50, auto_advance=True)
    data["policy"] = "policy.yaml"
    data["notifications"] = {
        "receivers": [{"name": "ops", "url": "http://127.0.0.1:9/hook"}],
        "fallback_storm": {"window": "60s", "min_fallbacks": 10, "share": 0.2},
    }
    config, store = prepare_rollout(write_config(tmp_path, data))
    yield config, store
    store.close()


def kinds_and_severities(store):
    with store.reader() as session:
        return [
            (e.kind, e.severity, e.summary)
            for e in session.scalars(select(NotificationEvent).order_by(NotificationEvent.id))
        ]


def test_a_tick_notifies_a_verdict_change_once_and_the_rollback_it_causes(loop_setup):
    from controller.rollout.loop import RolloutController
    from tests.test_loop import record_traffic

    config, store = loop_setup
    loop = RolloutController(config, store)
    loop.tick()  # no traffic: INCONCLUSIVE, the first verdict
    loop.tick()  # unchanged: nothing new
    record_traffic(store, config, 400, candidate_error=0.5)
    loop.tick()
    seen = kinds_and_severities(store)
    assert [(k, s) for k, s, _ in seen] == [
        ("transition", "info"),  # init
        ("verdict", "warning"),  # none → INCONCLUSIVE
        ("verdict", "critical"),  # INCONCLUSIVE → FAIL
        ("transition", "critical"),  # the automatic rollback
    ]
    assert "verdict INCONCLUSIVE → FAIL (error_rate FAIL" in seen[2][2]


def test_a_fallback_storm_is_told_once_per_window(loop_setup):
    import uuid

    from sqlalchemy import insert

    from controller.rollout.loop import RolloutController
    from controller.rollout.transitions import get_rollout
    from controller.storage.tables import Output, Request
    from tests.test_loop import record_traffic

    config, store = loop_setup
    record_traffic(store, config, 40)
    loop = RolloutController(config, store)
    loop.tick()
    assert not [k for k, _, _ in kinds_and_severities(store) if k == "fallback_storm"]
    with store.session() as session:
        rollout = get_rollout(session, config.name)
        requests = session.scalars(
            select(Request.id).where(Request.rollout_id == rollout.id).limit(12)
        ).all()
        session.execute(
            insert(Output),
            [
                {
                    "id": str(uuid.uuid4()),
                    "request_id": request_id,
                    "role": "fallback",
                    "image_index": 0,
                    "is_primary": True,
                    "status": "ok",
                    "created_at": utcnow(),
                    "model": "fast",
                }
                for request_id in requests
            ],
        )
    loop.tick()
    loop.tick()
    storms = [s for k, _, s in kinds_and_severities(store) if k == "fallback_storm"]
    assert storms == [
        "test-rollout: the fallback model answered 12 of 40 requests on route generate "
        "in the last 60s"
    ]


def test_one_events_failure_holds_back_only_its_own_rollouts_later_events(setup, receivers):
    config, store = setup
    flaky, _ = receivers
    moves(store, config, [(Verb.PAUSE, "p1"), (Verb.RESUME, "r1"), (Verb.PAUSE, "p2")])
    other_rollouts_events(store, config)
    with store.reader() as session:
        pause = session.scalars(
            select(NotificationEvent.id).where(NotificationEvent.key == "transition:test-rollout:2")
        ).one()
    # The receiver refuses only the rollout's second event (its first pause), for a while.
    refusing = {"on": True}
    flaky.answer = lambda body: (503, {}) if refusing["on"] and body["id"] == pause else (200, {})
    clock = Clock()
    dispatcher = Dispatcher(store, config.notifications, clock=clock)
    try:
        for _ in range(10):
            dispatcher.run_once()
            clock.now += timedelta(seconds=1)
        got = [r["body"]["id"] for r in flaky.received if r["body"]["id"] != pause]
        with store.reader() as session:
            others = session.scalars(
                select(NotificationEvent.id).where(NotificationEvent.rollout == "other")
            ).all()
        # The other rollout's events all went; this rollout's stopped at the refused one.
        assert [i for i in got if i in others] == others
        assert [i for i in got if i not in others] == [pause - 1], "init only"
        refusing["on"] = False
        for _ in range(20):
            dispatcher.run_once()
            clock.now += timedelta(seconds=1)
    finally:
        dispatcher.close()
    mine = [r["body"]["id"] for r in flaky.received if r["body"]["rollout"] == "test-rollout"]
    delivered = [i for i in mine if i != pause] + [pause]
    assert sorted(set(delivered)) == [pause - 1, pause, pause + 1, pause + 2]
    order = []
    for i in mine:  # the first delivery of each, after the refusals
        if i not in order:
            order.append(i)
    assert order == sorted(order)
