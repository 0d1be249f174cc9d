"""Delivering the outbox: at least once, in order per rollout, never blocking the loop.

Each receiver sees each rollout's events in the order they were stored: only the oldest
undelivered event of a (receiver, rollout) is tried, and the next waits until it is
delivered. A receiver that is down holds back only its own queue; its attempts back off
(doubling from `initial_backoff` to `max_backoff`) and nothing is dropped. Receivers are
tried side by side, so a slow one does not delay the others. Every body carries the
event's id (also in the `X-Cutover-Event-Id` header): a receiver deduplicates by it,
which makes at-least-once delivery exactly-once for the receiver.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from typing import Any

import httpx
import structlog
from sqlalchemy import func, select, update

from controller.operations.settings import NotificationsConfig, ReceiverConfig
from controller.storage.store import Store
from controller.storage.tables import NotificationDelivery, NotificationEvent, utcnow
from workers.logs import one_line

log = structlog.get_logger("cutover.notifications")

SLACK_COLOURS = {"info": "#2eb67d", "warning": "#ecb22e", "critical": "#e01e5a"}
BATCH = 500


def generic_body(event: NotificationEvent) -> dict[str, Any]:
    return {
        "id": event.id,
        "key": event.key,
        "kind": event.kind,
        "severity": event.severity,
        "rollout": event.rollout,
        "summary": event.summary,
        "created_at": event.created_at.isoformat(),
        "payload": event.payload,
    }


def slack_body(event: NotificationEvent) -> dict[str, Any]:
    """Slack's incoming-webhook shape: a text line and one coloured attachment."""
    return {
        "text": f"[{event.severity}] {event.summary}",
        "attachments": [
            {
                "color": SLACK_COLOURS.get(event.severity, "#999999"),
                "fields": [
                    {"title": "rollout", "value": event.rollout or "-", "short": True},
                    {"title": "kind", "value": event.kind, "short": True},
                    {"title": "event id", "value": str(event.id), "short": True},
                ],
                "ts": int(event.created_at.timestamp()),
            }
        ],
    }


BODIES = {"generic": generic_body, "slack": slack_body}


def backoff(settings: NotificationsConfig, attempts: int) -> float:
    return min(settings.max_backoff, settings.initial_backoff * 2 ** max(attempts - 1, 0))


class Dispatcher:
    """`run_once` is one pass (tests drive it with their own clock); `run` loops it."""

    def __init__(
        self,
        store: Store,
        settings: NotificationsConfig,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.store = store
        self.settings = settings
        self.receivers = {r.name: r for r in settings.receivers}
        self._client = httpx.Client()
        self.clock = clock
        self._pool = ThreadPoolExecutor(
            max_workers=max(len(self.receivers), 1), thread_name_prefix="cutover-notify"
        )

    def run_once(self) -> int:
        """Try every queue's head that is due; return how many were delivered."""
        if not self.receivers:
            return 0
        now = self.clock()
        with self.store.reader() as session:
            rows = session.execute(
                select(NotificationDelivery, NotificationEvent)
                .join(NotificationEvent, NotificationEvent.id == NotificationDelivery.event_id)
                .where(
                    NotificationDelivery.delivered_at.is_(None),
                    NotificationDelivery.receiver.in_(self.receivers),
                )
                .order_by(NotificationDelivery.event_id)
                .limit(BATCH)
            ).all()
            session.expunge_all()
        heads: dict[tuple[str, str | None], tuple[NotificationDelivery, NotificationEvent]] = {}
        for delivery, event in rows:
            heads.setdefault((delivery.receiver, event.rollout), (delivery, event))
        due = [(d, e) for d, e in heads.values() if d.next_attempt_at <= now]
        by_receiver: dict[str, list[tuple[NotificationDelivery, NotificationEvent]]] = {}
        for delivery, event in due:
            by_receiver.setdefault(delivery.receiver, []).append((delivery, event))
        results = self._pool.map(
            lambda item: self._deliver_all(self.receivers[item[0]], item[1], now),
            by_receiver.items(),
        )
        return sum(results)

    def _deliver_all(
        self,
        receiver: ReceiverConfig,
        items: list[tuple[NotificationDelivery, NotificationEvent]],
        now: datetime,
    ) -> int:
        return sum(self._deliver(receiver, d, e, now) for d, e in items)

    def _deliver(
        self,
        receiver: ReceiverConfig,
        delivery: NotificationDelivery,
        event: NotificationEvent,
        now: datetime,
    ) -> bool:
        error = None
        try:
            response = self._client.post(
                receiver.url,
                json=BODIES[receiver.format](event),
                headers={"X-Cutover-Event-Id": str(event.id), "Idempotency-Key": event.key},
                timeout=receiver.timeout,
            )
            if not 200 <= response.status_code < 300:
                error = f"HTTP {response.status_code}: {response.text[:200]}"
        except Exception as exc:  # refused, reset, timed out: the receiver is down for now
            error = one_line(exc)
        attempts = delivery.attempts + 1
        values: dict[str, Any] = {"attempts": attempts}
        if error is None:
            values["delivered_at"] = self.clock()
            values["last_error"] = None
        else:
            values["next_attempt_at"] = now + timedelta(seconds=backoff(self.settings, attempts))
            values["last_error"] = error[:1000]
        with self.store.session() as session:
            session.execute(
                update(NotificationDelivery)
                .where(NotificationDelivery.id == delivery.id)
                .values(**values)
            )
        if error is None:
            log.info(
                "notification_delivered",
                receiver=receiver.name,
                rollout=event.rollout,
                event_id=event.id,
                kind=event.kind,
                attempts=attempts,
            )
        else:
            log.warning(
                "notification_failed",
                receiver=receiver.name,
                rollout=event.rollout,
                event_id=event.id,
                kind=event.kind,
                attempts=attempts,
                error=error[:300],
            )
        return error is None

    def run(self, stop: threading.Event) -> None:
        """Deliver until `stop` is set; a database outage is logged and retried."""
        while not stop.is_set():
            try:
                delivered = self.run_once()
            except Exception as exc:
                log.error("notification_pass_failed", error=one_line(exc))
                delivered = 0
            if not delivered:
                stop.wait(self.settings.poll_interval)

    def close(self) -> None:
        self._pool.shutdown(wait=False)
        self._client.close()


def delivery_summary(store: Store, settings: NotificationsConfig) -> list[dict[str, Any]]:
    """Per configured receiver: delivered, pending, the oldest pending event's age and the
    last error (what `cutover status` shows)."""
    now = utcnow()
    summary = []
    with store.reader() as session:
        for receiver in settings.receivers:
            where = NotificationDelivery.receiver == receiver.name
            delivered = session.scalar(
                select(func.count()).where(where, NotificationDelivery.delivered_at.is_not(None))
            )
            pending = session.execute(
                select(
                    func.count(),
                    func.min(NotificationEvent.created_at),
                    func.max(NotificationDelivery.attempts),
                )
                .select_from(NotificationDelivery)
                .join(NotificationEvent, NotificationEvent.id == NotificationDelivery.event_id)
                .where(where, NotificationDelivery.delivered_at.is_(None))
            ).one()
            last_error = session.scalar(
                select(NotificationDelivery.last_error)
                .where(
                    where,
                    NotificationDelivery.delivered_at.is_(None),
                    NotificationDelivery.last_error.is_not(None),
                )
                .order_by(NotificationDelivery.id.desc())
                .limit(1)
            )
            oldest = pending[1]
            summary.append(
                {
                    "receiver": receiver.name,
                    "url": receiver.url,
                    "delivered": delivered or 0,
                    "pending": pending[0] or 0,
                    "oldest_pending_s": round((now - oldest).total_seconds(), 1)
                    if oldest
                    else None,
                    "max_attempts": pending[2] or 0,
                    "last_error": last_error,
                }
            )
    return summary
