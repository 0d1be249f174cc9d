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

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from controller.config import Config
from controller.storage.tables import Output, Request
from policies.vocabulary import Arm
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
            session.execute(delete(Output).where(Output.id.in_(stale)))


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
