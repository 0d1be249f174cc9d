"""What the router hands the recorder: one request, and one output per image and model call.

`OutputRecord` is the one type from a model server's `ImageResult` to the row in
`outputs`: its fields are the table's columns (`tests/test_records.py` holds
them equal), so a column cannot be added on one side and forgotten on the other.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from workers.jobs import ImageJob, ImageResult


@dataclass
class RequestRecord:
    """A row of `requests`, naming its rollout (None on a route without one) rather than its id."""

    id: str
    rollout: str | None
    route: str
    stage: str
    primary_role: str
    sticky_key: str
    prompt: str
    params: dict[str, Any]
    seed: int
    mirrored: bool
    created_at: datetime
    tags: list[str] | None = None  # policies/prompt_tags.py: the slices the judge puts it in


@dataclass
class OutputRecord:
    """A row of `outputs`: one image of one model call, whatever its outcome."""

    id: str
    request_id: str
    role: str  # the arm it answered for, or `fallback`
    image_index: int
    is_primary: bool
    status: str
    created_at: datetime
    error: str | None = None
    latency_ms: float | None = None
    queue_ms: float | None = None
    batch_size: int | None = None
    peak_gpu_bytes: int | None = None
    oom_count: int = 0
    batch_ooms: int = 0
    artifact_sha256: str | None = None  # set by the recorder once the image is stored
    scored_at: datetime | None = None  # set by the scorer
    claimed_by: str | None = None  # set by the scorer that takes it
    claim_expires: datetime | None = None  # ... until when
    timeout_s: float | None = None  # the time the router gave this call
    model: str | None = None  # the pool's name for the model that answered
    fallback_of: str | None = None  # on a fallback's output: the failed attempt's output id

    @classmethod
    def of(
        cls,
        output_id: str,
        job: ImageJob,
        result: ImageResult,
        *,
        role: str,
        model: str,
        is_primary: bool,
        timeout_s: float,
        created_at: datetime,
        fallback_of: str | None = None,
    ) -> OutputRecord:
        """The record of one model call's result for one image of a request."""
        return cls(
            id=output_id,
            request_id=job.request_id,
            role=role,
            image_index=job.image_index,
            is_primary=is_primary,
            status=result.status,
            created_at=created_at,
            error=result.error,
            latency_ms=result.latency_ms,
            queue_ms=result.queue_ms,
            batch_size=result.batch_size or None,
            peak_gpu_bytes=result.peak_gpu_bytes,
            oom_count=result.oom_count,
            batch_ooms=result.batch_ooms,
            timeout_s=timeout_s,
            model=model,
            fallback_of=fallback_of,
        )
