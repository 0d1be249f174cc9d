"""Writing notifications: an event row, and one delivery row per receiver that wants it.

`emit` runs inside the caller's transaction (a transition's, a tick's), so an event is
stored exactly when what it reports committed, and a loop killed between the two cannot
lose it or send it for something that never happened. The event's `key` makes a second
write of the same event a no-op: a tick repeated after a crash does not notify twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from controller.operations.settings import NotificationsConfig
from controller.storage.tables import NotificationDelivery, NotificationEvent, utcnow


@dataclass(frozen=True)
class Event:
    key: str
    kind: str
    severity: str
    summary: str
    rollout: str | None = None
    payload: dict[str, Any] = field(default_factory=dict)


def emit(
    session: Session, settings: NotificationsConfig, event: Event, now: datetime | None = None
) -> NotificationEvent | None:
    """Store `event` with its deliveries; None when its key is stored already."""
    if session.scalars(
        select(NotificationEvent.id).where(NotificationEvent.key == event.key)
    ).first():
        return None
    now = now or utcnow()
    row = NotificationEvent(
        key=event.key,
        rollout=event.rollout,
        kind=event.kind,
        severity=event.severity,
        summary=event.summary,
        payload=event.payload,
        created_at=now,
    )
    session.add(row)
    session.flush()
    for receiver in settings.receivers:
        if receiver.wants(event.kind, event.severity):
            session.add(
                NotificationDelivery(
                    event_id=row.id, receiver=receiver.name, attempts=0, next_attempt_at=now
                )
            )
    return row


TRANSITION_SEVERITY = {
    "rollback": "critical",
    "abort": "critical",
    "pause": "warning",
}


def transition_event(
    rollout: str,
    version: int,
    verb: str,
    actor: str,
    from_state: str | None,
    from_stage: str | None,
    to_state: str,
    to_stage: str,
    reason: str,
    forced: bool,
) -> Event:
    where = f"{from_state}@{from_stage} → " if from_state else ""
    return Event(
        key=f"transition:{rollout}:{version}",
        kind="transition",
        severity="warning" if forced else TRANSITION_SEVERITY.get(verb, "info"),
        summary=f"{rollout} {verb} by {actor}: {where}{to_state}@{to_stage} ({reason})",
        rollout=rollout,
        payload={
            "verb": verb,
            "actor": actor,
            "version": version,
            "from_state": from_state,
            "from_stage": from_stage,
            "to_state": to_state,
            "to_stage": to_stage,
            "reason": reason,
            "forced": forced,
        },
    )
