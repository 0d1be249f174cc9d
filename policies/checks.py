"""One check, evaluated on the data gathered so far: FAIL, PASS or INCONCLUSIVE.

Pure functions of numbers, so the judge's maths is tested and simulated
(`bench/judge_sim.py`) without a database. FAIL means the confidence sequence
shows a regression larger than the tolerance; PASS means it shows any
regression is within the tolerance; otherwise the check is INCONCLUSIVE.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from policies.policy import Check
from policies.sequential import Interval, mean_bounds_counts, mean_test_counts
from policies.summaries import BetGrid, LogHistogram, PairCounts
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
    # A quantile check's point estimate per arm (the estimate above is their ratio).
    arms: dict[str, float] | None = None
    metric: str | None = None  # what the check measures (set by `judge.evaluate`)
    # False while the traffic gives the check nothing to measure (`judge.not_applicable`):
    # it then holds nothing, critical or not.
    applies: bool = True

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ProbeHealth:
    """How the probe behind a paired check fared on the outputs it tried to score."""

    attempts: int = 0
    errors: int = 0
    # One of the errors: the least in sort order, so it does not depend on the order in which
    # outputs were scored or judged.
    example_error: str | None = None

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


def evaluate_rate(check: Check, units: PairCounts, alpha: float, what: str = "") -> CheckResult:
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
    c, i, counts = units.arrays()
    z = c - r * i - a
    n = int(counts.sum())
    p_c = float(c @ counts) / n if n else 0.0
    p_i = float(i @ counts) / n if n else 0.0
    against_ok, against_bad = mean_test_counts(z, counts, 0.0, low, high)
    decision = _decide_by_evidence(check, n, against_ok, against_bad, alpha)
    bounds = mean_bounds_counts(z, counts, alpha, low, high) if n else Interval(low, high)
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
        float(z @ counts) / n if n else None,  # how far beyond the tolerance (<= 0: within it)
        bounds.lower,
        bounds.upper,
        n,
        check.critical,
        _min_samples_note(check, n, reason),
        alpha,
    )


def _decide_by_evidence(
    check: Check, n: int, against_ok: float, against_bad: float, alpha: float
) -> str:
    """FAIL once the e-value against "within tolerance" reaches 1/alpha, PASS once the one
    against "beyond it" does; nothing before `min_samples`."""
    needed = math.log(1.0 / alpha)
    if n < check.min_samples:
        return INCONCLUSIVE
    if against_ok >= needed:
        return FAIL
    if against_bad >= needed:
        return PASS
    return INCONCLUSIVE


Pair = tuple[float | None, float | None]  # one image's probe value: (candidate's, incumbent's)


def paired_values(check: Check, pairs: Sequence[Pair]) -> list[float]:
    """One request's pair values (candidate's score, or candidate minus incumbent), finite only."""
    if check.pair_value == "candidate":
        values = [c for c, _ in pairs if c is not None]
    else:
        values = [c - i for c, i in pairs if c is not None and i is not None]
    return [v for v in values if math.isfinite(v)]


def tail_unit(check: Check, pairs: Sequence[Pair]) -> tuple[float, float] | None:
    """One request's shares of its pairs in the tail against each arm (a `tail_rate` check);
    None when none of its pairs has a value.

    With `pair_value: candidate` the value already compares the pair (e.g. the ΔE between the
    two images), so only the candidate can be in the tail. With `difference`, a pair whose
    candidate is worse by more than the threshold counts against the candidate, and one whose
    incumbent is worse by as much counts against the incumbent: an A/A pair is as likely
    to land in either tail.
    """
    values = signed(check, paired_values(check, pairs))
    if not values:
        return None
    threshold = check.threshold or 0.0
    cand = sum(v > threshold for v in values) / len(values)
    if check.pair_value == "candidate":
        return cand, 0.0
    return cand, sum(v < -threshold for v in values) / len(values)


def probe_failing(check: Check, health: ProbeHealth, max_share: float) -> CheckResult | None:
    """INCONCLUSIVE, saying why, when the check's probe errors on more than `max_share`."""
    if not health.failing(max_share):
        return None
    reason = (
        f"probe {check.metric} errored on {health.errors}/{health.attempts} outputs it scored "
        f"({health.errors / health.attempts:.0%}, more than the policy's max_probe_error_share "
        f"{max_share:.0%}): {health.example_error}; the check holds the rollout until its probe "
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
    check: Check, candidate: LogHistogram, incumbent: LogHistogram, alpha: float
) -> CheckResult:
    """Quantile of each arm from its own one-sided bounds (alpha/2 each), compared by the tolerance."""
    q = check.quantile or 0.5
    cand = candidate.quantile_bounds(q, alpha / 2)
    inc = incumbent.quantile_bounds(q, alpha / 2)
    est_c, est_i = candidate.point_quantile(q), incumbent.point_quantile(q)
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
    samples = min(candidate.n, incumbent.n)
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
        arms={"candidate": est_c, "incumbent": est_i},
    )


def paired_grid(check: Check) -> BetGrid:
    """The empty summary of a paired check: values signed so that larger is worse."""
    low, high = check.range
    if check.direction == "higher_is_better":
        low, high = -high, -low
    return BetGrid(low, high, _limit(check))


def signed(check: Check, values: Sequence[float]) -> list[float]:
    """A paired check's values, finite only, signed so that larger is worse."""
    sign = -1 if check.direction == "higher_is_better" else 1
    return [sign * v for v in values if math.isfinite(v)]


def evaluate_paired(check: Check, grid: BetGrid, alpha: float) -> CheckResult:
    """Mean paired regression (candidate minus incumbent, or the pair's own score) by betting.

    The same test as the rate checks (`mean_test`) at the tolerance itself: FAIL and PASS
    are separate one-sided claims, each wrong with probability at most alpha at any look.
    """
    against_ok, against_bad = grid.test_at_limit()
    n = grid.n
    decision = _decide_by_evidence(check, n, against_ok, against_bad, alpha)
    bounds = grid.bounds(alpha)
    tolerance = _limit(check)
    what = "mean paired difference" if check.pair_value == "difference" else "mean per pair"
    words = {
        FAIL: f"above the tolerance {tolerance:g} (e-value {_e(against_ok)} >= {1 / alpha:.3g})",
        PASS: f"within the tolerance {tolerance:g} (e-value {_e(against_bad)} >= {1 / alpha:.3g})",
        INCONCLUSIVE: f"not yet shown within or beyond the tolerance {tolerance:g} (e-values "
        f"{_e(against_ok)} for a regression, {_e(against_bad)} against; {1 / alpha:.3g} decides)",
    }[decision]
    reason = (
        f"{check.metric} {what} {grid.mean:+.4g} over {n} pairs, {words}; the mean is in "
        f"[{bounds.lower:+.4g}, {bounds.upper:+.4g}], each end with {_confidence(alpha)} confidence"
    )
    return CheckResult(
        check.name,
        decision,
        grid.mean,
        bounds.lower,
        bounds.upper,
        n,
        check.critical,
        _min_samples_note(check, n, reason),
        alpha,
    )


def _min_samples_note(check: Check, samples: int, reason: str) -> str:
    if samples < check.min_samples:
        return f"{samples}/{check.min_samples} samples so far; " + reason
    return reason


def overall(results: Sequence[CheckResult], slice_actions: Collection[str] = ()) -> str:
    """FAIL if a critical check fails or a slice finding rolls back; PASS if every critical
    check that applies passes, none fails, no check's probe is failing and no slice finding holds;
    else INCONCLUSIVE. `slice_actions` are the findings' actions (`policies/slices.py`)."""
    if any(r.decision == FAIL and r.critical for r in results) or "rollback" in slice_actions:
        return FAIL
    if (
        all(r.decision == PASS for r in results if r.critical and r.applies)
        and not any(r.decision == FAIL for r in results)
        and not any(r.probe_error for r in results)
        and "hold" not in slice_actions
    ):
        return PASS
    return INCONCLUSIVE
