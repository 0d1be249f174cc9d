"""The router: Ray Serve ingress that serves each request from its route's model and mirrors.

Every endpoint ends in `_serve`: pick the route's rollout (if one runs there),
the user's side of it, answer from that side's model (or the route's fallback
model when that one fails), and mirror to the other side. The primary answer
goes back as soon as it is ready. Mirroring and recording happen beside it,
bounded: a mirror that errors, hangs or lags cannot change the primary
response, and excess mirrors are skipped and counted, never queued behind users.
"""

import asyncio
import base64
import dataclasses
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.serve.handle import DeploymentHandle

from controller.config import Config, RouteConfig
from controller.operations.metrics import CONTENT_TYPE, RouterMetrics
from controller.serving.api import BadRequest, error_envelope, parse_images_request
from controller.serving.asks import Ask, edit_ask, generation_ask, upscale_ask
from controller.serving.routing import is_mirrored, primary_role
from controller.serving.table_source import TableSource
from controller.serving.traffic import RoutingTable
from controller.serving.uploads import Part, parse_edit, parse_upscale
from controller.storage.artifact_store import artifacts_for
from controller.storage.recorder import Recorder
from controller.storage.records import OutputRecord, RequestRecord
from controller.storage.tables import utcnow
from policies.prompt_tags import tags_of
from policies.vocabulary import Arm
from workers.jobs import ImageJob, ImageResult, OutputStatus
from workers.logs import configure_logging, log_to_file

# Images up to this many bytes in all (per call) are written on the event loop: a 64x64
# PNG takes about 0.2 ms, less than handing the work to a thread on a busy replica.
INLINE_IMAGE_BYTES = 256 * 1024

log = structlog.get_logger("cutover.router")

http = FastAPI(title="cutover", description="Images API with shadow traffic and staged cutover.")

# What a failed primary answer becomes for the client.
FAILURE_STATUS = {
    OutputStatus.ERROR: 502,
    OutputStatus.OOM: 503,
    OutputStatus.TIMEOUT: 504,
    OutputStatus.BLANK: 502,
    OutputStatus.REJECTED: 422,
    OutputStatus.OVERLOAD: 503,
}
NO_ROLLOUT = "none"  # the stage recorded for a request on a route no rollout runs on
MAX_FORM_PARTS = 20
MAX_FORM_FILES = 3  # image and mask, and one more so a repeated file is named, not dropped


@dataclasses.dataclass
class Answer:
    """What the user gets for each image, and which model gave it."""

    results: list[ImageResult]
    models: list[str]
    fallback_cause: str | None = None


@serve.deployment
@serve.ingress(http)
class Router:
    def __init__(
        self,
        config: dict[str, Any],
        base_dir: str,
        models: dict[str, DeploymentHandle],
        log_level: str | None = None,
    ) -> None:
        configure_logging(level=log_level)
        self.config = Config.from_wire(config, base_dir)
        log_to_file(self.config.log_path)
        self.limits = self.config.server
        self.routes = self.config.route_map
        self.handles = models
        self.in_router = self._start_in_router_models(base_dir, log_level)
        self.tables = TableSource(self.config)
        self.recorder = Recorder(
            self.config.resolved_database_url,
            self.config.artifact_path,
            self.config.spill_path,
            timeouts=self.config.database,
            artifacts=artifacts_for(self.config),
        )
        self.mirrors_in_flight = 0
        self.mirrors_skipped = 0
        self.mirrors_started = 0
        self.fallbacks = 0
        self._background: set[asyncio.Task[Any]] = set()
        self.metrics = RouterMetrics(self.recorder, self) if self.limits.metrics else None

    @http.post("/v1/images/generations")
    async def generations(self, http_request: HttpRequest) -> JSONResponse:
        async def read() -> Ask:
            body = parse_images_request(await http_request.body(), self.limits)
            return generation_ask(body, self.config)

        return await self._handle(read, "generations")

    @http.post("/v1/images/edits")
    async def edits(self, http_request: HttpRequest) -> JSONResponse:
        async def read() -> Ask:
            return edit_ask(parse_edit(await self._form(http_request), self.limits), self.config)

        return await self._handle(read, "edits")

    @http.post("/v1/images/upscales")
    async def upscales(self, http_request: HttpRequest) -> JSONResponse:
        async def read() -> Ask:
            upload = parse_upscale(await self._form(http_request), self.limits)
            return upscale_ask(upload, self.config)

        return await self._handle(read, "upscales")

    def _start_in_router_models(self, base_dir: str, log_level: str | None) -> dict[str, Any]:
        """The models this replica serves itself (`in_router`): their calls skip a hop."""
        names = self.config.models_in_router()
        if not names:
            return {}
        from workers.model_server import ModelService

        return {
            name: ModelService(
                name,
                self.config.models[name].model_dump(mode="json"),
                base_dir,
                str(self.config.log_path),
                log_level,
            )
            for name in names
        }

    def check_health(self) -> None:
        """Ray Serve restarts this replica when a model it serves in-process is unhealthy."""
        for service in self.in_router.values():
            service.check_health()

    def set_faults(self, model: str, faults: dict[str, Any]) -> dict[str, Any]:
        """Fault injection for a model served in this router replica (tests, drills)."""
        if model not in self.in_router:
            raise KeyError(f"{model!r} is not served in the router; call its deployment")
        return self.in_router[model].set_faults(faults)

    @http.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        return {"status": "ok"}

    @http.get("/metrics")
    async def prometheus(self) -> Response:
        """This replica's series in Prometheus' text format (`server.metrics: false`: 404)."""
        if self.metrics is None:
            return JSONResponse(
                error_envelope("metrics are off (server.metrics: false)", "not_found"),
                status_code=404,
            )
        return Response(self.metrics.render(), media_type=CONTENT_TYPE)

    @http.get("/v1/rollouts")
    async def rollouts(self) -> dict[str, Any]:
        """Every rollout's routing table as this replica uses it now, and how old it is."""
        return {
            "rollouts": {name: t.as_dict() for name, t in self.tables.tables.items()},
            "routes": {route.value: r.model_dump(mode="json") for route, r in self.routes.items()},
            "table_age_s": round(self.tables.age(), 3),
        }

    @http.get("/v1/stats")
    async def stats(self) -> dict[str, Any]:
        return {
            "recorder": self.recorder.counters.as_dict(),
            "mirrors": {
                "started": self.mirrors_started,
                "skipped": self.mirrors_skipped,
                "in_flight": self.mirrors_in_flight,
            },
            "fallbacks": self.fallbacks,
            "in_router": sorted(self.in_router),
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

    # -- one request, whatever its endpoint -------------------------------------------------

    async def _handle(self, read: Callable[[], Awaitable[Ask]], endpoint: str) -> JSONResponse:
        request_id = str(uuid.uuid4())
        headers = {"x-cutover-request-id": request_id}
        metrics = self.metrics
        if metrics is not None:
            metrics.in_flight.inc()
        try:
            try:
                ask = await read()
            except BadRequest as exc:
                log.info("bad_request", request_id=request_id, errors=exc.errors)
                if metrics is not None:
                    metrics.bad_requests.labels(endpoint, str(exc.status)).inc()
                return JSONResponse(exc.body(), status_code=exc.status, headers=headers)
            started = time.perf_counter()
            response = await self._serve(ask, request_id, headers)
            if metrics is not None:
                route = ask.route.value
                metrics.request_latency.labels(route).observe(time.perf_counter() - started)
                metrics.requests.labels(
                    route,
                    headers["x-cutover-served-by"],
                    headers["x-cutover-stage"],
                    str(response.status_code),
                ).inc()
            return response
        except Exception as exc:  # a router bug: still the envelope, the headers and a log event
            log.exception("router_failed", request_id=request_id)
            return JSONResponse(
                error_envelope(
                    f"the router failed: {type(exc).__name__}",
                    "router_error",
                    request_id=request_id,
                ),
                status_code=500,
                headers=headers,
            )
        finally:
            if metrics is not None:
                metrics.in_flight.dec()

    async def _form(self, http_request: HttpRequest) -> list[tuple[str, Part]]:
        """The multipart parts as (name, text) or (name, (file name, bytes)); a body that is
        not multipart, or is malformed, is a 4xx naming the body."""
        kind = http_request.headers.get("content-type", "")
        if not kind.startswith("multipart/form-data"):
            raise BadRequest(
                415,
                [
                    {
                        "field": "body",
                        "message": f"content-type is {kind or 'missing'}; send multipart/form-data",
                    }
                ],
            )
        declared = int(http_request.headers.get("content-length") or 0)
        if declared > 2 * self.limits.max_upload_bytes + 65536:
            raise BadRequest(
                413,
                [{"field": "body", "message": f"body is {declared} bytes, over the upload limit"}],
            )
        try:
            form = await http_request.form(
                max_files=MAX_FORM_FILES,
                max_fields=MAX_FORM_PARTS,
                max_part_size=self.limits.max_prompt_chars * 4 + 1024,
            )
        except Exception as exc:  # starlette's multipart errors: the client's body, not us
            raise BadRequest(
                400,
                [{"field": "body", "message": f"not valid multipart/form-data: {exc}"}],
            ) from None
        parts: list[tuple[str, Part]] = []
        for name, value in form.multi_items():
            if isinstance(value, str):
                parts.append((name, value))
            else:
                parts.append((name, (value.filename or "", await value.read())))
        await form.close()
        return parts

    async def _serve(self, ask: Ask, request_id: str, headers: dict[str, str]) -> JSONResponse:
        route = self.routes[ask.route]
        table = self.tables.for_route(ask.route)
        sticky_key = ask.body.user or request_id
        arm = primary_role(table, sticky_key) if table else Arm.INCUMBENT
        model = table.model_of(arm) if table else route.model
        stage = table.stage if table else NO_ROLLOUT
        seed = ask.body.seed if ask.body.seed is not None else secrets.randbelow(2**31)
        jobs = ask.jobs(request_id, seed)
        mirrored = (
            table is not None
            and is_mirrored(table, request_id)
            and self._claim_mirror_slot(ask.route.value)
        )
        params = ask.params()
        # The request row is queued before any output, so its outputs never precede it in SQL.
        self.recorder.record(
            RequestRecord(
                id=request_id,
                rollout=table.rollout if table else None,
                route=ask.route.value,
                stage=stage,
                primary_role=arm.value,
                sticky_key=sticky_key,
                prompt=ask.body.prompt,
                params=params,
                seed=seed,
                mirrored=mirrored,
                created_at=utcnow(),
                tags=tags_of(ask.body.prompt, ask.route.value, params),
            )
        )
        headers |= {
            "x-cutover-route": ask.route.value,
            "x-cutover-stage": stage,
            "x-cutover-served-by": arm.value,
        }
        # Where the serving model fails, the route's fallback answers (the safety net the
        # route was given, sized for its deadline); on a route without one, a user the
        # candidate serves gets the incumbent's answer. The failure is recorded and judged.
        backup = route.fallback
        if backup is None and table is not None and arm is Arm.CANDIDATE:
            backup = table.incumbent if table.retry_on_incumbent else None
        answer = await self._answer(route, arm, model, jobs, (ask.route.value, stage), backup)
        if mirrored and table is not None:
            # Dispatched once the primary has answered: the mirror's routing and its result's
            # handling then never share the event loop with the user's request.
            self._spawn(self._mirror(table, arm.other, jobs))
        headers["x-cutover-model"] = answer.models[0]
        if answer.fallback_cause is not None:
            headers["x-cutover-fallback"] = answer.fallback_cause
        log.info(
            "served",
            request_id=request_id,
            rollout=table.rollout if table else None,
            route=ask.route.value,
            stage=stage,
            role=arm.value,
            model=answer.models[0],
            statuses=[r.status for r in answer.results],
            fallback=answer.fallback_cause,
            mirrored=mirrored,
        )
        failed = [r for r in answer.results if not r.ok]
        if failed:
            return JSONResponse(
                error_envelope(
                    f"the model failed: {failed[0].error}",
                    "model_error",
                    status=failed[0].status,
                    request_id=request_id,
                ),
                status_code=FAILURE_STATUS.get(OutputStatus(failed[0].status), 502),
                headers=headers,
            )
        data = [
            {"b64_json": base64.b64encode(r.png or b"").decode(), "seed": job.seed}
            for job, r in zip(jobs, answer.results, strict=True)
        ]
        return JSONResponse({"created": int(time.time()), "data": data}, headers=headers)

    async def _answer(
        self,
        route: RouteConfig,
        arm: Arm,
        model: str,
        jobs: list[ImageJob],
        where: tuple[str, str],
        backup: str | None,
    ) -> Answer:
        """The serving model's answer, or for each image it failed on (per `fallback_on`) the
        backup model's, inside the request's own timeout. Both attempts are recorded."""
        started = time.monotonic()
        timeout = self.limits.request_timeout
        first = timeout
        if backup and route.fallback_after is not None:
            first = min(route.fallback_after, timeout)
        elif backup and backup != route.fallback:
            # The incumbent backs a candidate's user: the candidate gets half the time, so
            # a candidate that hangs (its node died) still leaves the incumbent time to answer.
            first = timeout / 2
        results = await self._call_all(model, jobs, first)
        ids = await self._record(arm, model, jobs, results, first, is_primary=True, where=where)
        answer = Answer(list(results), [model] * len(jobs))
        failed = [i for i, r in enumerate(results) if backup and r.status in route.fallback_on]
        remaining = timeout - (time.monotonic() - started)
        if not failed or backup is None or remaining <= 0:
            return answer
        retried = await self._call_all(backup, [jobs[i] for i in failed], remaining)
        await self._record(
            Arm.FALLBACK,
            backup,
            [jobs[i] for i in failed],
            retried,
            remaining,
            is_primary=True,
            where=where,
            fallback_of=[ids[i] for i in failed],
        )
        for i, result in zip(failed, retried, strict=True):
            answer.results[i] = result
            answer.models[i] = backup
        answer.fallback_cause = results[failed[0]].status
        self.fallbacks += 1
        if self.metrics is not None:
            self.metrics.fallbacks.labels(where[0], backup, answer.fallback_cause).inc()
        return answer

    def _claim_mirror_slot(self, route: str) -> bool:
        claimed = self.mirrors_in_flight < self.limits.mirror_max_in_flight
        if claimed:
            self.mirrors_in_flight += 1
            self.mirrors_started += 1
        else:
            self.mirrors_skipped += 1
        if self.metrics is not None:
            self.metrics.mirrors.labels(route, "started" if claimed else "skipped").inc()
        return claimed

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _mirror(self, table: RoutingTable, arm: Arm, jobs: list[ImageJob]) -> None:
        model = table.model_of(arm)
        try:
            results = await self._call_all(model, jobs, self.limits.mirror_timeout)
            await self._record(
                arm,
                model,
                jobs,
                results,
                self.limits.mirror_timeout,
                is_primary=False,
                where=(table.route, table.stage),
            )
        except Exception:  # a mirror must never take anything down with it
            log.exception(
                "mirror_failed",
                request_id=jobs[0].request_id,
                rollout=table.rollout,
                stage=table.stage,
                role=arm.value,
            )
        finally:
            self.mirrors_in_flight -= 1

    async def _call_all(
        self, model: str, jobs: list[ImageJob], timeout: float
    ) -> list[ImageResult]:
        return list(await asyncio.gather(*(self._call(model, job, timeout) for job in jobs)))

    async def _call(self, model: str, job: ImageJob, timeout: float) -> ImageResult:
        start = time.perf_counter()
        # The deadline travels with the job: the model server refuses work that cannot finish
        # by then, drops it unstarted once it has passed, and stops sampling between steps.
        job = dataclasses.replace(job, deadline=time.time() + timeout)
        service = self.in_router.get(model)
        # In-process, wait_for cancels the coroutine on timeout; a handle's call is cancelled.
        response = (
            self.handles[model].generate.remote(job) if service is None else service.generate(job)
        )
        try:
            return await asyncio.wait_for(response, timeout)
        except TimeoutError:
            if service is None:
                response.cancel()
            return ImageResult(
                OutputStatus.TIMEOUT,
                error=f"no answer within {timeout:g}s",
                latency_ms=(time.perf_counter() - start) * 1000,
            )
        except Exception as exc:  # the replica died or Ray failed: a model error, recorded as such
            return ImageResult(
                OutputStatus.ERROR,
                error=f"{type(exc).__name__}: {exc}"[:2000],
                latency_ms=(time.perf_counter() - start) * 1000,
            )

    async def _record(
        self,
        role: Arm,
        model: str,
        jobs: list[ImageJob],
        results: list[ImageResult],
        timeout_s: float,
        *,
        is_primary: bool,
        where: tuple[str, str],
        fallback_of: list[str] | None = None,
    ) -> list[str]:
        """Hand one output record per image to the recorder; returns their ids (a fallback
        links to them).

        `record` writes each image's file and journals its row before the answer goes out
        (so a killed replica loses neither). For large images that takes milliseconds the
        event loop's other requests should not wait for, so it runs in a worker thread;
        small ones are written in place, which costs less than the hop to a thread."""
        now = utcnow()
        if self.metrics is not None:
            self._count_outputs(role, model, results, where)
        ids = [str(uuid.uuid4()) for _ in jobs]
        records = [
            OutputRecord.of(
                ids[i],
                job,
                result,
                role=role.value,
                model=model,
                is_primary=is_primary,
                timeout_s=timeout_s,
                created_at=now,
                fallback_of=fallback_of[i] if fallback_of else None,
            )
            for i, (job, result) in enumerate(zip(jobs, results, strict=True))
        ]
        pngs = [r.png for r in results]
        if sum(len(png or b"") for png in pngs) <= INLINE_IMAGE_BYTES:
            self._hand_over(records, pngs)
        else:
            await asyncio.to_thread(self._hand_over, records, pngs)
        return ids

    def _hand_over(self, records: list[OutputRecord], pngs: list[bytes | None]) -> None:
        for record, png in zip(records, pngs, strict=True):
            self.recorder.record(record, png=png)

    def _count_outputs(
        self,
        role: Arm,
        model: str,
        results: list[ImageResult],
        where: tuple[str, str],
    ) -> None:
        metrics = self.metrics
        assert metrics is not None
        route, stage = where
        for result in results:
            metrics.outputs.labels(route, model, role.value, stage, result.status).inc()
            metrics.latency.labels(route, model, role.value).observe(result.latency_ms / 1000)
            if result.batch_size:
                metrics.batch_size.labels(model).observe(result.batch_size)
            if result.batch_ooms:
                metrics.oom_splits.labels(model).inc(result.batch_ooms)
