"""Scorer lag: how far behind the probes are, the gate that holds a rollout on it."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from controller.storage.tables import Output, Request


def scorer_lag(session: Session, rollout_id: int, now: datetime) -> float | None:
    """Seconds since the oldest output of the rollout not scored yet was recorded (None: the
    scorer is caught up). Read from the unscored outputs' index: the backlog, not history."""
    oldest = session.scalar(
        select(Output.created_at)
        .join(Request, Output.request_id == Request.id)
        .where(Output.scored_at.is_(None), Request.rollout_id == rollout_id)
        .order_by(Output.created_at)
        .limit(1)
    )
    return None if oldest is None else max((now - oldest).total_seconds(), 0.0)
