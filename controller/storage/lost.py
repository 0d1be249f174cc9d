"""Requests whose outcome was never recorded get one: `lost`, so counts add up.

A router replica that dies (kill -9, a node lost) between recording a request row and
recording its outputs leaves a request with no outcome. The controller loop gives each
missing image a `lost` output once no record of it can still be on its way (the router's
timeouts plus the time a spilled record may wait for replay). `lost` is an outcome for
accounting, never evidence about a model: the judge leaves it out. If a real output turns
up later after all (a spill file adopted late), replay replaces the placeholder with it.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from controller.config import Config
from controller.storage.tables import JUDGE_PENDING, Output, Request
from policies.vocabulary import ARMS, Arm
from workers.jobs import OutputStatus

# How long a spilled record may wait for replay before it would be dead-lettered anyway.
RECORD_TTL = timedelta(minutes=10)
_NAMESPACE = uuid.UUID("6f1d8a52-3c8e-4b8e-9a53-5d0f3c7e2a10")
_CHUNK = 500


def lost_after(config: Config) -> timedelta:
    """Age past which a request's missing outputs can no longer arrive."""
    server = config.server
    return timedelta(seconds=max(server.request_timeout, server.mirror_timeout)) + RECORD_TTL


def expected_outputs(request: Any) -> list[tuple[str, int]]:
    """(role, image index) of every output a request should have: each image from the
    serving role, and from the other role too when it was mirrored."""
    roles = [request.primary_role] + ([Arm(request.primary_role).other] if request.mirrored else [])
    count = int((request.params or {}).get("n") or 1)
    return [(role, index) for role in roles for index in range(count)]


def reconcile_lost(
    session: Session,
    rollout_id: int,
    *,
    before: datetime,
    since: datetime | None = None,
    now: datetime,
) -> int:
    """Insert a `lost` output for each missing image of requests created in [since, before).
    Returns how many were inserted. Ids are derived from the slot, so two loops that race
    here insert each placeholder at most once (the second hits the unique constraint)."""
    query = select(Request.id, Request.primary_role, Request.mirrored, Request.params).where(
        Request.rollout_id == rollout_id, Request.created_at < before
    )
    if since is not None:
        query = query.where(Request.created_at >= since)
    requests = session.execute(query).all()
    have = _recorded(session, [r.id for r in requests])
    missing = [
        Output(
            id=str(uuid.uuid5(_NAMESPACE, f"{request.id}:{role}:{index}")),
            request_id=request.id,
            role=role,
            image_index=index,
            is_primary=role == request.primary_role,
            status=OutputStatus.LOST,
            error="no outcome was recorded: the router replica that took this request died "
            "before recording it",
            created_at=now,
            scored_at=now,
        )
        for request in requests
        for role, index in expected_outputs(request)
        if (request.id, role, index) not in have
    ]
    session.add_all(missing)
    return len(missing)


def supersede_lost(session: Session, outputs: list[dict[str, Any]]) -> None:
    """Delete `lost` placeholders that these real outputs, about to be inserted, replace."""
    slots = {(o["request_id"], o["role"], o["image_index"]) for o in outputs}
    request_ids = sorted({request_id for request_id, _, _ in slots})
    for start in range(0, len(request_ids), _CHUNK):
        placeholders = session.execute(
            select(Output.id, Output.request_id, Output.role, Output.image_index).where(
                Output.request_id.in_(request_ids[start : start + _CHUNK]),
                Output.status == OutputStatus.LOST,
            )
        ).all()
        stale = [row.id for row in placeholders if tuple(row[1:]) in slots]
        if stale:
            _rejudge_dropped(session, {row.request_id for row in placeholders if row.id in stale})
            session.execute(delete(Output).where(Output.id.in_(stale)))


def _rejudge_dropped(session: Session, request_ids: set[str]) -> None:
    """Send back to the judge the requests it dropped for want of an arm: one whose arm had
    nothing but `lost` was never a unit, and a real output makes it one. (A request judged
    with some images lost keeps its judgement: a late image is not folded in twice.)"""
    arms = [arm.value for arm in ARMS]
    rows = session.execute(
        select(Output.request_id, Output.role, Output.status).where(
            Output.request_id.in_(sorted(request_ids)), Output.role.in_(arms)
        )
    ).all()
    had_outcome = {(r.request_id, r.role) for r in rows if r.status != OutputStatus.LOST}
    dropped = [rid for rid in request_ids if any((rid, arm) not in had_outcome for arm in arms)]
    if dropped:
        session.execute(
            update(Request)
            .where(Request.id.in_(dropped), Request.mirrored.is_(True))
            .values(judge_progress=JUDGE_PENDING)
        )


def _recorded(session: Session, request_ids: list[str]) -> set[tuple[str, str, int]]:
    found: set[tuple[str, str, int]] = set()
    for start in range(0, len(request_ids), _CHUNK):
        rows = session.execute(
            select(Output.request_id, Output.role, Output.image_index).where(
                Output.request_id.in_(request_ids[start : start + _CHUNK])
            )
        )
        found |= {tuple(row) for row in rows}
    return found
