"""ModelService serves one model of the pool; ModelServer is it as a Ray Serve deployment.

The class is plain so a router replica can also host a model in-process (`in_router`),
with the same batching, admission, deadlines and fault injection as a deployment.

Requests arrive one image at a time and are grouped by `@serve.batch`, whose
`batch_size_fn` asks the batch planner how full a batch is: by count for a
fixed batch size, by estimated memory against free device memory for `auto`;
how long a batch waits to fill is set per request (`workers/batch_wait.py`), so a
lone request never waits for company that is not coming.
The pipeline runs in a worker thread behind a lock, so the replica keeps
accepting requests while a batch samples. Every outcome, failures included,
comes back as an ImageResult: nothing escapes to the router unrecorded.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import structlog
from ray import serve

from workers.batch_wait import BatchWait
from workers.batching import UNITS, BatchExecutor, BatchPlanner, CostModel, Rendered
from workers.config import FaultConfig, ModelConfig
from workers.deadlines import Admission, SpeedModel, StepCallback, measure_speed
from workers.faults import InjectedError, apply_tint, plan_for, text_card
from workers.images import to_png
from workers.jobs import ImageJob, ImageResult, OutputStatus
from workers.logs import configure_logging, log_to_file
from workers.memory import make_probe
from workers.pipeline import PipelineRunner

log = structlog.get_logger("cutover.model_server")


@dataclass(frozen=True)
class _Queued:
    """A job in the batch queue, carrying the planner that sizes batches (same process)."""

    job: ImageJob
    planner: BatchPlanner


def _batch_units(items: list[_Queued]) -> int:
    return items[0].planner.units([item.job for item in items])


class _StandIn:
    """No pipeline: a solid image per job (`faults.stand_in`, for overhead benchmarks)."""

    device = "none"

    def call(
        self, jobs: list[ImageJob], on_step: StepCallback | None = None
    ) -> list[tuple[np.ndarray, bool]]:
        return [(np.full((j.height, j.width, 3), 128, dtype=np.uint8), False) for j in jobs]


class _TextCards:
    """No pipeline: a card with each prompt's quoted text (`faults.text_card`, rehearsals)."""

    device = "none"

    def __init__(self, garble_over: int | None) -> None:
        self.garble_over = garble_over

    def call(
        self, jobs: list[ImageJob], on_step: StepCallback | None = None
    ) -> list[tuple[np.ndarray, bool]]:
        return [(text_card(j.prompt, j.width, j.height, self.garble_over), False) for j in jobs]


class ModelService:
    def __init__(
        self,
        name: str,
        model: dict[str, Any],
        base_dir: str,
        log_file: str | None = None,
        log_level: str | None = None,
    ) -> None:
        configure_logging(level=log_level)
        log_to_file(Path(log_file) if log_file else None)
        self.name = name
        self.model = ModelConfig.model_validate(model)
        self.faults = self.model.faults
        runner: Any
        if self.faults.stand_in:
            runner = _StandIn()
        elif self.faults.text_card:
            runner = _TextCards(self.faults.garble_text_over)
        else:
            runner = PipelineRunner(self.model, Path(base_dir))
        probe = make_probe(self.model, runner.device)
        cost = CostModel(self.model.initial_bytes_per_pixel)
        self.planner = BatchPlanner(self.model, probe, cost)
        speed = SpeedModel(self.model.steps)
        measure_speed(runner, speed, self.model.warmup, kind=self.model.kind)
        self.admission = Admission(speed)
        self.executor = BatchExecutor(
            runner,
            probe,
            cost,
            self.model.oom_unhealthy_after,
            speed,
            step_delay=lambda: self.faults.step_delay,
        )
        self._batched.set_max_batch_size(UNITS)
        self.batch_wait = BatchWait(self.model.batch_wait)
        log.info(
            "model_server_ready",
            model=name,
            pipeline=self.model.pipeline,
            sampler=self.model.sampler,
            precision=self.model.precision,
            device=runner.device,
            probe=probe.name,
            batch_size=self.model.batch_size,
            max_batch_size=self.planner.max_count,
            step_seconds={str(p): round(t, 4) for p, t in speed.step_seconds.items()},
        )

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Ray Serve calls this on every replica when the deployment's user_config changes."""
        self.set_faults(user_config.get("faults", {}))

    def set_faults(self, faults: dict[str, Any]) -> dict[str, Any]:
        """Change fault injection at run time (on the replica that receives the call)."""
        self.faults = FaultConfig.model_validate(faults)
        log.warning("faults_changed", model=self.name, faults=self.faults.model_dump(mode="json"))
        return self.faults.model_dump(mode="json")

    def get_faults(self) -> dict[str, Any]:
        return self.faults.model_dump(mode="json")

    def check_health(self) -> None:
        """Ray Serve restarts a replica whose health check raises."""
        problem = self.executor.health_problem(self.model.wedged_after)
        if problem is not None:
            raise RuntimeError(f"{problem}; asking Ray to restart this replica")

    async def generate(self, job: ImageJob) -> ImageResult:
        arrived = time.perf_counter()
        plan = plan_for(self.faults, f"{job.request_id}:{job.image_index}")
        try:
            if plan.delay_s:
                await asyncio.sleep(plan.delay_s)
            if plan.hang:
                await asyncio.sleep(self.faults.hang)
                return ImageResult(
                    "timeout",
                    error="injected fault: hung past the caller's timeout",
                    latency_ms=_ms_since(arrived),
                )
            if plan.error:
                raise InjectedError("injected fault: model error (faults.error_percent)")
            if plan.oom:
                import torch

                raise torch.OutOfMemoryError(
                    "injected fault: CUDA out of memory (faults.oom_percent)"
                )
            refusal = self.admission.refusal(job)
            if refusal is not None:
                log.info(
                    "admission_refused", request_id=job.request_id, model=self.name, error=refusal
                )
                return ImageResult("overload", error=refusal, latency_ms=_ms_since(arrived))
            queued = time.perf_counter()
            cost = self.admission.started(job)
            # Read by the batcher when this job starts a batch: no wait unless more is coming.
            self._batched.set_batch_wait_timeout_s(self.batch_wait.arrived(job, queued))
            try:
                outcome, png, started, batch_size = await self._batched(_Queued(job, self.planner))
            finally:
                self.admission.finished(cost)
        except Exception as exc:  # every failure becomes a recorded result, never a dead request
            status = (
                OutputStatus.OOM if type(exc).__name__ == "OutOfMemoryError" else OutputStatus.ERROR
            )
            log.warning(
                "generate_failed",
                request_id=job.request_id,
                model=self.name,
                status=status,
                error=str(exc),
            )
            return ImageResult(
                status,
                error=f"{type(exc).__name__}: {exc}",
                latency_ms=_ms_since(arrived),
                oom_count=int(status == OutputStatus.OOM),
            )
        return ImageResult(
            outcome.status,
            png=png,
            error=outcome.error,
            latency_ms=_ms_since(arrived),
            queue_ms=(started - queued) * 1000,
            batch_size=batch_size,
            peak_gpu_bytes=outcome.peak_bytes,
            oom_count=outcome.oom_count,
            batch_ooms=outcome.batch_ooms,
        )

    @serve.batch(max_batch_size=UNITS, batch_wait_timeout_s=0.01, batch_size_fn=_batch_units)
    async def _batched(
        self, items: list[_Queued]
    ) -> list[tuple[Rendered, bytes | None, float, int]]:
        started = time.perf_counter()
        jobs = [item.job for item in items]
        self.planner.running_bytes = self.planner.cost.estimate(jobs)
        try:
            outcomes = await asyncio.to_thread(self._render, jobs)
        finally:
            self.planner.running_bytes = 0
        return [(outcome, png, started, len(jobs)) for outcome, png in outcomes]

    def _render(self, jobs: list[ImageJob]) -> list[tuple[Rendered, bytes | None]]:
        tint = self.faults.tint
        return [
            (outcome, None if outcome.image is None else to_png(apply_tint(outcome.image, tint)))
            for outcome in self.executor.render(jobs)
        ]


ModelServer = serve.deployment(ModelService)


def _ms_since(start: float) -> float:
    return (time.perf_counter() - start) * 1000
