"""Confidence sequences: intervals that stay valid however often they are looked at.

A fixed-sample test re-run after every request will, sooner or later, reject a
true null (that is what "peeking" means). A confidence sequence holds at every
sample size at once. Here each end is its own one-sided sequence:
P(the true value is ever below the lower end) <= alpha, and the same for the
upper end. The judge's FAIL rests on lower ends and its PASS on upper ends, so
no claim pays for the other side. The judge may recompute a verdict after
every record.

Two constructions, both from Ville's inequality on a nonnegative supermartingale:
- `log_mixture_ratio`: conjugate (beta) mixtures of likelihood ratios for a
  Bernoulli mean (Robbins 1970; Howard et al. 2021, "Time-uniform, nonparametric,
  nonasymptotic confidence sequences", section on conjugate mixtures), the prior
  restricted to one side of each hypothesised rate. `quantile_cs` applies it to the
  count of observations below the quantile (Howard & Ramdas 2022, "Sequential
  estimation of quantiles"). `bernoulli_cs`, the same mixture as bounds on a rate,
  no longer backs a check (rate checks are paired, below); its tests still vouch
  for the mixture the quantile bounds use.
- `mean_test`: a mixture of constant bets against "mean <= m" and "mean >= m" for
  bounded data, the test of every rate, tail and paired check. Constant bets make the
  test order-free and its state a sum per bet, which is what lets the judge fold new
  data into a summary instead of replaying history (`policies/summaries.py`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

# Beta(1/2, 1/2) (Jeffreys) mixing prior for Bernoulli likelihood ratios.
PRIOR_A = 0.5
PRIOR_B = 0.5


@dataclass(frozen=True)
class Interval:
    lower: float
    upper: float

    @property
    def width(self) -> float:
        return self.upper - self.lower

    def __contains__(self, value: float) -> bool:
        return self.lower <= value <= self.upper


def _log_beta(a: float, b: float) -> float:
    return math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)


Side = Literal["above", "below"]


def log_mixture_ratio(successes: int, n: int, p: float, side: Side) -> float:
    """log of a one-sided beta-mixture likelihood ratio against Bernoulli(p).

    side "above": the Jeffreys prior restricted to rates above p (renormalised), a
    supermartingale under every rate <= p, so crossing 1/alpha rejects "rate <= p" and bounds
    the rate from below; "below" mirrors it. A prior over both sides would spend part of its
    evidence on the side the bound does not claim.
    """
    if p <= 0.0 or p >= 1.0:
        impossible = (p <= 0.0 and successes > 0 and side == "above") or (
            p >= 1.0 and successes < n and side == "below"
        )
        return math.inf if impossible else 0.0
    from scipy.special import betainc, betaincc

    a, b = PRIOR_A + successes, PRIOR_B + n - successes
    tail = betaincc if side == "above" else betainc
    posterior, prior = tail(a, b, p), tail(PRIOR_A, PRIOR_B, p)
    if posterior <= 0.0:  # the data put (almost) no weight on that side: nothing rejected
        return -math.inf
    log_mix = _log_beta(a, b) - _log_beta(PRIOR_A, PRIOR_B) + math.log(posterior / prior)
    return log_mix - successes * math.log(p) - (n - successes) * math.log1p(-p)


def bernoulli_cs(successes: int, n: int, alpha: float) -> Interval:
    """Time-uniform bounds for a Bernoulli mean, each end one-sided at 1 - alpha.

    The lower end is the largest rate that the "above" mixture rejects, the upper the smallest
    that the "below" mixture rejects: P(rate ever below lower) <= alpha, and the same above.
    """
    if n == 0:
        return Interval(0.0, 1.0)
    threshold = math.log(1.0 / alpha)
    centre = min(max(successes / n, 1e-12), 1 - 1e-12)

    def edge(side: Side, out: float) -> float:
        def rejected(p: float) -> bool:
            return log_mixture_ratio(successes, n, p, side) >= threshold

        if not rejected(out):
            return 0.0 if side == "above" else 1.0
        return _last_accepted(rejected, centre, out, 80)

    return Interval(edge("above", 1e-15), edge("below", 1 - 1e-15))


def _last_accepted(rejected: Any, inside: float, out: float, steps: int) -> float:
    """Bisection between a value a test accepts (`inside`) and one it rejects (`out`)."""
    for _ in range(steps):
        mid = (inside + out) / 2
        if rejected(mid):
            out = mid
        else:
            inside = mid
    return inside


def quantile_cs(values: Sequence[float], q: float, alpha: float) -> Interval:
    """Time-uniform bounds for the q-quantile, each end one-sided at 1 - alpha.

    The number of observations at or below the true quantile is Binomial(n, q); the counts
    the one-sided mixtures do not reject (at p = q) map to order statistics.
    """
    n = len(values)
    if n == 0:
        return Interval(-math.inf, math.inf)
    ordered = sorted(values)
    low_count, high_count = accepted_counts(n, q, alpha)
    lower = ordered[low_count - 1] if low_count >= 1 else -math.inf
    upper = ordered[high_count] if high_count < n else math.inf
    return Interval(lower, upper)


# Largest share of what the bounds allow a bet may stake (Waudby-Smith & Ramdas suggest 1/2 to 3/4):
# one observation at the far end of the range then costs a bet at most log(1 / (1 - BET_CAP)).
BET_CAP = 0.75


def accepted_counts(n: int, q: float, alpha: float) -> tuple[int, int]:
    """The counts s in [0, n] that the one-sided mixtures at p = q do not reject, as (low, high).

    A count below `low` is rejected by the "below" mixture and one above `high` by the
    "above" mixture, each with probability at most alpha ever when the rate is q.
    """
    threshold = math.log(1.0 / alpha)
    centre = min(max(round(n * q), 0), n)

    def edge(side: Side, out: int) -> int:
        def rejected(s: int) -> bool:
            return log_mixture_ratio(s, n, q, side) >= threshold

        if not rejected(out):
            return out
        inside = centre
        while abs(out - inside) > 1:
            mid = (inside + out) // 2
            if rejected(mid):
                out = mid
            else:
                inside = mid
        return inside

    return edge("below", 0), edge("above", n)


# Stakes the paired tests mix over, as shares of the largest stake that the data's range allows:
# 12 constant bets, log-spaced. The mixture grows nearly as fast as the best of them in
# hindsight, paying log(12) once, whatever the failure rate (prototyped against the
# variance-adaptive plug-in and aGRAPA: no slower at 1-5% rates, and with no tuning).
STAKES = tuple(0.01 * (BET_CAP / 0.01) ** (k / 11) for k in range(12))


def mean_test(values: Sequence[float], m: float, low: float, high: float) -> tuple[float, float]:
    """log e-values against "mean <= m" and against "mean >= m", for data in [low, high].

    Each is the log of a mixture, over `STAKES`, of bets that the mean lies on the other
    side: capital x (1 + lambda (x - m)) per value, the stake lambda sized so that no value in
    the range can take the capital to zero. Under its null each capital is a nonnegative
    supermartingale whatever the values' dependence on the past, so by Ville's inequality it
    ever reaches 1/alpha with probability at most alpha: the judge may look after every record.
    The values need not be identically distributed: the null is on each one's conditional mean.
    """

    return mean_test_counts(*_distinct(values, low, high), m, low, high)


def _distinct(values: Sequence[float], low: float, high: float) -> tuple[Any, Any]:
    """The values clipped to the range, as distinct values and their counts: a rate check's
    values take a handful of distinct values, so its tests cost the same at any sample size."""
    import numpy as np

    return np.unique(np.clip(np.asarray(values, dtype=float), low, high), return_counts=True)


def mean_test_counts(x: Any, counts: Any, m: float, low: float, high: float) -> tuple[float, float]:
    """`mean_test` on values given once each with how many times each was seen."""
    import numpy as np

    x = np.clip(np.asarray(x, dtype=float), low, high)
    counts = np.asarray(counts, dtype=float)
    if x.size == 0 or not low < m < high:
        return 0.0, 0.0
    shares = np.asarray(STAKES)
    centred = x[:, None] - m
    above = counts @ np.log1p(shares / (m - low) * centred)
    below = counts @ np.log1p(-shares / (high - m) * centred)

    def mixture(logs: Any) -> float:
        top = float(logs.max())
        return top + math.log(float(np.exp(logs - top).mean()))

    return mixture(above), mixture(below)


def mean_bounds(values: Sequence[float], alpha: float, low: float, high: float) -> Interval:
    """The means `mean_test` does not reject at alpha: each end a one-sided bound, for display.

    The judge decides by `mean_test` at the tolerance itself; these bounds only show how far
    the data are from it (bisection to about 1e-7 of the range).
    """
    return mean_bounds_counts(*_distinct(values, low, high), alpha, low, high)


def mean_bounds_counts(x: Any, counts: Any, alpha: float, low: float, high: float) -> Interval:
    """`mean_bounds` on values given once each with how many times each was seen."""
    import numpy as np

    x = np.clip(np.asarray(x, dtype=float), low, high)
    counts = np.asarray(counts, dtype=float)
    if x.size == 0:
        return Interval(low, high)
    limit = math.log(1.0 / alpha)
    centre = float(x @ counts / counts.sum())

    def edge(side: int, out: float) -> float:
        def rejected(m: float) -> bool:
            return mean_test_counts(x, counts, m, low, high)[side] >= limit

        return _last_accepted(rejected, centre, out, 24) if rejected(out) else out

    span = (high - low) * 1e-9
    return Interval(edge(0, low + span), edge(1, high - span))
