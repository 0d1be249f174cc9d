"""Batches that fit: sizing from free memory, and out-of-memory split-and-retry.

The batch a model server runs is chosen by one rule, used both by Ray Serve's
`@serve.batch` (through `batch_size_fn`) and by `bench/gpu_batching.py`: take
the longest prefix of the queue whose estimated peak fits in free memory minus
headroom, and whose count fits `max_batch_size`. The estimate is learned from
measured peaks. When it is wrong anyway, an out-of-memory error splits the
batch in halves down to single images, so a replica never dies of OOM.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import structlog

from workers.config import ModelConfig
from workers.deadlines import (
    DeadlineExceeded,
    SpeedModel,
    expired,
    latest_deadline,
    step_callback,
)
from workers.jobs import ImageJob, OutputStatus
from workers.memory import MemoryProbe, pixels

log = structlog.get_logger("cutover.batching")

# Ray Serve compares batch "sizes" to max_batch_size; a full batch is this many units.
UNITS = 1_000_000


def group_jobs(jobs: list[ImageJob]) -> list[list[int]]:
    """Indices of jobs that one pipeline call can take together (same size and parameters)."""
    groups: dict[tuple[object, ...], list[int]] = defaultdict(list)
    for index, job in enumerate(jobs):
        groups[job.group_key].append(index)
    return list(groups.values())


class CostModel:
    """Peak activation bytes per image pixel, learned from measured peaks.

    Steps do not enter: sampling frees each step's activations before the next,
    so the peak of a call depends on how many pixels it holds at once.
    An underestimate is corrected at once, an overestimate slowly.
    """

    def __init__(self, initial_bytes_per_pixel: float) -> None:
        self.bytes_per_pixel = initial_bytes_per_pixel
        self.observations = 0

    def estimate(self, jobs: list[ImageJob]) -> int:
        """Peak bytes of a batch: its largest pipeline call (groups run one after another)."""
        calls = (sum(pixels(jobs[i]) for i in group) for group in group_jobs(jobs))
        return max((int(total * self.bytes_per_pixel) for total in calls), default=0)

    def observe(self, jobs: list[ImageJob], peak_bytes: int) -> None:
        measured = peak_bytes / max(sum(pixels(j) for j in jobs), 1)
        self.bytes_per_pixel = max(measured, 0.8 * self.bytes_per_pixel + 0.2 * measured)
        self.observations += 1


class BatchPlanner:
    def __init__(self, model: ModelConfig, probe: MemoryProbe, cost: CostModel) -> None:
        self.auto = model.batch_size == "auto"
        self.max_count = model.max_batch_size if self.auto else int(model.batch_size)
        self.headroom = model.memory_headroom
        self.probe = probe
        self.cost = cost
        self.running_bytes = (
            0  # estimate of the batch executing now; freed before the next one runs
        )

    def budget(self) -> int | None:
        free = self.probe.free_bytes()
        if free is None:
            return None
        return max(free + self.running_bytes - self.headroom, 1)

    def units(self, jobs: list[ImageJob]) -> int:
        """How full `jobs` would make a batch, in UNITS (more than UNITS does not fit)."""
        needed = math.ceil(len(jobs) * UNITS / self.max_count)
        budget = self.budget() if self.auto else None
        if budget is not None:
            needed = max(needed, math.ceil(self.cost.estimate(jobs) * UNITS / budget))
        # A single image always runs; if it truly does not fit, it is recorded as `oom`.
        return min(needed, UNITS) if len(jobs) == 1 else needed

    def take(self, queue: list[ImageJob]) -> list[ImageJob]:
        """The longest prefix of `queue` that fits (what Ray Serve's batcher does with `units`)."""
        batch = queue[:1]
        for job in queue[1:]:
            if self.units([*batch, job]) > UNITS:
                break
            batch.append(job)
        return batch


@dataclass
class Rendered:
    """One image's outcome from a batch."""

    status: str
    image: np.ndarray | None = None
    error: str | None = None
    oom_count: int = 0
    batch_ooms: int = 0
    peak_bytes: int | None = None


class BatchExecutor:
    """Runs batches through a pipeline runner, splitting on OOM and stopping calls whose
    callers have all given up; tracks replica health (OOMs in a row, a wedged call)."""

    def __init__(
        self,
        runner: Any,
        probe: MemoryProbe,
        cost: CostModel,
        oom_unhealthy_after: int,
        speed: SpeedModel | None = None,
        step_delay: Callable[[], float] = lambda: 0.0,
    ) -> None:
        self.runner = runner
        self.probe = probe
        self.cost = cost
        self.speed = speed
        self.step_delay = step_delay
        self.oom_unhealthy_after = oom_unhealthy_after
        self.single_ooms_in_a_row = 0
        self.total_ooms = 0
        # The latest deadline of the call running now (None: idle, or a caller waits for ever).
        self.running_deadline: float | None = None

    def health_problem(self, wedged_after: float, now: float | None = None) -> str | None:
        """Why this replica should be restarted, or None while it is healthy.

        Repeated OOMs of single images mean the device is in a bad state; a call that runs on
        long after every caller's deadline did not stop between steps (a hung kernel, or one
        step that alone outlasts the deadline) and holds the replica for nobody.
        """
        if self.single_ooms_in_a_row >= self.oom_unhealthy_after:
            return f"{self.single_ooms_in_a_row} single images in a row ran out of memory"
        deadline = self.running_deadline
        overdue = 0.0 if deadline is None else (now or time.time()) - deadline
        if overdue > wedged_after:
            return (
                f"a pipeline call has run {overdue:.0f}s past the deadline of every request in "
                f"it (wedged_after {wedged_after:g}s) and did not stop between steps"
            )
        return None

    def render(self, jobs: list[ImageJob]) -> list[Rendered]:
        """One outcome per job, in order. A job whose deadline passed while it queued is
        dropped unstarted: nobody waits for it, and the jobs behind it do."""
        results: list[Rendered | None] = [None] * len(jobs)
        live = []
        for index, job in enumerate(jobs):
            if expired(job):
                results[index] = Rendered(
                    OutputStatus.TIMEOUT,
                    error="dropped unstarted: its deadline passed while it waited",
                )
            else:
                live.append(index)
        for group in group_jobs([jobs[i] for i in live]):
            indices = [live[i] for i in group]
            ooms_before = self.total_ooms
            outcomes = self._render_group([jobs[i] for i in indices], ooms=0)
            for index, outcome in zip(indices, outcomes, strict=True):
                outcome.batch_ooms = self.total_ooms - ooms_before
                results[index] = outcome
        return [r for r in results if r is not None]

    def _render_group(self, jobs: list[ImageJob], ooms: int) -> list[Rendered]:
        import torch

        on_step = step_callback(jobs, self.speed, self.step_delay())
        self.running_deadline = latest_deadline(jobs)
        try:
            images, peak = self.probe.run(jobs, lambda: self.runner.call(jobs, on_step))
            failure = None
        except torch.OutOfMemoryError as exc:
            failure = str(exc).splitlines()[0][:300]
        except DeadlineExceeded as exc:
            log.warning(
                "batch_stopped", batch_size=len(jobs), request_id=jobs[0].request_id, error=str(exc)
            )
            return [Rendered(OutputStatus.TIMEOUT, oom_count=ooms, error=str(exc)) for _ in jobs]
        finally:
            self.running_deadline = None
        if failure is not None:
            # Retry outside the except block: its traceback holds the failed call's activations.
            return self._split_after_oom(jobs, ooms, failure)
        self.single_ooms_in_a_row = 0
        if peak:
            self.cost.observe(jobs, peak)
        return [
            Rendered(
                OutputStatus.BLANK if blank else OutputStatus.OK,
                image=image,
                oom_count=ooms,
                peak_bytes=peak,
                error="blank image: constant or non-finite pixels" if blank else None,
            )
            for image, blank in images
        ]

    def _split_after_oom(self, jobs: list[ImageJob], ooms: int, failure: str) -> list[Rendered]:
        self.probe.release()
        self.total_ooms += 1
        first = jobs[0]
        log.warning(
            "batch_oom",
            batch_size=len(jobs),
            size=f"{first.width}x{first.height}",
            request_id=first.request_id,
            error=failure,
        )
        if len(jobs) == 1:
            self.single_ooms_in_a_row += 1
            message = f"{first.width}x{first.height} does not fit in device memory even as a batch of one: {failure}"
            return [Rendered(OutputStatus.OOM, oom_count=ooms + 1, error=message)]
        half = len(jobs) // 2
        return self._render_group(jobs[:half], ooms + 1) + self._render_group(jobs[half:], ooms + 1)
