"""The judge: the policy's checks over everything recorded in a rollout attempt.

Pure: `controller/rollout/analysis.py` reads new outputs and scores from SQL and
hands them here as `OutputFacts` and score rows. The unit of analysis is a mirrored
request with both arms recorded (`unit_of` says why), judged at the shorter of its
arms' deadlines. Each check is an anytime-valid test over that growing sequence at
its share of the policy's budget (`Policy.alpha_for`), so evaluating after every
record keeps the chance of a false rollback over the whole attempt below `alpha`.

A unit is folded into a `JudgeState` once and never read again: its arms (rates,
quantiles) as soon as both are recorded, its probe scores once the scorer has
settled them. The state's summaries (`policies/summaries.py`) are order-free, so the
state after any sequence of folds equals the one a single pass over the same units
builds, which is what a restarted loop relies on.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from policies.checks import (
    CheckResult,
    Pair,
    ProbeHealth,
    evaluate_paired,
    evaluate_quantile,
    evaluate_rate,
    paired_grid,
    paired_values,
    probe_failing,
    signed,
    tail_unit,
)
from policies.metrics import SCORE_METRICS, counts, gpu_seconds
from policies.policy import Check, Policy
from policies.slices import SliceFinding, SliceState, evaluate_slices
from policies.summaries import BetGrid, LogHistogram, PairCounts
from policies.vocabulary import Arm
from workers.jobs import OutputStatus

CANDIDATE, INCUMBENT = Arm.CANDIDATE, Arm.INCUMBENT
OK, TIMEOUT = OutputStatus.OK, OutputStatus.TIMEOUT


@dataclass(frozen=True)
class OutputFacts:
    """What the judge reads of one recorded output (a row of `outputs`, or a simulated one)."""

    id: str
    request_id: str
    role: str
    image_index: int
    status: str
    latency_ms: float | None = None
    queue_ms: float | None = None
    batch_size: int | None = None
    timeout_s: float | None = None


@dataclass
class Side:
    """One role's side of a mirrored request, judged at the pair's common deadline."""

    statuses: list[str]  # per image; a success slower than the pair's deadline counts as a timeout
    latency_ms: float | None  # the request's (its slowest image), capped at the deadline
    queue_ms: float | None
    gpu_seconds: float | None


@dataclass
class Unit:
    """One mirrored request whose both arms are recorded: the judge's unit of analysis."""

    request_id: str
    arms: dict[str, Side]
    scores: dict[str, list[Pair]]  # per probe, per image: (candidate's value, incumbent's)
    tags: tuple[str, ...] = ()  # the request's prompt tags: the slices it belongs to


@dataclass
class Window:
    """Units in arrival order, and how each probe fared on them (the simulation's form)."""

    units: list[Unit]
    probe_health: dict[str, ProbeHealth]


ScoreRow = tuple[str, str, float | None, str | None]  # (output id, probe, value, error)


def build_window(
    outputs: Iterable[OutputFacts],
    mirrored: Collection[str],
    scores: Iterable[ScoreRow],
    gpus: dict[str, float],
) -> Window:
    """Units from outputs in arrival order: mirrored requests with both arms recorded."""
    by_request: dict[str, dict[str, list[OutputFacts]]] = {}
    for output in outputs:
        if output.request_id in mirrored:
            by_request.setdefault(output.request_id, {}).setdefault(output.role, []).append(output)
    rows_by_output = rows_by_output_id(scores)
    units, health = [], ProbeTally()
    for request_id, roles in by_request.items():
        unit = unit_of(request_id, roles, gpus, rows_by_output)
        if unit is not None:
            units.append(unit)
            health.add_rows(score_rows_of(roles, rows_by_output))
    return Window(units, health.health())


def rows_by_output_id(scores: Iterable[ScoreRow]) -> dict[str, list[ScoreRow]]:
    found: dict[str, list[ScoreRow]] = {}
    for row in scores:
        found.setdefault(row[0], []).append(row)
    return found


def score_rows_of(
    roles: dict[str, list[OutputFacts]], rows_by_output: dict[str, list[ScoreRow]]
) -> list[ScoreRow]:
    return [row for outs in roles.values() for o in outs for row in rows_by_output.get(o.id, [])]


def unit_of(
    request_id: str,
    roles: dict[str, list[OutputFacts]],
    gpus: dict[str, float],
    rows_by_output: dict[str, list[ScoreRow]] | None = None,
    tags: Sequence[str] = (),
) -> Unit | None:
    """One mirrored request as the judge sees it, or None when an arm has no outcome.

    Why only mirrored requests: users are routed stickily, so the candidate's share of
    *requests* is not its share of users, and a heavy user's habits land on one arm; a
    mirrored request shows the same request to both arms. A request's images are one unit,
    because a failure often takes out the whole request. Whether a request is mirrored
    depends on the past only (its id, and the mirrors in flight when it arrived), never on
    its own outcome, so the sequential tests stay valid on this subset.
    """
    if set(roles) != {CANDIDATE, INCUMBENT}:
        return None
    deadlines = [o.timeout_s for outs in roles.values() for o in outs if o.timeout_s]
    deadline_ms = min(deadlines) * 1000 if deadlines else None
    arms = {role: _arm(outs, deadline_ms, gpus.get(role, 0.0)) for role, outs in roles.items()}
    values: dict[str, dict[str, dict[int, float | None]]] = {}
    for role, outs in roles.items():
        for o in outs:
            for _, probe, value, error in (rows_by_output or {}).get(o.id, []):
                if error is None and value is not None and math.isfinite(value):
                    values.setdefault(probe, {}).setdefault(role, {})[o.image_index] = value
    ok = {role: {o.image_index for o in outs if o.status == OK} for role, outs in roles.items()}
    both_ok = sorted(ok[CANDIDATE] & ok[INCUMBENT])
    scores_of = {
        probe: [
            (by_role.get(CANDIDATE, {}).get(k), by_role.get(INCUMBENT, {}).get(k)) for k in both_ok
        ]
        for probe, by_role in values.items()
    }
    return Unit(request_id, arms, scores_of, tuple(tags))


def _arm(outputs: list[OutputFacts], deadline_ms: float | None, gpus: float) -> Side:
    """One arm of a pair at the pair's deadline: both arms of a pair are given the same time.

    The mirror's timeout is usually shorter than the primary's. Judged as recorded, an
    identical model on the mirror side would time out more and lose its slow successes from
    the latency data; judged at the shorter deadline, both arms are censored alike.
    """
    statuses: list[str] = []
    latencies: list[float | None] = []  # of the images that succeeded or timed out
    for o in outputs:
        late = deadline_ms is not None and o.latency_ms is not None and o.latency_ms > deadline_ms
        status = TIMEOUT if o.status == OK and late else o.status
        statuses.append(status)
        if status == TIMEOUT:
            latencies.append(deadline_ms if deadline_ms is not None else o.latency_ms)
        elif status == OK:
            latencies.append(o.latency_ms)
    known = [v for v in latencies if v is not None]
    latency = max(known) if known and len(known) == len(outputs) else None
    all_ok = all(s == OK for s in statuses)
    queue = max((o.queue_ms or 0.0 for o in outputs), default=0.0) if all_ok else None
    gpu = sum(gpu_seconds(o.latency_ms, o.batch_size, gpus) for o in outputs) if all_ok else None
    return Side(statuses, latency, queue, gpu)


class ProbeTally:
    """Score rows per probe: how many, how many errored, one error. An `image` error
    (the artifact could not be read) is an error of every probe."""

    def __init__(self, health: dict[str, ProbeHealth] | None = None) -> None:
        self.attempts: dict[str, int] = {}
        self.errors: dict[str, int] = {}
        self.example: dict[str, str] = {}
        for name, h in (health or {}).items():
            self.attempts[name], self.errors[name] = h.attempts, h.errors
            if h.example_error is not None:
                self.example[name] = h.example_error

    def add_rows(self, rows: Iterable[ScoreRow]) -> None:
        for _, probe, value, error in rows:
            self.add(probe, value, error)

    def add(self, probe: str, value: float | None, error: str | None) -> None:
        if value is not None and not math.isfinite(value):
            error = f"the probe stored {value}, not a finite number"
        for name in SCORE_METRICS if probe == "image" else (probe,):
            self.attempts[name] = self.attempts.get(name, 0) + 1
            if error is not None:
                self.errors[name] = self.errors.get(name, 0) + 1
                self.example[name] = min(self.example.get(name, error), error)

    def health(self) -> dict[str, ProbeHealth]:
        return {
            name: ProbeHealth(count, self.errors.get(name, 0), self.example.get(name))
            for name, count in self.attempts.items()
        }


class JudgeState:
    """Every check's summary of the units folded so far, and the probes' health.

    What each check keeps (docs/policy.md has the why): rate, fallback_rate and tail_rate
    checks a `PairCounts`; quantile checks a `LogHistogram` per arm; paired_mean checks a
    `BetGrid`. None of them grows with the number of units.
    """

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.units = 0  # units whose arms are folded
        self.scored_units = 0  # units whose scores are folded
        self.rates: dict[str, PairCounts] = {}
        self.quantiles: dict[str, tuple[LogHistogram, LogHistogram]] = {}
        self.paired: dict[str, BetGrid] = {}
        for check in policy.checks:
            if check.is_rate or check.kind == "tail_rate":
                self.rates[check.name] = PairCounts()
            elif check.kind == "quantile":
                self.quantiles[check.name] = (LogHistogram(), LogHistogram())
            else:
                self.paired[check.name] = paired_grid(check)
        self._unfolded: dict[str, list[float]] = {name: [] for name in self.paired}
        self.probes = ProbeTally()
        self.slices = SliceState(policy)

    def fold_arms(self, unit: Unit) -> None:
        """A unit's outcomes, latencies and costs: as soon as both arms are recorded."""
        self.units += 1
        cand, inc = unit.arms[CANDIDATE], unit.arms[INCUMBENT]
        shares = {}
        for check in self.policy.checks:
            if check.is_rate:
                shares[check.name] = (
                    _share(cand.statuses, check.metric),
                    _share(inc.statuses, check.metric),
                )
                self.rates[check.name].add(*shares[check.name])
            elif check.kind == "quantile":
                for side, histogram in zip((cand, inc), self.quantiles[check.name], strict=True):
                    value = getattr(side, check.metric)
                    if value is not None and math.isfinite(value):
                        histogram.add(value)
        self.slices.fold_arms(unit.tags, shares)

    def fold_scores(self, unit: Unit, rows: Iterable[ScoreRow]) -> None:
        """A unit's probe scores (and every score row of its outputs, for the probes' health):
        once the scorer has settled both arms."""
        self.scored_units += 1
        self.probes.add_rows(rows)
        for check in self.policy.checks:
            pairs = unit.scores.get(check.metric, [])
            if check.kind == "tail_rate":
                shares = tail_unit(check, pairs)
                if shares is not None:
                    self.rates[check.name].add(*shares)
            elif check.kind == "paired_mean":
                values = signed(check, paired_values(check, pairs))
                if values:
                    self._unfolded[check.name].append(sum(values) / len(values))
        self.slices.fold_scores(unit.tags, unit.scores)

    def settle(self) -> None:
        """Fold the paired values gathered since the last read into their grids, in one
        vectorised pass (a grid update per unit would cost more than the rest of the fold)."""
        for name, values in self._unfolded.items():
            if values:
                self.paired[name].add_many(values)
                values.clear()

    def to_json(self) -> dict[str, Any]:
        self.settle()
        return {
            "units": self.units,
            "scored_units": self.scored_units,
            "rates": {name: c.to_json() for name, c in self.rates.items()},
            "quantiles": {
                name: [h.to_json() for h in pair] for name, pair in self.quantiles.items()
            },
            "paired": {name: g.to_json() for name, g in self.paired.items()},
            "probes": {
                name: [h.attempts, h.errors, h.example_error]
                for name, h in self.probes.health().items()
            },
            "slices": self.slices.to_json(),
        }

    @classmethod
    def from_json(cls, policy: Policy, data: dict[str, Any]) -> JudgeState:
        """The stored state, for the same policy (the caller checks its fingerprint)."""
        state = cls(policy)
        state.units, state.scored_units = int(data["units"]), int(data["scored_units"])
        state.rates = {name: PairCounts.from_json(c) for name, c in data["rates"].items()}
        state.quantiles = {
            name: (LogHistogram.from_json(c), LogHistogram.from_json(i))
            for name, (c, i) in data["quantiles"].items()
        }
        state.paired = {name: BetGrid.from_json(g) for name, g in data["paired"].items()}
        state.probes = ProbeTally(
            {name: ProbeHealth(a, e, x) for name, (a, e, x) in data["probes"].items()}
        )
        state.slices = SliceState.from_json(policy, data.get("slices"))
        return state


def state_of(policy: Policy, window: Window) -> JudgeState:
    """A window's units folded into a fresh state (the simulation's and the tests' path)."""
    state = JudgeState(policy)
    for unit in window.units:
        state.fold_arms(unit)
        state.fold_scores(unit, [])
    state.probes = ProbeTally(window.probe_health)
    return state


def _share(statuses: list[str], metric: str) -> float:
    return sum(counts(metric, s) for s in statuses) / len(statuses)


def evaluate(
    state: JudgeState, alpha_for: Callable[[Check], float] | None = None
) -> list[CheckResult]:
    """Every check of the state's policy, on what the state has folded, each at its share of
    the policy's budget, or at `alpha_for(check)` (a bake-off splits one budget over every
    check of every model it compares: `controller/lab/compare.py`)."""
    policy = state.policy
    alpha_for = alpha_for or policy.alpha_for
    state.settle()
    results = []
    health = state.probes.health()
    for check in policy.checks:
        alpha = alpha_for(check)
        if check.is_rate:
            results.append(evaluate_rate(check, state.rates[check.name], alpha))
            continue
        if check.kind == "quantile":
            cand, inc = state.quantiles[check.name]
            results.append(evaluate_quantile(check, cand, inc, alpha))
            continue
        held = probe_failing(
            check, health.get(check.metric, ProbeHealth()), policy.max_probe_error_share
        )
        if held is not None:
            results.append(held)
            continue
        if check.kind == "tail_rate":
            what = f"{check.metric} past {check.threshold:g}"
            result = evaluate_rate(check, state.rates[check.name], alpha, what)
        else:
            result = evaluate_paired(check, state.paired[check.name], alpha)
        if result.samples == 0 and state.scored_units >= check.min_samples:
            result = not_applicable(result, check, state.scored_units)
        results.append(_sampled_note(result, policy.rate_for(check.metric)))
    return [
        dataclasses.replace(r, metric=c.metric) for r, c in zip(results, policy.checks, strict=True)
    ]


def not_applicable(result: CheckResult, check: Check, scored: int) -> CheckResult:
    """A score check none of `scored` scored pairs gave a value to: typography on traffic
    that quotes no text. It holds nothing (a critical check that can never be measured would
    hold a rollout forever) and applies again with its first value."""
    reason = (
        f"none of the {scored} scored pairs has a {check.metric} value (for typography: no "
        "prompt quoted text), so the check does not apply yet and holds nothing; it decides "
        "once pairs with a value arrive"
    )
    return dataclasses.replace(result, reason=reason, applies=False)


def slice_findings(state: JudgeState) -> list[SliceFinding]:
    """The slices where a check FAILs (`policies/slices.py`); none when slicing is off."""
    return evaluate_slices(state.slices)


def _sampled_note(result: CheckResult, rate: float) -> CheckResult:
    """Say when a probe scores a sample: the pairs counted are the sampled requests' (the
    draw is independent of the outcome, so the tests hold on them as on all)."""
    if rate >= 1.0:
        return result
    note = f"; the probe scores {rate:.0%} of requests (the policy's sample rate)"
    return dataclasses.replace(result, reason=result.reason + note)
