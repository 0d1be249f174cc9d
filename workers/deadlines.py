"""Work that cannot finish in time is not started, and work past its deadline is stopped.

The router waits `request_timeout` (or `mirror_timeout`) for an answer; each job carries
that moment as a deadline. A model server uses it three times: admission refuses a job
whose estimated sampling time (steps × the measured seconds per step at its size) does not
fit before the deadline; a job still queued when its deadline passes is dropped unstarted;
and a running pipeline call stops between denoising steps once every job in it has
expired. Without these, one oversized request kept a replica busy for ten minutes after
its caller had given up, and every request behind it timed out too.

Step times are measured by the step callback on every call, and at start-up on a few small
sizes (`models.<role>.warmup`), so the first oversized request is judged too.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np

from workers.config import UPSCALE_FACTOR, ModelKind
from workers.images import to_png
from workers.jobs import ImageJob


class DeadlineExceeded(Exception):
    """Raised from the step callback: every job in the call has passed its deadline."""


def expired(job: ImageJob, now: float | None = None) -> bool:
    return job.deadline is not None and (now or time.time()) >= job.deadline


def latest_deadline(jobs: list[ImageJob]) -> float | None:
    """When the last caller of these jobs stops waiting; None if any waits for ever."""
    deadlines = [job.deadline for job in jobs]
    return None if None in deadlines else max(d for d in deadlines if d is not None)


class SpeedModel:
    """Seconds per denoising step, learned per call size (pixels in the call) from the step
    callback's clock, and an estimate for a job that never overstates its cost.

    A linear "seconds per pixel-step" fitted on small images overstates large ones many
    times over (small calls are bound by fixed per-step overheads, not by pixels), and
    admission would refuse work that fits. So a job's steps are estimated from the calls
    seen so far at or below its size: the slowest of them per step, or the line through the
    two largest (which rises no faster than the true curve, flat first and then linear).
    Text encoding and VAE decoding are left out. The estimate is a lower bound, so a
    refusal is sure; an unseen larger size is admitted, its steps are measured as it runs
    (even if it is stopped), and the next one like it is judged by them.
    """

    def __init__(self, default_steps: int) -> None:
        self.default_steps = default_steps
        self.step_seconds: dict[int, float] = {}  # pixels in a call -> seconds per step

    def observe_step(self, pixels: int, seconds: float) -> None:
        previous = self.step_seconds.get(pixels)
        self.step_seconds[pixels] = seconds if previous is None else 0.7 * previous + 0.3 * seconds

    def seconds_per_step(self, pixels: int) -> float | None:
        seen = sorted((p, t) for p, t in self.step_seconds.items() if p <= pixels)
        if not seen:
            return None  # smaller than anything measured: no bound to offer
        bound = max(t for _, t in seen)
        if len(seen) >= 2:
            (p1, t1), (p2, t2) = seen[-2:]
            bound = max(bound, t2 + (t2 - t1) / (p2 - p1) * (pixels - p2))
        return bound

    def estimate(self, job: ImageJob) -> float | None:
        per_step = self.seconds_per_step(job.width * job.height)
        return None if per_step is None else per_step * (job.steps or self.default_steps)


class Admission:
    """Refuses a job that the learned speed says cannot finish before its deadline.

    `backlog_s` is the estimated sampling time of jobs admitted and not finished on this
    replica: a job that fits alone may still not fit behind them.
    """

    def __init__(self, speed: SpeedModel) -> None:
        self.speed = speed
        self.backlog_s = 0.0

    def refusal(self, job: ImageJob, now: float | None = None) -> str | None:
        """Why `job` cannot finish before its deadline, or None to let it in."""
        if job.deadline is None:
            return None
        cost = self.speed.estimate(job)
        if cost is None:
            return None
        left = job.deadline - (now or time.time())
        steps = job.steps or self.speed.default_steps
        if cost > left:
            return (
                f"{job.width}x{job.height} at {steps} steps needs about {cost:.1f}s on this "
                f"model, and the deadline leaves {max(left, 0):.1f}s: ask for a smaller size "
                "or fewer steps"
            )
        if self.backlog_s + cost > left:
            return (
                f"overloaded: {self.backlog_s:.1f}s of admitted work is ahead of this "
                f"{cost:.1f}s job and the deadline leaves {max(left, 0):.1f}s; retry later"
            )
        return None

    def started(self, job: ImageJob) -> float:
        """Count the job into the backlog; returns what to hand back to `finished`."""
        cost = self.speed.estimate(job) or 0.0
        self.backlog_s += cost
        return cost

    def finished(self, cost: float) -> None:
        self.backlog_s = max(self.backlog_s - cost, 0.0)


StepCallback = Callable[[Any, int, Any, dict[str, Any]], dict[str, Any]]


def step_callback(
    jobs: list[ImageJob], speed: SpeedModel | None = None, step_delay: float = 0.0
) -> StepCallback:
    """A diffusers `callback_on_step_end` for one pipeline call of `jobs`.

    It times each step into `speed` (from the second step on: the first interval holds the
    prompt encoding), applies `step_delay` (fault injection, `faults.step_delay`: a slow or
    throttled device), and stops the call between steps once every job in it has passed its
    deadline: nobody is waiting for these images any more.
    """
    latest = latest_deadline(jobs)
    pixels = sum(job.width * job.height for job in jobs)
    last: list[float] = []

    def callback(pipeline: Any, step: int, timestep: Any, kwargs: dict[str, Any]) -> dict:
        now = time.perf_counter()
        if last and speed is not None:
            # From the previous callback's start: that callback's delay slowed this step.
            speed.observe_step(pixels, now - last[0])
        last[:] = [now]
        if step_delay:
            time.sleep(step_delay)
        if latest is not None and time.time() >= latest:
            raise DeadlineExceeded(
                f"stopped after step {step + 1}: every request in the batch had passed its deadline"
            )
        return kwargs

    return callback


def measure_speed(
    runner: Any,
    speed: SpeedModel,
    sides: list[int],
    steps: int = 2,
    kind: ModelKind = ModelKind.TEXT2IMG,
) -> None:
    """Time a few denoising steps at each square output size, smallest first (start-up warm-up)."""
    for side in sorted(sides):
        job = warmup_job(kind, side, steps)
        runner.call([job], step_callback([job], speed))


def warmup_job(kind: ModelKind, side: int, steps: int) -> ImageJob:
    """A job of `kind` whose output is side x side: edits start from a grey image of that size
    (inpaint repaints its centre), an upscale from one UPSCALE_FACTOR times smaller."""
    job = ImageJob("warmup", 0, "a warm-up image", 0, side, side, steps=steps)
    if kind is ModelKind.TEXT2IMG:
        return job
    source = side // UPSCALE_FACTOR if kind is ModelKind.UPSCALE else side
    image = to_png(np.full((source, source, 3), 128, dtype=np.uint8))
    mask = None
    if kind is ModelKind.INPAINT:
        pixels = np.zeros((side, side), dtype=np.uint8)
        pixels[side // 4 : 3 * side // 4, side // 4 : 3 * side // 4] = 255
        mask = to_png(pixels)
    return replace(job, image=image, mask=mask)
