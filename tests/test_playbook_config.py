"""The playbook config: a pool, routes with fallbacks, rollouts per route; every error located."""

from __future__ import annotations

import pytest
import yaml

from controller.config import ConfigError, Route, load_config
from tests.conftest import write_config


def playbook(**overrides: object) -> dict:
    data = {
        "name": "editor",
        "models": {
            "sd": {"pipeline": "org/sd"},
            "sd-next": {"pipeline": "org/sd-next"},
            "sd-fast": {"pipeline": "org/sd-fast", "sampler": "lcm", "steps": 2},
            "edit-v1": {"pipeline": "org/edit-v1", "kind": "img2img"},
            "edit-v2": {"pipeline": "org/edit-v2", "kind": "img2img"},
            "paint": {"pipeline": "org/paint", "kind": "inpaint"},
            "up": {"pipeline": "org/up", "kind": "upscale"},
        },
        "routes": {
            "generate": {
                "model": "sd",
                "fallback": "sd-fast",
                "fallback_after": "2s",
                "fallback_on": ["timeout", "oom"],
            },
            "thumbnail": {"model": "sd-fast", "match": {"max_side": 128}},
            "edit": {"model": "edit-v1"},
            "inpaint": {"model": "paint"},
            "upscale": {"model": "up"},
        },
        "rollouts": {
            "gen-next": {
                "route": "generate",
                "candidate": "sd-next",
                "stages": ["shadow", 30, 100],
            },
            "edit-v2": {"route": "edit", "candidate": "edit-v2", "stages": [1, 100]},
        },
    }
    data.update(overrides)
    return data


def test_a_pool_with_routes_and_two_rollouts_loads(tmp_path):
    config = load_config(write_config(tmp_path, playbook()))
    assert set(config.route_map) == {
        Route.GENERATE,
        Route.THUMBNAIL,
        Route.EDIT,
        Route.INPAINT,
        Route.UPSCALE,
    }
    plans = config.plans()
    assert {n: (p.route, p.incumbent, p.candidate) for n, p in plans.items()} == {
        "gen-next": (Route.GENERATE, "sd", "sd-next"),
        "edit-v2": (Route.EDIT, "edit-v1", "edit-v2"),
    }
    assert [s.weight for s in plans["edit-v2"].stages] == [1, 100]
    # Every model a route, a fallback or a candidate uses gets a deployment; no other.
    assert config.models_in_use() == [
        "sd",
        "sd-fast",
        "edit-v1",
        "paint",
        "up",
        "sd-next",
        "edit-v2",
    ]
    assert config.route_map[Route.GENERATE].fallback_after == 2.0


def test_the_two_model_file_is_the_shorthand_for_one_generate_rollout(tmp_path):
    data = {
        "name": "classic",
        "models": {"incumbent": {"pipeline": "org/a"}, "candidate": {"pipeline": "org/b"}},
        "rollout": {"stages": ["shadow", 50, 100], "min_samples": 7},
    }
    config = load_config(write_config(tmp_path, data))
    plan = config.plan()
    assert (plan.name, plan.route, plan.incumbent, plan.candidate) == (
        "classic",
        Route.GENERATE,
        "incumbent",
        "candidate",
    )
    assert plan.for_stage("min_samples", "50") == 7
    assert config.route_map[Route.GENERATE].model == "incumbent"


def test_verbs_need_a_rollout_name_when_there_are_several(tmp_path):
    config = load_config(write_config(tmp_path, playbook()))
    with pytest.raises(ConfigError, match="say which with --rollout NAME"):
        config.plan()
    with pytest.raises(
        ConfigError, match="there is no rollout 'nope'; rollouts: gen-next, edit-v2"
    ):
        config.plan("nope")
    assert config.plan("edit-v2").route is Route.EDIT


def _with(path_keys: tuple[str, ...], value: object, base: dict | None = None) -> dict:
    data = yaml.safe_load(yaml.safe_dump(base or playbook()))
    node = data
    for key in path_keys[:-1]:
        node = node[key]
    if value is None:
        node.pop(path_keys[-1])
    else:
        node[path_keys[-1]] = value
    return data


# (case id, config, key named, words in the message)
BAD = [
    (
        "unknown-route-model",
        _with(("routes", "edit", "model"), "nope"),
        "routes.edit.model",
        "there is no model 'nope'",
    ),
    (
        "route-model-of-wrong-kind",
        _with(("routes", "upscale", "model"), "sd"),
        "routes.upscale.model",
        "is of kind text2img; route upscale needs upscale",
    ),
    (
        "fallback-of-wrong-kind",
        _with(("routes", "generate", "fallback"), "edit-v1"),
        "routes.generate.fallback",
        "route generate needs text2img",
    ),
    (
        "fallback-after-without-timeout",
        _with(("routes", "generate", "fallback_on"), ["oom"]),
        "routes.generate.fallback_on",
        "add timeout to fallback_on",
    ),
    (
        "fallback-after-without-fallback",
        _with(("routes", "edit", "fallback_after"), "3s"),
        "routes.edit.fallback_after",
        "needs a fallback",
    ),
    (
        "match-on-a-base-route",
        _with(("routes", "edit", "match"), {"max_side": 64}),
        "routes.edit.match",
        "only the derived route thumbnail",
    ),
    (
        "candidate-of-wrong-kind",
        _with(("rollouts", "edit-v2", "candidate"), "up"),
        "rollouts.edit-v2.candidate",
        "is of kind upscale; route edit needs img2img or inpaint",
    ),
    (
        "candidate-is-the-incumbent",
        _with(("rollouts", "edit-v2", "candidate"), "edit-v1"),
        "rollouts.edit-v2.candidate",
        "a candidate must be another model",
    ),
    (
        "two-rollouts-on-one-route",
        _with(("rollouts", "edit-v2", "route"), "generate"),
        "rollouts.gen-next.route",
        "route generate already has rollout",
    ),
    (
        "rollout-on-a-route-not-served",
        _with(("routes", "upscale"), None, _with(("rollouts", "edit-v2", "route"), "upscale")),
        "rollouts.edit-v2.route",
        "there is no route 'upscale'",
    ),
    (
        "unknown-route-name",
        _with(("routes", "video"), {"model": "sd"}),
        "routes.video",
        "generate",
    ),
    (
        "shorthand-rollout-beside-routes",
        _with(("rollout",), {"stages": ["shadow", 100]}),
        "rollout",
        "rollout: is the two-model shorthand",
    ),
    (
        "stage-name-typo-in-a-rollout",
        _with(("rollouts", "gen-next", "min_samples"), {"shadow": 5, "31": 9}),
        "rollouts.gen-next.min_samples.31",
        "there is no stage '31'",
    ),
    (
        "replicas-of-a-model-in-the-router",
        _with(("models", "up"), {"pipeline": "org/up", "replicas": 3, "in_router": True}),
        "models.up.in_router",
        "set `server.replicas` instead",
    ),
    (
        "bad-model-name",
        _with(("models", "Big Model"), {"pipeline": "org/x"}),
        "models.Big Model",
        "pattern",
    ),
]


@pytest.mark.parametrize(("data", "key", "words"), [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_every_playbook_error_names_file_line_and_key(tmp_path, data, key, words):
    path = write_config(tmp_path, data)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    problems = caught.value.problems
    assert any(p.key == key and words in p.message for p in problems), [str(p) for p in problems]
    located = [p for p in problems if p.key == key]
    assert all(p.file == str(path) and p.line > 0 for p in located), [str(p) for p in located]


def test_a_model_in_the_router_gets_no_deployment_and_adds_its_resources_to_the_router(
    tmp_path,
):
    from controller.serving.app import build_app, cpus_needed

    data = playbook(server={"replicas": 2, "num_cpus": 0.25})
    data["models"]["up"] |= {"in_router": True, "num_cpus": 0.5, "num_gpus": 0.25}
    config = load_config(write_config(tmp_path, data))
    assert config.models_in_router() == ["up"]
    router = build_app(config)._bound_deployment
    assert "up" not in router.init_args[2]  # the handles the router is given
    assert set(router.init_args[2]) == set(config.models_in_use()) - {"up"}
    assert router.ray_actor_options["num_cpus"] == 0.75
    assert router.ray_actor_options["num_gpus"] == 0.25
    others = sum(config.models[n].num_cpus for n in config.models_in_use() if n != "up")
    scorer = config.scorer.num_cpus * config.scorer.actors
    assert cpus_needed(config) == pytest.approx(others + 2 * 0.75 + scorer)
