"""The judge: the policy's checks over everything recorded in a rollout attempt.

Pure: `controller/rollout/analysis.py` reads the attempt's outputs and scores
from SQL and hands them here as `OutputFacts` and score rows. The unit of analysis is a mirrored
request with both arms recorded (`build_window` says why), judged at the
shorter of its arms' deadlines. Each check is an anytime-valid test over that
growing sequence at its share of the policy's budget (`Policy.alpha_for`), so
evaluating after every record keeps the chance of a false rollback over the
whole attempt below `alpha`.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable
from dataclasses import dataclass

from policies.checks import (
    CheckResult,
    Pair,
    ProbeHealth,
    evaluate_paired,
    evaluate_quantile,
    evaluate_rate,
    paired_values,
    probe_failing,
    tail_units,
)
from policies.metrics import SCORE_METRICS, counts, gpu_seconds
from policies.policy import Policy
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


@dataclass
class Window:
    """The units of one rollout attempt, in arrival order, and how each probe fared on them."""

    units: list[Unit]
    probe_health: dict[str, ProbeHealth]


def build_window(
    outputs: Iterable[OutputFacts],
    mirrored: Collection[str],
    scores: Iterable[tuple[str, str, float | None, str | None]],
    gpus: dict[str, float],
) -> Window:
    """Units from outputs in arrival order: mirrored requests with both arms recorded.

    Why only those: users are routed stickily, so the candidate's share of *requests* is not
    its share of users, and a heavy user's habits land on one arm; a mirrored request shows
    the same request to both arms. A request's images are one unit, because a failure often
    takes out the whole request. Whether a request is mirrored depends on the past only
    (its id, and the mirrors in flight when it arrived), never on its own outcome, so the
    sequential tests stay valid on this subset. A request whose mirror is not recorded yet
    waits until it is.
    """
    by_request: dict[str, dict[str, list[OutputFacts]]] = {}
    for output in outputs:
        if output.request_id in mirrored:
            by_request.setdefault(output.request_id, {}).setdefault(output.role, []).append(output)
    rows_by_output: dict[str, list[tuple[str, float | None, str | None]]] = {}
    for output_id, probe, value, error in scores:
        rows_by_output.setdefault(output_id, []).append((probe, value, error))
    units, health = [], _ProbeTally()
    for request_id, roles in by_request.items():
        if set(roles) != {CANDIDATE, INCUMBENT}:
            continue
        deadlines = [o.timeout_s for outs in roles.values() for o in outs if o.timeout_s]
        deadline_ms = min(deadlines) * 1000 if deadlines else None
        arms = {role: _arm(outs, deadline_ms, gpus.get(role, 0.0)) for role, outs in roles.items()}
        values: dict[str, dict[str, dict[int, float | None]]] = {}
        for role, outs in roles.items():
            for o in outs:
                for probe, value, error in rows_by_output.get(o.id, []):
                    health.add(probe, value, error)
                    if error is None and value is not None and math.isfinite(value):
                        values.setdefault(probe, {}).setdefault(role, {})[o.image_index] = value
        ok = {role: {o.image_index for o in outs if o.status == OK} for role, outs in roles.items()}
        both_ok = sorted(ok[CANDIDATE] & ok[INCUMBENT])
        scores_of = {
            probe: [
                (by_role.get(CANDIDATE, {}).get(k), by_role.get(INCUMBENT, {}).get(k))
                for k in both_ok
            ]
            for probe, by_role in values.items()
        }
        units.append(Unit(request_id, arms, scores_of))
    return Window(units, health.health())


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


class _ProbeTally:
    """Score rows per probe: how many, how many errored, the first error. An `image` error
    (the artifact could not be read) is an error of every probe."""

    def __init__(self) -> None:
        self.attempts: dict[str, int] = {}
        self.errors: dict[str, int] = {}
        self.first: dict[str, str] = {}

    def add(self, probe: str, value: float | None, error: str | None) -> None:
        if value is not None and not math.isfinite(value):
            error = f"the probe stored {value}, not a finite number"
        for name in SCORE_METRICS if probe == "image" else (probe,):
            self.attempts[name] = self.attempts.get(name, 0) + 1
            if error is not None:
                self.errors[name] = self.errors.get(name, 0) + 1
                self.first.setdefault(name, error)

    def health(self) -> dict[str, ProbeHealth]:
        return {
            name: ProbeHealth(count, self.errors.get(name, 0), self.first.get(name))
            for name, count in self.attempts.items()
        }


def _share(statuses: list[str], metric: str) -> float:
    return sum(counts(metric, s) for s in statuses) / len(statuses)


def evaluate(policy: Policy, window: Window) -> list[CheckResult]:
    results = []
    for check in policy.checks:
        alpha = policy.alpha_for(check)
        if check.is_rate:
            units = [
                (
                    _share(u.arms[CANDIDATE].statuses, check.metric),
                    _share(u.arms[INCUMBENT].statuses, check.metric),
                )
                for u in window.units
            ]
            results.append(evaluate_rate(check, units, alpha))
            continue
        if check.kind == "quantile":
            cand, inc = (
                [
                    v
                    for u in window.units
                    if (v := getattr(u.arms[role], check.metric)) is not None and math.isfinite(v)
                ]
                for role in (CANDIDATE, INCUMBENT)
            )
            results.append(evaluate_quantile(check, cand, inc, alpha))
            continue
        health = window.probe_health.get(check.metric, ProbeHealth())
        held = probe_failing(check, health, policy.max_probe_error_share)
        if held is not None:
            results.append(held)
            continue
        per_request = [u.scores.get(check.metric, []) for u in window.units]
        if check.kind == "tail_rate":
            what = f"{check.metric} past {check.threshold:g}"
            results.append(evaluate_rate(check, tail_units(check, per_request), alpha, what))
            continue
        means = [sum(v) / len(v) for pairs in per_request if (v := paired_values(check, pairs))]
        results.append(evaluate_paired(check, means, alpha))
    return results
