"""Analysis: the judge run over what SQL holds for a rollout attempt, its verdict stored.

The attempt is everything since the newest `init` or `retry` event. The judge
itself (`policies/judge.py`) is pure; this module is its only reader of SQL.
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from controller.storage.pairs import score_rows
from controller.storage.tables import Output, Request, Rollout, RolloutEvent, Verdict, utcnow
from policies.checks import overall
from policies.judge import OutputFacts, Window, build_window, evaluate
from policies.policy import Policy
from policies.vocabulary import ARMS
from workers.jobs import OutputStatus


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
    """The attempt's outputs and scores from SQL, as `build_window` judges them."""
    since = attempt_started(session, rollout)
    rows = session.execute(
        select(Output, Request.mirrored)
        .join(Request, Output.request_id == Request.id)
        .where(
            Request.rollout_id == rollout.id,
            Request.created_at >= since,
            # `lost` is an accounting outcome (the router died), not evidence.
            Output.status != OutputStatus.LOST,
            # A fallback's answer is the user's, not an arm's: the failed attempt it stood in
            # for is what the judge counts, so a fallback never hides an arm's failure.
            Output.role.in_([arm.value for arm in ARMS]),
        )
        .order_by(Request.created_at, Request.id, Output.image_index)
    ).all()
    facts = [
        OutputFacts(
            o.id,
            o.request_id,
            o.role,
            o.image_index,
            o.status,
            o.latency_ms,
            o.queue_ms,
            o.batch_size,
            o.timeout_s,
        )
        for o, _ in rows
    ]
    mirrored = {o.request_id for o, is_mirrored in rows if is_mirrored}
    paired_ids = [f.id for f in facts if f.request_id in mirrored and f.status == OutputStatus.OK]
    return build_window(facts, mirrored, score_rows(session, paired_ids), gpus)


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
