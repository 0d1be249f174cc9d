"""One check, evaluated on the data gathered so far: FAIL, PASS or INCONCLUSIVE.

Pure functions of numbers, so the judge's maths is tested and simulated
(`bench/judge_sim.py`) without a database. FAIL means the confidence sequence
shows a regression larger than the tolerance; PASS means it shows any
regression is within the tolerance; otherwise the check is INCONCLUSIVE.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from policies.policy import Check
from policies.sequential import (
    Interval,
    attribution_log_evalue,
    bernoulli_cs,
    bounded_mean_cs,
    quantile_cs,
)

FAIL, PASS, INCONCLUSIVE = "FAIL", "PASS", "INCONCLUSIVE"


@dataclass(frozen=True)
class CheckResult:
    name: str
    decision: str
    estimate: float | None
    lower: float | None
    upper: float | None
    samples: int
    critical: bool
    reason: str
    alpha: float  # the check's share of its budget: each of its FAIL and PASS claims is wrong w.p. <= alpha

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RateData:
    candidate_events: int
    candidate_total: int
    incumbent_events: int
    incumbent_total: int
    # Informative failures in time order: (candidate's share of the trials, from the candidate?).
    attributions: Sequence[tuple[float, bool]] = ()


def _confidence(alpha: float) -> str:
    """Every bound here is one-sided: a FAIL, a PASS or either end of an interval is wrong w.p. <= alpha."""
    return f"{(1 - alpha) * 100:.4g}%"


def _limit(check: Check) -> float:
    """Regressions are expressed so that the tolerance is an absolute limit (0 after a ratio)."""
    return check.tolerance.absolute if check.tolerance.absolute is not None else 0.0


def _decide(check: Check, bounds: Interval, samples: int) -> str:
    """FAIL / PASS from the bounds of the regression (candidate worse is positive)."""
    limit = _limit(check)
    if samples < check.min_samples:
        return INCONCLUSIVE
    if bounds.lower > limit:
        return FAIL
    if bounds.upper <= limit:
        return PASS
    return INCONCLUSIVE


def evaluate_rate(check: Check, data: RateData, alpha: float) -> CheckResult:
    """Two Bernoulli rates.

    Absolute tolerance: per-arm one-sided bounds at alpha/2 each bound the difference; its
    lower end (candidate's lower minus incumbent's upper) is wrong w.p. <= alpha, as is its upper.
    Ratio tolerance: FAIL by the sequential count test (failures attributed at the traffic
    split); PASS when the candidate's upper bound is within ratio x the incumbent's lower
    bound, or below `negligible`.
    """
    cand = bernoulli_cs(data.candidate_events, data.candidate_total, alpha / 2)
    inc = bernoulli_cs(data.incumbent_events, data.incumbent_total, alpha / 2)
    p_c = data.candidate_events / data.candidate_total if data.candidate_total else 0.0
    p_i = data.incumbent_events / data.incumbent_total if data.incumbent_total else 0.0
    counts = f"({data.candidate_total} vs {data.incumbent_total} outputs)"
    enough = data.candidate_total >= check.min_samples
    if check.tolerance.ratio is not None:
        r = check.tolerance.ratio
        log_e = attribution_log_evalue(data.attributions, r)
        if enough and log_e >= math.log(1 / alpha):
            decision = FAIL
        elif enough and (cand.upper <= r * inc.lower or cand.upper <= check.tolerance.negligible):
            decision = PASS
        else:
            decision = INCONCLUSIVE
        words = {
            FAIL: f"rate ratio above x{r:g} (count test e-value {math.exp(min(log_e, 700)):.3g} >= "
            f"{1 / alpha:.3g})",
            PASS: f"candidate rate <= {cand.upper:.2%}",
            INCONCLUSIVE: f"candidate rate in [{cand.lower:.2%}, {cand.upper:.2%}], incumbent in "
            f"[{inc.lower:.2%}, {inc.upper:.2%}], each end",
        }[decision]
        reason = (
            f"candidate {check.metric} rate {p_c:.1%} vs {p_i:.1%} {counts}, {words} with "
            f"{_confidence(alpha)} confidence, tolerance x{r:g}"
        )
        bounds = Interval(cand.lower - r * inc.upper, cand.upper - r * inc.lower)
    else:
        diff = Interval(cand.lower - inc.upper, cand.upper - inc.lower)
        bounds = (
            diff if check.direction == "lower_is_better" else Interval(-diff.upper, -diff.lower)
        )
        decision = _decide(check, bounds, data.candidate_total)
        words = {
            FAIL: f"difference >= {bounds.lower * 100:+.1f} pp",
            PASS: f"difference <= {bounds.upper * 100:+.1f} pp",
            INCONCLUSIVE: f"difference in [{bounds.lower * 100:+.1f}, {bounds.upper * 100:+.1f}] pp, "
            "each end",
        }[decision]
        reason = (
            f"candidate {check.metric} rate {p_c:.1%} vs {p_i:.1%} {counts}, {words} with "
            f"{_confidence(alpha)} confidence, tolerance {check.tolerance.absolute * 100:.1f} pp"
        )
    return CheckResult(
        check.name,
        decision,
        p_c - p_i,
        bounds.lower,
        bounds.upper,
        data.candidate_total,
        check.critical,
        _min_samples_note(check, data.candidate_total, reason),
        alpha,
    )


def evaluate_quantile(
    check: Check, candidate: Sequence[float], incumbent: Sequence[float], alpha: float
) -> CheckResult:
    """Quantile of each arm from its own one-sided bounds (alpha/2 each), compared by the tolerance."""
    q = check.quantile or 0.5
    cand = quantile_cs(candidate, q, alpha / 2)
    inc = quantile_cs(incumbent, q, alpha / 2)
    est_c, est_i = _point_quantile(candidate, q), _point_quantile(incumbent, q)
    if check.tolerance.ratio is not None:
        r = check.tolerance.ratio
        # Regression in units of the incumbent: candidate - r x incumbent, positive means beyond tolerance.
        bounds = Interval(cand.lower - r * inc.upper, cand.upper - r * inc.lower)
        tolerance_text = f"tolerance x{r:g}"
    else:
        bounds = Interval(cand.lower - inc.upper, cand.upper - inc.lower)
        tolerance_text = f"tolerance {check.tolerance.absolute:g}"
    if check.direction == "higher_is_better":
        bounds = Interval(-bounds.upper, -bounds.lower)
    samples = min(len(candidate), len(incumbent))
    decision = _decide(check, bounds, samples)
    reason = (
        f"candidate p{q * 100:g} {check.metric} {est_c:.4g} vs {est_i:.4g}; candidate in "
        f"[{cand.lower:.4g}, {cand.upper:.4g}], incumbent in [{inc.lower:.4g}, {inc.upper:.4g}], "
        f"the regression's bounds each with {_confidence(alpha)} confidence, {tolerance_text}"
    )
    ratio = est_c / est_i if est_i else None
    return CheckResult(
        check.name,
        decision,
        ratio,
        bounds.lower,
        bounds.upper,
        samples,
        check.critical,
        _min_samples_note(check, samples, reason),
        alpha,
    )


def evaluate_paired(check: Check, values: Sequence[float], alpha: float) -> CheckResult:
    """Mean paired regression (candidate minus incumbent, or the pair's own score) by betting.

    FAIL rests on the lower bound alone and PASS on the upper alone, each one-sided at
    alpha, so a false FAIL has probability at most alpha.
    """
    low, high = check.range
    sign = -1 if check.direction == "higher_is_better" else 1
    signed = [sign * v for v in values]
    lo, hi = (low, high) if sign == 1 else (-high, -low)
    bounds = bounded_mean_cs(signed, alpha, lo, hi)
    mean = sum(signed) / len(signed) if signed else 0.0
    decision = _decide(check, bounds, len(signed))
    tolerance = _limit(check)
    what = "mean paired difference" if check.pair_value == "difference" else "mean per pair"
    words = {
        FAIL: f"at least {bounds.lower:+.4g} with {_confidence(alpha)} confidence",
        PASS: f"at most {bounds.upper:+.4g} with {_confidence(alpha)} confidence",
        INCONCLUSIVE: f"in [{bounds.lower:+.4g}, {bounds.upper:+.4g}], each end with "
        f"{_confidence(alpha)} confidence",
    }[decision]
    reason = (
        f"{check.metric} {what} {mean:+.4g} over {len(signed)} pairs, {words}, "
        f"tolerance {tolerance:g}"
    )
    return CheckResult(
        check.name,
        decision,
        mean,
        bounds.lower,
        bounds.upper,
        len(signed),
        check.critical,
        _min_samples_note(check, len(signed), reason),
        alpha,
    )


def _point_quantile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(int(q * len(ordered)), len(ordered) - 1)]


def _min_samples_note(check: Check, samples: int, reason: str) -> str:
    if samples < check.min_samples:
        return f"{samples}/{check.min_samples} samples so far; " + reason
    return reason


def overall(results: Sequence[CheckResult]) -> str:
    """FAIL if a critical check fails; PASS if every critical check passes and none fails; else INCONCLUSIVE."""
    if any(r.decision == FAIL and r.critical for r in results):
        return FAIL
    if all(r.decision == PASS for r in results if r.critical) and not any(
        r.decision == FAIL for r in results
    ):
        return PASS
    return INCONCLUSIVE
