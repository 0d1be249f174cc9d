"""The KubeRay manifests in docs/kuberay parse, their config loads, and the RayService's
import path builds the serving application from it (no cluster: nothing is applied)."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import yaml

from controller.config import ConfigError, load_config
from controller.serving.app import ROUTER

KUBERAY = Path(__file__).parents[1] / "docs" / "kuberay"


def documents(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((KUBERAY / name).read_text()) if d]


@pytest.fixture
def config_file(tmp_path, monkeypatch):
    for name, value in {
        "PGPASSWORD": "secret",
        "SLACK_WEBHOOK_URL": "https://hooks.slack.example/T0/B0/x",
    }.items():
        monkeypatch.setenv(name, value)
    (config_map,) = documents("cutover-config.yaml")
    path = tmp_path / "cutover.yaml"
    path.write_text(config_map["data"]["cutover.yaml"])
    return path


def test_the_configmaps_config_is_a_cluster_config(config_file):
    config = load_config(config_file, check_paths=True)
    assert config.resolved_database_url.startswith("postgresql+psycopg://cutover:secret@")
    assert config.object_store is not None and config.object_store.bucket == "cutover-images"
    assert config.server.resources == {"router": 1}
    assert all(config.models[m].num_gpus > 0 for m in config.models_in_use())


def test_the_rayservice_import_path_builds_the_application(config_file):
    (service,) = documents("rayservice.yaml")
    assert service["kind"] == "RayService"
    (application,) = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    module, attribute = application["import_path"].split(":")
    builder = getattr(importlib.import_module(module), attribute)
    app = builder({"config": str(config_file)})
    deployment = app._bound_deployment
    assert deployment.name == ROUTER
    assert deployment.ray_actor_options["resources"] == {"router": 1}
    groups = {g["groupName"]: g for g in service["spec"]["rayClusterConfig"]["workerGroupSpecs"]}
    assert '\\"router\\": 1' in groups["cpu"]["rayStartParams"]["resources"]
    assert groups["gpu"]["rayStartParams"]["num-gpus"] == "1"


def test_the_builder_refuses_what_a_cluster_cannot_use(tmp_path):
    path = tmp_path / "cutover.yaml"
    path.write_text(
        "name: local\nmodels:\n  incumbent: {pipeline: org/a}\n  candidate: {pipeline: org/b}\n"
    )
    from controller.serving.kuberay import app_builder

    with pytest.raises(ConfigError) as refused:
        app_builder({"config": str(path)})
    text = str(refused.value)
    assert "database_url" in text and "SQLite" in text
    assert "artifact_dir" in text and "object_store" in text


def test_the_control_plane_runs_cutovers_own_commands():
    commands = {
        d["metadata"]["name"]: d["spec"]["template"]["spec"]["containers"][0]["args"]
        for d in documents("control-plane.yaml")
        if d["kind"] in ("Job", "Deployment")
    }
    assert commands == {
        "cutover-init": ["cutover", "-c", "/etc/cutover/cutover.yaml", "init"],
        "cutover-controller": ["cutover", "-c", "/etc/cutover/cutover.yaml", "control"],
        "cutover-console": ["cutover", "-c", "/etc/cutover/cutover.yaml", "console", "--notify"],
    }
