"""What each check keeps of the data it has seen: a summary that grows with nothing.

The judge folds every new unit into these and never reads a unit twice, so a tick
costs the same after a million pairs as after a thousand. Each summary answers
exactly the questions its test asks, and each is order-free: folding the same units
in any order, in any number of ticks, gives the same summary (counts exactly; the
betting sums up to float rounding). That is what lets a restarted loop resume from
the stored summary and agree with a recomputation from the raw rows.

- `PairCounts` (rate, fallback_rate and tail_rate checks): how many units had each
  (candidate share, incumbent share). The shares are k/n for small n, so there are a
  handful of distinct keys however many units.
- `LogHistogram` (quantile checks): counts in buckets 1% wide on a log scale. The
  bounds round outwards to the bucket's edges, so they stay valid; the estimate is
  the bucket's geometric centre, within 0.5% of the exact order statistic.
- `BetGrid` (paired_mean checks): the log capital of each of `STAKES` bets for and
  against a mean at each point of a fixed grid over the check's range, plus the
  tolerance itself. Constant bets multiply, so their logs add: a sum per bet.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Iterable
from typing import Any

import numpy as np

from policies.sequential import STAKES, Interval, accepted_counts

# Relative width of a quantile bucket: [BASE**i, BASE**(i+1)).
BASE = 1.01
_LOG_BASE = math.log(BASE)
ZERO = "0"  # the bucket of values <= 0 (an empty queue, a model with no GPU)


class PairCounts:
    """Units per (candidate's share, incumbent's share) of what the check counts."""

    def __init__(self, counts: dict[tuple[float, float], int] | None = None) -> None:
        self.counts: dict[tuple[float, float], int] = dict(counts or {})

    @classmethod
    def of(cls, units: Iterable[tuple[float, float]]) -> PairCounts:
        counts = cls()
        for candidate, incumbent in units:
            counts.add(candidate, incumbent)
        return counts

    def add(self, candidate: float, incumbent: float, times: int = 1) -> None:
        key = (float(candidate), float(incumbent))
        self.counts[key] = self.counts.get(key, 0) + times

    @property
    def n(self) -> int:
        return sum(self.counts.values())

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(candidate shares, incumbent shares, unit counts), one entry per distinct key."""
        keys = sorted(self.counts)
        return (
            np.array([c for c, _ in keys], dtype=float),
            np.array([i for _, i in keys], dtype=float),
            np.array([self.counts[k] for k in keys], dtype=float),
        )

    def to_json(self) -> dict[str, int]:
        return {f"{c!r}|{i!r}": n for (c, i), n in sorted(self.counts.items())}

    @classmethod
    def from_json(cls, data: dict[str, int]) -> PairCounts:
        counts = {}
        for key, n in data.items():
            c, i = key.split("|")
            counts[(float(c), float(i))] = int(n)
        return cls(counts)


def bucket_of(value: float) -> str:
    if value <= 0.0:
        return ZERO
    return str(math.floor(math.log(value) / _LOG_BASE))


def bucket_edges(bucket: str) -> tuple[float, float]:
    if bucket == ZERO:
        return 0.0, 0.0
    index = int(bucket)
    return BASE**index, BASE ** (index + 1)


class LogHistogram:
    """Counts of values in log buckets: order statistics to 1%, rounded outwards for bounds."""

    def __init__(self, counts: dict[str, int] | None = None) -> None:
        self.counts: dict[str, int] = dict(counts or {})

    @classmethod
    def of(cls, values: Iterable[float]) -> LogHistogram:
        histogram = cls()
        for value in values:
            histogram.add(value)
        return histogram

    def add(self, value: float) -> None:
        bucket = bucket_of(value)
        self.counts[bucket] = self.counts.get(bucket, 0) + 1

    @property
    def n(self) -> int:
        return sum(self.counts.values())

    def _sorted(self) -> list[tuple[str, int]]:
        return sorted(self.counts.items(), key=lambda kv: bucket_edges(kv[0])[0])

    def order_statistic(self, k: int) -> tuple[float, float]:
        """The edges of the bucket holding the k-th smallest value (1-based)."""
        seen = 0
        for bucket, count in self._sorted():
            seen += count
            if seen >= k:
                return bucket_edges(bucket)
        raise IndexError(k)

    def quantile_bounds(self, q: float, alpha: float) -> Interval:
        """Time-uniform bounds for the q-quantile, each end one-sided at 1 - alpha, rounded
        outwards to bucket edges (so each stays valid): as `sequential.quantile_cs`."""
        n = self.n
        if n == 0:
            return Interval(-math.inf, math.inf)
        low_count, high_count = accepted_counts(n, q, alpha)
        lower = self.order_statistic(low_count)[0] if low_count >= 1 else -math.inf
        upper = self.order_statistic(high_count + 1)[1] if high_count < n else math.inf
        return Interval(lower, upper)

    def point_quantile(self, q: float) -> float:
        """The bucket of the q-quantile, at its geometric centre (0 for the zero bucket)."""
        n = self.n
        if n == 0:
            return float("nan")
        low, high = self.order_statistic(min(int(q * n), n - 1) + 1)
        return math.sqrt(low * high)

    def to_json(self) -> dict[str, int]:
        return dict(sorted(self.counts.items()))

    @classmethod
    def from_json(cls, data: dict[str, int]) -> LogHistogram:
        return cls({k: int(v) for k, v in data.items()})


GRID = 257  # points of a paired check's range its bounds are read at (1/256 of the range apart)


class BetGrid:
    """Mixture-of-constant-bets tests on a mean of data in [low, high], at fixed means.

    At each mean m of the grid (and at `limit`, the check's tolerance), each stake of
    `STAKES` has a bet that the mean is above m and one that it is below, sized as in
    `sequential.mean_test`. A constant bet's log capital is a sum over the data, so the
    state is that sum per (m, stake, side): about 6,000 floats, whatever the sample size.
    The decision reads the tests at `limit` exactly; the bounds shown are read off the
    grid, rounded outwards to its points.
    """

    def __init__(self, low: float, high: float, limit: float, grid: int = GRID) -> None:
        self.low, self.high, self.limit = low, high, limit
        inner = np.linspace(low, high, grid)[1:-1]
        self.means = np.append(inner, limit)
        self.shares = np.asarray(STAKES)
        self.log_capital = np.zeros((2, self.means.size, self.shares.size))
        self.n = 0
        self.total = 0.0

    def add_many(self, values: Iterable[float]) -> None:
        x = np.clip(np.asarray(list(values), dtype=float), self.low, self.high)
        if x.size == 0:
            return
        m = self.means[:, None]
        valid = (self.low < m) & (m < self.high)
        with np.errstate(divide="ignore", invalid="ignore"):
            up = np.where(valid, self.shares / (m - self.low), 0.0)
            down = np.where(valid, self.shares / (self.high - m), 0.0)
        for start in range(0, x.size, 256):  # 256 values x 6,000 bets at a time: 12 MB
            centred = x[start : start + 256, None, None] - m[None]  # (values, means, 1)
            self.log_capital[0] += np.log1p(up[None] * centred).sum(axis=0)
            self.log_capital[1] += np.log1p(-down[None] * centred).sum(axis=0)
        self.n += int(x.size)
        self.total += float(x.sum())

    @property
    def mean(self) -> float:
        return self.total / self.n if self.n else 0.0

    def _mixtures(self) -> np.ndarray:
        """log e-values (side, mean): against "mean <= m" (side 0) and "mean >= m" (side 1)."""
        top = self.log_capital.max(axis=2, keepdims=True)
        return top[..., 0] + np.log(np.exp(self.log_capital - top).mean(axis=2))

    def test_at_limit(self) -> tuple[float, float]:
        """log e-values against "mean <= limit" and against "mean >= limit"."""
        if not self.low < self.limit < self.high:
            return 0.0, 0.0
        mixtures = self._mixtures()
        return float(mixtures[0, -1]), float(mixtures[1, -1])

    def bounds(self, alpha: float) -> Interval:
        """The grid's means the tests do not reject, widened to the next grid point outwards."""
        if self.n == 0:
            return Interval(self.low, self.high)
        limit = math.log(1.0 / alpha)
        mixtures = self._mixtures()[:, :-1]
        means = self.means[:-1]
        rejected_low = means[mixtures[0] >= limit]  # the mean is above these
        rejected_high = means[mixtures[1] >= limit]  # the mean is below these
        lower = float(rejected_low.max()) if rejected_low.size else self.low
        upper = float(rejected_high.min()) if rejected_high.size else self.high
        if lower > upper:  # the two claims contradict: possible only with probability < 2 alpha
            lower = upper = self.mean
        return Interval(lower, upper)

    def to_json(self) -> dict[str, Any]:
        raw = np.ascontiguousarray(self.log_capital, dtype="<f8").tobytes()
        return {
            "low": self.low,
            "high": self.high,
            "limit": self.limit,
            "grid": self.means.size - 1 + 2,
            "n": self.n,
            "total": self.total,
            "log_capital": base64.b64encode(raw).decode("ascii"),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BetGrid:
        grid = cls(data["low"], data["high"], data["limit"], data["grid"])
        raw = base64.b64decode(data["log_capital"])
        grid.log_capital = np.frombuffer(raw, dtype="<f8").reshape(grid.log_capital.shape).copy()
        grid.n, grid.total = int(data["n"]), float(data["total"])
        return grid
