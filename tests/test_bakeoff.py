"""The lab on real tiny models and Ray Serve: a bake-off of four, its report in Chromium,
resuming after kill -9, and `cutover validate` as the gate into shadow."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from sqlalchemy import func, select
from typer.testing import CliRunner

from controller.cli import app
from controller.config import load_config
from controller.lab.render import LabRenderer
from controller.lab.runs import LabSession, bakeoff_judging, plan_run
from controller.lab.validation import validate
from controller.review.bakeoff_report import build_bakeoff_report
from controller.storage.store import Store
from controller.storage.tables import LabOutput, RolloutEvent, Validation
from policies.policy import load_policy
from tests.browser import CHROMIUM, probe_report

INJECTED = '<script>document.title="pwned"</script> a cat on a mat'
MODEL = {"steps": 2, "guidance": 4.0, "batch_size": 4, "num_cpus": 0.5, "batch_wait": 0.02}
FAULTS = {"base": {}, "good": {}, "tint": {"tint": [70, 10, -50]}, "errors": {"error_percent": 20}}


def lab_config(
    directory: Path, pipeline: Path, candidate: str = "good", quoted: bool = True
) -> Path:
    """`quoted`: the suite has two items quoting text. Without them the route's suite gives
    the critical typography check nothing to measure (it does not apply), rather than 4
    pairs of the 30 it needs."""
    items = [
        {"id": f"plain-{k}", "prompt": f"a photo of object {k}", "tags": ["plain"]}
        for k in range(38)
    ]
    if quoted:
        items += [
            {"id": "quoted", "prompt": 'a sign that says "OPEN"', "tags": ["text"]},
            {"id": "injected", "prompt": INJECTED, "tags": ["text", "hostile"]},
        ]
    (directory / "mini.yaml").write_text(
        yaml.safe_dump({"suite": "mini", "version": 1, "items": items})
    )
    data = {
        "name": "lab",
        "database_url": f"sqlite:///{directory / 'lab.db'}",
        "artifact_dir": str(directory / "artifacts"),
        "spill_dir": str(directory / "spill"),
        "log_file": str(directory / "events.jsonl"),
        "models": {
            name: {"pipeline": str(pipeline), **MODEL, "faults": faults}
            for name, faults in FAULTS.items()
        },
        "routes": {"generate": {"model": "base", "suites": ["mini.yaml"]}},
        "rollouts": {"next": {"route": "generate", "candidate": candidate}},
    }
    path = directory / "cutover.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def bakeoff(tmp_path_factory, tiny_models, ray_serve):
    """One bake-off of four models against `base`, three seeds per item."""
    directory = tmp_path_factory.mktemp("bakeoff")
    config = load_config(lab_config(directory, tiny_models["incumbent"]))
    store = Store.for_config(config)
    store.upgrade()
    plan = plan_run(config, [str(directory / "mini.yaml")], ["tint", "errors", "good"], "base", 3)
    judging = bakeoff_judging(load_policy(), 3)
    renderer = LabRenderer(config, plan.everyone)
    try:
        result = LabSession(config, store, plan, judging, renderer).run()
    finally:
        renderer.close()
    yield config, store, plan, judging, result
    store.close()


def test_the_tinted_and_erroring_models_rank_below_the_baseline(bakeoff):
    _, _, _, _, result = bakeoff
    ranking = {s["model"]: s for s in result["ranking"]}
    assert result["ranking"][0]["model"] == "good"
    assert ranking["good"]["verdict"] == "level", ranking["good"]["lines"]
    assert "colour_shift" in ranking["tint"]["worse_on"]
    assert "error_rate" in ranking["errors"]["worse_on"]
    # Clearly losing: stopped within a round or two of its first images.
    assert ranking["tint"]["stopped_early"] and ranking["tint"]["units"] < 120
    for s in result["ranking"]:  # every figure has its interval
        assert s["latency_ms_p50"]["lower"] is not None
        assert all(c["lower"] is not None for c in s["checks"] if c["samples"])
    assert result["rendered_now"] > 0 and result["images_per_second"] > 0


def test_a_rerun_renders_nothing_again(bakeoff):
    config, store, plan, judging, result = bakeoff
    with store.reader() as session:
        before = session.scalar(select(func.count()).select_from(LabOutput))
    again = LabSession(config, store, plan, judging, renderer=None).run()
    assert again["rendered_now"] == 0
    assert [s["model"] for s in again["ranking"]] == [s["model"] for s in result["ranking"]]
    with store.reader() as session:
        assert session.scalar(select(func.count()).select_from(LabOutput)) == before


def test_the_cli_reruns_it_as_json_and_as_a_table_without_rendering(bakeoff, tmp_path):
    config, _, plan, _, result = bakeoff
    path = config.base_dir / "cutover.yaml"
    args = ["bakeoff", "--suite", str(config.base_dir / "mini.yaml"), "--models",
            "tint,errors,good", "--baseline", "base", "--seeds", "3"]  # fmt: skip
    as_json = runner(path, *args, "--json")
    assert as_json.exit_code == 0, as_json.stderr
    data = json.loads(as_json.stdout)
    assert data["rendered_now"] == 0 and data["run"] == result["run"]
    assert [s["model"] for s in data["ranking"]] == [s["model"] for s in result["ranking"]]
    table = runner(path, *args, "--report", str(tmp_path / "r.html"))
    assert table.exit_code == 0, table.stderr
    assert "tint: worse than baseline on colour_shift" in table.stdout.replace("\n", " ")
    assert (tmp_path / "r.html").stat().st_size > 10_000
    unknown = runner(path, "bakeoff", "--suite", "colour", "--models", "nope", "--baseline", "base")
    assert unknown.exit_code == 2 and "no model 'nope'" in unknown.stderr


def test_the_report_is_self_contained_and_escapes_prompts(bakeoff, tmp_path):
    config, store, _, _, result = bakeoff
    with store.reader() as session:
        html = build_bakeoff_report(session, config, result["run"], load_policy())
    assert "&lt;script&gt;document.title" in html and "<script>document" not in html
    assert 'src="http' not in html and "<link" not in html
    for words in ("Ranking", "Worst pairs per check", "colour shift", "Filter by tag", "hostile"):
        assert words in html
    if CHROMIUM is None and not os.environ.get("CI"):
        pytest.skip("Debian's chromium is not installed (make test installs it when run as root)")
    report = tmp_path / "bakeoff.html"
    report.write_text(html)
    seen = probe_report(
        report,
        "{promptShownAsText: Array.from(doc.querySelectorAll('.prompt'))"
        ".some(e => e.textContent.includes('<script>')),"
        " rankingRows: doc.querySelectorAll('#ranking tr').length}",
    )
    assert seen["images"] > 100 and seen["loaded"] == seen["images"], seen
    assert seen["reportTitle"].startswith("cutover bake-off"), seen
    assert seen["promptShownAsText"] and seen["rankingRows"] == 5, seen


def test_kill_9_mid_bakeoff_then_rerun_renders_nothing_twice(tmp_path, tiny_models, ray_serve):
    path = lab_config(tmp_path, tiny_models["incumbent"])
    env = {**os.environ, "RAY_ADDRESS": "local", "CUTOVER_LOG_LEVEL": "warning"}
    command = [sys.executable, "-m", "controller", "-c", str(path), "bakeoff", "--suite",
               str(tmp_path / "mini.yaml"), "--models", "good", "--baseline", "base",
               "--seeds", "1", "--no-early-stop", "--round-size", "8"]  # fmt: skip
    proc = subprocess.Popen(command, env=env, start_new_session=True, stderr=subprocess.PIPE)
    config = load_config(path)
    store = Store.for_config(config)

    def recorded() -> int:
        try:
            with store.reader() as session:
                return session.scalar(select(func.count()).select_from(LabOutput)) or 0
        except Exception:  # the tables are not there yet
            return 0

    deadline = time.monotonic() + 240
    while recorded() < 12 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)  # waits for an event (rows recorded), not for a moment
    os.killpg(proc.pid, signal.SIGKILL)  # the bake-off and the Ray it started, mid-run
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, (
        proc.stderr.read().decode()[-2000:] if proc.stderr else ""
    )
    with store.reader() as session:
        before = {(r.model, r.unit): r.id for r in session.scalars(select(LabOutput))}
    assert 12 <= len(before) < 80
    plan = plan_run(config, [str(tmp_path / "mini.yaml")], ["good"], "base", 1)
    judging = bakeoff_judging(load_policy(), 1)
    renderer = LabRenderer(config, plan.everyone)
    session_ = LabSession(config, store, plan, judging, renderer, round_size=8, early_stop=False)
    try:
        session_.run()
    finally:
        renderer.close()
    with store.reader() as session:
        after = {(r.model, r.unit): r.id for r in session.scalars(select(LabOutput))}
    assert len(after) == 80  # 40 items x 2 models, each once
    assert {k: after[k] for k in before} == before  # what was recorded stays as it was
    assert session_.stats.submitted == session_.stats.rendered == 80 - len(before)  # once each
    store.close()


def test_one_pipeline_with_other_settings_is_another_run(tmp_path, tiny_models):
    """The demo's healthy and regression candidates share a pipeline and differ in faults:
    the second validation must render its own images, not reuse the first one's."""
    path = lab_config(tmp_path, tiny_models["incumbent"])
    config = load_config(path)
    suite = [str(tmp_path / "mini.yaml")]
    good = plan_run(config, suite, ["good"], "base", 1, "validate")
    data = yaml.safe_load(path.read_text())
    data["models"]["good"]["faults"] = {"tint": [70, 10, -50]}
    path.write_text(yaml.safe_dump(data))
    tinted = plan_run(load_config(path), suite, ["good"], "base", 1, "validate")
    assert good.pipelines == tinted.pipelines and good.key != tinted.key


def runner(path: Path, *args: str):
    return CliRunner().invoke(app, ["-c", str(path), *args], catch_exceptions=False)


def test_validation_gates_init_and_records_a_skip_as_forced(tmp_path, tiny_models, ray_serve):
    path = lab_config(tmp_path, tiny_models["incumbent"], candidate="tint", quoted=False)
    refused = runner(path, "init")
    assert refused.exit_code == 2
    assert (
        "no passing validation" in refused.stderr
        and "cutover validate --rollout next" in refused.stderr
    )

    config = load_config(path)
    store = Store.for_config(config)
    row, result = validate(config, store, config.plan("next"), "alice", seeds=2)
    assert row.decision == "FAIL" and "colour_shift" in row.reason
    assert runner(path, "init").exit_code == 2  # a FAIL opens nothing

    good = lab_config(tmp_path, tiny_models["incumbent"], candidate="good", quoted=False)
    config = load_config(good)
    row, result = validate(config, store, config.plan("next"), "alice", seeds=2)
    assert row.decision == "PASS", row.reason
    typography = {c["name"]: c for c in row.figures["checks"]}["typography_cer"]
    assert typography["critical"] and not typography["applies"]
    assert row.suites == {"mini": 1} and row.figures["checks"]
    accepted = runner(good, "init")
    assert accepted.exit_code == 0, accepted.stderr
    with store.reader() as session:
        (event,) = session.scalars(select(RolloutEvent)).all()
    assert f"validation {row.id} PASS on mini v1" in event.reason and not event.forced

    # A new suite version asks for a new validation; a skip is recorded as forced.
    (tmp_path / "mini.yaml").write_text(
        (tmp_path / "mini.yaml").read_text().replace("version: 1", "version: 2")
    )
    data = yaml.safe_load(good.read_text())
    data["rollouts"] = {"again": {"route": "generate", "candidate": "good"}}
    good.write_text(yaml.safe_dump(data))
    assert runner(good, "init").exit_code == 2
    assert runner(good, "init", "--skip-validation").exit_code == 2  # needs --reason
    skipped = runner(good, "init", "--skip-validation", "--reason", "hotfix, lab down")
    assert skipped.exit_code == 0, skipped.stderr
    with store.reader() as session:
        skip = session.scalars(select(Validation).where(Validation.rollout == "again")).one()
        event = session.scalars(select(RolloutEvent).order_by(RolloutEvent.id.desc())).first()
    assert (skip.decision, skip.forced, skip.suites) == ("SKIPPED", True, {"mini": 2})
    assert event.forced and "validation skipped by" in event.reason and "hotfix" in event.reason
    store.close()
