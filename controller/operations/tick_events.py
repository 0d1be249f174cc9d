"""What a controller tick tells receivers: verdict changes, new slice findings, fallback storms.

Each is written by `emit` in the tick's transaction with the verdict it is about, keyed
so a tick repeated after a crash does not notify twice.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from controller.operations.outbox import Event, emit
from controller.operations.settings import NotificationsConfig
from controller.storage.tables import NotificationEvent, Output, Request, Rollout, Verdict
from policies.checks import FAIL
from policies.vocabulary import PASS, Arm

VERDICT_SEVERITY = {FAIL: "critical", PASS: "info"}


def previous_verdict(session: Session, rollout: Rollout, before_id: int) -> Verdict | None:
    return session.scalars(
        select(Verdict)
        .where(Verdict.rollout_id == rollout.id, Verdict.id < before_id)
        .order_by(Verdict.id.desc())
        .limit(1)
    ).one_or_none()


def verdict_events(
    session: Session,
    settings: NotificationsConfig,
    rollout: Rollout,
    verdict: Verdict,
    now: datetime,
) -> None:
    """The overall decision when it changed, and each slice finding the last verdict lacked."""
    previous = previous_verdict(session, rollout, verdict.id)
    if previous is None or previous.decision != verdict.decision:
        changed = [
            f"{c['name']} {c['decision']}"
            for c in verdict.checks
            if c.get("applies", True) and c["decision"] != PASS
        ]
        emit(
            session,
            settings,
            Event(
                key=f"verdict:{rollout.name}:{verdict.id}",
                kind="verdict",
                severity=VERDICT_SEVERITY.get(verdict.decision, "warning"),
                summary=(
                    f"{rollout.name} at stage {verdict.stage}: verdict "
                    f"{previous.decision if previous else 'none'} → {verdict.decision}"
                    + (f" ({', '.join(changed)})" if changed else "")
                ),
                rollout=rollout.name,
                payload={
                    "stage": verdict.stage,
                    "from": previous.decision if previous else None,
                    "to": verdict.decision,
                    "samples": verdict.samples,
                    "checks": [
                        {k: c.get(k) for k in ("name", "decision", "estimate", "lower", "upper")}
                        for c in verdict.checks
                    ],
                },
            ),
            now,
        )
    known = {(f["check"], f["slice"]) for f in (previous.slices or [])} if previous else set()
    for finding in verdict.slices or []:
        if (finding["check"], finding["slice"]) in known:
            continue
        emit(
            session,
            settings,
            Event(
                key=f"slice:{rollout.name}:{verdict.id}:{finding['check']}:{finding['slice']}",
                kind="slice",
                severity="critical" if finding["action"] == "rollback" else "warning",
                summary=(
                    f"{rollout.name}: {finding['check']} fails on {finding['slice']}: "
                    f"{finding['sentence']}"
                ),
                rollout=rollout.name,
                payload={"stage": verdict.stage} | finding,
            ),
            now,
        )


def fallback_storm_event(
    session: Session, settings: NotificationsConfig, rollout: Rollout, now: datetime
) -> None:
    """One event per window in which the fallback model answered too large a share of the
    rollout's requests (a model failing under load, say): the judge compares the two arms,
    and a storm hits both."""
    storm = settings.fallback_storm
    since = now - timedelta(seconds=storm.window)
    requests = session.scalar(
        select(func.count())
        .select_from(Request)
        .where(Request.rollout_id == rollout.id, Request.created_at >= since)
    )
    fallbacks = session.scalar(
        select(func.count(func.distinct(Output.request_id)))
        .select_from(Output)
        .join(Request, Request.id == Output.request_id)
        .where(
            Request.rollout_id == rollout.id,
            Request.created_at >= since,
            Output.role == Arm.FALLBACK.value,
        )
    )
    if not requests or fallbacks < storm.min_fallbacks or fallbacks / requests < storm.share:
        return
    told = session.scalar(
        select(func.max(NotificationEvent.created_at)).where(
            NotificationEvent.rollout == rollout.name,
            NotificationEvent.kind == "fallback_storm",
        )
    )
    if told is not None and told > since:
        return  # told within this window already: one event per storm, not one per tick
    emit(
        session,
        settings,
        Event(
            key=f"fallback_storm:{rollout.name}:{now.isoformat()}",
            kind="fallback_storm",
            severity="critical",
            summary=(
                f"{rollout.name}: the fallback model answered {fallbacks} of {requests} "
                f"requests on route {rollout.route} in the last {storm.window:g}s"
            ),
            rollout=rollout.name,
            payload={
                "route": rollout.route,
                "fallbacks": fallbacks,
                "requests": requests,
                "window_s": storm.window,
            },
        ),
        now,
    )
