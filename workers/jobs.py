"""What travels between the router and a model server: one image job, one image result.

Plain dataclasses (no torch) so the router can import them cheaply; Ray
pickles them across processes.
"""

from __future__ import annotations

from dataclasses import dataclass

STATUSES = ("ok", "error", "timeout", "oom", "rejected", "blank", "overload", "lost")


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

    @property
    def group_key(self) -> tuple[object, ...]:
        """Jobs with equal keys can share one pipeline call."""
        return (self.width, self.height, self.steps, self.guidance, self.negative_prompt is None)


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
        return self.status == "ok"
