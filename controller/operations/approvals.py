"""Stage approvals: an external yes before a stage advances, asked of a webhook.

The gate is one more line in `Evidence.unmet()`, so the loop's automatic advance and an
operator's `cutover advance` are held alike; only an approval or an admin's `--force`
moves the stage. A webhook that is down, slow or says `pending` leaves the approval
pending; past the stage's `timeout` it is `timed_out`, which holds the stage until a
person decides (`cutover approve` or the console). Nothing here ever advances anything.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import httpx
import structlog
from sqlalchemy import select
from sqlalchemy.orm import Session

from controller.config import Config
from controller.operations.outbox import Event, emit
from controller.storage.store import Store
from controller.storage.tables import Approval, Rollout, utcnow
from workers.logs import one_line

log = structlog.get_logger("cutover.approvals")

PENDING, APPROVED, DENIED, TIMED_OUT = "pending", "approved", "denied", "timed_out"
DECISIONS = {"approve": APPROVED, "deny": DENIED}


def approval_of(session: Session, row: Rollout) -> Approval | None:
    """The approval asked for the rollout's current stage attempt (its version)."""
    return session.scalars(
        select(Approval).where(Approval.rollout_id == row.id, Approval.version == row.version)
    ).one_or_none()


def approval_hold(session: Session, config: Config, row: Rollout) -> str:
    """Why the stage waits for an approval, in words; "" when it needs none or has one."""
    settings = config.plan(row.name).settings.approval_for(row.stage_name)
    if settings is None:
        return ""
    approval = approval_of(session, row)
    if approval is None:
        return (
            f"approval from {settings.url} not asked yet (it is asked once the other gates are met)"
        )
    if approval.state == APPROVED:
        return ""
    if approval.state == PENDING:
        return f"approval pending (asked {approval.asks} time(s) since {approval.requested_at:%H:%M:%S})"
    by = f" by {approval.decided_by}" if approval.decided_by else ""
    said = f": {approval.reason}" if approval.reason else ""
    if approval.state == DENIED:
        return f"approval denied{by}{said}; `cutover approve` overrides it, with a reason"
    return (
        f"approval timed out after {settings.timeout:g}s{said}; decide with `cutover approve` "
        "or `cutover deny`"
    )


def ask(store: Store, config: Config, row: Rollout, now: datetime) -> str | None:
    """Ask the stage's webhook (when it has one and no decision is stored yet); return the
    approval's state. Called by the loop's tick once the stage's other gates are met."""
    settings = config.plan(row.name).settings.approval_for(row.stage_name)
    if settings is None:
        return None
    with store.session() as session:
        approval = approval_of(session, row)
        if approval is None:
            approval = _pending(session, row, now)
            _notify(session, config, row, approval, f"approval asked of {settings.url}", now)
        if approval.state != PENDING:
            return approval.state
        if (now - approval.requested_at).total_seconds() > settings.timeout:
            _decide(session, config, row, approval, TIMED_OUT, None, "no decision in time", now)
            return TIMED_OUT
        approval.asks += 1
        approval_id, asks = approval.id, approval.asks
    body = {
        "approval_id": approval_id,
        "rollout": row.name,
        "route": row.route,
        "stage": row.stage_name,
        "next_stage": row.stages[min(row.stage_index + 1, len(row.stages) - 1)][0],
        "version": row.version,
        "asks": asks,
    }
    try:
        response = httpx.post(settings.url, json=body, timeout=settings.request_timeout)
        response.raise_for_status()
        answer: dict[str, Any] = response.json()
        decision = str(answer.get("decision", "pending")).lower()
    except Exception as exc:  # down, slow, or answering nonsense: still pending, asked again
        log.warning(
            "approval_ask_failed",
            rollout=row.name,
            stage=row.stage_name,
            url=settings.url,
            error=one_line(exc),
        )
        return PENDING
    if decision not in DECISIONS:
        return PENDING
    by = str(answer.get("by") or f"webhook {settings.url}")[:128]
    with store.session() as session:
        stored = session.get(Approval, approval_id)
        if stored is None or stored.state != PENDING:
            return stored.state if stored else None
        _decide(
            session,
            config,
            row,
            stored,
            DECISIONS[decision],
            by,
            str(answer.get("reason", ""))[:1000],
            now,
        )
    return DECISIONS[decision]


def decide(
    store: Store,
    config: Config,
    row: Rollout,
    decision: str,
    actor: str,
    reason: str,
    now: datetime,
) -> str:
    """A person's decision (`cutover approve|deny`, the console) on the current stage's
    approval, whatever the webhook said or did not say."""
    with store.session() as session:
        approval = approval_of(session, row) or _pending(session, row, now)
        _decide(session, config, row, approval, DECISIONS[decision], actor, reason, now)
        return approval.state


def decide_current(
    store: Store, config: Config, rollout: str, decision: str, actor: str, reason: str
) -> tuple[str, str]:
    """`decide` on the rollout's current stage as stored now; returns (stage, state).
    ValueError when the stage needs no approval or the decision is not approve or deny."""
    if decision not in DECISIONS:
        raise ValueError(f"decision {decision!r} is not approve or deny")
    from controller.rollout.transitions import get_rollout

    with store.reader() as session:
        row = get_rollout(session, rollout)
        session.expunge(row)
    stage = row.stage_name
    if config.plan(rollout).settings.approval_for(stage) is None:
        raise ValueError(f"stage {stage} of {rollout} needs no approval")
    return stage, decide(store, config, row, decision, actor, reason, utcnow())


def _pending(session: Session, row: Rollout, now: datetime) -> Approval:
    """A new approval for the rollout's current stage attempt, not decided yet."""
    approval = Approval(
        rollout_id=row.id,
        version=row.version,
        stage=row.stage_name,
        state=PENDING,
        requested_at=now,
        asks=0,
        reason="",
    )
    session.add(approval)
    session.flush()
    return approval


def _decide(
    session: Session,
    config: Config,
    row: Rollout,
    approval: Approval,
    state: str,
    by: str | None,
    reason: str,
    now: datetime,
) -> None:
    approval.state = state
    approval.decided_at = now
    approval.decided_by = by
    approval.reason = reason
    log.info(
        "approval_decided",
        rollout=row.name,
        stage=approval.stage,
        state=state,
        by=by,
        reason=reason[:300],
    )
    _notify(session, config, row, approval, f"approval {state}" + (f" by {by}" if by else ""), now)


def _notify(
    session: Session, config: Config, row: Rollout, approval: Approval, what: str, now: datetime
) -> None:
    emit(
        session,
        config.notifications,
        Event(
            key=f"approval:{row.name}:{approval.version}:{approval.state}",
            kind="approval",
            severity="info" if approval.state in (PENDING, APPROVED) else "warning",
            summary=f"{row.name} stage {approval.stage}: {what}"
            + (f" ({approval.reason})" if approval.reason else ""),
            rollout=row.name,
            payload={
                "stage": approval.stage,
                "version": approval.version,
                "state": approval.state,
                "by": approval.decided_by,
                "reason": approval.reason,
            },
        ),
        now,
    )
