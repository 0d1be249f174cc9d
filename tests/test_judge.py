"""The judge's maths: confidence sequences against independent computations, and A/A honesty."""

from __future__ import annotations

import dataclasses
import math
import random

import pytest
from scipy import integrate, optimize, stats

from policies.checks import (
    FAIL,
    INCONCLUSIVE,
    PASS,
    evaluate_paired,
    evaluate_quantile,
    evaluate_rate,
    paired_grid,
    signed,
)
from policies.policy import Check, Tolerance, load_policy
from policies.sequential import (
    PRIOR_A,
    PRIOR_B,
    bernoulli_cs,
    log_mixture_ratio,
    mean_bounds,
    mean_test,
    quantile_cs,
)
from policies.summaries import BetGrid, LogHistogram, PairCounts


@pytest.mark.parametrize("side", ["above", "below"])
@pytest.mark.parametrize(
    ("successes", "n", "p"), [(0, 10, 0.1), (3, 50, 0.02), (40, 100, 0.5), (99, 100, 0.9)]
)
def test_mixture_ratio_matches_numerical_integration(successes, n, p, side):
    """The closed forms (beta and incomplete beta functions) against scipy's quadrature of the
    mixture integral, the prior restricted (and renormalised) to one side of p."""
    prior = stats.beta(PRIOR_A, PRIOR_B)

    def integrand(q):
        return math.exp(
            successes * math.log(q / p) + (n - successes) * math.log((1 - q) / (1 - p))
        ) * prior.pdf(q)

    low, high, mass = {
        "above": (p, 1.0, prior.sf(p)),
        "below": (0.0, p, prior.cdf(p)),
    }[side]
    inside = [successes / n] if low < successes / n < high else None
    numeric, _ = integrate.quad(integrand, low, high, points=inside, limit=200)
    assert log_mixture_ratio(successes, n, p, side) == pytest.approx(
        math.log(numeric / mass), rel=1e-6, abs=1e-6
    )


@pytest.mark.parametrize("n", [10, 100, 1000])
def test_zero_successes_upper_bound_solves_the_one_sided_mixture_numerically(n):
    """Independently of the code's closed form: the "below" mixture for zero successes,
    integrated by quadrature (q = u^2 removes the prior's singularity at 0), crosses 1/alpha
    exactly at the reported upper bound."""
    alpha = 0.05
    prior = stats.beta(PRIOR_A, PRIOR_B)
    norm = math.exp(math.lgamma(PRIOR_A) + math.lgamma(PRIOR_B) - math.lgamma(PRIOR_A + PRIOR_B))

    def log_ratio(p: float) -> float:
        numeric, _ = integrate.quad(
            lambda u: 2 * (1 - u * u) ** (n - 0.5) / norm, 0, math.sqrt(p), limit=200
        )
        return math.log(numeric / prior.cdf(p)) - n * math.log1p(-p)

    expected = optimize.brentq(lambda p: log_ratio(p) - math.log(1 / alpha), 1e-9, 0.99)
    assert bernoulli_cs(0, n, alpha).upper == pytest.approx(expected, rel=1e-5)


def test_each_end_of_the_bernoulli_sequence_is_one_sided_at_alpha():
    """Each end alone may be wrong at some look with probability at most alpha (400 runs of
    3000 steps at a small rate, where the upper end matters most)."""
    rng = random.Random(29)
    alpha, p, below, above = 0.1, 0.01, 0, 0
    for _ in range(400):
        successes, low_missed, high_missed = 0, False, False
        for t in range(1, 3001):
            successes += rng.random() < p
            if t % 25 == 0:
                bounds = bernoulli_cs(successes, t, alpha)
                low_missed |= p < bounds.lower
                high_missed |= p > bounds.upper
        below += low_missed
        above += high_missed
    assert below / 400 <= alpha and above / 400 <= alpha


def test_bernoulli_cs_is_wider_than_a_fixed_sample_interval_but_shrinks():
    wilson = stats.binomtest(50, 1000).proportion_ci(0.95, method="wilson")
    cs = bernoulli_cs(50, 1000, 0.05)
    assert cs.lower < wilson.low and cs.upper > wilson.high  # the price of looking at every step
    assert bernoulli_cs(500, 10000, 0.05).width < cs.width / 2.5


def test_time_uniform_coverage_of_quantile_and_betting_summaries():
    """Each end of the quantile bounds (exact and from the log histogram the judge keeps) and
    of the paired check's grid bounds is wrong at some look w.p. <= alpha."""
    rng = random.Random(11)
    alpha = 0.1
    keys = ("p90 low", "p90 high", "sketch low", "sketch high", "mean low", "mean high")
    misses = dict.fromkeys(keys, 0)
    true_p90, true_mean = -math.log(0.1), 2 / 7  # Exp(1) and Beta(2, 5)
    for _ in range(150):
        values, histogram, grid = [], LogHistogram(), BetGrid(0.0, 1.0, 0.5)
        missed = dict.fromkeys(misses, False)
        for t in range(1, 401):
            values.append(rng.expovariate(1.0))
            histogram.add(values[-1])
            grid.add_many([rng.betavariate(2, 5)])
            if t % 25 == 0:
                quantile = quantile_cs(values, 0.9, alpha)
                sketch = histogram.quantile_bounds(0.9, alpha)
                mean = grid.bounds(alpha)
                missed["p90 low"] |= true_p90 < quantile.lower
                missed["p90 high"] |= true_p90 > quantile.upper
                missed["sketch low"] |= true_p90 < sketch.lower
                missed["sketch high"] |= true_p90 > sketch.upper
                missed["mean low"] |= true_mean < mean.lower
                missed["mean high"] |= true_mean > mean.upper
        for key, value in missed.items():
            misses[key] += value
    assert all(count / 150 <= alpha for count in misses.values()), misses


def test_the_histogram_rounds_each_bound_outwards_by_at_most_one_bucket():
    rng = random.Random(2)
    values = [rng.lognormvariate(4, 0.5) for _ in range(3000)]
    exact, sketch = quantile_cs(values, 0.95, 0.01), LogHistogram.of(values)
    bounds = sketch.quantile_bounds(0.95, 0.01)
    assert exact.lower / 1.01 <= bounds.lower <= exact.lower
    assert exact.upper <= bounds.upper <= exact.upper * 1.01
    point = sorted(values)[int(0.95 * len(values))]
    assert sketch.point_quantile(0.95) == pytest.approx(point, rel=0.006)


def test_each_paired_claim_is_one_sided_at_alpha():
    """A mean sitting exactly at the tolerance: the test against "within tolerance" wrongly
    reaches 1/alpha (a false FAIL) in at most alpha of runs, checked after every point. Data at
    the two ends of the range make the bets as risky as they can be."""
    rng = random.Random(17)
    alpha, false_fails = 0.2, 0
    for _ in range(300):
        grid = BetGrid(-1.0, 1.0, 0.0)
        for _step in range(300):
            grid.add_many([rng.choice((-1.0, 1.0)) if rng.random() < 0.1 else 0.0])
            if grid.test_at_limit()[0] >= math.log(1 / alpha):
                false_fails += 1
                break
    assert false_fails / 300 <= alpha


def test_the_grid_summary_is_the_mean_test_on_the_raw_values_in_any_order():
    """The paired check's state is a sum per bet: folding values in any order and any
    chunks gives the e-values `mean_test` computes from the raw values, and bounds within
    a grid step of `mean_bounds`, rounded outwards."""
    rng = random.Random(23)
    values = [max(-1.0, min(1.0, rng.gauss(0.05, 0.15))) for _ in range(400)]
    one_pass, shuffled = BetGrid(-1.0, 1.0, 0.03), BetGrid(-1.0, 1.0, 0.03)
    one_pass.add_many(values)
    order = values[:]
    rng.shuffle(order)
    for start in range(0, len(order), 37):
        shuffled.add_many(order[start : start + 37])
    raw = mean_test(values, 0.03, -1.0, 1.0)
    assert one_pass.test_at_limit() == pytest.approx(raw, rel=1e-9)
    assert shuffled.test_at_limit() == pytest.approx(raw, rel=1e-9)
    restored = BetGrid.from_json(shuffled.to_json())
    assert restored.test_at_limit() == pytest.approx(raw, rel=1e-9) and restored.n == 400
    exact, grid = mean_bounds(values, 0.01, -1.0, 1.0), one_pass.bounds(0.01)
    step = 2.0 / 256
    assert exact.lower - step <= grid.lower <= exact.lower
    assert exact.upper <= grid.upper <= exact.upper + step


def grid_of(check, values):
    grid = paired_grid(check)
    grid.add_many(signed(check, values))
    return grid


def check(kind, metric, **extra):
    tolerance = extra.pop("tolerance", {"absolute": 0.01})
    return Check(
        name=f"{metric}_check",
        kind=kind,
        metric=metric,
        tolerance=Tolerance(**tolerance),
        min_samples=20,
        **extra,
    )


def test_rate_check_fails_passes_and_says_why():
    """Units are mirrored requests: (candidate's failed share, incumbent's)."""
    c = check("rate", "failure")
    worse = [(1.0, 0.0)] * 120 + [(0.0, 1.0)] * 20 + [(0.0, 0.0)] * 860
    fail = evaluate_rate(c, PairCounts.of(worse), 0.01)
    assert fail.decision == FAIL and fail.lower > 0
    assert fail.reason.startswith("candidate failure rate 12.00% vs 2.00% over 1000 mirrored")
    assert "above 1 pp of the incumbent's" in fail.reason and "99% confidence" in fail.reason
    assert evaluate_rate(c, PairCounts.of([(0.0, 0.0)] * 5000), 0.01).decision == PASS
    assert (
        evaluate_rate(
            c, PairCounts.of([(1.0, 0.0)] * 3 + [(0.0, 1.0)] * 2 + [(0.0, 0.0)] * 95), 0.01
        ).decision
        == INCONCLUSIVE
    )
    assert (
        "5/20 samples"
        in evaluate_rate(c, PairCounts.of([(1.0, 0.0)] * 4 + [(0.0, 0.0)]), 0.01).reason
    )


def test_rate_check_tests_the_rate_ratio_with_both_failures_counted():
    """At 50% vs 40% with x1.25 the null holds exactly (rate ratio 1.25) though the odds ratio
    is 1.5: pairs where both arms failed must count, or the check tests the odds ratio."""
    c = check("rate", "failure", tolerance={"ratio": 1.25})
    # Independent arms: both fail 20%, candidate only 30%, incumbent only 20%, neither 30%.
    units = [(1.0, 1.0)] * 2000 + [(1.0, 0.0)] * 3000 + [(0.0, 1.0)] * 2000 + [(0.0, 0.0)] * 3000
    at_boundary = evaluate_rate(c, PairCounts.of(units), 0.05)
    assert at_boundary.decision == INCONCLUSIVE
    assert at_boundary.lower < 0 < at_boundary.upper
    slightly_worse = (
        [(1.0, 1.0)] * 2000 + [(1.0, 0.0)] * 4000 + [(0.0, 1.0)] * 2000 + [(0.0, 0.0)] * 2000
    )
    assert evaluate_rate(c, PairCounts.of(slightly_worse), 0.05).decision == FAIL


def test_mean_test_is_one_sided_at_alpha_under_its_null():
    """Rare events at exactly the null's boundary, looked at after every 50 values: each side's
    e-value ever reaches 1/alpha in at most alpha of runs."""
    rng = random.Random(41)
    alpha, ratio, runs = 0.1, 1.25, 300
    fails = passes = 0
    for _ in range(runs):
        z, failed, passed = [], False, False
        for step in range(4000):
            c, i = rng.random() < 0.05 * ratio, rng.random() < 0.05
            z.append(c - ratio * i)
            if step % 50 == 49:
                above, below = mean_test(z, 0.0, -ratio, 1.0)
                failed |= above >= math.log(1 / alpha)
                passed |= below >= math.log(1 / alpha)
        fails += failed
        passes += passed
    assert fails / runs <= alpha and passes / runs <= alpha


def test_mean_test_known_value_and_bounds_agree_with_it():
    """One value at the top of [-1, 1] against m = 0: the "above" capital of each stake s is
    1 + s, so the mixture is their mean; the bounds are where the tests stop rejecting."""
    from policies.sequential import STAKES

    above, below = mean_test([1.0], 0.0, -1.0, 1.0)
    assert above == pytest.approx(math.log(sum(1 + s for s in STAKES) / len(STAKES)))
    assert below == pytest.approx(math.log(sum(1 - s for s in STAKES) / len(STAKES)))
    values = [0.3] * 400 + [-0.1] * 100
    bounds = mean_bounds(values, 0.05, -1.0, 1.0)
    assert bounds.lower < 0.22 < bounds.upper
    assert mean_test(values, bounds.lower - 1e-3, -1.0, 1.0)[0] >= math.log(20)
    assert mean_test(values, bounds.upper + 1e-3, -1.0, 1.0)[1] >= math.log(20)


def test_quantile_check_with_ratio_tolerance():
    rng = random.Random(3)
    c = check("quantile", "latency_ms", quantile=0.95, tolerance={"ratio": 1.2})
    base = [rng.lognormvariate(4, 0.3) for _ in range(3000)]
    slow = [2 * rng.lognormvariate(4, 0.3) for _ in range(3000)]
    same = [rng.lognormvariate(4, 0.3) for _ in range(3000)]
    assert evaluate_quantile(c, LogHistogram.of(slow), LogHistogram.of(base), 0.01).decision == FAIL
    assert evaluate_quantile(c, LogHistogram.of(same), LogHistogram.of(base), 0.01).decision == PASS


def test_paired_check_on_differences_and_direction():
    rng = random.Random(5)
    worse = [max(-1, min(1, rng.gauss(0.3, 0.1))) for _ in range(200)]
    c = check("paired_mean", "typography_cer", tolerance={"absolute": 0.05})
    assert evaluate_paired(c, grid_of(c, worse), 0.01).decision == FAIL
    assert evaluate_paired(c, grid_of(c, [-v for v in worse]), 0.01).decision == PASS
    higher = check(
        "paired_mean", "clip_score", tolerance={"absolute": 0.05}, direction="higher_is_better"
    )
    assert evaluate_paired(higher, grid_of(higher, [-v for v in worse]), 0.01).decision == FAIL


def test_a_policy_still_using_negligible_is_told_what_to_write(tmp_path):
    from policies.yaml_source import SourceError

    path = tmp_path / "policy.yaml"
    path.write_text(
        "alpha: 0.05\nchecks:\n"
        "  - name: error_rate\n"
        "    kind: rate\n"
        "    metric: failure\n"
        "    tolerance: {ratio: 1.25, negligible: 0.01}\n"
    )
    with pytest.raises(SourceError) as error:
        load_policy(path)
    message = str(error.value)
    assert "policy.yaml:6" in message and "negligible" in message
    assert "{ratio: R, absolute: A}" in message and "absolute: 0.01" in message


def test_a_tail_check_needs_its_threshold(tmp_path):
    from policies.yaml_source import SourceError

    path = tmp_path / "policy.yaml"
    path.write_text(
        "checks:\n"
        "  - {name: t, kind: tail_rate, metric: colour_shift_de, tolerance: {absolute: 0.02}}\n"
    )
    with pytest.raises(SourceError) as error:
        load_policy(path)
    assert "policy.yaml:2" in str(error.value) and "threshold" in str(error.value)


def test_alpha_is_shared_by_weight_within_each_budget(tmp_path):
    """Critical checks share alpha, the others advisory_alpha; the shares add up to each budget."""
    policy = load_policy()
    critical = [c for c in policy.checks if c.critical]
    advisory = [c for c in policy.checks if not c.critical]
    assert sum(policy.alpha_for(c) for c in critical) == pytest.approx(policy.alpha)
    assert sum(policy.alpha_for(c) for c in advisory) == pytest.approx(policy.alpha)
    by_name = {c.name: policy.alpha_for(c) for c in policy.checks}
    assert by_name["error_rate"] == pytest.approx(3 * by_name["latency_p95"])
    path = tmp_path / "policy.yaml"
    path.write_text(
        "alpha: 0.04\nadvisory_alpha: 0.1\nchecks:\n"
        "  - {name: a, kind: rate, metric: oom, tolerance: {absolute: 0.01}}\n"
        "  - {name: b, kind: rate, metric: blank, tolerance: {absolute: 0.01}, weight: 3}\n"
        "  - {name: c, kind: rate, metric: error, tolerance: {absolute: 0.01}, critical: false}\n"
    )
    custom = load_policy(path)
    assert [custom.alpha_for(c) for c in custom.checks] == pytest.approx([0.01, 0.03, 0.1])


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (
            "  - {name: a, kind: rate, metric: oom, tolerance: {absolute: 0.01}, weight: 0}\n",
            "weight",
        ),
        (
            "  - {name: a, kind: rate, metric: oom, tolerance: {absolute: 0.01}}\n"
            "  - {name: a, kind: rate, metric: blank, tolerance: {absolute: 0.01}}\n",
            "repeated: a",
        ),
    ],
)
def test_bad_weights_and_repeated_names_are_refused(tmp_path, body, words):
    from policies.yaml_source import SourceError

    path = tmp_path / "policy.yaml"
    path.write_text("alpha: 0.05\nchecks:\n" + body)
    with pytest.raises(SourceError) as error:
        load_policy(path)
    assert "policy.yaml" in str(error.value) and words in str(error.value)


def test_cost_per_image_is_a_check_and_a_priced_figure():
    from controller.review.status import cost_per_image
    from policies.judge import JudgeState, Side, Unit, evaluate

    policy = load_policy()
    state = JudgeState(policy)
    for n in range(60):  # the candidate's images cost twice the incumbent's GPU time
        arms = {
            "candidate": Side(["ok"], 100.0, 0.0, 0.2),
            "incumbent": Side(["ok"], 100.0, 0.0, 0.1),
        }
        state.fold_arms(Unit(f"r{n}", arms, {}))
    results = evaluate(state)
    cost = next(r for r in results if r.name == "cost_per_image")
    assert cost.decision == "FAIL" and not cost.critical  # x2 is beyond x1.25: it holds
    figure = cost_per_image([r.as_dict() for r in results], price_per_gpu_hour=3.6)
    assert figure["gpu_seconds_p50"]["candidate"] == pytest.approx(0.2, rel=0.05)
    assert figure["usd_per_1k_images"]["candidate"] == pytest.approx(
        0.2, rel=0.05
    )  # 0.2 s at $1/ks
    assert cost_per_image([r.as_dict() for r in results], None)["usd_per_1k_images"] is None


def test_a_critical_check_the_traffic_never_measures_holds_nothing_until_it_does():
    from policies.checks import overall
    from policies.judge import JudgeState, Side, Unit, evaluate

    policy = load_policy()  # typography_cer is critical: it rolls back on prompts quoting text
    state = JudgeState(policy)

    def fold(n, scores):
        arms = {role: Side(["ok"], 100.0, 0.0, 0.0) for role in ("candidate", "incumbent")}
        unit = Unit(f"r{n}", arms, scores)
        state.fold_arms(unit)
        state.fold_scores(unit, [])

    for n in range(20):
        fold(n, {"colour_shift_de": [(1.0, None)]})
    early = {r.name: r for r in evaluate(state)}["typography_cer"]
    assert early.applies  # 20 scored pairs: too early to say the traffic has no text
    for n in range(20, 60):
        fold(n, {"colour_shift_de": [(1.0, None)]})
    results = {r.name: r for r in evaluate(state)}
    typography = results["typography_cer"]
    assert typography.critical and not typography.applies and typography.samples == 0
    assert "no prompt quoted text" in typography.reason
    assert overall([typography]) == "PASS"  # on its own, it holds nothing
    assert overall([dataclasses.replace(typography, applies=True)]) == "INCONCLUSIVE"
    fold(60, {"typography_cer": [(0.1, 0.1)]})  # the first quoted prompt: it applies again
    assert {r.name: r for r in evaluate(state)}["typography_cer"].applies


def test_a_verdict_with_no_samples_stores_as_json_postgresql_accepts():
    """No sample yet: a quantile check's per-arm estimates are NaN, stored as null (PostgreSQL's
    JSON refuses NaN), and status shows no cost rather than failing."""
    import json

    from controller.review.status import cost_per_image
    from controller.rollout.analysis import _jsonable
    from policies.judge import JudgeState, evaluate

    rows = [_jsonable(r.as_dict()) for r in evaluate(JudgeState(load_policy()))]
    json.dumps(rows, allow_nan=False)  # raises on NaN or Infinity anywhere
    cost = next(r for r in rows if r["name"] == "cost_per_image")
    assert set(cost["arms"].values()) == {None}
    assert cost_per_image(rows, 2.5) is None
