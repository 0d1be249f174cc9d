"""What travels between the router and a model server: one image job, one image result.

Plain dataclasses (no torch) so the router can import them cheaply; Ray
pickles them across processes.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

DEFAULT_STRENGTH = 0.8  # an edit's, when the request gives none


class OutputStatus(StrEnum):
    """How one image call ended: the one list the router, recorder, judge and reports share."""

    OK = "ok"
    ERROR = "error"  # the model raised, or its replica died
    TIMEOUT = "timeout"  # no answer within the caller's deadline
    OOM = "oom"  # out of memory even after splitting the batch
    REJECTED = "rejected"  # the model refused the input (a 4xx the router could not catch)
    BLANK = "blank"  # an image came back, but flat or not numbers (a NaN decode)
    OVERLOAD = "overload"  # refused before starting: it could not finish by the deadline
    LOST = "lost"  # the router died before recording an outcome (written by reconciliation)


@dataclass(frozen=True)
class ImageJob:
    request_id: str
    image_index: int
    prompt: str
    seed: int
    width: int
    height: int
    steps: int | None = None
    guidance: float | None = None
    negative_prompt: str | None = None
    # When the caller stops waiting (epoch seconds); None waits for ever (benchmarks, calibrate).
    deadline: float | None = None
    # Edits and upscales start from an image (PNG); an inpaint also has a mask (PNG, one
    # channel, white is repainted). width x height is always the size of the output.
    image: bytes | None = None
    mask: bytes | None = None
    strength: float | None = None  # how far an edit may move from its image (0..1)
    # How many images the request has: the others arrive alongside this one, so a batch may
    # wait for them (`workers/batch_wait.py`).
    images: int = 1

    @property
    def group_key(self) -> tuple[object, ...]:
        """Jobs with equal keys can share one pipeline call."""
        return (
            self.width,
            self.height,
            self.steps,
            self.guidance,
            self.negative_prompt is None,
            self.strength,
            self.image is None,
            self.mask is None,
        )


@dataclass
class ImageResult:
    status: str
    png: bytes | None = None
    error: str | None = None
    latency_ms: float = 0.0
    queue_ms: float = 0.0
    batch_size: int = 0
    peak_gpu_bytes: int | None = None
    oom_count: int = 0
    batch_ooms: int = 0

    @property
    def ok(self) -> bool:
        return self.status == OutputStatus.OK
