"""The shadow log: recorded pairs for an SRE to review, filtered.

One row per request and image: both roles' status and latency, the probes'
scores, and where the two images are. Filters that SQL can answer run in SQL;
`failing` (pairs that are on the wrong side of a check's tolerance) needs the
policy and runs on the rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Select, exists, select, tuple_
from sqlalchemy.orm import Session, aliased

from controller.storage.artifacts import artifact_path
from controller.storage.pairs import group_pairs, scores_by_output
from controller.storage.tables import Output, Request, Rollout
from policies.metrics import Observed, gpu_seconds
from policies.policy import Check, Policy
from policies.vocabulary import ARMS, Arm


@dataclass(frozen=True)
class Filters:
    since: datetime | None = None
    stage: str | None = None
    role: str | None = None
    status: str | None = None
    failing: str | None = None
    prompt_contains: str | None = None
    limit: int = 50
    before: str | None = None  # a request id: only older requests (the next page)


def shadow_log(
    session: Session,
    rollout: Rollout,
    policy: Policy,
    filters: Filters,
    artifact_dir: Path,
    gpus_of: dict[str, float] | None = None,
) -> list[dict[str, Any]]:
    """Pairs, newest first, that match every filter given. `gpus_of` (GPUs per model name)
    prices the gpu_seconds metric; without it GPU time counts as zero."""
    gpus_of = gpus_of or {}
    check = _check(policy, filters.failing)
    query = _requests(rollout, filters).order_by(Request.created_at.desc(), Request.id.desc())
    after = _page_start(session, rollout, filters.before)
    rows: list[dict[str, Any]] = []
    batch = 500
    # Keyset pages on the (rollout, time) index: each page costs the same however deep it is.
    while len(rows) < filters.limit:
        page = (
            query if after is None else query.where(tuple_(Request.created_at, Request.id) < after)
        )
        requests = session.scalars(page.limit(batch)).all()
        if not requests:
            break
        after = (requests[-1].created_at, requests[-1].id)
        for row in _pairs(session, requests, artifact_dir, gpus_of):
            if filters.status is not None and filters.status not in (
                row[Arm.INCUMBENT]["status"],
                row[Arm.CANDIDATE]["status"],
            ):
                continue  # the status matched another image of the same request
            if check is None or _fails(check, row):
                rows.append(row)
            if len(rows) >= filters.limit:
                break
    return rows


def _requests(rollout: Rollout, filters: Filters) -> Select[tuple[Request]]:
    query = select(Request).where(Request.rollout_id == rollout.id)
    if filters.since is not None:
        query = query.where(Request.created_at >= filters.since)
    if filters.stage is not None:
        query = query.where(Request.stage == filters.stage)
    if filters.role is not None:
        query = query.where(Request.primary_role == filters.role)
    if filters.prompt_contains:
        query = query.where(Request.prompt.contains(filters.prompt_contains, autoescape=True))
    if filters.status is not None:
        matching = aliased(Output)
        query = query.where(
            exists().where(matching.request_id == Request.id, matching.status == filters.status)
        )
    return query


def _page_start(
    session: Session, rollout: Rollout, before: str | None
) -> tuple[datetime, str] | None:
    if before is None:
        return None
    found = session.execute(
        select(Request.created_at, Request.id).where(
            Request.id == before, Request.rollout_id == rollout.id
        )
    ).one_or_none()
    if found is None:
        raise ValueError(
            f"--before {before!r}: no request with that id in rollout {rollout.name!r}; "
            "give the last request id a page showed"
        )
    return found.created_at, found.id


def _check(policy: Policy, name: str | None) -> Check | None:
    if name is None:
        return None
    for check in policy.checks:
        if check.name == name:
            return check
    raise ValueError(
        f"no check named {name!r} in the policy; checks are {', '.join(c.name for c in policy.checks)}"
    )


def _pairs(
    session: Session, requests: list[Request], artifact_dir: Path, gpus_of: dict[str, float]
) -> list[dict[str, Any]]:
    ids = [r.id for r in requests]
    outputs = session.scalars(
        select(Output).where(Output.request_id.in_(ids), Output.role.in_(list(ARMS)))
    ).all()
    scores = scores_by_output(session, [o.id for o in outputs])
    by_request: dict[str, dict[int, dict[str, Output]]] = {}
    for (request_id, index), roles in group_pairs(outputs).items():
        by_request.setdefault(request_id, {})[index] = roles
    rows = []
    for request in requests:
        images = by_request.get(request.id) or {0: {}}
        for index in sorted(images):
            roles = images[index]
            rows.append(
                {
                    "request_id": request.id,
                    "image_index": index,
                    "created_at": request.created_at.isoformat(),
                    "stage": request.stage,
                    "served_by": request.primary_role,
                    "user": request.sticky_key,
                    "prompt": request.prompt,
                    "route": request.route,
                    "tags": request.tags,
                    "seed": request.seed,
                    "params": request.params,
                    **{
                        role: _side(roles.get(role), scores, artifact_dir, gpus_of) for role in ARMS
                    },
                }
            )
    return rows


def _side(
    output: Output | None,
    scores: dict[str, dict[str, float]],
    artifact_dir: Path,
    gpus_of: dict[str, float],
) -> dict[str, Any]:
    if output is None:
        return {
            "status": None,
            "model": None,
            "latency_ms": None,
            "samples": {},
            "error": None,
            "scores": {},
            "artifact": None,
        }
    path = artifact_path(artifact_dir, output.artifact_sha256) if output.artifact_sha256 else None
    gpus = gpus_of.get(output.model or "", 0.0)
    return {
        "status": output.status,
        "model": output.model,
        "latency_ms": None if output.latency_ms is None else round(output.latency_ms, 1),
        "samples": {
            "latency_ms": output.latency_ms,
            "queue_ms": output.queue_ms,
            "gpu_seconds": gpu_seconds(output.latency_ms, output.batch_size, gpus),
        },
        "error": output.error,
        "scores": scores.get(output.id, {}),
        "artifact": str(path) if path else None,
    }


def _fails(check: Check, row: dict[str, Any]) -> bool:
    """Whether this pair is on the wrong side of the check, by the metric registry's rule."""
    return check.pair_fails(observed(row[Arm.CANDIDATE]), observed(row[Arm.INCUMBENT]))


def observed(side: dict[str, Any]) -> Observed:
    """One side of a shadow-log row as the metric registry reads it (also `cutover failures`)."""
    return Observed(side["status"], side["samples"], side["scores"])


def pair_value(check: Check, row: dict[str, Any]) -> float | None:
    """The pair's value of a score check: the candidate's score, or its difference from the
    incumbent's (None when a side has no score)."""
    candidate = row[Arm.CANDIDATE]["scores"].get(check.metric)
    if candidate is None:
        return None
    if check.pair_value == "difference":
        incumbent = row[Arm.INCUMBENT]["scores"].get(check.metric)
        return None if incumbent is None else candidate - incumbent
    return candidate


def worst_first(check: Check, rows: list[dict[str, Any]]) -> list[tuple[float, dict[str, Any]]]:
    """The rows with a value of the check, the candidate's worst first (the galleries)."""
    scored = [(pair_value(check, row), row) for row in rows]
    return sorted(
        ((v, row) for v, row in scored if v is not None),
        key=lambda item: item[0],
        reverse=check.direction == "lower_is_better",
    )
