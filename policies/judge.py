"""The judge: the policy's checks over everything recorded in this rollout attempt.

Data come from SQL: outputs of both roles since the attempt began (the last
`init` or `retry`), and probe scores of pairs (same request, same image
index, both outputs ok). Each check is a confidence sequence over that
growing window at its share of the policy's budget (`Policy.alpha_for`), so
evaluating after every record keeps the chance of a false rollback over the
whole attempt below `alpha`.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from controller.lost import LOST
from controller.pairs import group_pairs, scores_by_output
from controller.tables import Output, Request, Rollout, RolloutEvent, Verdict, utcnow
from policies.checks import (
    CheckResult,
    RateData,
    evaluate_paired,
    evaluate_quantile,
    evaluate_rate,
    overall,
)
from policies.policy import Check, Policy

RATE_STATUSES = {
    "error": {"error"},
    "timeout": {"timeout"},
    "oom": {"oom"},
    "blank": {"blank"},
    "failure": {"error", "timeout", "overload"},
}


@dataclass
class Window:
    """Per-role outputs and per-pair scores of one rollout attempt."""

    statuses: dict[str, list[str]]
    samples: dict[str, dict[str, list[float]]]
    pair_scores: dict[str, list[tuple[float | None, float | None]]]
    requests: int
    # Per (request, image) in arrival order: (candidate's primary share in its stage, statuses by role).
    units: list[tuple[float, dict[str, str]]] = field(default_factory=list)


def attempt_started(session: Session, rollout: Rollout) -> datetime:
    """When the current attempt began: the newest `init` or `retry` event."""
    started = session.scalar(
        select(RolloutEvent.at)
        .where(RolloutEvent.rollout_id == rollout.id, RolloutEvent.verb.in_(("init", "retry")))
        .order_by(RolloutEvent.version.desc())
        .limit(1)
    )
    return started or rollout.created_at


def load_window(session: Session, rollout: Rollout, gpus: dict[str, float]) -> Window:
    since = attempt_started(session, rollout)
    rows = session.execute(
        select(Output, Request.id, Request.stage, Request.mirrored)
        .join(Request, Output.request_id == Request.id)
        .where(
            Request.rollout_id == rollout.id,
            Request.created_at >= since,
            Output.status != LOST,  # an accounting outcome (the router died), not evidence
        )
        .order_by(Request.created_at, Request.id, Output.image_index)
    ).all()
    weights = {name: weight / 100 for name, weight in rollout.stages}
    statuses: dict[str, list[str]] = defaultdict(list)
    samples: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    unit_info: dict[tuple[str, int], tuple[float, bool]] = {}
    for output, request_id, stage, mirrored in rows:
        unit_info[(request_id, output.image_index)] = (weights.get(stage, 0.0), mirrored)
        statuses[output.role].append(output.status)
        if output.status == "ok" and output.latency_ms is not None:
            role_samples = samples[output.role]
            role_samples["latency_ms"].append(output.latency_ms)
            role_samples["queue_ms"].append(output.queue_ms or 0.0)
            role_samples["gpu_seconds"].append(
                output.latency_ms
                / 1000
                * gpus.get(output.role, 0.0)
                / max(output.batch_size or 1, 1)
            )
    by_pair = group_pairs(row[0] for row in rows)
    pairs = {
        key: roles
        for key, roles in by_pair.items()
        if roles.get("candidate") is not None
        and roles.get("incumbent") is not None
        and roles["candidate"].status == "ok"
        and roles["incumbent"].status == "ok"
    }
    scores = scores_by_output(session, [o.id for roles in pairs.values() for o in roles.values()])
    pair_scores: dict[str, list[tuple[float | None, float | None]]] = defaultdict(list)
    for roles in pairs.values():
        cand, inc = scores.get(roles["candidate"].id, {}), scores.get(roles["incumbent"].id, {})
        for probe in set(cand) | set(inc):
            pair_scores[probe].append((cand.get(probe), inc.get(probe)))
    requests = len({row[1] for row in rows})
    units = []
    for key, roles in by_pair.items():  # insertion order is arrival order
        share, mirrored = unit_info[key]
        if mirrored and len(roles) < 2:
            continue  # the mirror's output is not recorded yet: judge the unit once it is whole
        units.append(
            (0.5 if len(roles) == 2 else share, {role: o.status for role, o in roles.items()})
        )
    return Window(
        dict(statuses), {k: dict(v) for k, v in samples.items()}, dict(pair_scores), requests, units
    )


def attributions(window: Window, bad: set[str]) -> list[tuple[float, bool]]:
    """Failures the count test can attribute: one arm failed and the split says how likely that was."""
    events = []
    for share, statuses in window.units:
        failed = {role for role, status in statuses.items() if status in bad}
        if len(failed) == 1 and (len(statuses) == 2 or 0.0 < share < 1.0):
            events.append((share, "candidate" in failed))
    return events


def paired_values(check: Check, pairs: list[tuple[float | None, float | None]]) -> list[float]:
    if check.pair_value == "candidate":
        return [c for c, _ in pairs if c is not None]
    return [c - i for c, i in pairs if c is not None and i is not None]


def evaluate(policy: Policy, window: Window) -> list[CheckResult]:
    results = []
    for check in policy.checks:
        alpha = policy.alpha_for(check)
        if check.kind == "rate":
            bad = RATE_STATUSES[check.metric]
            cand, inc = window.statuses.get("candidate", []), window.statuses.get("incumbent", [])
            data = RateData(
                sum(s in bad for s in cand),
                len(cand),
                sum(s in bad for s in inc),
                len(inc),
                attributions(window, bad),
            )
            results.append(evaluate_rate(check, data, alpha))
        elif check.kind == "quantile":
            cand = window.samples.get("candidate", {}).get(check.metric, [])
            inc = window.samples.get("incumbent", {}).get(check.metric, [])
            results.append(evaluate_quantile(check, cand, inc, alpha))
        else:
            results.append(
                evaluate_paired(
                    check, paired_values(check, window.pair_scores.get(check.metric, [])), alpha
                )
            )
    return results


def judge(
    session: Session,
    rollout: Rollout,
    policy: Policy,
    gpus: dict[str, float],
    now: datetime | None = None,
) -> Verdict:
    """Evaluate every check and store the verdict (in the caller's transaction)."""
    results = evaluate(policy, load_window(session, rollout, gpus))
    verdict = Verdict(
        rollout_id=rollout.id,
        stage=rollout.stages[rollout.stage_index][0],
        evaluated_at=now or utcnow(),
        decision=overall(results),
        samples=max((r.samples for r in results), default=0),
        checks=[_jsonable(r.as_dict()) for r in results],
    )
    session.add(verdict)
    return verdict


def _jsonable(row: dict[str, Any]) -> dict[str, Any]:
    """Plain floats for JSON; an unbounded side (too few samples) is stored as null."""

    def clean(value: Any) -> Any:
        if hasattr(value, "item"):
            value = value.item()
        return None if isinstance(value, float) and not math.isfinite(value) else value

    return {k: clean(v) for k, v in row.items()}
