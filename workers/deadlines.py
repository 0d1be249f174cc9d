"""Work that cannot finish in time is not started, and work past its deadline is stopped.

The router waits `request_timeout` (or `mirror_timeout`) for an answer; each job carries
that moment as a deadline. A model server uses it three times: admission refuses a job
whose estimated sampling time (pixels × steps × the learned seconds per pixel-step) does
not fit before the deadline; a job still queued when its deadline passes is dropped
unstarted; and a running pipeline call stops between denoising steps once every job in it
has expired. Without these, one oversized request kept a replica busy for ten minutes
after its caller had given up, and every request behind it timed out too.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from workers.jobs import ImageJob


class DeadlineExceeded(Exception):
    """Raised from the step callback: every job in the call has passed its deadline."""


def expired(job: ImageJob, now: float | None = None) -> bool:
    return job.deadline is not None and (now or time.time()) >= job.deadline


def step_units(job: ImageJob, default_steps: int) -> int:
    """What sampling time scales with: pixels × denoising steps."""
    return job.width * job.height * (job.steps or default_steps)


class SpeedModel:
    """Seconds per pixel-step, learned from measured pipeline calls.

    A batched call is timed as a whole and divided by the units of all its jobs, so the
    figure already holds batching's gain. Unknown until the first call: admission then lets
    work in, and the step callback bounds what a wrong guess costs.
    """

    def __init__(self, default_steps: int) -> None:
        self.default_steps = default_steps
        self.seconds_per_unit: float | None = None

    def observe(self, jobs: list[ImageJob], seconds: float) -> None:
        units = sum(step_units(j, self.default_steps) for j in jobs)
        if units <= 0:
            return
        measured = seconds / units
        previous = self.seconds_per_unit
        self.seconds_per_unit = measured if previous is None else 0.7 * previous + 0.3 * measured

    def estimate(self, job: ImageJob) -> float | None:
        if self.seconds_per_unit is None:
            return None
        return step_units(job, self.default_steps) * self.seconds_per_unit


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


def stop_when_expired(jobs: list[ImageJob], step_delay: float = 0.0) -> StepCallback:
    """A diffusers `callback_on_step_end` that stops the call between steps once every job
    in it has passed its deadline (nobody is waiting for these images any more).

    `step_delay` is fault injection (`faults.step_delay`): every step takes that much longer,
    as on a slow or throttled device.
    """
    deadlines = [job.deadline for job in jobs]
    latest = None if None in deadlines else max(d for d in deadlines if d is not None)

    def callback(pipeline: Any, step: int, timestep: Any, kwargs: dict[str, Any]) -> dict:
        if step_delay:
            time.sleep(step_delay)
        if latest is not None and time.time() >= latest:
            raise DeadlineExceeded(
                f"stopped after step {step + 1}: every request in the batch had passed its deadline"
            )
        return kwargs

    return callback
