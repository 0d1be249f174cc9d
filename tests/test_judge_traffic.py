"""The judge under production-shaped traffic: seeded simulations through its own code.

Each scenario is one of issue 11's findings. Every test also judges the same traffic
the naive way (the judge before the fix, or this judge without the piece that fixes
the scenario) and asserts that that goes wrong, so a test fails if its fix is undone.
`bench/judge_sim.py` runs the same scenarios at 500+ runs each.
"""

from __future__ import annotations

import dataclasses
import random
import statistics

import pytest

from bench.judge_sim import only, previous_judge_fails, uncensored
from controller.rollout.simulation import SCENARIOS, Traffic, generate, judge_traffic
from policies.checks import FAIL, INCONCLUSIVE, PASS, evaluate_rate, overall
from policies.judge import OutputFacts, build_window, evaluate, state_of
from policies.metrics import METRICS
from policies.policy import load_policy
from policies.summaries import PairCounts
from policies.vocabulary import Arm

CANDIDATE, INCUMBENT = Arm.CANDIDATE, Arm.INCUMBENT


def aa_rollbacks(traffic: Traffic, runs: int, seed: int, naive, policy=None) -> tuple[int, int]:
    """False rollbacks of the judge and of a naive judge over `runs` A/A attempts."""
    policy = policy or load_policy()
    rng = random.Random(seed)
    ours = theirs = 0
    for _ in range(runs):
        records = generate(traffic, rng)
        ours += judge_traffic(policy, traffic, rng, 200, records=records).rollback_at is not None
        theirs += naive(records)
    return ours, theirs


# The error check with no tolerance at all: A/A sits exactly on its null, where an invalid
# unit of analysis shows most plainly.
AT_THE_BOUNDARY = only(load_policy(), "error_rate", ratio=1.0, absolute=0.0)


def test_sticky_heavy_users_do_not_roll_back_a_healthy_candidate():
    """Heavy users routed stickily, mirrors skipped under load: judged on mirrored requests
    only, no false rollback; the count test that took unmirrored requests at the split did."""

    def previous(records) -> bool:
        return previous_judge_fails(records, AT_THE_BOUNDARY.alpha, ratio=1.0)

    # The bench's scenario run twice as long: the naive test's bias grows with the evidence.
    traffic = dataclasses.replace(SCENARIOS["sticky_heavy_users"], requests=12_000)
    ours, theirs = aa_rollbacks(traffic, 30, 11, previous, AT_THE_BOUNDARY)
    assert ours <= 2  # alpha 0.0167 of 30 is 0.5
    assert theirs >= 4  # a valid 5% test reaches 4 of 30 in 6% of seeds; this one is fixed


def test_a_request_wide_failure_of_four_images_is_one_unit():
    """Four images, failures taking out the whole request: one unit per request keeps the
    check at alpha; the same check with one unit per image does not."""
    check = AT_THE_BOUNDARY.checks[0]
    bad = METRICS["failure"].statuses

    def per_image(records) -> bool:
        window = build_window(records.outputs, records.mirrored, [], {})
        units = []
        for unit in window.units:
            pairs = zip(unit.arms[CANDIDATE].statuses, unit.arms[INCUMBENT].statuses, strict=True)
            units.extend((float(c in bad), float(i in bad)) for c, i in pairs)
            if (
                len(units) % 400 == 0
                and evaluate_rate(check, PairCounts.of(units), AT_THE_BOUNDARY.alpha).decision
                == FAIL
            ):
                return True
        return False

    traffic = dataclasses.replace(
        SCENARIOS["four_images"], failure={CANDIDATE: 0.08, INCUMBENT: 0.08}
    )
    ours, theirs = aa_rollbacks(traffic, 30, 12, per_image, AT_THE_BOUNDARY)
    assert ours <= 2
    assert theirs >= 4


def test_a_slow_identical_model_on_the_mirror_side_is_not_rolled_back():
    """Median 25 s, 4% over the mirror's 60 s timeout: both arms judged at the 60 s deadline."""
    policy = only(load_policy(), "error_rate", "latency_p95")

    def naive(records) -> bool:
        traffic = SCENARIOS["slow_mirror_timeouts"]
        judged = judge_traffic(policy, traffic, random.Random(0), 200, records=uncensored(records))
        return judged.rollback_at is not None

    ours, theirs = aa_rollbacks(SCENARIOS["slow_mirror_timeouts"], 30, 13, naive)
    assert ours <= 2
    assert theirs >= 6


def test_the_rate_tolerance_is_a_rate_ratio_not_an_odds_ratio():
    """25% vs 20% failures against x1.25: the null holds, so the check must not FAIL by 20,000
    pairs (a test on discordant pairs alone FAILs in about a third of runs)."""
    from bench.judge_sim import _discordant_fails

    policy = only(load_policy(), "error_rate", ratio=1.25, absolute=0.0)
    traffic = Traffic(
        requests=20_000, stages=(0,), failure={CANDIDATE: 0.25, INCUMBENT: 0.20}, oom=0.0, blank=0.0
    )
    rng = random.Random(14)
    ours = theirs = 0
    for _ in range(20):
        records = generate(traffic, rng)
        ours += (
            "error_rate" in judge_traffic(policy, traffic, rng, 1000, records=records).first_fail
        )
        theirs += _discordant_fails(records, 1.25, policy.alpha)
    assert ours <= 1
    assert theirs >= 3


@pytest.mark.parametrize(("rate", "within"), [(0.01, 3000), (0.02, 3500), (0.05, 4000)])
def test_a_healthy_candidate_passes_error_rate_within_a_few_thousand_pairs(rate, within):
    """The median first PASS stays inside the window quoted in docs/policy.md."""
    policy = only(load_policy(), "error_rate")
    traffic = Traffic(requests=12_000, stages=(0,), failure={CANDIDATE: rate, INCUMBENT: rate})
    rng = random.Random(15)
    firsts = []
    for _ in range(15):
        outcome = judge_traffic(policy, traffic, rng, 100, stop_on="error_rate")
        assert "error_rate" not in outcome.first_fail
        firsts.append(outcome.first_pass.get("error_rate", 10**9))
    assert statistics.median(firsts) <= within


def test_a_nan_score_never_reaches_a_statistic():
    """One NaN in a hundred colour scores, every other pair ΔE 50: colour shift still FAILs."""
    policy = only(load_policy(), "colour_shift")
    traffic = Traffic(requests=600, stages=(0,), scores=True, colour=(50.0, 1.0), nan_every=100)
    outcome = judge_traffic(policy, traffic, random.Random(16), 100)
    result = outcome.last[0]
    assert result.decision == FAIL and "nan" not in result.reason.lower()
    assert "colour_shift" in outcome.first_fail


@pytest.mark.parametrize(
    ("probe", "check"), [("typography_cer", "typography_cer"), ("colour_shift_de", "colour_shift")]
)
def test_a_probe_that_always_errors_holds_the_rollout_and_says_why(probe, check):
    """Everything else healthy: the verdict is never PASS, and the check names the probe error."""
    policy = load_policy()
    traffic = Traffic(
        requests=6000, stages=(0,), scores=True, oom=0.0, probe_error_share={probe: 1.0}
    )
    outcome = judge_traffic(policy, traffic, random.Random(17), 500)
    results = {r.name: r for r in outcome.last}
    assert results[check].decision == INCONCLUSIVE and results[check].probe_error
    assert f"probe {probe} errored on" in results[check].reason
    assert "OCR failed" in results[check].reason or "probe error" in results[check].reason
    assert results["error_rate"].decision == PASS  # the rest has enough evidence ...
    assert overall(outcome.last) == INCONCLUSIVE  # ... but no PASS without the probe's


def test_spread_and_tail_regressions_are_caught_by_the_tail_checks():
    """Colour with the same mean shift but 3x the spread, and CER with the same mean but a
    quarter of pairs worse by 0.3 or more: the mean checks cannot see them, the tails do."""
    policy = load_policy()
    colour = Traffic(requests=1500, stages=(0,), scores=True, colour=(2 / 9, 9.0))
    outcome = judge_traffic(policy, colour, random.Random(18), 100)
    assert "colour_tail" in outcome.first_fail and "colour_shift" not in outcome.first_fail
    assert outcome.rollback_at is not None
    cer = Traffic(
        requests=6000,
        stages=(0,),
        scores=True,
        typography_share=1.0,
        cer_tail=0.25,
        cer_shift=-0.15,
    )
    outcome = judge_traffic(policy, cer, random.Random(19), 200)
    assert "typography_tail" in outcome.first_fail and "typography_cer" not in outcome.first_fail


def out(request, role, index, status="ok", latency=1000.0, timeout=60.0) -> OutputFacts:
    return OutputFacts(
        f"{request}-{role}-{index}", request, role, index, status, latency, 0.0, 1, timeout
    )


def test_a_non_finite_latency_never_reaches_the_quantile_check():
    outputs = [
        out(f"r{k}", role, 0, latency=100.0 + k)
        for k in range(60)
        for role in (CANDIDATE, INCUMBENT)
    ]
    outputs.append(out("odd", INCUMBENT, 0))
    outputs.append(out("odd", CANDIDATE, 0, latency=float("nan")))
    window = build_window(outputs, {o.request_id for o in outputs}, [], {})
    latency = next(r for r in evaluate(state_of(load_policy(), window)) if r.name == "latency_p95")
    assert latency.samples == 60 and "nan" not in latency.reason.lower()


def test_units_are_whole_mirrored_requests_judged_at_the_shorter_deadline():
    """The window by hand: unmirrored and half-recorded requests are left out, a slow success
    past the mirror's deadline is a timeout there, and four images make one unit."""

    outputs = [
        out("alone", INCUMBENT, 0, timeout=120.0),  # not mirrored
        out("half", INCUMBENT, 0, timeout=120.0),  # mirrored, mirror not recorded yet
        out("slow", INCUMBENT, 0, latency=90_000.0, timeout=120.0),
        out("slow", CANDIDATE, 0, latency=30_000.0),
        *(out("four", INCUMBENT, k, status="error", timeout=120.0) for k in range(4)),
        *(out("four", CANDIDATE, k) for k in range(4)),
    ]
    window = build_window(outputs, {"half", "slow", "four"}, [], {})
    assert [u.request_id for u in window.units] == ["slow", "four"]
    slow, four = window.units
    assert slow.arms[INCUMBENT].statuses == ["timeout"]  # 90 s > the pair's 60 s
    assert slow.arms[INCUMBENT].latency_ms == 60_000.0
    assert slow.arms[CANDIDATE].statuses == ["ok"] and slow.arms[CANDIDATE].latency_ms == 30_000.0
    assert (
        four.arms[INCUMBENT].statuses == ["error"] * 4 and four.arms[INCUMBENT].latency_ms is None
    )
    results = {r.name: r for r in evaluate(state_of(load_policy(), window))}
    assert results["error_rate"].samples == 2  # two units, not five images
    # The incumbent failed both: mean(z) = 0 - 1.2 x 1 - 0.01, far inside the tolerance.
    assert results["error_rate"].estimate == pytest.approx(-1.21)
    assert "rate 0.00% vs 100.00% over 2 mirrored requests" in results["error_rate"].reason
