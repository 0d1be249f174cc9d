"""Verdicts per slice: where, among kinds of prompts, the candidate is worse.

An aggregate check can PASS a candidate that is better on average and breaks one kind
of prompt, quoted text past a dozen characters for instance. So the judge also runs
every check but the quantiles on each *slice*: the units carrying one tag
(`policies/prompt_tags.py`), or two tags of different `pair_keys`.

How many false findings (docs/policy.md, "Slices"): each slice's test is the aggregate
test (`mean_test` at the check's tolerance) at `Policy.slice_alpha_for(check)`: the
slice budget's share for the check, divided by `max_slices`. A check never judges more
than `max_slices` slices in an attempt (admitted on first sight, never dropped, pairs at
most half of them, chosen by tags alone, never by outcome), so by Bonferroni over the checks and slices, the chance
that *any* slice FAILs falsely in an attempt is at most `slices.alpha`. That bounds the
false-discovery rate too (FDR <= FWER); `bench/slice_sim.py` measures it.

What is kept: per check, per admitted slice, a `PairCounts` of unit values, plus one
for every unit (`*`), so a slice's complement ("elsewhere") is a subtraction. A paired
value is kept on a grid of a thousandth of the check's range, so a slice's summary
stays small whatever the traffic; the rounding moves a mean by at most half a step.
Like every other summary of the judge, it is order-free.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from itertools import combinations
from typing import Any

from policies.checks import Pair, paired_values, signed, tail_unit
from policies.policy import Check, Policy
from policies.prompt_tags import phrase
from policies.sequential import Interval, mean_bounds_counts, mean_test_counts
from policies.summaries import PairCounts

EVERY = "*"  # the summary of every unit, of which each slice is a part
GRID_STEPS = 1000

# How a finding names a metric.
METRIC_WORDS = {
    "typography_cer": "typography CER",
    "typography_word_accuracy": "typography word accuracy",
    "colour_shift_de": "colour shift ΔE",
    "skin_tone_de": "skin-tone ΔE",
}


@dataclass(frozen=True)
class SliceFinding:
    """A slice where a check FAILs: the candidate is worse there beyond the tolerance."""

    check: str
    slice: str  # "text:13+", or two tags "people:yes & words:long"
    action: str  # the check's slice_action: rollback, hold or report
    critical: bool
    difference: float  # candidate minus incumbent (rates) or the paired value, worse positive
    lower: float
    upper: float
    samples: int
    elsewhere: float | None
    elsewhere_lower: float | None
    elsewhere_upper: float | None
    elsewhere_samples: int
    alpha: float
    sentence: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class SliceState:
    """Per sliced check, per admitted slice, the values of its units (see the module's doc)."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.admitted: list[str] = []
        self._admitted: set[str] = set()
        self._pairs = 0  # admitted slices of two tags
        self.counts: dict[str, dict[str, PairCounts]] = {
            c.name: {EVERY: PairCounts()} for c in policy.sliced_checks
        }

    def slices_of(self, tags: Sequence[str]) -> list[str]:
        """A unit's candidate slices: each tag, then each pair of tags of different pair keys."""
        singles = sorted(set(tags))
        keyed = [t for t in singles if t.partition(":")[0] in self.policy.slices.pair_keys]
        pairs = [
            f"{a} & {b}"
            for a, b in combinations(keyed, 2)
            if a.partition(":")[0] != b.partition(":")[0]
        ]
        return singles + pairs

    def admit(self, tags: Sequence[str]) -> list[str]:
        """The unit's slices this state judges, admitting new ones while there is room.
        Pairs of tags take at most half of it, so single tags always have the other half:
        one seen late still finds a place after the pairs of the first units."""
        limit = self.policy.slices.max_slices
        mine = []
        for name in self.slices_of(tags):
            pair = " & " in name
            if (
                name not in self._admitted
                and len(self.admitted) < limit
                and (not pair or self._pairs < limit // 2)
            ):
                self.admitted.append(name)
                self._admitted.add(name)
                self._pairs += pair
            if name in self._admitted:
                mine.append(name)
        return mine

    def add(self, check: Check, slices: Sequence[str], candidate: float, incumbent: float) -> None:
        for name in (EVERY, *slices):
            self.counts[check.name].setdefault(name, PairCounts()).add(candidate, incumbent)

    def fold_arms(self, tags: Sequence[str], shares: dict[str, tuple[float, float]]) -> None:
        """A unit's rate checks (their shares by check name), admitting its slices."""
        slices = self.admit(tags)
        for check in self.policy.sliced_checks:
            if check.is_rate:
                self.add(check, slices, *shares[check.name])

    def fold_scores(self, tags: Sequence[str], scores: dict[str, list[Pair]]) -> None:
        """A unit's score checks: tail shares, or the mean paired value on the grid."""
        slices = [s for s in self.slices_of(tags) if s in self._admitted]
        for check in self.policy.sliced_checks:
            pairs = scores.get(check.metric, [])
            if check.kind == "tail_rate":
                found = tail_unit(check, pairs)
                if found is not None:
                    self.add(check, slices, *found)
            elif check.kind == "paired_mean":
                values = signed(check, paired_values(check, pairs))
                if values:
                    self.add(check, slices, on_grid(check, sum(values) / len(values)), 0.0)

    def to_json(self) -> dict[str, Any]:
        return {
            "admitted": list(self.admitted),
            "counts": {
                check: {name: c.to_json() for name, c in by_slice.items()}
                for check, by_slice in self.counts.items()
            },
        }

    @classmethod
    def from_json(cls, policy: Policy, data: dict[str, Any] | None) -> SliceState:
        state = cls(policy)
        if not data:
            return state
        state.admitted = list(data["admitted"])
        state._admitted = set(state.admitted)
        state._pairs = sum(" & " in name for name in state.admitted)
        for check, by_slice in data["counts"].items():
            state.counts[check] = {n: PairCounts.from_json(c) for n, c in by_slice.items()}
        return state


def on_grid(check: Check, value: float) -> float:
    """A paired value rounded to the check's grid (a thousandth of its range)."""
    low, high = check.range
    step = (high - low) / GRID_STEPS
    return round(round(value / step) * step, 12)


def evaluate_slices(
    state: SliceState, share: float = 1.0, who: str = "candidate"
) -> list[SliceFinding]:
    """Every admitted slice with enough units, of every sliced check: the ones that FAIL.

    `share` scales each slice's alpha (a bake-off splits the slice budget over the models it
    compares); `who` is the model the sentence names."""
    policy = state.policy
    findings = []
    for check in policy.sliced_checks:
        by_slice = state.counts[check.name]
        every = by_slice[EVERY]
        alpha = policy.slice_alpha_for(check) * share
        for name in state.admitted:
            counts = by_slice.get(name)
            if counts is None or counts.n < policy.slices.min_samples or counts.n == every.n:
                continue  # too few units, or the slice is every unit (the aggregate's job)
            if _fails(check, counts, alpha):
                rest = _minus(every, counts)
                findings.append(_finding(check, name, counts, rest, alpha, who))
    return findings


def _regression(check: Check, counts: PairCounts) -> tuple[Any, Any, float, float]:
    """Each distinct unit's distance past the tolerance (<= 0: within it), with its range."""
    c, i, n = counts.arrays()
    if check.kind == "paired_mean":
        limit = check.tolerance.absolute or 0.0
        low, high = check.range if check.direction == "lower_is_better" else _flipped(check)
        return c - limit, n, low - limit, high - limit
    r, a = check.tolerance.rate_ratio, check.tolerance.rate_absolute
    return c - r * i - a, n, -r - a, 1.0 - a


def _fails(check: Check, counts: PairCounts, alpha: float) -> bool:
    z, n, low, high = _regression(check, counts)
    if z @ n <= 0:
        return False  # no bet on "worse" gains on data whose mean is not worse (log(1+x) <= x)
    against_ok, _ = mean_test_counts(z, n, 0.0, low, high)
    return against_ok >= math.log(1.0 / alpha)


def _difference(check: Check, counts: PairCounts, alpha: float) -> tuple[float, Interval]:
    """The slice's mean difference (worse positive) and its bounds at the slice's alpha."""
    c, i, n = counts.arrays()
    if check.kind == "paired_mean":
        low, high = check.range if check.direction == "lower_is_better" else _flipped(check)
        d = c
    else:
        d, low, high = c - i, -1.0, 1.0
    return float(d @ n / n.sum()), mean_bounds_counts(d, n, alpha, low, high)


def _finding(
    check: Check, name: str, counts: PairCounts, rest: PairCounts, alpha: float, who: str
) -> SliceFinding:
    mean, bounds = _difference(check, counts, alpha)
    figure = _figure(check, mean, bounds, counts.n)
    if rest.n:
        rest_mean, rest_bounds = _difference(check, rest, alpha)
        rest_figure = _figure(check, rest_mean, rest_bounds, rest.n)
        limit = _tolerance_of(check)
        within = rest_bounds.lower <= limit
        elsewhere = (
            f"no difference beyond the tolerance elsewhere ({rest_figure})"
            if within
            else f"worse elsewhere too ({rest_figure})"
        )
    else:
        rest_mean, rest_bounds, elsewhere = None, None, "no units elsewhere yet"
    words = METRIC_WORDS.get(check.metric, check.metric.replace("_", " "))
    sentence = f"{who} worse on {phrase(name)}: {words} {figure}; {elsewhere}"
    return SliceFinding(
        check=check.name,
        slice=name,
        action=check.slice_action,
        critical=check.critical,
        difference=mean,
        lower=bounds.lower,
        upper=bounds.upper,
        samples=counts.n,
        elsewhere=rest_mean,
        elsewhere_lower=rest_bounds.lower if rest_bounds else None,
        elsewhere_upper=rest_bounds.upper if rest_bounds else None,
        elsewhere_samples=rest.n,
        alpha=alpha,
        sentence=sentence,
    )


def _figure(check: Check, mean: float, bounds: Interval, n: int) -> str:
    if check.kind == "paired_mean":
        return f"{mean:+.2f} [{bounds.lower:+.2f}, {bounds.upper:+.2f}], n={n}"
    what = f"past {check.threshold:g}" if check.kind == "tail_rate" else "rate"
    return (
        f"{what} {mean * 100:+.1f} pp [{bounds.lower * 100:+.1f}, {bounds.upper * 100:+.1f}], n={n}"
    )


def _tolerance_of(check: Check) -> float:
    """The difference the check tolerates, in the finding's units (rates: at the incumbent's
    rate of zero, so only the absolute part)."""
    if check.kind == "paired_mean":
        return check.tolerance.absolute or 0.0
    return check.tolerance.rate_absolute


def _flipped(check: Check) -> tuple[float, float]:
    low, high = check.range
    return -high, -low


def _minus(every: PairCounts, part: PairCounts) -> PairCounts:
    rest = {k: n - part.counts.get(k, 0) for k, n in every.counts.items()}
    return PairCounts({k: n for k, n in rest.items() if n > 0})


def blocking(findings: Sequence[SliceFinding]) -> tuple[bool, bool]:
    """(a finding rolls back, a finding holds): what the findings do to the verdict."""
    return (
        any(f.action == "rollback" for f in findings),
        any(f.action == "hold" for f in findings),
    )
