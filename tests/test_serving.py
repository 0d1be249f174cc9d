"""End to end over HTTP on a real local Ray: two tiny models, the router, the recorder, SQLite.

One Ray Serve application is started for the module (about half a minute);
each test moves the rollout to the stage it needs through the same code path
as `cutover advance`.
"""

from __future__ import annotations

import base64
import concurrent.futures
import json
import os
import sqlite3
import subprocess
import sys
import time

import pytest
from sqlalchemy import select
from sqlalchemy.engine import make_url

from controller.rollout.state_machine import Command, Verb
from controller.rollout.transitions import apply_command, get_rollout
from controller.serving import app as serving
from controller.storage.artifacts import artifact_path
from controller.storage.tables import Output, Request
from policies.prompt_tags import tags_of
from tests.conftest import image_distance, prepare_rollout, router_client, write_config
from tests.test_api import MALFORMED
from workers.config import ModelConfig
from workers.images import from_png
from workers.jobs import ImageJob
from workers.pipeline import PipelineRunner

pytestmark = pytest.mark.ray

REFRESH = 0.5
REQUEST_TIMEOUT = 6
MIRROR_LIMIT = 4


@pytest.fixture(scope="module")
def deployed(tmp_path_factory, tiny_models, ray_serve):
    root = tmp_path_factory.mktemp("serving")
    port = ray_serve
    model = {"steps": 2, "guidance": 4.0, "batch_size": 4, "num_cpus": 0.5}
    path = write_config(
        root,
        {
            "name": "e2e",
            "database_url": f"sqlite:///{root / 'cutover.db'}",
            "models": {role: {"pipeline": str(p), **model} for role, p in tiny_models.items()},
            "rollout": {"min_samples": 0, "min_duration": 0},
            "server": {
                "port": port,
                "refresh_interval": REFRESH,
                "mirror_max_in_flight": MIRROR_LIMIT,
                "max_prompt_chars": 100,
                "max_n": 4,
                "max_steps": 50,
                "min_size": 64,
                "max_size": 512,
                "mirror_timeout": 30,
                "request_timeout": REQUEST_TIMEOUT,
            },
        },
    )
    config, store = prepare_rollout(path)
    router = serving.start(config, http_port=port)
    from ray import serve

    client = router_client(port)
    yield {
        "config": config,
        "path": path,
        "store": store,
        "client": client,
        "router": router,
        "candidate": serve.get_deployment_handle("candidate", app_name="e2e"),
        "incumbent": serve.get_deployment_handle("incumbent", app_name="e2e"),
    }
    client.close()
    serve.delete("e2e")
    store.close()


def flush(deployed, include_spill=False):
    assert deployed["router"].flush.remote(60, include_spill).result(timeout_s=90)


def move_to(deployed, stage):
    """Put the rollout at `stage` whatever it was (rollback + retry to go backwards)."""
    store, config = deployed["store"], deployed["config"]
    with store.reader() as session:
        row = get_rollout(session, config.name)
        current = row.stages[row.stage_index][0]
        names = [name for name, _ in row.stages]
    if current == stage and row.state not in ("rolled_back", "paused"):
        return
    if row.state != "rolled_back" and names.index(stage) <= names.index(current):
        apply_command(store, config, Command(Verb.ROLLBACK, reason="test reset"), "tester")
    if row.state == "rolled_back" or names.index(stage) <= names.index(current):
        apply_command(store, config, Command(Verb.RETRY), "tester")
    if stage != names[0]:
        apply_command(
            store, config, Command(Verb.ADVANCE, to=stage, force=True, reason="test"), "tester"
        )
    wait_for_stage(deployed, stage)


def wait_for_stage(deployed, stage, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (
            deployed["client"]
            .get("/v1/rollouts")
            .json()["rollouts"][deployed["config"].name]["stage"]
            == stage
        ):
            return time.monotonic()
        time.sleep(0.05)
    raise AssertionError(f"router did not reach stage {stage}")


def set_faults(deployed, role="candidate", **faults):
    deployed[role].set_faults.remote(faults).result(timeout_s=30)


def generate(client, **body):
    return client.post(
        "/v1/images/generations", json={"prompt": 'a shop sign that says "OPEN"', **body}
    )


def outputs_for(deployed, request_id):
    with deployed["store"].reader() as session:
        request = session.get(Request, request_id)
        outputs = session.scalars(select(Output).where(Output.request_id == request_id)).all()
        return request, {o.role: o for o in outputs}


def test_response_headers_image_and_reproducible_seed(deployed):
    move_to(deployed, "shadow")
    client = deployed["client"]
    first = generate(client, seed=1234, user="alice")
    assert first.status_code == 200, first.text
    assert first.headers["x-cutover-served-by"] == "incumbent"
    assert first.headers["x-cutover-stage"] == "shadow"
    image = from_png(base64.b64decode(first.json()["data"][0]["b64_json"]))
    assert image.shape == (64, 64, 3)
    again = from_png(
        base64.b64decode(generate(client, seed=1234, user="alice").json()["data"][0]["b64_json"])
    )
    assert image_distance(image, again) <= 2.0


def test_mirrored_pair_shares_prompt_params_and_seed(deployed, tiny_models):
    move_to(deployed, "shadow")
    response = generate(
        deployed["client"], user="bob", steps=3, guidance=2.5, negative_prompt="blurry"
    )
    assert response.status_code == 200
    flush(deployed)
    request, outputs = outputs_for(deployed, response.headers["x-cutover-request-id"])
    assert request.mirrored and request.params["steps"] == 3 and request.params["guidance"] == 2.5
    # The router stores the prompt's tags with it: the slices the judge puts it in.
    assert request.tags == tags_of(request.prompt, "generate", request.params)
    assert "steps:1-10" in request.tags and "route:generate" in request.tags
    assert set(outputs) == {"incumbent", "candidate"}
    assert outputs["incumbent"].is_primary and not outputs["candidate"].is_primary
    assert all(o.status == "ok" and o.artifact_sha256 for o in outputs.values())
    # The mirror really used the same prompt, parameters and seed: re-render it here and compare.
    stored = from_png(
        artifact_path(
            deployed["config"].artifact_path, outputs["candidate"].artifact_sha256
        ).read_bytes()
    )
    runner = PipelineRunner(
        ModelConfig(pipeline=str(tiny_models["candidate"]), steps=2, guidance=4.0),
        tiny_models["candidate"].parent,
    )
    local, blank = runner.call(
        [
            ImageJob(
                "x",
                0,
                request.prompt,
                request.seed,
                64,
                64,
                steps=3,
                guidance=2.5,
                negative_prompt="blurry",
            )
        ]
    )[0]
    assert not blank
    assert image_distance(stored, local) <= 2.0


def test_advance_from_a_terminal_changes_the_split_within_the_refresh_interval(deployed):
    move_to(deployed, "shadow")
    client = deployed["client"]
    users = [f"user-{i}" for i in range(60)]
    assert {
        generate(client, user=u, steps=1).headers["x-cutover-served-by"] for u in users[:20]
    } == {"incumbent"}
    advanced = time.monotonic()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "controller",
            "-c",
            str(deployed["path"]),
            "advance",
            "--to",
            "60",
            "--force",
            "--reason",
            "e2e",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    done = time.monotonic()
    seen = wait_for_stage(deployed, "60")
    assert seen - done <= REFRESH + 0.5, f"router took {seen - done:.2f}s after the CLI returned"
    served = [generate(client, user=u, steps=1).headers["x-cutover-served-by"] for u in users]
    share = served.count("candidate") / len(served)
    assert 0.35 <= share <= 0.85, share
    assert served == [
        generate(client, user=u, steps=1).headers["x-cutover-served-by"] for u in users
    ]
    assert advanced < seen


def test_failing_candidate_never_fails_a_primary(deployed):
    move_to(deployed, "shadow")
    set_faults(deployed, error_percent=100)
    try:
        responses = [generate(deployed["client"], user=f"err-{i}", steps=1) for i in range(8)]
        flush(deployed)
    finally:
        set_faults(deployed)
    assert all(r.status_code == 200 for r in responses)
    for response in responses:
        _, outputs = outputs_for(deployed, response.headers["x-cutover-request-id"])
        assert outputs["incumbent"].status == "ok"
        assert (
            outputs["candidate"].status == "error"
            and "injected fault" in outputs["candidate"].error
        )


def test_slow_candidate_does_not_slow_primaries_and_excess_mirrors_are_skipped(deployed):
    move_to(deployed, "shadow")
    client = deployed["client"]
    before = client.get("/v1/stats").json()["mirrors"]
    set_faults(deployed, delay=5)
    try:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            started = time.monotonic()
            responses = list(
                pool.map(lambda i: generate(client, user=f"slow-{i}", steps=1), range(10))
            )
            elapsed = time.monotonic() - started
        after = client.get("/v1/stats").json()["mirrors"]
        flush(deployed)
    finally:
        set_faults(deployed)
    assert all(r.status_code == 200 for r in responses)
    assert elapsed < 5, f"primaries waited on the slow candidate: {elapsed:.1f}s"
    assert after["skipped"] - before["skipped"] >= 10 - MIRROR_LIMIT
    slow = [
        outputs_for(deployed, r.headers["x-cutover-request-id"])[1].get("candidate")
        for r in responses
    ]
    mirrored = [o for o in slow if o is not None]
    assert 1 <= len(mirrored) <= MIRROR_LIMIT and all(o.latency_ms >= 5000 for o in mirrored)


def test_bad_requests_are_4xx_and_never_model_errors(deployed):
    client = deployed["client"]
    with deployed["store"].reader() as session:
        before = (
            len(session.scalars(select(Request.id)).all()),
            len(session.scalars(select(Output.id)).all()),
        )
    for case, raw, status, field, _words in MALFORMED:
        response = client.post(
            "/v1/images/generations", content=raw, headers={"content-type": "application/json"}
        )
        assert response.status_code == status, (case, response.text)
        assert response.json()["error"]["param"] == field, case
    flush(deployed)
    with deployed["store"].reader() as session:
        after = (
            len(session.scalars(select(Request.id)).all()),
            len(session.scalars(select(Output.id)).all()),
        )
    assert after == before


def test_database_locked_during_traffic_loses_nothing(deployed):
    move_to(deployed, "shadow")
    client = deployed["client"]
    lock = sqlite3.connect(
        make_url(deployed["config"].resolved_database_url).database, isolation_level=None
    )
    lock.execute("BEGIN EXCLUSIVE")
    try:
        ids = [
            generate(client, user=f"lock-{i}", steps=1).headers["x-cutover-request-id"]
            for i in range(6)
        ]
        time.sleep(3)  # longer than the recorder's busy timeout: these rows must spill
        stats = client.get("/v1/stats").json()["recorder"]
    finally:
        lock.execute("COMMIT")
        lock.close()
    ids += [
        generate(client, user=f"after-{i}", steps=1).headers["x-cutover-request-id"]
        for i in range(3)
    ]
    flush(deployed, include_spill=True)
    assert stats["spilled"] > 0
    with deployed["store"].reader() as session:
        requests = session.scalars(select(Request.id).where(Request.id.in_(ids))).all()
        outputs = session.scalars(select(Output).where(Output.request_id.in_(ids))).all()
    assert sorted(requests) == sorted(ids)
    assert sorted((o.request_id, o.role) for o in outputs) == sorted(
        (i, r) for i in ids for r in ("incumbent", "candidate")
    )
    # The alert events reach the one log file (and so `cutover serve`'s stderr), once each.
    assert len(events_in_log(deployed, "database_unavailable")) == 1
    assert len(events_in_log(deployed, "database_recovered")) == 1


def events_in_log(deployed, name):
    """Events called `name` in the one file every replica appends to, from other processes."""
    path = deployed["config"].log_path
    lines = path.read_text().splitlines() if path.exists() else []
    events = [json.loads(line) for line in lines]
    return [e for e in events if e["event"] == name and e["pid"] != os.getpid()]


def test_a_timed_out_request_does_not_hold_its_model(deployed):
    """Before: the router gave up at its timeout but the replica kept sampling, and every later
    request to that side timed out too. Now the call stops between steps once its caller has
    gone, and the next small request is served in its normal time."""
    move_to(deployed, "shadow")
    client = deployed["client"]

    def timed(**body):
        started = time.monotonic()
        response = generate(client, **body)
        return response, time.monotonic() - started

    normal = max(timed(user="deadline-a", steps=1)[1] for _ in range(3))
    set_faults(deployed, "incumbent", step_delay=0.5)  # a slow device: 40 steps take 20 s
    try:
        slow, waited = timed(user="deadline-a", steps=40)
    finally:
        set_faults(deployed, "incumbent")
    assert slow.status_code == 504 and waited < REQUEST_TIMEOUT + 2, slow.text
    body = slow.json()["error"]
    assert set(body) >= {"message", "type", "param", "errors"}  # one envelope, 4xx and 5xx
    assert body["type"] == "model_error" and slow.headers["x-cutover-request-id"]
    after, took = timed(user="deadline-a", steps=1)
    assert after.status_code == 200, after.text
    # The stopped call ends within one (0.5 s) step of the deadline: never the 14 s left of it.
    assert took < normal + 1.5, f"the next request took {took:.1f}s (normal {normal:.1f}s)"
    flush(deployed)
    assert events_in_log(deployed, "batch_stopped"), "the replica said it stopped the call"


def test_work_that_cannot_finish_in_time_is_refused_at_once(deployed):
    move_to(deployed, "shadow")
    client = deployed["client"]
    # The replica timed steps at 64..256 px when it started: 512x512 is judged before it runs.
    started = time.monotonic()
    response = generate(client, user="admit", size="512x512", steps=50)
    assert response.status_code == 503 and time.monotonic() - started < REQUEST_TIMEOUT
    message = response.json()["error"]["message"]
    assert "512x512 at 50 steps needs about" in message and "fewer steps" in message
    flush(deployed)
    _, outputs = outputs_for(deployed, response.headers["x-cutover-request-id"])
    assert outputs["incumbent"].status == "overload"


def test_replica_events_reach_the_one_log_file(deployed):
    set_faults(deployed, "incumbent")  # each logs a warning, `faults_changed`, with its model
    set_faults(deployed, "candidate")
    changed = events_in_log(deployed, "faults_changed")
    assert {e["model"] for e in changed} >= {"incumbent", "candidate"}
    assert all("pid" in e and "host" in e and e["level"] == "warning" for e in changed)


# The label names each router series may carry: all bounded by the config (no request id,
# prompt or user is ever a label).
METRIC_LABELS = {
    "cutover_requests": {"route", "arm", "stage", "code"},
    "cutover_bad_requests": {"endpoint", "code"},
    "cutover_outputs": {"route", "model", "role", "stage", "status"},
    "cutover_output_latency_seconds": {"route", "model", "role", "le"},
    "cutover_request_latency_seconds": {"route", "le"},
    "cutover_batch_size": {"model", "le"},
    "cutover_oom_splits": {"model"},
    "cutover_mirrors": {"route", "outcome"},
    "cutover_fallbacks": {"route", "model", "cause"},
    "cutover_requests_in_flight": set(),
    "cutover_mirrors_in_flight": set(),
    "cutover_recorder_queue_depth": set(),
    "cutover_recorder_records": {"outcome"},
}


def test_metrics_scraped_during_traffic_parse_with_bounded_labels(deployed):
    from prometheus_client.parser import text_string_to_metric_families

    move_to(deployed, "shadow")
    client = deployed["client"]
    scrapes = []
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        sent = [pool.submit(generate, client, user=f"metrics-{i}", steps=1) for i in range(12)]
        while not all(f.done() for f in sent):
            scrapes.append(client.get("/metrics"))
        responses = [f.result() for f in sent]
    bad = client.post("/v1/images/generations", json={"prompt": "x", "n": 99})
    assert bad.status_code == 422
    flush(deployed)
    scrapes.append(client.get("/metrics"))
    assert all(r.status_code == 200 for r in responses + scrapes)
    assert scrapes[-1].headers["content-type"].startswith("text/plain; version=0.0.4")
    for scrape in scrapes:  # every scrape parses, mid-traffic ones too
        families = {f.name: f for f in text_string_to_metric_families(scrape.text)}
    assert set(METRIC_LABELS) <= set(families), set(METRIC_LABELS) - set(families)
    ids = {r.headers["x-cutover-request-id"] for r in responses}
    for name, allowed in METRIC_LABELS.items():
        for sample in families[name].samples:
            assert set(sample.labels) <= allowed, (name, sample.labels)
            assert not ids & set(sample.labels.values())
            assert not any("sign" in v for v in sample.labels.values()), "a prompt as a label"
        assert len(families[name].samples) < 400, f"{name}: unbounded series"

    def total(name, **labels):
        return sum(
            s.value
            for s in families[name].samples
            if s.name == name + "_total" and labels.items() <= s.labels.items()
        )

    assert total("cutover_requests", route="generate", stage="shadow", code="200") >= 12
    assert total("cutover_outputs", role="candidate", status="ok") >= 1
    assert total("cutover_bad_requests", endpoint="generations", code="422") >= 1
    assert total("cutover_mirrors", outcome="started") >= 1
    latency = [
        s for s in families["cutover_output_latency_seconds"].samples if s.name.endswith("_count")
    ]
    assert {s.labels["role"] for s in latency} >= {"incumbent", "candidate"}
    records = {s.labels["outcome"]: s.value for s in families["cutover_recorder_records"].samples}
    assert records["recorded"] >= 24  # 12 requests and their primary outputs, at least


def test_a_candidate_that_fails_its_users_is_retried_on_the_incumbent(deployed):
    """In a canary the candidate serves real users: where it fails, they get the incumbent's
    image (no 5xx), and the candidate's failure is recorded and judged all the same."""
    move_to(deployed, "100")  # every user on the candidate
    client = deployed["client"]
    set_faults(deployed, error_percent=100)
    try:
        responses = [generate(client, user=f"canary-{i}", steps=1) for i in range(4)]
        flush(deployed)
    finally:
        set_faults(deployed)
    for response in responses:
        assert response.status_code == 200, response.text
        assert response.headers["x-cutover-served-by"] == "candidate"
        assert response.headers["x-cutover-model"] == "incumbent"
        assert response.headers["x-cutover-fallback"] == "error"
        _, outputs = outputs_for(deployed, response.headers["x-cutover-request-id"])
        assert outputs["candidate"].status == "error" and outputs["candidate"].is_primary
        assert outputs["fallback"].model == "incumbent" and outputs["fallback"].status == "ok"
        assert outputs["fallback"].fallback_of == outputs["candidate"].id
