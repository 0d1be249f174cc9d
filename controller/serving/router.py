"""The router: Ray Serve ingress that serves each user from one model and mirrors to the other.

The primary answer goes back as soon as the serving model answers. Mirroring
and recording happen beside it, bounded: a mirror that errors, hangs or lags
cannot change the primary response, and excess mirrors are skipped and
counted, never queued behind users.
"""

import asyncio
import base64
import dataclasses
import secrets
import time
import uuid
from typing import Any

import structlog
from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from controller.config import Config
from controller.serving.api import BadRequest, ImagesRequest, error_envelope, parse_images_request
from controller.serving.routing import is_mirrored, other, primary_role
from controller.serving.table_source import TableSource
from controller.serving.traffic import RoutingTable
from controller.storage.recorder import OutputRecord, Recorder, RequestRecord
from controller.storage.tables import utcnow
from workers.jobs import ImageJob, ImageResult
from workers.logs import configure_logging, log_to_file

log = structlog.get_logger("cutover.router")

http = FastAPI(title="cutover", description="Images API with shadow traffic and staged cutover.")

# What a failed primary answer becomes for the client.
FAILURE_STATUS = {
    "error": 502,
    "oom": 503,
    "timeout": 504,
    "blank": 502,
    "rejected": 422,
    "overload": 503,
}


@serve.deployment
@serve.ingress(http)
class Router:
    def __init__(
        self,
        config: dict[str, Any],
        base_dir: str,
        incumbent: DeploymentHandle,
        candidate: DeploymentHandle,
        log_level: str | None = None,
    ) -> None:
        configure_logging(level=log_level)
        self.config = Config.from_wire(config, base_dir)
        log_to_file(self.config.log_path)
        self.limits = self.config.server
        self.handles = {"incumbent": incumbent, "candidate": candidate}
        self.tables = TableSource(self.config)
        self.recorder = Recorder(
            self.config.resolved_database_url,
            self.config.artifact_path,
            self.config.spill_path,
            timeouts=self.config.database,
        )
        self.mirrors_in_flight = 0
        self.mirrors_skipped = 0
        self.mirrors_started = 0
        self._background: set[asyncio.Task[Any]] = set()

    @http.post("/v1/images/generations")
    async def generate(self, http_request: HttpRequest) -> JSONResponse:
        request_id = str(uuid.uuid4())
        table = self.tables.table
        headers = {"x-cutover-request-id": request_id, "x-cutover-stage": table.stage}
        try:
            return await self._generate(http_request, request_id, table, headers)
        except Exception as exc:  # a router bug: still the envelope, the headers and a log event
            log.exception("router_failed", request_id=request_id, rollout=table.rollout)
            return JSONResponse(
                error_envelope(
                    f"the router failed: {type(exc).__name__}",
                    "router_error",
                    request_id=request_id,
                ),
                status_code=500,
                headers=headers,
            )

    async def _generate(
        self,
        http_request: HttpRequest,
        request_id: str,
        table: RoutingTable,
        headers: dict[str, str],
    ) -> JSONResponse:
        try:
            body = parse_images_request(await http_request.body(), self.limits)
        except BadRequest as exc:
            log.info(
                "bad_request",
                request_id=request_id,
                rollout=table.rollout,
                stage=table.stage,
                errors=exc.errors,
            )
            return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

        sticky_key = body.user or request_id
        role = primary_role(table, sticky_key)
        seed = body.seed if body.seed is not None else secrets.randbelow(2**31)
        jobs = self._jobs(request_id, body, seed)
        mirrored = is_mirrored(table, request_id) and self._claim_mirror_slot()
        # The request row is queued before any output, so its outputs never precede it in SQL.
        self.recorder.record(
            RequestRecord(
                id=request_id,
                rollout=table.rollout,
                stage=table.stage,
                primary_role=role,
                sticky_key=sticky_key,
                prompt=body.prompt,
                params=body.generation_params(jobs[0].width, jobs[0].height),
                seed=seed,
                mirrored=mirrored,
                created_at=utcnow(),
            )
        )
        headers["x-cutover-served-by"] = role

        results = await self._call_all(role, jobs, self.limits.request_timeout)
        if mirrored:
            # Dispatched once the primary has answered: the mirror's routing and its result's
            # handling then never share the event loop with the user's request.
            self._spawn(self._mirror(other(role), jobs, table.stage))
        self._record_outputs(role, jobs, results, self.limits.request_timeout, is_primary=True)
        log.info(
            "served",
            request_id=request_id,
            rollout=table.rollout,
            stage=table.stage,
            role=role,
            statuses=[r.status for r in results],
            mirrored=mirrored,
        )

        failed = [r for r in results if not r.ok]
        if failed:
            status = FAILURE_STATUS.get(failed[0].status, 502)
            return JSONResponse(
                error_envelope(
                    f"the model failed: {failed[0].error}",
                    "model_error",
                    status=failed[0].status,
                    request_id=request_id,
                ),
                status_code=status,
                headers=headers,
            )
        data = [
            {"b64_json": base64.b64encode(r.png or b"").decode(), "seed": job.seed}
            for job, r in zip(jobs, results, strict=True)
        ]
        return JSONResponse({"created": int(time.time()), "data": data}, headers=headers)

    @http.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        return {"status": "ok"}

    @http.get("/v1/rollout")
    async def rollout(self) -> dict[str, Any]:
        table = self.tables.table
        return table.as_dict() | {"table_age_s": round(self.tables.age(), 3)}

    @http.get("/v1/stats")
    async def stats(self) -> dict[str, Any]:
        return {
            "recorder": self.recorder.counters.as_dict(),
            "mirrors": {
                "started": self.mirrors_started,
                "skipped": self.mirrors_skipped,
                "in_flight": self.mirrors_in_flight,
            },
        }

    async def flush(self, timeout: float = 30.0, include_spill: bool = False) -> bool:
        """Wait for mirrors in flight and for the recorder (tests and orderly shutdown)."""
        deadline = time.monotonic() + timeout
        while self._background and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        remaining = max(deadline - time.monotonic(), 0.1)
        return await asyncio.to_thread(self.recorder.flush, remaining, include_spill)

    def __del__(self) -> None:
        for part in ("tables", "recorder"):
            if hasattr(self, part):
                getattr(self, part).close()

    # -- internals --------------------------------------------------------------------------

    def _jobs(self, request_id: str, body: ImagesRequest, seed: int) -> list[ImageJob]:
        width, height = body.dimensions(self.limits)
        return [
            ImageJob(
                request_id=request_id,
                image_index=i,
                prompt=body.prompt,
                seed=seed + i,
                width=width,
                height=height,
                steps=body.steps,
                guidance=body.guidance,
                negative_prompt=body.negative_prompt,
            )
            for i in range(body.n)
        ]

    def _claim_mirror_slot(self) -> bool:
        if self.mirrors_in_flight >= self.limits.mirror_max_in_flight:
            self.mirrors_skipped += 1
            return False
        self.mirrors_in_flight += 1
        self.mirrors_started += 1
        return True

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _mirror(self, role: str, jobs: list[ImageJob], stage: str) -> None:
        try:
            results = await self._call_all(role, jobs, self.limits.mirror_timeout)
            self._record_outputs(role, jobs, results, self.limits.mirror_timeout, is_primary=False)
        except Exception:  # a mirror must never take anything down with it
            log.exception("mirror_failed", request_id=jobs[0].request_id, role=role, stage=stage)
        finally:
            self.mirrors_in_flight -= 1

    async def _call_all(self, role: str, jobs: list[ImageJob], timeout: float) -> list[ImageResult]:
        return list(await asyncio.gather(*(self._call(role, job, timeout) for job in jobs)))

    async def _call(self, role: str, job: ImageJob, timeout: float) -> ImageResult:
        start = time.perf_counter()
        # The deadline travels with the job: the model server refuses work that cannot finish
        # by then, drops it unstarted once it has passed, and stops sampling between steps.
        job = dataclasses.replace(job, deadline=time.time() + timeout)
        response = self.handles[role].generate.remote(job)
        try:
            return await asyncio.wait_for(response, timeout)
        except TimeoutError:
            response.cancel()
            return ImageResult(
                "timeout",
                error=f"no answer within {timeout:g}s",
                latency_ms=(time.perf_counter() - start) * 1000,
            )
        except Exception as exc:  # the replica died or Ray failed: a model error, recorded as such
            return ImageResult(
                "error",
                error=f"{type(exc).__name__}: {exc}"[:2000],
                latency_ms=(time.perf_counter() - start) * 1000,
            )

    def _record_outputs(
        self,
        role: str,
        jobs: list[ImageJob],
        results: list[ImageResult],
        timeout_s: float,
        *,
        is_primary: bool,
    ) -> None:
        now = utcnow()
        for job, result in zip(jobs, results, strict=True):
            self.recorder.record(
                OutputRecord(
                    id=str(uuid.uuid4()),
                    request_id=job.request_id,
                    role=role,
                    image_index=job.image_index,
                    is_primary=is_primary,
                    status=result.status,
                    created_at=now,
                    error=result.error,
                    latency_ms=result.latency_ms,
                    queue_ms=result.queue_ms,
                    batch_size=result.batch_size or None,
                    peak_gpu_bytes=result.peak_gpu_bytes,
                    oom_count=result.oom_count,
                    batch_ooms=result.batch_ooms,
                    timeout_s=timeout_s,
                ),
                png=result.png,
            )
