"""The bake-off's comparison, pure: what it asks of each check, its error rate under A/A,
and that it ranks real regressions below the baseline (seeded simulations)."""

from __future__ import annotations

import random

from controller.lab.compare import bakeoff_alpha, lab_policy, lines, rank
from controller.lab.simulation import Engine, Suite, simulate
from policies.checks import FAIL
from policies.policy import load_policy


def test_the_bakeoff_asks_worse_or_better_at_all_except_for_distances():
    policy = load_policy()
    lab = {c.name: c for c in lab_policy(policy).checks}
    assert (lab["error_rate"].tolerance.ratio, lab["error_rate"].tolerance.absolute) == (1.0, 0.0)
    assert lab["latency_p95"].tolerance.ratio == 1.0
    assert lab["typography_cer"].tolerance.absolute == 0.0
    # ΔE against the baseline is a distance: zero would call every other model worse.
    assert (
        lab["colour_shift"].tolerance
        == {c.name: c for c in policy.checks}["colour_shift"].tolerance
    )
    alpha_for = bakeoff_alpha(lab_policy(policy), compared=4)
    total = sum(alpha_for(c) for c in lab_policy(policy).checks) * 4
    assert abs(total - policy.alpha) < 1e-12  # one budget over every check of every model


def test_aa_bakeoffs_call_a_model_worse_no_more_often_than_alpha():
    """The same model under four names, judged after every round and stopped early when
    losing: the share of bake-offs where any of them is called worse stays within alpha."""
    policy = load_policy()
    runs, false_worse = 60, 0
    for seed in range(runs):
        result = simulate(
            policy,
            Engine(),
            {name: Engine() for name in ("a", "b", "c", "d")},
            Suite(units=200, round_size=40),
            random.Random(seed),
        )
        false_worse += any(after is not None for after in result.worse_after.values())
    assert false_worse / runs <= policy.alpha


def test_a_model_at_the_boundary_is_not_called_better_or_worse_beyond_alpha():
    """Worst case for the claims: latency exactly the baseline's, CER exactly the baseline's,
    many looks. Every claim (worse or better) on any check counts as an error."""
    policy = load_policy()
    runs, wrong = 40, 0
    for seed in range(runs):
        result = simulate(
            policy,
            Engine(failure=0.2),
            {"a": Engine(failure=0.2), "b": Engine(failure=0.2)},
            Suite(units=300, round_size=20, typography_share=1.0),
            random.Random(1000 + seed),
            early_stop=False,
        )
        wrong += any(s.worse or s.better for s in result.standings.values())
    assert wrong / runs <= policy.alpha


def test_tinted_erroring_and_worse_typography_models_rank_below_the_baseline():
    policy = load_policy()
    result = simulate(
        policy,
        Engine(),
        {
            "tinted": Engine(colour_de=30.0),
            "erroring": Engine(failure=0.23),
            "good": Engine(),
            "blurry-text": Engine(cer_shift=0.1),
        },
        Suite(units=400),
        random.Random(7),
    )
    ranked = rank(result.standings.values())
    assert ranked[0].model == "good" and ranked[0].verdict == "level"
    verdicts = {s.model: s.verdict for s in ranked}
    assert verdicts == {
        "good": "level",
        "tinted": "worse",
        "erroring": "worse",
        "blurry-text": "worse",
    }
    said = lines(ranked)
    assert any(line.startswith("worse than baseline on colour_shift") for line in said["tinted"])
    assert any("error_rate" in line for line in said["erroring"])
    # Its CER is worse: seen by the mean check or the tail check, whichever crosses first.
    assert any("worse than baseline on typography_" in line for line in said["blurry-text"])
    # A clearly losing model stops being rendered; the claim it was stopped on stands.
    tinted = result.standings["tinted"]
    assert tinted.stopped and tinted.units < 400
    assert any(r.decision == FAIL and r.name == "colour_shift" for r in tinted.results)
