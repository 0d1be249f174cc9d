"""Config loading: the example works, and every mistake is named by line and key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from controller.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]

GOOD = """\
name: demo
models:
  incumbent:
    pipeline: org/model-a
  candidate:
    pipeline: org/model-b
rollout:
  stages: [shadow, 10, 30, 60, 100]
"""

# (case id, config text, expected line, key that must be named, words the message must contain)
MALFORMED = [
    ("bad-yaml", "name: demo\nmodels: [unclosed\n", 3, "models", "invalid YAML"),
    ("tab-indent", "name: demo\nmodels:\n\tincumbent: x\n", 3, "incumbent", "invalid YAML"),
    ("top-level-list", "- name\n- demo\n", 1, "(top level)", "mapping"),
    ("empty-file", "", 1, "(top level)", "empty"),
    (
        "unknown-top-key",
        GOOD + "colour: blue\n",
        9,
        "colour",
        "unknown key 'colour'; allowed here: artifact_dir",
    ),
    (
        "unknown-model-key",
        GOOD.replace("    pipeline: org/model-b", "    pipeline: org/model-b\n    sampel: ddim"),
        7,
        "models.candidate.sampel",
        "allowed here: batch_size",
    ),
    ("missing-name", GOOD.replace("name: demo\n", ""), 1, "name", "required"),
    (
        "missing-model-path",
        GOOD.replace("    pipeline: org/model-a\n", "    steps: 4\n"),
        3,
        "models.incumbent.pipeline",
        "required",
    ),
    (
        "missing-candidate",
        "name: demo\nmodels:\n  incumbent:\n    pipeline: a/b\nrollout:\n  auto_advance: false\n",
        2,
        "models.candidate",
        "required",
    ),
    (
        "wrong-type-steps",
        GOOD.replace("org/model-a", "org/model-a\n    steps: many"),
        5,
        "models.incumbent.steps",
        "integer",
    ),
    (
        "negative-guidance",
        GOOD.replace("org/model-a", "org/model-a\n    guidance: -1"),
        5,
        "models.incumbent.guidance",
        "greater than or equal to 0",
    ),
    (
        "nan-guidance",
        GOOD.replace("org/model-a", "org/model-a\n    guidance: .nan"),
        5,
        "models.incumbent.guidance",
        "finite",
    ),
    (
        "unknown-sampler",
        GOOD.replace("org/model-b", "org/model-b\n    sampler: magic"),
        7,
        "models.candidate.sampler",
        "'ddim', 'euler', 'euler_ancestral', 'dpmpp_2m' or 'lcm'",
    ),
    (
        "unknown-precision",
        GOOD.replace("org/model-a", "org/model-a\n    precision: int4"),
        5,
        "models.incumbent.precision",
        "'float32', 'float16', 'bfloat16' or 'mixed_float16'",
    ),
    (
        "bad-batch-size",
        GOOD.replace("org/model-a", "org/model-a\n    batch_size: 0"),
        5,
        "models.incumbent.batch_size",
        "whole number >= 1 or 'auto'",
    ),
    (
        "stages-not-increasing",
        GOOD.replace("[shadow, 10, 30, 60, 100]", "[shadow, 30, 10, 100]"),
        8,
        "rollout.stages",
        "stages must increase",
    ),
    (
        "stage-over-100",
        GOOD.replace("[shadow, 10, 30, 60, 100]", "[shadow, 10, 150]"),
        8,
        "rollout.stages",
        "between 1 and 100",
    ),
    (
        "last-stage-not-100",
        GOOD.replace("[shadow, 10, 30, 60, 100]", "[shadow, 10, 50]"),
        8,
        "rollout.stages",
        "must be 100",
    ),
    (
        "shadow-not-first",
        GOOD.replace("[shadow, 10, 30, 60, 100]", "[10, shadow, 100]"),
        8,
        "rollout.stages",
        "only be the first",
    ),
    (
        "mirror-over-100",
        GOOD + "  mirror_percent: 150\n",
        9,
        "rollout.mirror_percent",
        "less than or equal to 100",
    ),
    (
        "mirror-unknown-stage",
        GOOD + '  mirror_percent: {shadow: 100, "45": 10}\n',
        9,
        "rollout.mirror_percent.45",
        "there is no stage '45'",
    ),
    (
        "bad-duration",
        GOOD + "  min_duration: 5 minutes\n",
        9,
        "rollout.min_duration",
        "not a duration",
    ),
    (
        "per-stage-wrong-type",
        GOOD + "  min_samples:\n    shadow: lots\n",
        10,
        "rollout.min_samples.shadow",
        "integer",
    ),
    ("duplicate-key", GOOD + "name: again\n", 9, "name", "duplicate key (first set on line 1)"),
    ("bad-name", GOOD.replace("name: demo", "name: Demo Rollout!"), 1, "name", "pattern"),
    (
        "unset-env-var",
        GOOD + "database_url: ${CUTOVER_TEST_SURELY_UNSET}\n",
        9,
        "database_url",
        "CUTOVER_TEST_SURELY_UNSET is not set",
    ),
    (
        "wrong-type-auto-advance",
        GOOD + "  auto_advance: sometimes\n",
        9,
        "rollout.auto_advance",
        "boolean",
    ),
    (
        "tint-out-of-range",
        GOOD.replace("org/model-b", "org/model-b\n    faults: {tint: [300, 0, 0]}"),
        7,
        "models.candidate.faults.tint",
        "between -255 and 255",
    ),
]


@pytest.mark.parametrize(
    ("text", "line", "key", "words"), [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED]
)
def test_malformed_config_names_line_and_key(tmp_path, text, line, key, words):
    path = tmp_path / "cutover.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    problems = caught.value.problems
    assert any(p.line == line and p.key == key and words in p.message for p in problems), [
        str(p) for p in problems
    ]
    assert all(p.file == str(path) for p in problems)


def test_there_are_at_least_fifteen_cases():
    assert len(MALFORMED) >= 15


def test_example_config_loads_as_shipped():
    config = load_config(REPO / "examples" / "cutover.yaml")
    assert [s.name for s in config.plan().stages] == ["shadow", "10", "30", "60", "100"]
    assert config.resolved_database_url.startswith("sqlite:///")
    assert config.plan().for_stage("min_samples", "shadow") == 50


def test_env_expansion_with_and_without_default(tmp_path, monkeypatch):
    monkeypatch.setenv("CUTOVER_TEST_PG_PASSWORD", "s3cret")
    path = tmp_path / "c.yaml"
    path.write_text(
        GOOD + "database_url: postgresql+psycopg://app:${CUTOVER_TEST_PG_PASSWORD}@db/x\n"
        "artifact_dir: ${CUTOVER_TEST_UNSET_DIR:-/srv/art}\n"
    )
    config = load_config(path)
    assert config.database_url == "postgresql+psycopg://app:s3cret@db/x"
    assert config.artifact_dir == "/srv/art"


def test_per_stage_values_and_durations(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        GOOD + '  mirror_percent: {shadow: 100, "10": 50}\n'
        '  min_duration: {shadow: 1h30m, "60": 90}\n'
        "  max_duration: 2d\n"
    )
    rollout = load_config(path).rollout
    assert rollout.for_stage("mirror_percent", "10") == 50
    assert rollout.for_stage("mirror_percent", "30") == 100  # default for unnamed stages
    assert rollout.for_stage("min_duration", "shadow") == 5400
    assert rollout.for_stage("min_duration", "60") == 90
    assert rollout.for_stage("max_duration", "30") == 2 * 86400


def test_relative_sqlite_path_is_anchored_at_the_config_file(tmp_path):
    path = tmp_path / "sub" / "c.yaml"
    path.parent.mkdir()
    path.write_text(GOOD)
    assert (
        load_config(path).resolved_database_url == f"sqlite:///{tmp_path}/sub/.cutover/cutover.db"
    )


def test_missing_local_pipeline_directory_is_named(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(GOOD.replace("org/model-a", "./models/not-built-yet"))
    load_config(path)  # state commands do not need the models
    with pytest.raises(ConfigError) as caught:
        load_config(path, check_paths=True)
    (problem,) = caught.value.problems
    assert (problem.line, problem.key) == (4, "models.incumbent.pipeline")
    assert "make-tiny" in problem.message


@pytest.mark.parametrize(
    ("pipeline", "words"),
    [
        ("models/tiny/incumbent", "neither a directory next to the config"),
        ("models/x", "is a directory in the current one"),
        ("org/model-a", None),  # a hub id: checked by the hub, not here
    ],
)
def test_pipeline_paths_are_relative_to_the_config_not_the_current_directory(
    tmp_path, monkeypatch, pipeline, words
):
    """A bare relative path must not be mistaken for a hub id, nor loaded from the wrong place."""
    config_dir, elsewhere = tmp_path / "conf", tmp_path / "cwd"
    config_dir.mkdir()
    (elsewhere / "models" / "x").mkdir(parents=True)
    monkeypatch.chdir(elsewhere)
    path = config_dir / "c.yaml"
    path.write_text(GOOD.replace("org/model-a", pipeline))
    if words is None:
        load_config(path, check_paths=True)
        return
    with pytest.raises(ConfigError) as caught:
        load_config(path, check_paths=True)
    (problem,) = caught.value.problems
    assert problem.key == "models.incumbent.pipeline" and words in problem.message


@pytest.mark.parametrize(
    "case", ["bad-yaml", "unknown-sampler", "stages-not-increasing", "empty-file"]
)
def test_cli_reports_config_errors_without_traceback(tmp_path, case):
    text = next(c[1] for c in MALFORMED if c[0] == case)
    path = tmp_path / "cutover.yaml"
    path.write_text(text)
    result = subprocess.run(
        [sys.executable, "-m", "controller", "-c", str(path), "status"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert f"{path}:" in result.stderr.replace("\n", "")
