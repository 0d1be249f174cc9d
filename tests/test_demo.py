"""`cutover demo`: each scenario ends as expected, exits 0, and leaves no process behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from sqlalchemy import create_engine, text

from controller.demo import ray_temp_dir

pytestmark = pytest.mark.ray


def leftovers(workdir: Path) -> list[str]:
    """Processes whose command line mentions the demo's directory (its Ray lives there)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(str(workdir) in part for part in proc.info["cmdline"] or ()):
                found.append(" ".join(proc.info["cmdline"])[:200])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


@pytest.mark.parametrize(
    ("scenario", "state", "stage"),
    [
        ("regression", "rolled_back", None),
        ("healthy", "promoted", "100"),
        ("edit", "promoted", "100"),
    ],
)
def test_demo_scenario(tmp_path, scenario, state, stage):
    workdir = tmp_path / ".cutover" / "demo"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "controller",
            "demo",
            "--scenario",
            scenario,
            # No --workdir: the default, relative `.cutover/demo`, as `make demo` runs it.
            "--timeout",
            "400",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        # Info level, so the replicas write their start-up events to the log file checked below.
        env=os.environ
        | {"PYTHONPATH": str(Path(__file__).resolve().parents[1]), "CUTOVER_LOG_LEVEL": "info"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    engine = create_engine(f"sqlite:///{workdir / 'cutover.db'}")
    if scenario == "edit":
        check_edit_scenario(engine, workdir)
        return
    with engine.connect() as conn:
        row = conn.execute(
            text("SELECT state, stage_index, stages FROM rollouts WHERE name = :n"),
            {"n": f"demo-{scenario}"},
        ).one()
        events = conn.execute(
            text(
                "SELECT verb, actor, reason FROM rollout_events e JOIN rollouts r "
                "ON e.rollout_id = r.id WHERE r.name = :n ORDER BY e.version"
            ),
            {"n": f"demo-{scenario}"},
        ).all()
        validation = conn.execute(
            text("SELECT decision, suites FROM validations WHERE decision != 'SKIPPED'")
        ).one()
    engine.dispose()
    assert row.state == state
    # Validation ran first: the healthy candidate passed it; the regression was caught there
    # (FAIL) and, shadowed anyway with the skip recorded, caught again in shadow.
    assert validation.decision == ("FAIL" if scenario == "regression" else "PASS")
    assert "validation" in events[0].reason
    caught = f"{scenario}: defect caught in validation and shadow"
    assert (caught in result.stdout) == (scenario == "regression"), result.stdout[-3000:]
    if scenario == "regression":
        verb, actor, reason = events[-1]
        assert verb == "rollback" and actor.startswith("controller@")
        assert "automatic rollback" in reason and any(
            c in reason for c in ("colour_shift", "error_rate")
        )
    else:
        assert [v for v, _, _ in events].count("advance") == 4 and all(
            a.startswith("controller@") for _, a, _ in events[1:]
        )
    # Scoring ran beside the recorder all along (OCR included), and nothing spilled: with no
    # outage, the recorder never waited out SQLite's lock. The replicas' events say so.
    events = [
        json.loads(line) for line in (workdir / "logs" / "events.jsonl").read_text().splitlines()
    ]
    names = {e["event"] for e in events}
    assert "model_server_ready" in names, sorted(names)
    assert not names & {"records_spilled", "database_unavailable"}, sorted(names)
    assert not [p for p in (workdir / "spill").glob("*.jsonl") if p.stat().st_size], "spilled"
    assert (workdir / f"report-{scenario}.html").stat().st_size > 10_000
    assert not leftovers(workdir), leftovers(workdir)
    assert not leftovers(ray_temp_dir(workdir)), leftovers(ray_temp_dir(workdir))


def run_demo(workdir: Path, scenario: str) -> subprocess.CompletedProcess[str]:
    """`cutover demo --scenario S --workdir W` as a user runs it; it must exit 0."""
    result = subprocess.run(
        [sys.executable, "-m", "controller", "demo", "--scenario", scenario,
         "--workdir", str(workdir), "--timeout", "400"],
        capture_output=True,
        text=True,
        timeout=600,
        env=os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_demo_bakeoff_ranks_the_good_variant_first_and_names_each_defect(tmp_path):
    workdir = tmp_path / "demo"
    result = run_demo(workdir, "bakeoff")
    engine = create_engine(f"sqlite:///{workdir / 'cutover.db'}")
    with engine.connect() as conn:
        (raw,) = conn.execute(text("SELECT result FROM lab_runs")).one()
    engine.dispose()
    ranking = json.loads(raw)["ranking"] if isinstance(raw, str) else raw["ranking"]
    assert [s["model"] for s in ranking][0] == "good" and ranking[0]["verdict"] == "level"
    worse = {s["model"]: s["worse_on"] for s in ranking}
    assert "colour_shift" in worse["tint"] and "error_rate" in worse["errors"]
    assert "latency_p50" in worse["slow"]  # the demo policy's latency check
    for model, check in (
        ("tint", "colour_shift"),
        ("errors", "error_rate"),
        ("slow", "latency_p50"),
    ):
        assert f"{model}: worse than baseline on" in result.stdout and check in result.stdout
    assert (workdir / "report-bakeoff.html").stat().st_size > 10_000
    assert not leftovers(workdir), leftovers(workdir)


def test_demo_slice_catches_a_candidate_that_fails_only_on_long_quoted_text(tmp_path):
    workdir = tmp_path / "demo"
    result = run_demo(workdir, "slice")
    engine = create_engine(f"sqlite:///{workdir / 'cutover.db'}")
    with engine.connect() as conn:
        state, reason = conn.execute(
            text(
                "SELECT r.state, e.reason FROM rollouts r JOIN rollout_events e "
                "ON e.rollout_id = r.id ORDER BY e.version DESC LIMIT 1"
            )
        ).one()
        checks, slices = conn.execute(
            text("SELECT checks, slices FROM verdicts ORDER BY id DESC LIMIT 1")
        ).one()
    engine.dispose()
    assert state == "rolled_back"
    assert "automatic rollback" in reason and "typography_cer on text:13+" in reason
    assert "candidate worse on prompts quoting ≥ 13 characters" in reason
    checks = json.loads(checks) if isinstance(checks, str) else checks
    slices = json.loads(slices) if isinstance(slices, str) else slices
    aggregate = next(c for c in checks if c["name"] == "typography_cer")
    assert aggregate["decision"] != "FAIL" and aggregate["estimate"] < 0.3  # its tolerance
    assert all("text:13+" in f["slice"].split(" & ") for f in slices), slices
    assert "slice: defect caught in shadow" in result.stdout, result.stdout[-3000:]
    assert (workdir / "report-slice.html").stat().st_size > 10_000
    assert not leftovers(workdir), leftovers(workdir)


def check_edit_scenario(engine, workdir: Path) -> None:
    """Two rollouts side by side: a 1% canary of an img2img candidate on `edit` while a
    text-to-image candidate walks every stage on `generate`; both reach 100% by the loop."""
    with engine.connect() as conn:
        rollouts = {
            name: (route, state, json.loads(stages) if isinstance(stages, str) else stages)
            for name, route, state, stages in conn.execute(
                text("SELECT name, route, state, stages FROM rollouts")
            )
        }
        served = dict(
            conn.execute(
                text(
                    "SELECT o.model, count(*) FROM outputs o JOIN requests q ON o.request_id = q.id "
                    "WHERE q.route = 'edit' GROUP BY o.model"
                )
            ).all()
        )
        actors = {
            a
            for (a,) in conn.execute(
                text("SELECT actor FROM rollout_events WHERE verb = 'advance'")
            )
        }
    engine.dispose()
    assert rollouts["demo-edit-edit"][:2] == ("edit", "promoted")
    assert [w for _, w in rollouts["demo-edit-edit"][2]] == [1, 100]
    assert rollouts["demo-edit-generate"][:2] == ("generate", "promoted")
    assert set(served) == {"edit-v1", "edit-v2"} and min(served.values()) > 10, served
    assert actors and all(a.startswith("controller@") for a in actors)
    for name in ("demo-edit-generate", "demo-edit-edit"):
        assert (workdir / f"report-edit-{name}.html").stat().st_size > 10_000
    assert not leftovers(workdir), leftovers(workdir)
