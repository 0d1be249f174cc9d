"""A lab run, end to end: render every unit on every model, score, compare, rank; resumable.

Rounds of units go to every model at once (`render.py`). While the next round renders,
this process scores the last one (OCR of quoted text on each image, and each model's
colour shift against the baseline's image of the same item and seed) and folds every
settled pair into that model's comparison (`compare.py`). A model a critical check shows
worse than the baseline stops being rendered.

Every rendered image is a row of `lab_outputs` the moment it arrives, and its scores
are written onto that row, so a run killed at any point resumes where it stopped: a
rerun finds its `lab_runs` row by key (the suites' versions, the models' settings, the
baseline and the seeds) and renders only what has no row yet.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import structlog
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from controller.config import Config
from controller.lab.compare import (
    LabImage,
    ModelTally,
    Standing,
    bakeoff_alpha,
    lab_policy,
    lines,
    losing,
    median_figure,
    rank,
)
from controller.lab.render import LabUnit, routes_served, units_of
from controller.lab.suites import Suite, find_suite, load_suite
from controller.rollout.scoring import run_probes
from controller.storage.artifact_store import artifacts_for, ensure_local
from controller.storage.artifacts import artifact_path
from controller.storage.store import Store
from controller.storage.tables import LabOutput, LabRun, utcnow
from policies.checks import CheckResult
from policies.policy import Check, Policy
from policies.probes.pack import ProbeContext, probes_for
from policies.probes.typography import ENGINES
from workers.images import from_png, pil_image
from workers.jobs import ImageJob, ImageResult, OutputStatus

log = structlog.get_logger("cutover.lab")


@dataclass(frozen=True)
class Judging:
    """The checks a run applies and each one's alpha."""

    policy: Policy
    alpha_for: Callable[[Check], float]
    figure_alpha: float  # each latency and cost interval's
    slice_share: float = 1.0  # of the policy's slice budget, per model compared


def bakeoff_judging(policy: Policy, compared: int) -> Judging:
    """Zero tolerance, one alpha over every check of every model (`compare.py` says why)."""
    lab = lab_policy(policy)
    figure_alpha = lab.alpha / (compared + 1)
    return Judging(lab, bakeoff_alpha(lab, compared), figure_alpha, 1 / max(compared, 1))


def validation_judging(policy: Policy) -> Judging:
    """The rollout's own policy, tolerances and alphas as in shadow."""
    return Judging(policy, policy.alpha_for, policy.alpha / 2)


@dataclass(frozen=True)
class LabPlan:
    """What a run renders: units (suite items at seeds) on the baseline and each model."""

    kind: str  # bakeoff | validate
    suites: dict[str, int]  # suite: version
    models: list[str]  # compared with the baseline
    baseline: str
    seeds: int
    units: list[LabUnit]
    suite_files: dict[str, str]  # suite: the file it was read from (the report reads items)
    pipelines: dict[str, str]  # every model of the run (baseline too): its pipeline
    settings: dict[str, str]  # every model's whole config, fingerprinted (`settings_of`)
    devices: dict[str, float]  # GPUs (else CPUs) each model's replica holds: its cost

    @property
    def everyone(self) -> list[str]:
        return [self.baseline, *self.models]

    @property
    def key(self) -> str:
        """The same suites, models (with all their settings), baseline and seeds find the same
        run: one pipeline served with other settings (sampler, precision, faults) is another
        model, and must not reuse the first one's images."""
        what = [self.kind, self.suites, self.settings, self.baseline, self.models, self.seeds]
        return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()


def plan_run(
    config: Config,
    suite_names: list[str],
    models: list[str],
    baseline: str,
    seeds: int,
    kind: str = "bakeoff",
) -> LabPlan:
    """Check the names and build the plan; a ValueError says which name is wrong and why."""
    everyone = [baseline, *models]
    pool = ", ".join(config.models)
    for name in everyone:
        if name not in config.models:
            raise ValueError(f"there is no model {name!r} in the config's models: ({pool})")
    if baseline in models:
        raise ValueError(f"--baseline {baseline!r} is also in --models; compare it with others")
    if len(set(models)) != len(models) or not models:
        raise ValueError("--models needs one or more distinct model names, for example A,B,C")
    files: list[tuple[Suite, Path]] = []
    for name in suite_names:
        path = find_suite(name)
        files.append((load_suite(path), path))
    routes = routes_served(config, everyone)
    units = units_of(files, seeds, routes)
    if not units:
        kinds = sorted({config.models[m].kind.value for m in everyone})
        raise ValueError(
            f"the suites have no item that every model can serve (kinds {', '.join(kinds)}); "
            "choose suites of the models' route, or models of one kind"
        )
    return LabPlan(
        kind,
        {suite.suite: suite.version for suite, _ in files},
        list(models),
        baseline,
        seeds,
        units,
        {suite.suite: str(path.resolve()) for suite, path in files},
        {m: config.models[m].pipeline for m in everyone},
        {m: settings_of(config, m) for m in everyone},
        {m: config.models[m].num_gpus or config.models[m].num_cpus for m in everyone},
    )


def settings_of(config: Config, model: str) -> str:
    """A fingerprint of everything that makes a model render what it renders."""
    dump = json.dumps(config.models[model].model_dump(mode="json"), sort_keys=True)
    return hashlib.sha256(dump.encode()).hexdigest()[:12]


class LabScorer:
    """The probes a lab image gets (`policies/probes/pack.py`, as in shadow): the typography
    probes of the prompt's quoted text; for a compared model, the colour and skin-tone shift
    against the baseline's image of the same unit; for an edit or upscale, fidelity to the
    item's input image (which the lab has and shadow does not)."""

    def __init__(self, policy: Policy, artifacts: Path) -> None:
        self.engine_name = policy.ocr_engine
        self.artifacts = artifacts
        self.wanted = {check.metric for check in policy.checks}
        self._local = threading.local()

    def _ocr(self) -> Any:
        if not hasattr(self._local, "engine"):
            self._local.engine = ENGINES[self.engine_name]()
        return self._local.engine

    def image(self, sha256: str) -> Any:
        path = ensure_local(artifact_path(self.artifacts, sha256))
        if path is None:
            raise FileNotFoundError(f"image {sha256} is in neither {self.artifacts} nor the store")
        return from_png(path.read_bytes())

    def score(
        self,
        unit: LabUnit,
        sha256: str,
        baseline_sha256: str | None,
        first_sha256: str | None = None,
    ) -> dict[str, Any]:
        """`first_sha256`: for a repeated edit, the same model's first render at that seed."""
        item = unit.item
        source = (unit.suite_dir / item.image) if item.image else None
        mask = (unit.suite_dir / item.mask) if item.mask else None
        context = ProbeContext(
            prompt=item.prompt,
            route=item.route.value,
            ocr=self._ocr,
            partner=(lambda: self.image(baseline_sha256)) if baseline_sha256 else None,
            source=(lambda: from_png(source.read_bytes())) if source else None,
            mask=(lambda: np.asarray(pil_image(mask.read_bytes(), "L"))) if mask else None,
            first_render=(lambda: self.image(first_sha256)) if first_sha256 else None,
        )
        probes = probes_for(context, self.wanted)
        try:
            image = self.image(sha256)
        except OSError as exc:
            return {"values": {}, "errors": dict.fromkeys(probes, f"image unreadable: {exc}")}
        probed = run_probes(probes, image, rollout="lab")
        return {
            "values": {name: value for name, value, error in probed if error is None},
            "errors": {name: error for name, _, error in probed if error is not None},
        }


@dataclass
class RunStats:
    submitted: int = 0  # renders asked of the models by this invocation
    rendered: int = 0  # images it recorded
    render_seconds: float = 0.0
    by_model: dict[str, int] = field(default_factory=dict)


class LabSession:
    """One invocation of a bake-off or validation: `run()` renders what is missing, then ranks."""

    def __init__(
        self,
        config: Config,
        store: Store,
        plan: LabPlan,
        judging: Judging,
        renderer: Any,
        *,
        round_size: int = 32,
        early_stop: bool = True,
        on_recorded: Callable[[int], None] | None = None,
    ) -> None:
        self.config, self.store, self.plan, self.judging = config, store, plan, judging
        self.renderer = renderer
        self.round_size = round_size
        self.early_stop = early_stop
        self.on_recorded = on_recorded  # called with the run's row count after each image
        self.scorer = LabScorer(judging.policy, config.artifact_path)
        self.stats = RunStats()
        self.run_id, self.result = self._open()
        self.rows: dict[tuple[str, str], LabOutput] = self._existing()
        self.tallies = {m: ModelTally(m, judging.policy, plan.devices[m]) for m in plan.models}
        for model, claims in (self.result or {}).get("claims", {}).items():
            self.tallies[model].claims = {k: CheckResult(**v) for k, v in claims.items()}
        for model, reason in (self.result or {}).get("stopped", {}).items():
            self.tallies[model].stopped = reason
        self._folded: set[tuple[str, str]] = set()
        self._scoring: ThreadPoolExecutor | None = None

    def _open(self) -> tuple[int, dict[str, Any] | None]:
        plan = self.plan
        with self.store.session() as session:
            row = session.scalars(select(LabRun).where(LabRun.key == plan.key)).one_or_none()
            if row is None:
                row = LabRun(
                    key=plan.key,
                    kind=plan.kind,
                    suites=plan.suites,
                    models=plan.pipelines,
                    baseline=plan.baseline,
                    seeds=plan.seeds,
                    created_at=utcnow(),
                )
                session.add(row)
                session.flush()
                log.info("lab_run_started", run=row.id, kind=plan.kind, units=len(plan.units))
            else:
                log.info("lab_run_resumed", run=row.id, kind=plan.kind)
            return row.id, row.result

    def _existing(self) -> dict[tuple[str, str], LabOutput]:
        with self.store.reader() as session:
            rows = session.scalars(select(LabOutput).where(LabOutput.run_id == self.run_id)).all()
            session.expunge_all()
        return {(r.model, r.unit): r for r in rows}

    def run(self) -> dict[str, Any]:
        """Render, score and compare every round; the result (also stored on the run's row).

        A thread renders every unit in one stream while this one scores and judges each
        round as its last image arrives: the probes never hold the models up, no model
        waits for the others at a round's end, and a stopped model is sent nothing more.
        """
        rounds = [
            self.plan.units[i : i + self.round_size]
            for i in range(0, len(self.plan.units), self.round_size)
        ]
        finished: queue.Queue[int | BaseException | None] = queue.Queue()

        def render_all() -> None:
            started = time.perf_counter()
            try:
                self._render(rounds, finished.put)
            except BaseException as exc:  # handed to the main thread, which raises it
                finished.put(exc)
            finally:
                self.stats.render_seconds = time.perf_counter() - started
                finished.put(None)

        with ThreadPoolExecutor(2, thread_name_prefix="cutover-lab-score") as scoring:
            self._scoring = scoring
            for units in rounds:  # what an earlier invocation rendered is folded first
                self._settle(units)
            renderer = threading.Thread(target=render_all, name="cutover-lab-render", daemon=True)
            renderer.start()
            while (item := finished.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                self._settle(rounds[item])
                self._judge(final=False, last_round=item == len(rounds) - 1)
            renderer.join()
        return self._judge(final=True)

    def _window(self, model: str) -> int:
        """Renders in flight per model: three batches per replica, so a replica always has
        its next batch waiting, and latency is a few batches' time, not a whole round's queue
        (every job at once renders about a fifth faster on 2 cores, but then latency measures
        the queue: bench/bakeoff_throughput.py)."""
        settings = self.config.models[model]
        batch = (
            settings.batch_size if isinstance(settings.batch_size, int) else settings.max_batch_size
        )
        return 3 * batch * settings.replicas

    def _stopped(self, model: str) -> bool:
        tally = self.tallies.get(model)  # the baseline has none: it is never stopped
        return tally is not None and tally.stopped is not None

    def _render(self, rounds: list[list[LabUnit]], round_done: Callable[[int], None]) -> None:
        """Every model's missing units, all models at once, each kept at its window of renders
        in flight and refilled the moment any render is back; each image is recorded as it
        arrives, and `round_done(i)` is called once every model has round i (or was stopped)."""
        asyncio.run(self._render_all(rounds, round_done))

    async def _render_all(
        self, rounds: list[list[LabUnit]], round_done: Callable[[int], None]
    ) -> None:
        size = self.config.server.default_size
        jobs: dict[str, ImageJob] = {}
        todo = {
            model: deque(u for units in rounds for u in units if (model, u.key) not in self.rows)
            for model in self.plan.everyone
        }
        flying: dict[asyncio.Future[ImageResult], tuple[str, LabUnit]] = {}
        in_flight = dict.fromkeys(todo, 0)
        models = deque(todo)
        next_round = 0

        def complete(units: list[LabUnit]) -> bool:
            return all(
                (m, u.key) in self.rows or self._stopped(m)
                for u in units
                for m in self.plan.everyone
            )

        while True:
            # Who is sent work first turns with every pass: on shared hardware the model
            # always sent first would render first, and its latency would look better.
            models.rotate(1)
            for model in models:
                if self._stopped(model):
                    todo[model].clear()
                while todo[model] and in_flight[model] < self._window(model):
                    unit = todo[model].popleft()
                    if unit.key not in jobs:
                        jobs[unit.key] = unit.job(size)
                    response = self.renderer.submit(model, jobs[unit.key])
                    self.stats.submitted += 1
                    flying[asyncio.ensure_future(self._outcome(response))] = (model, unit)
                    in_flight[model] += 1
            if not flying:
                break
            done, _ = await asyncio.wait(flying, return_when=asyncio.FIRST_COMPLETED)
            for future in done:
                model, unit = flying.pop(future)
                in_flight[model] -= 1
                self._record(model, unit, future.result())
            while next_round < len(rounds) and complete(rounds[next_round]):
                round_done(next_round)
                next_round += 1
        for index in range(next_round, len(rounds)):
            round_done(index)  # nothing more will come for these (a record another run made)

    async def _outcome(self, response: Any) -> ImageResult:
        try:
            return await response
        except Exception as exc:  # the replica died: a model error, recorded like one
            return ImageResult(OutputStatus.ERROR, error=f"{type(exc).__name__}: {exc}")

    def _record(self, model: str, unit: LabUnit, result: ImageResult) -> None:
        sha = artifacts_for(self.config).put(result.png) if result.png else None
        row = LabOutput(
            run_id=self.run_id,
            model=model,
            unit=unit.key,
            status=result.status,
            error=result.error,
            latency_ms=result.latency_ms,
            batch_size=result.batch_size or None,
            artifact_sha256=sha,
            created_at=utcnow(),
        )
        try:
            with self.store.session() as session:
                session.add(row)
                session.flush()
                session.expunge(row)
        except IntegrityError:  # another invocation of the same run recorded it first
            return
        self.rows[(model, unit.key)] = row
        self.stats.rendered += 1
        self.stats.by_model[model] = self.stats.by_model.get(model, 0) + 1
        log.info(
            "lab_rendered",
            request_id=f"lab:{unit.key}",
            rollout=self.plan.kind,
            role=model,
            status=result.status,
            latency_ms=round(result.latency_ms, 1),
        )
        if self.on_recorded is not None:
            self.on_recorded(len(self.rows))

    def _settle(self, units: list[LabUnit]) -> None:
        """Score what is unscored among these units, then fold every pair that is complete."""
        work = []
        for unit in units:
            base = self.rows.get((self.plan.baseline, unit.key))
            for model in self.plan.everyone:
                row = self.rows.get((model, unit.key))
                if row is None or row.scores is not None:
                    continue
                if row.status != OutputStatus.OK or row.artifact_sha256 is None:
                    row.scores = {"values": {}, "errors": {}}
                    work.append((row, None))
                    continue
                partner = None
                if model != self.plan.baseline:
                    if base is None:
                        continue  # scored once the baseline's image is there to compare with
                    partner = base.artifact_sha256 if base.status == OutputStatus.OK else None
                first = self.rows.get((model, unit.repeat_of)) if unit.repeat_of else None
                repeat = first.artifact_sha256 if first is not None else None
                score = self.scorer.score
                assert self._scoring is not None
                job = self._scoring.submit(score, unit, row.artifact_sha256, partner, repeat)
                work.append((row, job))
        if work:
            with self.store.session() as session:
                for row, future in work:
                    if future is not None:
                        row.scores = future.result()
                    session.execute(
                        update(LabOutput).where(LabOutput.id == row.id).values(scores=row.scores)
                    )
        for unit in units:
            base = self.rows.get((self.plan.baseline, unit.key))
            if base is None or base.scores is None:
                continue
            for model, tally in self.tallies.items():
                row = self.rows.get((model, unit.key))
                if row is None or row.scores is None or (model, unit.key) in self._folded:
                    continue
                self._folded.add((model, unit.key))
                tags = unit.tags
                baseline_devices = self.plan.devices[self.plan.baseline]
                tally.fold(_image(row, tags), _image(base, tags), baseline_devices)

    def _judge(self, final: bool, last_round: bool = False) -> dict[str, Any]:
        judging = self.judging
        standings: list[Standing] = []
        for model, tally in self.tallies.items():
            now = tally.standing(judging.alpha_for, judging.figure_alpha, judging.slice_share)
            if self.early_stop and tally.stopped is None and not final and not last_round:
                tally.stopped = losing(now)
                if tally.stopped:
                    log.warning(
                        "lab_model_stopped",
                        rollout=self.plan.kind,
                        role=model,
                        pairs=now.units,
                        reason=tally.stopped,
                    )
            standings.append(dataclasses.replace(now, stopped=tally.stopped))
        ranked = rank(standings)
        said = lines(ranked)
        base = [
            r.latency_ms
            for (m, _), r in list(self.rows.items())
            if m == self.plan.baseline and r.status == OutputStatus.OK and r.latency_ms
        ]
        result = {
            "kind": self.plan.kind,
            "run": self.run_id,
            "baseline": self.plan.baseline,
            "suites": self.plan.suites,
            "suite_files": self.plan.suite_files,
            "seeds": self.plan.seeds,
            "units": len(self.plan.units),
            "alpha": judging.policy.alpha,
            "rendered_now": self.stats.rendered,
            "images_per_second": (
                self.stats.rendered / self.stats.render_seconds
                if self.stats.render_seconds
                else None
            ),
            "baseline_latency_ms_p50": median_figure(base, judging.figure_alpha).as_dict(),
            "ranking": [{**s.as_dict(), "lines": said[s.model]} for s in ranked],
            "claims": {
                m: {k: v.as_dict() for k, v in t.claims.items()} for m, t in self.tallies.items()
            },
            "stopped": {m: t.stopped for m, t in self.tallies.items() if t.stopped},
        }
        with self.store.session() as session:
            session.execute(
                update(LabRun)
                .where(LabRun.id == self.run_id)
                .values(result=result, finished_at=utcnow() if final else None)
            )
        self.result = result
        return result


def _image(row: LabOutput, tags: tuple[str, ...]) -> LabImage:
    scores = row.scores or {}
    return LabImage(
        row.unit,
        row.status,
        latency_ms=row.latency_ms,
        batch_size=row.batch_size,
        scores=scores.get("values", {}),
        errors=scores.get("errors", {}),
        tags=tags,
    )


def run_on_ray(
    config: Config, store: Store, plan: LabPlan, judging: Judging, **options: Any
) -> dict[str, Any]:
    """Deploy the plan's models, run the session, take the models down again."""
    import logging

    from controller.lab.render import LabRenderer

    for name in ("ray", "ray.serve"):  # Serve's INFO lines per deployment would drown the result
        logging.getLogger(name).setLevel(logging.WARNING)
    renderer = LabRenderer(config, plan.everyone)
    try:
        return LabSession(config, store, plan, judging, renderer, **options).run()
    finally:
        renderer.close()
