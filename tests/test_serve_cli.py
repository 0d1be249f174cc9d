"""`cutover serve` and `cutover models make-tiny` refuse clearly before starting anything."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading

import httpx
import pytest

from tests.conftest import base_config, wait_until, write_config


def run(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "controller", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def test_remote_cluster_with_sqlite_and_local_artifacts_is_refused(tmp_path, tiny_models):
    data = base_config(f"sqlite:///{tmp_path / 'c.db'}")
    data["models"] = {role: {"pipeline": str(path)} for role, path in tiny_models.items()}
    path = write_config(tmp_path, data)
    assert run("-c", str(path), "init", "--skip-validation", "--reason", "test").returncode == 0
    result = run("-c", str(path), "serve", "--address", "ray://10.255.255.1:10001")
    assert result.returncode == 2, result.stderr
    assert "database_url" in result.stderr and "SQLite" in result.stderr
    assert "artifact_dir" in result.stderr and "Traceback" not in result.stderr


def test_missing_pipeline_directory_is_refused_before_ray_starts(tmp_path):
    data = base_config(f"sqlite:///{tmp_path / 'c.db'}")
    data["models"]["candidate"]["pipeline"] = "./models/never-built"
    path = write_config(tmp_path, data)
    assert run("-c", str(path), "init", "--skip-validation", "--reason", "test").returncode == 0
    result = run("-c", str(path), "serve")
    assert result.returncode == 2
    assert f"{path}:" in result.stderr and "models.candidate.pipeline" in result.stderr
    assert "make-tiny" in result.stderr


def test_make_tiny_builds_a_loadable_variant(tmp_path):
    result = run(
        "models", "make-tiny", str(tmp_path / "m"), "--variant", "candidate", "--seed", "3"
    )
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "m" / "cutover_tiny.json").read_text()) == {
        "variant": "candidate",
        "seed": 3,
        "kind": "text2img",
        "distilled": False,
    }
    assert (tmp_path / "m" / "model_index.json").exists()
    # --weights-of: the tour's candidate that passes carries the incumbent's weights.
    twin = run(
        "models",
        "make-tiny",
        str(tmp_path / "t"),
        "--variant",
        "candidate",
        "--weights-of",
        "incumbent",
    )
    assert twin.returncode == 0, twin.stderr
    from workers.tiny import variant_seed

    marker = json.loads((tmp_path / "t" / "cutover_tiny.json").read_text())
    assert marker == {
        "variant": "candidate",
        "seed": variant_seed("incumbent"),
        "kind": "text2img",
        "distilled": False,
    }


def test_calibrate_reports_noise_floors_from_an_aa_run(tmp_path, tiny_models):
    data = base_config(f"sqlite:///{tmp_path / 'c.db'}")
    data["models"] = {
        role: {"pipeline": str(path), "steps": 2} for role, path in tiny_models.items()
    }
    path = write_config(tmp_path, data)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text('a sign that says "OPEN"\na fox in the snow\n')
    result = run(
        "-c",
        str(path),
        "calibrate",
        "--prompts",
        str(prompts),
        "--repeats",
        "2",
        env={**os.environ, "COLUMNS": "200"},
    )
    assert result.returncode == 0, result.stderr
    for metric in ("colour_shift_de", "typography_cer", "latency ratio", "colour_shift_de past 8"):
        assert metric in result.stdout
    rows = [line for line in result.stdout.splitlines() if "colour_shift_de" in line]
    assert " 4 " in rows[0]  # two prompts x two rounds = four A/A pairs


@pytest.mark.ray
def test_serve_shows_every_replica_event_on_its_stderr(tmp_path, tiny_models):
    """Ray keeps replicas' stderr in worker files; `cutover serve` must show their events.
    It serves the console and both /metrics beside the images API."""
    from controller.serving.app import free_port

    port, console_port = free_port(), free_port()
    data = base_config(f"sqlite:///{tmp_path / 'c.db'}")
    data["models"] = {
        role: {"pipeline": str(path), "steps": 2, "num_cpus": 0.5}
        for role, path in tiny_models.items()
    }
    data["server"] = {"port": port, "num_cpus": 0.25}
    data["console"] = {"port": console_port}
    path = write_config(tmp_path, data)
    assert run("-c", str(path), "init", "--skip-validation", "--reason", "test").returncode == 0
    proc = subprocess.Popen(
        [sys.executable, "-m", "controller", "-c", str(path), "serve"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=os.environ | {"CUTOVER_LOG_LEVEL": "info"},
    )
    events: list[dict] = []
    reader = threading.Thread(target=_json_lines, args=(proc.stderr, events), daemon=True)
    reader.start()
    try:
        assert wait_until(lambda: _models_ready(events) >= {"incumbent", "candidate"}, 180), events
        response = httpx.post(
            f"http://127.0.0.1:{port}/v1/images/generations",
            json={"prompt": "a fox", "user": "u1"},
            timeout=60,
        )
        assert response.status_code == 200, response.text
        request_id = response.headers["x-cutover-request-id"]
        assert wait_until(
            lambda: any(
                e.get("request_id") == request_id for e in events if e["event"] == "served"
            ),
            30,
        )
        # The console, the admin API and the rollouts' metrics are served beside it.
        console = f"http://127.0.0.1:{console_port}"
        assert wait_until(lambda: _answers(f"{console}/healthz"), 60), "the console is not up"
        assert httpx.get(f"{console}/api/rollouts", timeout=10).status_code == 401
        metrics = httpx.get(f"{console}/metrics", timeout=10).text
        assert 'cutover_rollout_state{rollout="test-rollout",state="shadowing"} 1.0' in metrics
        router_metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        assert 'cutover_requests_total{arm="incumbent"' in router_metrics
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)
    replica_pids = {e["pid"] for e in events if e["event"] in ("model_server_ready", "served")}
    assert len(replica_pids) >= 3 and proc.pid not in replica_pids  # two models and a router
    assert (tmp_path / ".cutover" / "logs" / "events.jsonl").exists()


def _json_lines(stream, into):
    for line in stream:
        try:
            into.append(json.loads(line))
        except ValueError:
            continue


def _answers(url):
    try:
        return httpx.get(url, timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def _models_ready(events):
    return {e.get("model") for e in events if e["event"] == "model_server_ready"}
