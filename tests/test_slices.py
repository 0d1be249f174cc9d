"""Prompt tags and the judge's verdicts per slice (pure: no database, no Ray)."""

from __future__ import annotations

import random

import pytest

from controller.rollout.slice_simulation import SliceTraffic, simulate_slices
from policies.checks import FAIL, INCONCLUSIVE, PASS, CheckResult, overall
from policies.judge import JudgeState, Side, Unit, evaluate, slice_findings
from policies.policy import Policy, load_policy
from policies.prompt_tags import phrase, tags_of, with_hand_tags
from policies.slices import SliceState
from policies.vocabulary import Arm


def test_tags_name_quoted_text_people_colour_length_size_steps_route_and_mask():
    tags = tags_of(
        'portrait of a woman holding a sign that says "Every Journey Starts" on #ff0000',
        "generate",
        {"size": "512x512", "steps": 30},
    )
    assert tags == [
        "colour:hex",
        "people:yes",
        "route:generate",
        "script:latin",
        "size:512x512",
        "steps:11-30",
        "text:13+",
        "words:medium",
    ]
    assert "text:1-4" in tags_of('a sign that says "ХЛЕБ"', "generate")
    assert "script:cyrillic" in tags_of('a sign that says "ХЛЕБ"', "generate")
    assert "text:none" in tags_of("a bowl of green apples", "generate")
    assert "colour:named" in tags_of("a bowl of green apples", "generate")
    assert "mask:large" in tags_of("replace the sky", "edit", {"mask_area": 0.6})
    assert with_hand_tags(["text:none"], ["sign"]) == ["tag:sign", "text:none"]
    assert phrase("text:13+") == "prompts quoting ≥ 13 characters"
    assert phrase("people:yes & tag:sign") == (
        "prompts mentioning people, faces or skin and items tagged sign"
    )


def test_a_candidate_failing_only_on_long_quoted_text_gets_a_slice_fail_naming_it():
    policy = load_policy()
    # Quoted text of 13+ characters is 3% of traffic and 1 in 21 quoted prompts: the
    # aggregate typography CER moves by about 0.02, inside its 0.03 tolerance.
    traffic = SliceTraffic(
        pairs=4000,
        text_shares={"1-4": 0.30, "5-12": 0.30, "13+": 0.03},
        worse_on="text:13+",
        shift=0.4,
    )
    outcome = simulate_slices(policy, traffic, seed=3, stop_when_found=False)
    assert outcome.found_at is not None
    first = next(f for f in outcome.findings if f.slice == "text:13+")  # the first look's
    assert first.sentence.startswith("candidate worse on prompts quoting ≥ 13 characters: ")
    assert "no difference beyond the tolerance elsewhere" in first.sentence
    assert first.lower > 0 and first.samples >= policy.slices.min_samples
    assert all("text:13+" in f.slice.split(" & ") for f in outcome.findings)
    aggregate = {r.name: r for r in evaluate(outcome.state)}["typography_cer"]
    assert aggregate.decision != FAIL
    assert aggregate.estimate is not None and aggregate.estimate <= 0.03


def test_a_a_rollouts_find_no_slice_at_the_documented_rate():
    policy = load_policy()
    runs = 40
    outcomes = [simulate_slices(policy, SliceTraffic(pairs=1000), seed) for seed in range(runs)]
    assert all(o.slices_judged >= 20 for o in outcomes)
    false = sum(bool(o.findings) for o in outcomes)
    # The promise is at most slices.alpha = 5% of attempts; 40 runs at 5% would give more
    # than 6 with probability under 1.5%, and Bonferroni keeps the true rate far below.
    assert false <= 6


def unit(n, tags, cer=None, failed=False):
    ok = Side(["ok"], 1000.0, 0.0, 0.1)
    cand = Side(["error"], None, None, None) if failed else ok
    scores = {"typography_cer": [cer]} if cer else {}
    return Unit(f"r{n}", {Arm.CANDIDATE: cand, Arm.INCUMBENT: ok}, scores, tuple(tags))


def test_slice_state_is_order_free_and_survives_json():
    policy = load_policy()
    rng = random.Random(1)
    units = [
        unit(
            n,
            tags_of(
                rng.choice(['a sign "OPEN"', "a woman", 'a sign "Every Journey Starts"']),
                "generate",
            ),
            (rng.random(), rng.random()),
            failed=rng.random() < 0.1,
        )
        for n in range(300)
    ]

    def folded(order):
        state = JudgeState(policy)
        for u in order:
            state.fold_arms(u)
            state.fold_scores(u, [])
        return state

    forward, backward = folded(units), folded(list(reversed(units)))
    assert forward.slices.to_json()["counts"] == backward.slices.to_json()["counts"]
    assert sorted(forward.slices.admitted) == sorted(backward.slices.admitted)
    assert forward.slices.counts["typography_cer"]["text:13+"].n > 50
    restored = JudgeState.from_json(policy, forward.to_json())
    assert restored.slices.to_json() == forward.slices.to_json()


def test_a_check_never_judges_more_than_max_slices_and_each_runs_at_its_share():
    body = load_policy().model_dump()
    body["slices"]["max_slices"] = 5
    policy = Policy.model_validate(body)
    state = SliceState(policy)
    for n in range(50):
        state.admit(
            tags_of(f'prompt {n} "{"x" * (n % 20)}" red', "generate", {"size": f"{8 * (n + 1)}x64"})
        )
    assert len(state.admitted) == 5
    assert sum(" & " in name for name in state.admitted) <= 2  # pairs take half the room
    check = next(c for c in policy.checks if c.name == "typography_cer")
    shares = sum(c.weight for c in policy.sliced_checks)
    assert policy.slice_alpha_for(check) == pytest.approx(0.05 * check.weight / shares / 5)
    assert all(c.kind != "quantile" for c in policy.sliced_checks)


@pytest.mark.parametrize(
    ("actions", "expected"),
    [((), PASS), (("report",), PASS), (("hold",), INCONCLUSIVE), (("rollback",), FAIL)],
)
def test_what_a_slice_finding_does_to_the_verdict(actions, expected):
    passing = CheckResult("c", PASS, 0.0, -1.0, 0.0, 100, True, "ok", 0.05)
    assert overall([passing], actions) == expected


def test_findings_are_empty_when_slicing_is_off():
    body = load_policy().model_dump()
    body["slices"]["enabled"] = False
    policy = Policy.model_validate(body)
    state = JudgeState(policy)
    for n in range(200):
        u = unit(n, ["text:13+", "route:generate"], (1.0, 0.0))
        state.fold_arms(u)
        state.fold_scores(u, [])
    assert slice_findings(state) == []


def test_a_validation_fails_on_a_slice_its_policy_rolls_back_and_holds_on_one_it_holds():
    from controller.lab.validation import decide

    policy = load_policy()
    checks = [
        {
            "name": c.name,
            "decision": PASS,
            "critical": c.critical,
            "samples": c.min_samples,
            "probe_error": False,
            "reason": "fine",
        }
        for c in policy.checks
    ]
    finding = {"check": "typography_cer", "slice": "text:13+", "sentence": "candidate worse on …"}
    standing = {"units": 200, "checks": checks, "slices": []}
    assert decide(standing, policy)[0] == PASS
    rolled = decide(standing | {"slices": [finding | {"action": "rollback"}]}, policy)
    assert rolled[0] == FAIL and "typography_cer FAIL on a slice: candidate worse on" in rolled[1]
    held = decide(standing | {"slices": [finding | {"action": "hold"}]}, policy)
    assert held[0] == INCONCLUSIVE and "holds" in held[1]
    reported = decide(standing | {"slices": [finding | {"action": "report"}]}, policy)
    assert reported[0] == PASS and "reported" in reported[1]
