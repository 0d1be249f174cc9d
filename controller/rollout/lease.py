"""The controller lease: one active loop per rollout, taken over when it expires.

A row per rollout says who holds it until when. Taking or renewing it is one
conditional write, so two loops (on any nodes) can never both believe they
hold it; a loop that dies stops renewing and another takes over after the TTL.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import or_, select, update
from sqlalchemy.exc import IntegrityError

from controller.storage.store import Store
from controller.storage.tables import ControllerLease, utcnow


def acquire(
    store: Store, rollout_id: int, holder: str, ttl: timedelta, now: datetime | None = None
) -> bool:
    """Take or renew the lease; True if `holder` holds it until now + ttl."""
    now = now or utcnow()
    with store.session() as session:
        taken = session.execute(
            update(ControllerLease)
            .where(
                ControllerLease.rollout_id == rollout_id,
                or_(ControllerLease.holder == holder, ControllerLease.expires_at < now),
            )
            .values(holder=holder, acquired_at=now, expires_at=now + ttl)
        ).rowcount
        if taken:
            return True
        exists = session.scalar(
            select(ControllerLease.rollout_id).where(ControllerLease.rollout_id == rollout_id)
        )
    if exists is not None:
        return False
    try:
        with store.session() as session:
            session.add(
                ControllerLease(
                    rollout_id=rollout_id, holder=holder, acquired_at=now, expires_at=now + ttl
                )
            )
    except IntegrityError:
        return False  # another loop created it first
    return True


def release(store: Store, rollout_id: int, holder: str) -> None:
    """Let another loop take over at once (orderly shutdown)."""
    with store.session() as session:
        session.execute(
            update(ControllerLease)
            .where(ControllerLease.rollout_id == rollout_id, ControllerLease.holder == holder)
            .values(expires_at=utcnow() - timedelta(seconds=1))
        )


def holder_of(store: Store, rollout_id: int) -> tuple[str, datetime] | None:
    with store.reader() as session:
        row = session.get(ControllerLease, rollout_id)
        return None if row is None else (row.holder, row.expires_at)
