"""The judge under production-shaped traffic: false rollbacks, time to PASS, time to FAIL.

    python bench/judge_sim.py [--runs 500] [--workers 2] [--only NAME ...]

Every figure comes from `controller.rollout.simulation`: seeded traffic as the router records
it (sticky users routed by the router's own hash, mirrors skipped under load,
multi-image requests, the mirror's shorter timeout), judged by the judge's own
`build_window` and `evaluate` every 100 mirrored requests, with the default policy.

1. A/A (identical models) under each scenario of issue 11: the share of attempts
   (5 stages, 3,000 requests) with any critical FAIL, a 95% Wilson interval, next to
   alpha; beside it, the same traffic judged the way the judge worked before
   (`previous` column), to show what each scenario does to a naive judge.
2. The rate-ratio boundary: candidate 25% vs incumbent 20% failures under a pure
   x1.25 tolerance (the null holds exactly), up to 20,000 pairs, against a test on
   discordant pairs alone (which tests the odds ratio).
3. A healthy candidate at 1%, 2% and 5% failure rates: mirrored requests until
   error_rate PASSes (median, p90).
4. Regressions: mirrored requests until the relevant check FAILs (median, p90, and
   how many runs never did within the limit).
5. Probes: a NaN score, and probes that always error.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import random
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from controller.rollout.simulation import (
    SCENARIOS,
    Records,
    Traffic,
    generate,
    judge_traffic,
    wilson,
)
from policies.checks import FAIL, INCONCLUSIVE, PASS, overall
from policies.metrics import METRICS
from policies.policy import Policy, load_policy
from policies.vocabulary import Arm

CANDIDATE, INCUMBENT = Arm.CANDIDATE, Arm.INCUMBENT

LOOK = 100
LIFTS = (1.1, 1.2, 1.3, 1.4, 1.5, 1.75, 2.0, 2.5, 3.0, 4.0)


def previous_count_test(events: list[tuple[float, bool]], null_ratio: float) -> float:
    """The count test the judge used before issue 11, kept here as the naive control.

    Each failure one arm had and the other did not is attributed to an arm at theta0 =
    w r / (w r + 1 - w), w the candidate's share of the trials: 1/2 for a mirrored image,
    the stage's weight for an unmirrored one. Valid only when every image is an
    independent, independently routed trial, which sticky users and multi-image
    requests are not.
    """
    logs = [0.0] * len(LIFTS)
    for share, from_candidate in events:
        theta0 = share * null_ratio / (share * null_ratio + 1 - share)
        for k, lift in enumerate(LIFTS):
            ratio = null_ratio * lift
            theta1 = share * ratio / (share * ratio + 1 - share)
            logs[k] += (
                math.log(theta1 / theta0)
                if from_candidate
                else math.log((1 - theta1) / (1 - theta0))
            )
    top = max(logs)
    return top + math.log(sum(math.exp(v - top) for v in logs) / len(LIFTS))


def previous_judge_fails(records: Records, alpha: float, ratio: float = 1.25) -> bool:
    """Did the previous error_rate check (per image, unmirrored at the split) ever FAIL?"""
    bad = METRICS["failure"].statuses
    by_image: dict[tuple[str, int], dict[str, str]] = {}
    for o in records.outputs:
        by_image.setdefault((o.request_id, o.image_index), {})[o.role] = o.status
    events: list[tuple[float, bool]] = []
    looked = 0
    for (request_id, _), statuses in by_image.items():
        failed = {role for role, status in statuses.items() if status in bad}
        share = 0.5 if len(statuses) == 2 else records.shares[request_id]
        if len(failed) == 1 and 0.0 < share < 1.0:
            events.append((share, CANDIDATE in failed))
        looked += 1
        if looked % LOOK == 0 and previous_count_test(events, ratio) >= math.log(1 / alpha):
            return True
    return False


def uncensored(records: Records) -> Records:
    """The records as if the judge did not know each call's deadline (no common censoring)."""
    outputs = [dataclasses.replace(o, timeout_s=None) for o in records.outputs]
    return dataclasses.replace(records, outputs=outputs)


def only(policy: Policy, *names: str, **tolerance: Any) -> Policy:
    """The policy reduced to some checks (their alpha unchanged), tolerance overridden if given."""
    alphas = {c.name: policy.alpha_for(c) for c in policy.checks}
    checks = []
    for c in policy.checks:
        if c.name in names:
            if tolerance:
                c = c.model_copy(update={"tolerance": c.tolerance.model_copy(update=tolerance)})
            checks.append(c)
    total = sum(alphas[c.name] for c in checks)
    weights = [c.model_copy(update={"weight": alphas[c.name] / total}) for c in checks]
    return policy.model_copy(update={"checks": weights, "alpha": total, "advisory_alpha": total})


def _aa(args: tuple[str, int, int]) -> list[tuple[bool, bool, bool]]:
    name, seed, runs = args
    policy = load_policy()
    error_alpha = policy.alpha_for(next(c for c in policy.checks if c.name == "error_rate"))
    boundary = only(policy, "error_rate", ratio=1.0, absolute=0.0)
    rng = random.Random(seed)
    out = []
    for _ in range(runs):
        traffic = SCENARIOS[name]
        records = generate(traffic, rng)
        rolled_back = judge_traffic(policy, traffic, rng, LOOK, records=records).rollback_at
        # The same units against no tolerance at all: A/A sits exactly on that null.
        at_boundary = judge_traffic(boundary, traffic, rng, LOOK, records=records).rollback_at
        if name == "slow_mirror_timeouts":  # the naive judge: timeouts as recorded
            naive = (
                judge_traffic(
                    only(policy, "error_rate", "latency_p95"),
                    traffic,
                    rng,
                    LOOK,
                    records=uncensored(records),
                ).rollback_at
                is not None
            )
        else:
            naive = previous_judge_fails(records, error_alpha)
        out.append((rolled_back is not None, at_boundary is not None, naive))
    return out


def _boundary(args: tuple[int, int]) -> list[tuple[bool, bool]]:
    seed, runs = args
    policy = only(load_policy(), "error_rate", ratio=1.25, absolute=0.0)
    policy = policy.model_copy(
        update={"checks": [policy.checks[0].model_copy(update={"weight": 1.0})], "alpha": 0.05}
    )
    traffic = Traffic(
        requests=20_000, stages=(0,), failure={CANDIDATE: 0.25, INCUMBENT: 0.20}, oom=0.0, blank=0.0
    )
    rng = random.Random(seed)
    out = []
    for _ in range(runs):
        records = generate(traffic, rng)
        judged = judge_traffic(policy, traffic, rng, 500, stop_on=None, records=records)
        discordant = _discordant_fails(records, 1.25, 0.05)
        out.append(("error_rate" in judged.first_fail, discordant))
    return out


def _discordant_fails(records: Records, ratio: float, alpha: float) -> bool:
    """A test on discordant pairs alone (w = 1/2): it tests the odds ratio, not the rate ratio."""
    bad = METRICS["failure"].statuses
    statuses: dict[str, dict[str, str]] = {}
    for o in records.outputs:
        statuses.setdefault(o.request_id, {})[o.role] = o.status
    events = []
    for n, pair in enumerate(statuses.values(), 1):
        failed = {role for role, status in pair.items() if status in bad}
        if len(failed) == 1:
            events.append((0.5, CANDIDATE in failed))
        if n % 500 == 0 and previous_count_test(events, ratio) >= math.log(1 / alpha):
            return True
    return False


# A tolerance a team that must catch +2 pp on a 5% base could pick instead of the default.
STRICT = {"ratio": 1.0, "absolute": 0.0075}

# name -> (traffic, the check whose decision is timed, the decision[, its tolerance])
TIMED: dict[str, tuple[Any, ...]] = {
    "healthy, 1% failures": (
        Traffic(requests=20_000, failure={CANDIDATE: 0.01, INCUMBENT: 0.01}),
        "error_rate",
        PASS,
    ),
    "healthy, 2% failures": (
        Traffic(requests=20_000, failure={CANDIDATE: 0.02, INCUMBENT: 0.02}),
        "error_rate",
        PASS,
    ),
    "healthy, 5% failures": (
        Traffic(requests=20_000, failure={CANDIDATE: 0.05, INCUMBENT: 0.05}),
        "error_rate",
        PASS,
    ),
    "healthy, oom 0.5%": (
        Traffic(requests=20_000, oom=0.005),
        "oom_rate",
        PASS,
    ),
    "healthy, blank 0.2%": (
        Traffic(requests=20_000, blank=0.002),
        "blank_rate",
        PASS,
    ),
    "healthy colour (mean ΔE 2)": (
        Traffic(requests=20_000, scores=True),
        "colour_shift",
        PASS,
    ),
    "+2 pp failures on 5% (x1.4)": (
        Traffic(requests=20_000, failure={CANDIDATE: 0.07, INCUMBENT: 0.05}),
        "error_rate",
        FAIL,
    ),
    "failures 5% -> 10% (target)": (
        Traffic(requests=20_000, failure={CANDIDATE: 0.10, INCUMBENT: 0.05}),
        "error_rate",
        FAIL,
    ),
    "failures 2% -> 5% (target)": (
        Traffic(requests=20_000, failure={CANDIDATE: 0.05, INCUMBENT: 0.02}),
        "error_rate",
        FAIL,
    ),
    "failures 1% -> 3.5% (target)": (
        Traffic(requests=20_000, failure={CANDIDATE: 0.035, INCUMBENT: 0.01}),
        "error_rate",
        FAIL,
    ),
    "healthy latency": (
        Traffic(requests=20_000),
        "latency_p95",
        PASS,
    ),
    "strict: healthy, 1% failures": (
        Traffic(requests=20_000, failure={CANDIDATE: 0.01, INCUMBENT: 0.01}),
        "error_rate",
        PASS,
        STRICT,
    ),
    "strict: healthy, 5% failures": (
        Traffic(requests=40_000, failure={CANDIDATE: 0.05, INCUMBENT: 0.05}),
        "error_rate",
        PASS,
        STRICT,
    ),
    "strict: +2 pp failures on 5% (x1.4)": (
        Traffic(requests=20_000, failure={CANDIDATE: 0.07, INCUMBENT: 0.05}),
        "error_rate",
        FAIL,
        STRICT,
    ),
    "+20% latency, whole distribution": (
        Traffic(requests=20_000, latency_median_s={CANDIDATE: 1.2, INCUMBENT: 1.0}),
        "latency_p95",
        FAIL,
    ),
    "+40% latency (target)": (
        Traffic(requests=20_000, latency_median_s={CANDIDATE: 1.4, INCUMBENT: 1.0}),
        "latency_p95",
        FAIL,
    ),
    "+0.05 mean CER, sd 0.15 (target)": (
        Traffic(requests=20_000, scores=True, cer_shift=0.05),
        "typography_cer",
        FAIL,
    ),
    "colour: same mean, 3x the spread": (
        Traffic(requests=20_000, scores=True, colour=(2 / 9, 9.0)),
        "colour_tail",
        FAIL,
    ),
    "CER: same mean, 25% of pairs worse by 0.3+": (
        Traffic(requests=20_000, scores=True, cer_tail=0.25, cer_shift=-0.15),
        "typography_tail",
        FAIL,
    ),
    "colour ΔE 50, every 100th score NaN": (
        Traffic(requests=3_000, scores=True, colour=(50.0, 1.0), nan_every=100),
        "colour_shift",
        FAIL,
    ),
}


def _timed(args: tuple[str, int, int]) -> list[tuple[int | None, str]]:
    name, seed, runs = args
    traffic, check, decision, *tolerance = TIMED[name]
    policy = only(load_policy(), check, **(tolerance[0] if tolerance else {}))
    rng = random.Random(seed)
    out = []
    for _ in range(runs):
        outcome = judge_traffic(policy, traffic, rng, LOOK, stop_on=check)
        first = (outcome.first_pass if decision == PASS else outcome.first_fail).get(check)
        other = (outcome.first_fail if decision == PASS else outcome.first_pass).get(check)
        out.append((first, "wrong" if other is not None and first is None else ""))
    return out


def _probes(args: tuple[str, int, int]) -> list[tuple[str, bool, str, bool]]:
    """A probe erroring on every output, everything else healthy and given time to PASS."""
    probe, seed, runs = args
    policy = load_policy()
    traffic = Traffic(
        requests=8_000,
        stages=(0,),
        failure={CANDIDATE: 0.01, INCUMBENT: 0.01},
        oom=0.0,
        scores=True,
        probe_error_share={probe: 1.0},
    )
    check = "typography_cer" if probe == "typography_cer" else "colour_shift"
    rng = random.Random(seed)
    out = []
    for _ in range(runs):
        outcome = judge_traffic(policy, traffic, rng, 500)
        result = next(r for r in outcome.last if r.name == check)
        metric_of = {c.name: c.metric for c in policy.checks}
        others_passed = all(
            r.decision == PASS for r in outcome.last if r.critical and metric_of[r.name] != probe
        )
        out.append((result.decision, overall(outcome.last) == PASS, result.reason, others_passed))
    return out


def _spread(pool: ProcessPoolExecutor, fn: Any, key: Any, runs: int, workers: int) -> list[Any]:
    per = max(runs // workers, 1)
    args = (
        [(*key, 100 + i, per) for i in range(workers)]
        if key
        else [(100 + i, per) for i in range(workers)]
    )
    return [x for chunk in pool.map(fn, args) for x in chunk]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=500, help="runs per A/A scenario")
    parser.add_argument("--timed-runs", type=int, default=200, help="runs per timed case")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--only", nargs="*", default=None, help="sections: aa boundary timed probes"
    )
    parser.add_argument(
        "--cases", nargs="*", default=None, help="timed cases whose name has one of these"
    )
    parser.add_argument("--scenarios", nargs="*", default=None, help="A/A scenarios to run")
    args = parser.parse_args()
    sections = set(args.only or ("aa", "boundary", "timed", "probes"))
    policy = load_policy()
    critical = [c for c in policy.checks if c.critical]
    started = time.perf_counter()
    with ProcessPoolExecutor(args.workers) as pool:
        if "aa" in sections:
            print(
                f"A/A, {args.runs} attempts per scenario (3,000 requests over 5 stages unless "
                "the scenario says otherwise), "
                f"judged every {LOOK} mirrored requests; default policy, alpha {policy.alpha} "
                f"over {len(critical)} critical checks"
            )
            print(
                f"  {'scenario':<22} {'false rollbacks':>15} {'95% interval':>16}   "
                f"{'no tolerance':>12} {'95% interval':>16}   {'previous':>8}"
            )
            for name in SCENARIOS:
                if args.scenarios and name not in args.scenarios:
                    continue
                rows = _spread(pool, _aa, (name,), args.runs, args.workers)
                hits, edge, naive = (sum(r[k] for r in rows) for k in range(3))
                low, high = wilson(hits, len(rows))
                elow, ehigh = wilson(edge, len(rows))
                print(
                    f"  {name:<22} {hits / len(rows):>15.4f} [{low:.4f}, {high:.4f}]   "
                    f"{edge / len(rows):>12.4f} [{elow:.4f}, {ehigh:.4f}]   "
                    f"{naive / len(rows):>8.4f}"
                )
            print(
                f"  (false rollbacks: the default policy, alpha {policy.alpha}; no tolerance: "
                "error_rate alone with ratio 1 and absolute 0, alpha "
                f"{only(policy, 'error_rate').alpha:.4f}, where A/A sits exactly on the null; "
                "previous: the old error_rate count test on the same traffic, per image with "
                "unmirrored requests at the split, at the same alpha; for slow_mirror_timeouts, "
                "this judge without common censoring)"
            )
        if "boundary" in sections:
            rows = _spread(pool, _boundary, (), args.runs, args.workers)
            hits, naive = sum(r for r, _ in rows), sum(n for _, n in rows)
            low, high = wilson(hits, len(rows))
            nlow, nhigh = wilson(naive, len(rows))
            print(
                f"Rate-ratio boundary, 25% vs 20% failures, tolerance x1.25 (null true), "
                f"alpha 0.05, up to 20,000 pairs, {len(rows)} runs:\n"
                f"  FAIL rate, paired rate-ratio test:   {hits / len(rows):.4f} [{low:.4f}, {high:.4f}]\n"
                f"  FAIL rate, discordant pairs (odds):  {naive / len(rows):.4f} [{nlow:.4f}, {nhigh:.4f}]"
            )
        if "timed" in sections:
            print(
                f"Mirrored requests until the decision ({args.timed_runs} runs each; the check at "
                "its default tolerance and alpha)"
            )
            print(
                f"  {'case':<44} {'check':<16} {'decides':>7} {'median':>7} {'p90':>7} {'never':>6}"
            )
            for name, (_, check, decision, *_) in TIMED.items():
                if args.cases and not any(part in name for part in args.cases):
                    continue
                rows = _spread(pool, _timed, (name,), args.timed_runs, args.workers)
                found = sorted(n for n, _ in rows if n is not None)
                wrong = sum(w == "wrong" for _, w in rows)
                median = statistics.median(found) if found else float("nan")
                p90 = found[min(int(0.9 * len(found)), len(found) - 1)] if found else float("nan")
                print(
                    f"  {name:<44} {check:<16} {decision:>7} {median:>7.0f} {p90:>7.0f} "
                    f"{len(rows) - len(found):>6}"
                    + (f"  ({wrong} decided the other way)" if wrong else "")
                )
            print(
                "  (never: no decision within the case's requests: 20,000, or 40,000 for "
                "strict at 5%; 3,000 for the NaN case)"
            )
        if "probes" in sections:
            for probe in ("typography_cer", "colour_shift_de"):
                rows = _spread(pool, _probes, (probe,), 100, args.workers)
                decisions = {d: sum(r[0] == d for r in rows) for d in (FAIL, PASS, INCONCLUSIVE)}
                print(
                    f"Probe {probe} erroring on every output, {len(rows)} healthy attempts of "
                    f"8,000 requests: its check {decisions}; every critical check of another metric PASSed "
                    f"in {sum(r[3] for r in rows)}; verdict PASS in {sum(r[1] for r in rows)}.\n"
                    f"  reason: {rows[0][2]}"
                )
    print(f"({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
