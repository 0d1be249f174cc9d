"""The bake-off's comparison: each model against the baseline, pair by pair, then a ranking.

Pure, so the maths is tested and simulated (`controller/lab/simulation.py`,
`bench/bakeoff_sim.py`) without rendering anything. A unit is one suite item at one
seed: every model rendered it, so a model and the baseline form a pair, judged by the
rollout's own judge (`policies.judge`): the same checks, tests and summaries.

Two things differ from a rollout, and docs/policy.md says why:
- *The question.* A rollout asks "is the candidate within the tolerance?"; a bake-off
  ranks, so it asks "is this model worse, or better, than the baseline at all?". Every
  check that compares the two arms' own values (rates, quantiles, paired differences)
  runs with a zero tolerance. A check whose value already measures the distance between
  the pair (`pair_value: candidate`, such as the colour shift in ΔE) keeps its
  tolerance, since a distance is never below zero.
- *The budget.* One `alpha` covers the whole bake-off: it is split over every check
  (critical or not, by weight) and then over the models compared, so the chance that
  any model is called worse (or better) than the baseline when it is not stays below
  alpha, however many models, checks and looks there are.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from policies.checks import FAIL, PASS, CheckResult
from policies.judge import JudgeState, OutputFacts, ScoreRow, evaluate, unit_of
from policies.policy import Check, Policy, Tolerance
from policies.sequential import quantile_cs
from policies.slices import SliceFinding, evaluate_slices
from policies.vocabulary import Arm
from workers.jobs import OutputStatus

CANDIDATE, INCUMBENT = Arm.CANDIDATE, Arm.INCUMBENT


@dataclass(frozen=True)
class LabImage:
    """One suite item at one seed, rendered by one model, as the comparison reads it."""

    unit: str
    status: str
    latency_ms: float | None = None
    batch_size: int | None = None
    scores: Mapping[str, float | None] = field(default_factory=dict)  # probe: value
    errors: Mapping[str, str] = field(default_factory=dict)  # probe: why it failed
    tags: tuple[str, ...] = ()  # the item's prompt tags: the slices the pair belongs to

    def score_rows(self, output_id: str) -> list[ScoreRow]:
        rows: list[ScoreRow] = [(output_id, p, v, None) for p, v in self.scores.items()]
        return rows + [(output_id, p, None, e) for p, e in self.errors.items()]


@dataclass(frozen=True)
class Figure:
    """A number with its confidence interval, each end one-sided at the figure's alpha."""

    estimate: float | None
    lower: float | None
    upper: float | None

    def as_dict(self) -> dict[str, float | None]:
        return {"estimate": self.estimate, "lower": self.lower, "upper": self.upper}


def measures_distance(check: Check) -> bool:
    """A check whose value is already the distance between the pair (never below zero)."""
    return check.pair_value == "candidate" and check.on_scores


def lab_policy(policy: Policy) -> Policy:
    """The rollout's checks, asking "worse or better than the baseline at all?" (zero tolerance)
    wherever the check compares the two arms' own values."""
    checks = []
    for check in policy.checks:
        if measures_distance(check):
            checks.append(check)
        elif check.kind == "quantile":
            checks.append(check.model_copy(update={"tolerance": Tolerance(ratio=1.0)}))
        elif check.kind == "paired_mean":
            checks.append(check.model_copy(update={"tolerance": Tolerance(absolute=0.0)}))
        else:
            zero = Tolerance(ratio=1.0, absolute=0.0)
            checks.append(check.model_copy(update={"tolerance": zero}))
    return policy.model_copy(update={"checks": checks})


def bakeoff_alpha(policy: Policy, compared: int) -> Callable[[Check], float]:
    """Each check's share of one budget: alpha x weight / all weights / models compared."""
    total = sum(c.weight for c in policy.checks)
    return lambda check: policy.alpha * check.weight / total / max(compared, 1)


class ModelTally:
    """One model against the baseline: the judge's state over the units folded so far, and its
    latencies and costs per image."""

    def __init__(self, model: str, policy: Policy, devices: float = 1.0) -> None:
        self.model = model
        self.state = JudgeState(policy)
        self.devices = devices
        self.units: set[str] = set()
        self.latencies: list[float] = []
        self.costs: list[float] = []
        self.stopped: str | None = None  # why it was stopped early, once it was
        # Each check's first FAIL or PASS: a claim stands once made (see `standing`).
        self.claims: dict[str, CheckResult] = {}
        # Each slice's first FAIL, by "check slice", kept for the same reason.
        self.slice_claims: dict[str, SliceFinding] = {}

    def fold(self, mine: LabImage, baseline: LabImage, baseline_devices: float = 1.0) -> None:
        """One pair, once: a unit seen before is ignored (a resumed run folds from scratch)."""
        if mine.unit in self.units:
            return
        self.units.add(mine.unit)
        roles = {CANDIDATE: [_facts("c", mine)], INCUMBENT: [_facts("i", baseline)]}
        rows = {"c": mine.score_rows("c"), "i": baseline.score_rows("i")}
        gpus = {CANDIDATE: self.devices, INCUMBENT: baseline_devices}
        unit = unit_of(mine.unit, roles, gpus, rows, mine.tags)
        if unit is None:
            return
        self.state.fold_arms(unit)
        self.state.fold_scores(unit, rows["c"] + rows["i"])
        if mine.status == OutputStatus.OK and mine.latency_ms is not None:
            self.latencies.append(mine.latency_ms)
            self.costs.append(cost_per_image(mine, self.devices))

    def standing(
        self,
        alpha_for: Callable[[Check], float],
        figure_alpha: float,
        slice_share: float = 1.0,
    ) -> Standing:
        """Every check now, each FAIL or PASS kept once reached.

        Each test is a confidence sequence: the chance it ever crosses its threshold is at
        most its alpha, so the first crossing is a claim that stays valid, even if later data
        take the running statistic back inside (a mixture of bets can lose capital).
        """
        results = []
        for result in evaluate(self.state, alpha_for):
            claim = self.claims.get(result.name)
            if claim is None and result.decision in (FAIL, PASS):
                self.claims[result.name] = claim = result
            results.append(claim or result)
        for finding in evaluate_slices(self.state.slices, slice_share, who=self.model):
            self.slice_claims.setdefault(f"{finding.check} {finding.slice}", finding)
        policy = self.state.policy
        return Standing(
            self.model,
            self.state.units,
            results,
            median_figure(self.latencies, figure_alpha),
            median_figure(self.costs, figure_alpha),
            self.stopped,
            frozenset(c.name for c in policy.checks if not measures_distance(c)),
            frozenset(c.name for c in policy.checks if c.kind == "quantile"),
            list(self.slice_claims.values()),
        )


def _facts(output_id: str, image: LabImage) -> OutputFacts:
    role = CANDIDATE if output_id == "c" else INCUMBENT
    return OutputFacts(
        output_id,
        image.unit,
        role,
        0,
        image.status,
        latency_ms=image.latency_ms,
        batch_size=image.batch_size,
    )


def cost_per_image(image: LabImage, devices: float) -> float:
    """Device-seconds per image: the call's time on the model's GPUs (or CPUs), shared by
    the batch it ran in. Times a price per device-hour, it is the price of an image."""
    return (image.latency_ms or 0.0) / 1000 * devices / max(image.batch_size or 1, 1)


@dataclass(frozen=True)
class Standing:
    """Where one model stands against the baseline."""

    model: str
    units: int
    results: list[CheckResult]
    latency_ms: Figure  # median per image
    cost: Figure  # median device-seconds per image
    stopped: str | None
    zero_tolerance: frozenset[str]  # checks asking "better or worse at all"
    quantiles: frozenset[str] = frozenset()  # checks whose estimate is a ratio of quantiles
    slices: list[SliceFinding] = field(default_factory=list)  # slices where it is worse

    @property
    def worse(self) -> list[CheckResult]:
        return [r for r in self.results if r.decision == FAIL]

    @property
    def better(self) -> list[CheckResult]:
        """Checks on which it is shown better than the baseline (a distance check's PASS says
        "within its tolerance", which is not better, so it is not counted)."""
        return [r for r in self.results if r.decision == PASS and r.name in self.zero_tolerance]

    @property
    def verdict(self) -> str:
        if self.worse:
            return "worse"
        return "better" if self.better else "level"

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "units": self.units,
            "verdict": self.verdict,
            "worse_on": [r.name for r in self.worse],
            "better_on": [r.name for r in self.better],
            "stopped_early": self.stopped,
            "latency_ms_p50": self.latency_ms.as_dict(),
            "device_seconds_per_image_p50": self.cost.as_dict(),
            "checks": [r.as_dict() for r in self.results],
            "slices": [f.as_dict() for f in self.slices],
        }


def median_figure(values: list[float], alpha: float) -> Figure:
    if not values:
        return Figure(None, None, None)
    bounds = quantile_cs(values, 0.5, alpha)
    ordered = sorted(values)
    middle = ordered[len(ordered) // 2]

    def finite(x: float) -> float | None:
        return x if math.isfinite(x) else None

    return Figure(middle, finite(bounds.lower), finite(bounds.upper))


def losing(result: Standing) -> str | None:
    """Why a model is clearly losing (a critical check shows it worse), or None.

    Stopping it there keeps every claim valid: each test is a confidence sequence, which
    holds at any stopping time, whatever the stopping rule looked at (docs/policy.md).
    """
    critical = [r for r in result.worse if r.critical]
    if not critical:
        return None
    return "worse than the baseline on " + ", ".join(r.name for r in critical)


def rank(standings: Iterable[Standing]) -> list[Standing]:
    """Best first: fewest checks shown worse (critical ones first), most shown better, then
    the faster median latency."""

    def key(s: Standing) -> tuple[int, int, int, float]:
        critical = sum(r.critical for r in s.worse)
        return (critical, len(s.worse), -len(s.better), s.latency_ms.estimate or math.inf)

    return sorted(standings, key=key)


def lines(ranked: list[Standing]) -> dict[str, list[str]]:
    """Each model's sentences: "best on …" (among the models compared, for each check, and
    not worse than the baseline there), "better than baseline on …", "worse than baseline on …"."""
    said: dict[str, list[str]] = {s.model: [] for s in ranked}
    best: dict[str, list[str]] = {s.model: [] for s in ranked}
    if len(ranked) > 1:
        for index, check in enumerate(ranked[0].results):
            results = {s.model: s.results[index] for s in ranked}
            figures = {m: Figure(r.estimate, r.lower, r.upper) for m, r in results.items()}
            winner = _clear_best(figures)
            if winner is not None and results[winner].decision != FAIL:
                best[winner].append(check.name)
        winner = _clear_best({s.model: s.latency_ms for s in ranked})
        if winner is not None:
            best[winner].append("latency")
    for s in ranked:
        if best[s.model]:
            said[s.model].append("best on " + ", ".join(best[s.model]))
        if s.better:
            said[s.model].append("better than baseline on " + _named(s.better, s.quantiles))
        if s.worse:
            said[s.model].append("worse than baseline on " + _named(s.worse, s.quantiles))
        said[s.model] += [f.sentence for f in s.slices]
        if not s.worse and not s.better:
            said[s.model].append("no difference from the baseline shown on any check")
        if s.stopped:
            said[s.model].append(f"stopped early after {s.units} pairs: {s.stopped}")
    return said


def _clear_best(figures: Mapping[str, Figure]) -> str | None:
    """The model whose interval lies wholly below every other model's (lower is better), or
    None when no one is clearly ahead (or a model has no interval yet)."""
    known = {m: f for m, f in figures.items() if None not in (f.estimate, f.lower, f.upper)}
    if len(known) < len(figures):
        return None
    top = min(known, key=lambda m: known[m].estimate or 0.0)
    rest = [f for m, f in known.items() if m != top]
    return top if all((known[top].upper or 0.0) < (f.lower or 0.0) for f in rest) else None


def _named(results: list[CheckResult], quantiles: frozenset[str]) -> str:
    return ", ".join(f"{r.name} ({_figure_text(r, r.name in quantiles)})" for r in results)


def _figure_text(result: CheckResult, quantile: bool) -> str:
    """A quantile check's estimate is the ratio of the two quantiles, its interval the
    difference (candidate minus baseline, in the metric's unit); the others are both in one unit."""
    if result.estimate is None or result.lower is None or result.upper is None:
        return "n/a"
    interval = f"[{result.lower:+.3g}, {result.upper:+.3g}]"
    if quantile:
        return f"x{result.estimate:.3g} of the baseline's, difference in {interval}"
    return f"{result.estimate:+.3g}, interval {interval}"
