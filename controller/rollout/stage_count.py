"""How many requests the current stage has seen: a count that costs the same at any age.

A request older than `lost_after` can no longer be recorded (a record waits in a spill
file at most that long), so the loop adds such requests to a stored count once and moves
its mark forward. A read adds only the requests newer than the mark, so the gate's
`samples` never re-counts a 72-hour stage. A request adopted from a spill file later
than that is not counted: the gate errs on the side of holding.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from controller.storage.tables import Request, Rollout, StoredJudgeState


def stage_samples(session: Session, row: Rollout) -> int:
    """Requests recorded since the rollout entered its current stage."""
    until, counted = _mark(session.get(StoredJudgeState, row.id), row)
    return counted + _count(session, row, until, None)


def settle_stage_count(session: Session, row: Rollout, before: datetime) -> None:
    """Fold the stage's requests older than `before` into the stored count (the loop's tick,
    in its transaction; the rollout's `StoredJudgeState` row exists by then)."""
    stored = session.get(StoredJudgeState, row.id)
    if stored is None:
        return
    until, counted = _mark(stored, row)
    if before <= until:
        return
    stored.stage_count = {
        "stage": row.stage_name,
        "entered": row.stage_entered_at.isoformat(),
        "until": before.isoformat(),
        "count": counted + _count(session, row, until, before),
    }


def _mark(stored: StoredJudgeState | None, row: Rollout) -> tuple[datetime, int]:
    """(counted up to, how many): the stored mark if it is this stage's, else its start."""
    mark = stored.stage_count if stored is not None else None
    if (
        mark
        and mark["stage"] == row.stage_name
        and mark["entered"] == row.stage_entered_at.isoformat()
    ):
        return datetime.fromisoformat(mark["until"]), int(mark["count"])
    return row.stage_entered_at, 0


def _count(session: Session, row: Rollout, since: datetime, before: datetime | None) -> int:
    query = (
        select(func.count())
        .select_from(Request)
        .where(
            Request.rollout_id == row.id,
            Request.stage == row.stage_name,
            Request.created_at >= since,
        )
    )
    if before is not None:
        query = query.where(Request.created_at < before)
    return session.scalar(query) or 0
