"""ModelServer: one Ray Serve deployment class, deployed once per role.

Requests arrive one image at a time and are grouped by `@serve.batch`; the
pipeline itself runs in a worker thread behind a lock, so the replica's event
loop keeps accepting requests while a batch samples. Every outcome, failures
included, comes back as an ImageResult: a replica never lets an exception
escape to the router, which must record what happened.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import numpy as np
import structlog
from ray import serve

from controller.config import FaultConfig, ModelConfig
from controller.logs import configure_logging
from workers.faults import InjectedError, apply_tint, plan_for
from workers.jobs import ImageJob, ImageResult
from workers.pipeline import PipelineRunner, to_png

log = structlog.get_logger("cutover.model_server")


@serve.deployment
class ModelServer:
    def __init__(self, role: str, model: dict[str, Any], base_dir: str) -> None:
        configure_logging()
        self.role = role
        self.model = ModelConfig.model_validate(model)
        self.faults = self.model.faults
        self.runner = None if self.faults.stand_in else PipelineRunner(self.model, Path(base_dir))
        batch = (
            self.model.max_batch_size if self.model.batch_size == "auto" else self.model.batch_size
        )
        self._batched.set_max_batch_size(batch)
        self._batched.set_batch_wait_timeout_s(self.model.batch_wait)
        log.info(
            "model_server_ready",
            role=role,
            pipeline=self.model.pipeline,
            sampler=self.model.sampler,
            device=getattr(self.runner, "device", "none"),
            max_batch_size=batch,
            faults=self.faults.active,
        )

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Ray Serve calls this on every replica when the deployment's user_config changes."""
        self.set_faults(user_config.get("faults", {}))

    def set_faults(self, faults: dict[str, Any]) -> dict[str, Any]:
        """Change fault injection at run time (on the replica that receives the call)."""
        self.faults = FaultConfig.model_validate(faults)
        log.warning("faults_changed", role=self.role, faults=self.faults.model_dump(mode="json"))
        return self.faults.model_dump(mode="json")

    def get_faults(self) -> dict[str, Any]:
        return self.faults.model_dump(mode="json")

    def check_health(self) -> None:
        """Ray Serve restarts a replica whose health check raises."""

    async def generate(self, job: ImageJob) -> ImageResult:
        arrived = time.perf_counter()
        plan = plan_for(self.faults, f"{job.request_id}:{job.image_index}")
        log_keys = {"request_id": job.request_id, "role": self.role}
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
            queued = time.perf_counter()
            png, started, batch_size = await self._batched(job)
        except Exception as exc:  # every failure becomes a recorded result, never a dead request
            status = "oom" if type(exc).__name__ == "OutOfMemoryError" else "error"
            log.warning("generate_failed", status=status, error=str(exc), **log_keys)
            return ImageResult(
                status,
                error=f"{type(exc).__name__}: {exc}",
                latency_ms=_ms_since(arrived),
                oom_count=int(status == "oom"),
            )
        return ImageResult(
            "ok",
            png=png,
            latency_ms=_ms_since(arrived),
            queue_ms=(started - queued) * 1000,
            batch_size=batch_size,
        )

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def _batched(self, jobs: list[ImageJob]) -> list[tuple[bytes, float, int]]:
        started = time.perf_counter()
        pngs = await asyncio.to_thread(self._render, jobs)
        return [(png, started, len(jobs)) for png in pngs]

    def _render(self, jobs: list[ImageJob]) -> list[bytes]:
        tint = self.faults.tint
        if self.runner is None or self.faults.stand_in:  # no pipeline: a solid image (benchmarks)
            images = [np.full((job.height, job.width, 3), 128, dtype=np.uint8) for job in jobs]
        else:
            images = self.runner.generate(jobs)
        return [to_png(apply_tint(image, tint)) for image in images]


def _ms_since(start: float) -> float:
    return (time.perf_counter() - start) * 1000
