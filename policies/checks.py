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
from policies.sequential import Interval, bounded_mean_cs, mean_bounds, mean_test, quantile_cs
from policies.vocabulary import FAIL, INCONCLUSIVE, PASS


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
    # The check's probe is erroring (`probe_failing`): the check holds the rollout, critical or not.
    probe_error: bool = False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ProbeHealth:
    """How the probe behind a paired check fared on the outputs it tried to score."""

    attempts: int = 0
    errors: int = 0
    first_error: str | None = None

    def failing(self, max_share: float) -> bool:
        return self.attempts > 0 and self.errors / self.attempts > max_share


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


def evaluate_rate(
    check: Check, units: Sequence[tuple[float, float]], alpha: float, what: str = ""
) -> CheckResult:
    """Two rates on paired units: FAIL when candidate > ratio x incumbent + absolute, PASS when below.

    Each unit is one mirrored request: (share of the candidate's images that count, share of
    the incumbent's), so a request-wide failure is one unit, not n. Both arms saw the same
    request, so whatever a user or a prompt does to the rate cancels within the pair.

    The tolerance is linear in the rates, so one bounded variable per unit carries it:
    z = c - ratio x i - absolute, in [-ratio - absolute, 1 - absolute]. "Candidate within
    tolerance" is mean(z) <= 0 and "beyond it" is mean(z) >= 0; `mean_test` bets against
    each, so FAIL and PASS are separate one-sided claims, each wrong w.p. <= alpha at any
    look. This tests the rate ratio itself (not the odds ratio, as a test on discordant pairs
    alone would), and counts pairs where both arms failed.
    """
    r, a = check.tolerance.rate_ratio, check.tolerance.rate_absolute
    low, high = -r - a, 1.0 - a
    z = [c - r * i - a for c, i in units]
    n = len(z)
    p_c = sum(c for c, _ in units) / n if n else 0.0
    p_i = sum(i for _, i in units) / n if n else 0.0
    against_ok, against_bad = mean_test(z, 0.0, low, high)
    needed = math.log(1.0 / alpha)
    if n < check.min_samples:
        decision = INCONCLUSIVE
    elif against_ok >= needed:
        decision = FAIL
    elif against_bad >= needed:
        decision = PASS
    else:
        decision = INCONCLUSIVE
    bounds = mean_bounds(z, alpha, low, high) if n else Interval(low, high)
    tolerance = _rate_tolerance(r, a)
    words = {
        FAIL: f"above {tolerance} of the incumbent's (e-value {_e(against_ok)} >= {1 / alpha:.3g})",
        PASS: f"within {tolerance} of the incumbent's (e-value {_e(against_bad)} >= {1 / alpha:.3g})",
        INCONCLUSIVE: f"not yet shown within or beyond {tolerance} of the incumbent's (e-values "
        f"{_e(against_ok)} for a regression, {_e(against_bad)} against; {1 / alpha:.3g} decides)",
    }[decision]
    reason = (
        f"candidate {what or check.metric} rate {p_c:.2%} vs {p_i:.2%} over {n} mirrored "
        f"requests, {words}, each claim with {_confidence(alpha)} confidence"
    )
    return CheckResult(
        check.name,
        decision,
        sum(z) / n if n else None,  # how far beyond the tolerance (<= 0: within it), as the bounds
        bounds.lower,
        bounds.upper,
        n,
        check.critical,
        _min_samples_note(check, n, reason),
        alpha,
    )


Pair = tuple[float | None, float | None]  # one image's probe value: (candidate's, incumbent's)


def paired_values(check: Check, pairs: Sequence[Pair]) -> list[float]:
    """One request's pair values (candidate's score, or candidate minus incumbent), finite only."""
    if check.pair_value == "candidate":
        values = [c for c, _ in pairs if c is not None]
    else:
        values = [c - i for c, i in pairs if c is not None and i is not None]
    return [v for v in values if math.isfinite(v)]


def tail_units(check: Check, pairs: Sequence[Sequence[Pair]]) -> list[tuple[float, float]]:
    """Per request, the shares of its pairs in the tail against each arm (a `tail_rate` check).

    With `pair_value: candidate` the value already compares the pair (e.g. the ΔE between the
    two images), so only the candidate can be in the tail. With `difference`, a pair whose
    candidate is worse by more than the threshold counts against the candidate, and one whose
    incumbent is worse by as much counts against the incumbent: an A/A pair is as likely
    to land in either tail.
    """
    sign = -1 if check.direction == "higher_is_better" else 1
    threshold = check.threshold or 0.0
    units = []
    for request in pairs:
        values = [sign * v for v in paired_values(check, request)]
        if not values:
            continue
        cand = sum(v > threshold for v in values) / len(values)
        inc = (
            0.0
            if check.pair_value == "candidate"
            else sum(v < -threshold for v in values) / len(values)
        )
        units.append((cand, inc))
    return units


def probe_failing(check: Check, health: ProbeHealth, max_share: float) -> CheckResult | None:
    """INCONCLUSIVE, saying why, when the check's probe errors on more than `max_share`."""
    if not health.failing(max_share):
        return None
    reason = (
        f"probe {check.metric} errored on {health.errors}/{health.attempts} outputs it scored "
        f"({health.errors / health.attempts:.0%}, more than the policy's max_probe_error_share "
        f"{max_share:.0%}): {health.first_error}; the check holds the rollout until its probe "
        "works (see the scorer's probe_failed events)"
    )
    return CheckResult(
        check.name, INCONCLUSIVE, None, None, None, 0, check.critical, reason, 0.0, True
    )


def _rate_tolerance(ratio: float, absolute: float) -> str:
    """ "x1.2 + 1 pp", "1 pp" or "x1.25": the tolerance as the reason states it."""
    parts = [f"x{ratio:g}"] if ratio != 1 else []
    if absolute:
        parts.append(f"{absolute * 100:g} pp")
    return " + ".join(parts) or "x1"


def _e(log_e: float) -> str:
    return f"{math.exp(min(log_e, 700)):.3g}"


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
    signed = [sign * v for v in values if math.isfinite(v)]
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
    """FAIL if a critical check fails; PASS if every critical check passes, none fails and no
    check's probe is failing; else INCONCLUSIVE."""
    if any(r.decision == FAIL and r.critical for r in results):
        return FAIL
    if (
        all(r.decision == PASS for r in results if r.critical)
        and not any(r.decision == FAIL for r in results)
        and not any(r.probe_error for r in results)
    ):
        return PASS
    return INCONCLUSIVE
