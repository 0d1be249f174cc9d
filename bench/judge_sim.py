"""Simulated rollouts through the judge: false rollbacks under A/A, and samples until rollback.

    python bench/judge_sim.py [--rollouts 2000] [--regression-runs 200] [--workers 2]

A/A: healthy candidates (the same distributions on both arms) go through every
stage (shadow, 10, 30, 60, 100; every request mirrored), judged with the
default policy after every batch of 50 requests. The false-rollback rate is the
share of rollouts with any critical FAIL. In the same run the same latency data
are judged by a fixed-sample Mann-Whitney test re-run at every batch, the
"peeking" control that is not anytime-valid.

Regressions: candidate samples until the first FAIL (median and p90) for
+2 pp errors on a 5% base at a 10% split, +20% p95 latency (whole distribution
scaled, and tail only), and +0.05 mean typography CER (paired, sd 0.15). Each
check runs at its share of the default policy's budget (`Policy.alpha_for`); the
error and CER cases are also run under the other allocations a team might pick
(even weights; typography made critical), so the cost of each choice is visible.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import time
from bisect import insort
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from policies.checks import FAIL, RateData, evaluate_quantile, evaluate_rate
from policies.policy import Policy, load_policy
from policies.sequential import BET_CAP, BettingCS, attribution_log_evalue

BATCH = 50
STAGES = (0, 10, 30, 60, 100)


class PairedTrack:
    """An incrementally updated paired check (the judge recomputes from SQL; same maths)."""

    def __init__(self, check: Any, alpha: float) -> None:
        self.check = check
        sign = -1 if check.direction == "higher_is_better" else 1
        low, high = check.range if sign == 1 else (-check.range[1], -check.range[0])
        self.sign = sign
        self.cs = BettingCS(alpha, low, high, grid=501)

    def add(self, value: float) -> None:
        self.cs.update(self.sign * value)

    def decision(self) -> str:
        bounds = self.cs.interval()
        if self.cs.n < self.check.min_samples:
            return "INCONCLUSIVE"
        limit = self.check.tolerance.absolute or 0.0
        return (
            FAIL if bounds.lower > limit else ("PASS" if bounds.upper <= limit else "INCONCLUSIVE")
        )


def simulate_rollout(
    policy: Policy, rng: random.Random, requests_per_stage: int = 400, control: bool = False
) -> dict[str, Any]:
    """One healthy (A/A) rollout through every stage, judged after every batch."""
    from scipy.stats import mannwhitneyu

    checks = {c.name: c for c in policy.checks}
    counts = {name: [0, 0, 0, 0] for name, c in checks.items() if c.kind == "rate"}
    base_rates = {"failure": 0.03, "oom": 0.005, "blank": 0.002, "error": 0.03, "timeout": 0.0}
    latencies: dict[str, list[float]] = {"candidate": [], "incumbent": []}
    paired = {
        name: PairedTrack(c, policy.alpha_for(c))
        for name, c in checks.items()
        if c.kind == "paired_mean"
    }
    failed = held = control_failed = False
    for _weight in STAGES:
        for _batch in range(0, requests_per_stage, BATCH):
            for _ in range(BATCH):
                for name, c in checks.items():
                    if c.kind == "rate":
                        p = base_rates[c.metric]
                        counts[name][0] += rng.random() < p
                        counts[name][1] += 1
                        counts[name][2] += rng.random() < p
                        counts[name][3] += 1
                for role in latencies:
                    insort(latencies[role], rng.lognormvariate(5, 0.4))
                for name, track in paired.items():
                    if checks[name].pair_value == "candidate":
                        track.add(rng.gammavariate(2.0, 1.0))  # A/A colour shift, mean 2 ΔE
                    elif rng.random() < 0.4:  # typography prompts
                        track.add(max(-1.0, min(1.0, rng.gauss(0.0, 0.15))))
            for name, c in checks.items():
                alpha = policy.alpha_for(c)
                if c.kind == "rate":
                    result = evaluate_rate(c, RateData(*counts[name]), alpha)
                elif c.kind == "quantile":
                    result = evaluate_quantile(
                        c, latencies["candidate"], latencies["incumbent"], alpha
                    )
                else:
                    result = None
                decision = result.decision if result else paired[name].decision()
                failed |= decision == FAIL and c.critical
                held |= decision == FAIL and not c.critical
            if control and not control_failed:
                control_failed = (
                    mannwhitneyu(latencies["candidate"], latencies["incumbent"]).pvalue
                    < policy.alpha
                )
            if failed and not control:
                return {"failed": True, "held": held, "control_failed": control_failed}
    return {"failed": failed, "held": held, "control_failed": control_failed}


def samples_until_fail(
    kind: str, rng: random.Random, policy: Policy, limit: int = 200_000
) -> int | None:
    """Candidate samples (outputs or pairs) until the relevant check FAILs, or None within `limit`."""
    checks = {c.name: c for c in policy.checks}
    alpha = policy.alpha_for(checks[CHECK_OF[kind]])
    if kind in ("errors", "errors_oracle"):
        tolerance = checks["error_rate"].tolerance.model_copy(
            update={"ratio": 1.0, "absolute": None}
        )
        check = checks["error_rate"].model_copy(update={"tolerance": tolerance})
        counts, events = [0, 0, 0, 0], []
        while counts[1] < limit:
            for _ in range(BATCH * 10):  # 10% split, no mirroring: one candidate request in ten
                on_candidate = rng.random() < 0.1
                failed = rng.random() < (0.07 if on_candidate else 0.05)
                counts[0 if on_candidate else 2] += failed
                counts[1 if on_candidate else 3] += 1
                if failed:
                    events.append((0.1, on_candidate))
            if kind == "errors_oracle":  # the count test told the true lift (x1.4) in advance
                if counts[1] >= check.min_samples and attribution_log_evalue(
                    events, 1.0, lifts=(0.07 / 0.05,)
                ) >= math.log(1 / alpha):
                    return counts[1]
            elif evaluate_rate(check, RateData(*counts, events), alpha).decision == FAIL:
                return counts[1]
        return None
    if kind in ("latency", "latency_tail"):
        check = checks["latency_p95"].model_copy(
            update={"tolerance": checks["latency_p95"].tolerance.model_copy(update={"ratio": 1.0})}
        )
        cand: list[float] = []
        inc: list[float] = []
        tail_cut = 5 + 0.4 * 1.2816  # log of the incumbent's p90
        while len(cand) < limit:
            for _ in range(BATCH * 10):
                value = rng.lognormvariate(5, 0.4)
                if rng.random() < 0.1:
                    slow = (
                        value * 1.2 if kind == "latency" or value > 2.718281828**tail_cut else value
                    )
                    insort(cand, slow)
                else:
                    insort(inc, value)
            if evaluate_quantile(check, cand, inc, alpha).decision == FAIL:
                return len(cand)
        return None
    if kind == "cer":
        check = checks["typography_cer"].model_copy(
            update={
                "tolerance": checks["typography_cer"].tolerance.model_copy(update={"absolute": 0.0})
            }
        )
        track = PairedTrack(check, alpha)
        while track.cs.n < limit:
            track.add(max(-1.0, min(1.0, rng.gauss(0.05, 0.15))))
            if track.cs.n % 5 == 0 and track.decision() == FAIL:
                return track.cs.n
        return None
    raise ValueError(kind)


CHECK_OF = {
    "errors": "error_rate",
    "errors_oracle": "error_rate",
    "latency": "latency_p95",
    "latency_tail": "latency_p95",
    "cer": "typography_cer",
}


def policy_variant(name: str) -> Policy:
    """The default policy ("default"), with even weights ("even"), or with typography critical."""
    policy = load_policy()
    if name == "default":
        return policy
    if name == "even":
        checks = [c.model_copy(update={"weight": 1.0}) for c in policy.checks]
    elif name == "typography_critical":
        checks = [
            c.model_copy(update={"critical": True}) if c.name == "typography_cer" else c
            for c in policy.checks
        ]
    else:
        raise ValueError(name)
    return policy.model_copy(update={"checks": checks})


def cer_limits(policy: Policy) -> str:
    """Fewest pairs any valid test of the +0.05 CER case can need on average, and what ours can.

    For data known only to lie in [-1, 1] the best a bet against "mean <= 0" can grow is
    g = max over lambda in [0, 1] of E log(1 + lambda x) (stakes beyond 1 can lose everything
    on x = -1), so reaching 1/alpha takes about log(1/alpha) / g pairs on average (Wald),
    whatever the method; BET_CAP limits our stakes to lambda <= 0.75.
    """
    rng = random.Random(5)
    xs = [max(-1.0, min(1.0, rng.gauss(0.05, 0.15))) for _ in range(100_000)]

    def growth(top: float) -> float:
        return max(
            sum(math.log1p(lam * x) for x in xs) / len(xs)
            for lam in [top * k / 50 for k in range(1, 51)]
        )

    best, capped = growth(1.0), growth(BET_CAP)
    typography = policy_variant("typography_critical")
    alphas = [
        ("default", policy.alpha_for(next(c for c in policy.checks if c.name == "typography_cer"))),
        (
            "typography critical",
            typography.alpha_for(next(c for c in typography.checks if c.name == "typography_cer")),
        ),
    ]
    rows = "; ".join(
        f"{name}, alpha {a:.4f}: {math.log(1 / a) / best:.0f} / {math.log(1 / a) / capped:.0f}"
        for name, a in alphas
    )
    return (
        "  limit for +0.05 CER: mean pairs any valid test needs, stakes up to 1 / capped at "
        f"{BET_CAP:g}\n    {rows}"
    )


def _aa_chunk(args: tuple[int, int, int]) -> tuple[int, int, int, int]:
    seed, count, per_stage = args
    policy = load_policy()
    rng = random.Random(seed)
    failed = held = control = 0
    for _ in range(count):
        result = simulate_rollout(policy, rng, per_stage, control=True)
        failed += result["failed"]
        held += result["held"]
        control += result["control_failed"]
    return failed, held, control, count


def _regression_chunk(args: tuple[str, str, int, int]) -> list[int | None]:
    kind, variant, seed, runs = args
    policy = policy_variant(variant)
    rng = random.Random(seed)
    return [samples_until_fail(kind, rng, policy) for _ in range(runs)]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rollouts", type=int, default=2000)
    parser.add_argument("--requests-per-stage", type=int, default=400)
    parser.add_argument("--regression-runs", type=int, default=200)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    policy = load_policy()
    started = time.perf_counter()
    chunks = [
        (1000 + i, args.rollouts // args.workers, args.requests_per_stage)
        for i in range(args.workers)
    ]
    with ProcessPoolExecutor(args.workers) as pool:
        aa = list(pool.map(_aa_chunk, chunks))
        failed, held, control, total = (sum(x[i] for x in aa) for i in range(4))
        critical = [c for c in policy.checks if c.critical]
        print(
            f"A/A: {total} rollouts x {len(STAGES)} stages x {args.requests_per_stage} requests, judged "
            f"every {BATCH} requests; alpha {policy.alpha} over {len(critical)} critical checks, "
            f"advisory alpha {policy.advisory_alpha or policy.alpha} over "
            f"{len(policy.checks) - len(critical)} other(s)"
        )
        print(
            f"  false-rollback rate (anytime-valid judge):        {failed / total:.4f}   target <= {policy.alpha}"
        )
        print(f"  false-hold rate (a non-critical check FAILs):     {held / total:.4f}")
        print(
            f"  same latencies, Mann-Whitney re-run at each look:  {control / total:.4f}   (peeking control)"
        )
        print(
            f"Regressions ({args.regression_runs} runs each): candidate samples until the first FAIL"
        )
        print(
            f"  {'case':<44} {'policy':<20} {'alpha':>7} {'median':>7} {'p90':>7} {'never':>5}  target"
        )
        cases = [
            ("errors", "default", "+2 pp errors on 5% base, 10% split (outputs)", "<= 1500"),
            ("errors", "even", "  the same, weights even", ""),
            ("errors_oracle", "default", "  limit: a test told the lift in advance", ""),
            ("errors_oracle", "even", "  limit, weights even", ""),
            ("latency", "default", "+20% latency, whole distribution (outputs)", ""),
            ("latency_tail", "default", "+20% latency, slowest 10% only (outputs)", ""),
            ("cer", "default", "+0.05 mean CER, paired sd 0.15 (pairs)", "<= 120"),
            ("cer", "typography_critical", "  the same, typography_cer critical", ""),
        ]
        for kind, variant, label, target in cases:
            per = args.regression_runs // args.workers
            runs = [
                n
                for chunk in pool.map(
                    _regression_chunk, [(kind, variant, 7 + i, per) for i in range(args.workers)]
                )
                for n in chunk
            ]
            found = sorted(n for n in runs if n is not None)
            median = statistics.median(found) if found else float("nan")
            p90 = found[min(int(0.9 * len(found)), len(found) - 1)] if found else float("nan")
            variant_policy = policy_variant(variant)
            alpha = variant_policy.alpha_for(
                next(c for c in variant_policy.checks if c.name == CHECK_OF[kind])
            )
            print(
                f"  {label:<44} {variant:<20} {alpha:>7.4f} {median:>7.0f} {p90:>7.0f} "
                f"{len(runs) - len(found):>5}  {target}"
            )
    print(cer_limits(policy))
    print(
        f"(tolerances for the regression runs: 0 for the tested check, so any regression counts; "
        f"{time.perf_counter() - started:.0f}s)"
    )


if __name__ == "__main__":
    main()
