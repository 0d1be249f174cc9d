"""Confidence sequences: intervals that stay valid however often they are looked at.

A fixed-sample test re-run after every request will, sooner or later, reject a
true null (that is what "peeking" means). A confidence sequence holds at every
sample size at once. Here each end is its own one-sided sequence:
P(the true value is ever below the lower end) <= alpha, and the same for the
upper end. The judge's FAIL rests on lower ends and its PASS on upper ends, so
no claim pays for the other side. The judge may recompute a verdict after
every record.

Three constructions, all from Ville's inequality on a nonnegative supermartingale:
- `log_mixture_ratio`: conjugate (beta) mixtures of likelihood ratios for a
  Bernoulli mean (Robbins 1970; Howard et al. 2021, "Time-uniform, nonparametric,
  nonasymptotic confidence sequences", section on conjugate mixtures), the prior
  restricted to one side of each hypothesised rate. `quantile_cs` applies it to the
  count of observations below the quantile (Howard & Ramdas 2022, "Sequential
  estimation of quantiles"). `bernoulli_cs`, the same mixture as bounds on a rate,
  no longer backs a check (rate checks are paired, below); its tests still vouch
  for the mixture the quantile bounds use.
- `bounded_mean_cs`: betting bounds for means of bounded data, with the
  variance-adaptive predictable plug-in stakes of Waudby-Smith & Ramdas 2023,
  "Estimating means of bounded random variables by betting"; each end is a
  one-sided sequence, because the judge's FAIL uses only the lower end and its
  PASS only the upper. The paired checks use it.
- `mean_test`: a mixture of constant bets against "mean <= m" and "mean >= m" for
  bounded data, the rate and tail checks' test on paired units.
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


GRID = 2001  # candidate means on [0, 1] for the betting sequence
# Largest share of what the bounds allow a bet may stake (Waudby-Smith & Ramdas suggest 1/2 to 3/4):
# one observation at the far end of the range then costs a bet at most log(1 / (1 - BET_CAP)).
BET_CAP = 0.75


class BettingCS:
    """Betting confidence bounds for a mean of data in [low, high], updated one point at a time.

    Waudby-Smith & Ramdas (2023): for each candidate mean m, one gambler bets
    that the mean is above m (stake lambda * (x - m)) and another that it is below; each
    one's capital is a nonnegative supermartingale whenever the true mean lies on the side
    it bets against, so by Ville's inequality the chance that it ever reaches 1/alpha is
    at most alpha. The lower bound is the smallest m the "above" gambler has not beaten,
    the upper bound the largest m the "below" gambler has not: each bound is a one-sided
    (1 - alpha) sequence, and the two together a (1 - 2 alpha) interval. The judge uses
    the lower bound to FAIL and the upper bound to PASS, so each claim is wrong with
    probability at most alpha; hedging both bets into one capital would charge every
    claim for both (log 2 more evidence). Stakes are the predictable plug-in of their
    empirical-Bernstein sequence, capped at BET_CAP of what the range allows.
    """

    def __init__(self, alpha: float, low: float = 0.0, high: float = 1.0, grid: int = GRID) -> None:
        import numpy as np

        self._np = np
        self.low, self.span = low, high - low
        self.m = np.linspace(0.0, 1.0, grid)
        self._log_up = np.zeros(grid)
        self._log_down = np.zeros(grid)
        self._below = np.zeros(grid, dtype=bool)  # means the "above" gambler has beaten
        self._above = np.zeros(grid, dtype=bool)  # means the "below" gambler has beaten
        self._limit = math.log(1.0 / alpha)
        with np.errstate(divide="ignore"):
            self._cap_up = np.minimum(BET_CAP / self.m, 1e6)
            self._cap_down = np.minimum(BET_CAP / (1.0 - self.m), 1e6)
        self.n = 0
        self._sum = self._sum_sq = 0.0
        self._var = 0.25

    def update(self, raw: float) -> None:
        np = self._np
        x = min(max((raw - self.low) / self.span, 0.0), 1.0)
        self.n += 1
        t = self.n
        lam = math.sqrt(2 * self._limit / (self._var * t * math.log(1 + t)))
        self._log_up += np.log1p(np.minimum(lam, self._cap_up) * (x - self.m))
        self._log_down += np.log1p(-np.minimum(lam, self._cap_down) * (x - self.m))
        self._below |= self._log_up >= self._limit
        self._above |= self._log_down >= self._limit
        self._sum += x
        mean = (0.5 + self._sum) / (t + 1)
        self._sum_sq += (x - mean) ** 2
        self._var = (0.25 + self._sum_sq) / (t + 1)

    def interval(self) -> Interval:
        """[lower, upper]: each end a one-sided bound at 1 - alpha (see the class docstring)."""
        step = 1.0 / (self.m.size - 1)
        not_below, not_above = self.m[~self._below], self.m[~self._above]
        lower = max(float(not_below.min()) - step, 0.0) if not_below.size else 1.0
        upper = min(float(not_above.max()) + step, 1.0) if not_above.size else 0.0
        if lower > upper:  # the two claims contradict: possible only with probability < 2 alpha
            lower = upper = self._sum / max(self.n, 1)
        return Interval(self.low + self.span * lower, self.low + self.span * upper)


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


def bounded_mean_cs(
    values: Sequence[float], alpha: float, low: float = 0.0, high: float = 1.0
) -> Interval:
    """The betting bounds after all of `values`: each end one-sided at 1 - alpha."""
    sequence = BettingCS(alpha, low, high)
    for value in values:
        sequence.update(value)
    return sequence.interval()


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

    return _mean_test(*_distinct(values, low, high), m, low, high)


def _distinct(values: Sequence[float], low: float, high: float) -> tuple[Any, Any]:
    """The values clipped to the range, as distinct values and their counts: a rate check's
    values take a handful of distinct values, so its tests cost the same at any sample size."""
    import numpy as np

    return np.unique(np.clip(np.asarray(values, dtype=float), low, high), return_counts=True)


def _mean_test(x: Any, counts: Any, m: float, low: float, high: float) -> tuple[float, float]:
    import numpy as np

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
    x, counts = _distinct(values, low, high)
    if x.size == 0:
        return Interval(low, high)
    limit = math.log(1.0 / alpha)
    centre = float(x @ counts / counts.sum())

    def edge(side: int, out: float) -> float:
        def rejected(m: float) -> bool:
            return _mean_test(x, counts, m, low, high)[side] >= limit

        return _last_accepted(rejected, centre, out, 24) if rejected(out) else out

    span = (high - low) * 1e-9
    return Interval(edge(0, low + span), edge(1, high - span))
