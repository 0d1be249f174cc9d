"""Rendering a lab run's suite items on the models it compares: one Ray Serve application per
model, all called at once through their handles.

Each model runs the ModelServer a rollout deploys (`controller/serving/app.py`), so its
batching, precision, deadlines and fault injection are the ones production will see.
Every model is sent its share of a round at the same time, so the models render side by
side on whatever the cluster has, not one after another.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import structlog

from controller.config import ROUTE_KINDS, Config, Route
from controller.lab.suites import Suite, SuiteItem
from policies.prompt_tags import tags_of, with_hand_tags
from workers.images import mask_area
from workers.jobs import ImageJob, ImageResult

log = structlog.get_logger("cutover.lab")
APP_PREFIX = "cutover-lab-"
# Routes whose items are rendered twice at one seed, for the edit determinism probe.
REPEATED = {Route.EDIT, Route.INPAINT}


@dataclass(frozen=True)
class LabUnit:
    """One suite item at one seed: what every model of a run renders once."""

    key: str  # suite/item/seed index
    suite: str
    item: SuiteItem
    suite_dir: Path
    seed: int
    # An edit rendered a second time with the first seed: the key of the first render, which
    # the determinism probe compares it with (`policies/probes/fidelity.py`).
    repeat_of: str | None = None

    @cached_property
    def tags(self) -> tuple[str, ...]:
        """The item's prompt tags (`policies/prompt_tags.py`) and its own, as `tag:<name>`."""
        params: dict[str, Any] = {"size": self.item.size} if self.item.size else {}
        if self.item.mask:
            params["mask_area"] = mask_area((self.suite_dir / self.item.mask).read_bytes())
        derived = tags_of(self.item.prompt, self.item.route.value, params)
        return tuple(with_hand_tags(derived, self.item.tags))

    def job(self, default_size: str) -> ImageJob:
        """The request the router would have sent for this item (same seed on every model)."""
        image = (self.suite_dir / self.item.image).read_bytes() if self.item.image else None
        mask = (self.suite_dir / self.item.mask).read_bytes() if self.item.mask else None
        width, height = _size(self.item, image, default_size)
        return ImageJob(
            request_id=f"lab:{self.key}",
            image_index=0,
            prompt=self.item.prompt,
            seed=self.seed,
            width=width,
            height=height,
            image=image,
            mask=mask,
        )


def _size(item: SuiteItem, image: bytes | None, default_size: str) -> tuple[int, int]:
    """The item's size; else an edit keeps its input's size and an upscale makes it 4x."""
    if item.size:
        width, height = item.size.split("x")
        return int(width), int(height)
    if image is not None:
        from workers.images import from_png

        h, w = from_png(image).shape[:2]
        scale = 4 if item.route == Route.UPSCALE else 1
        return w * scale, h * scale
    width, height = default_size.split("x")
    return int(width), int(height)


def units_of(suites: Iterable[tuple[Suite, Path]], seeds: int, routes: set[Route]) -> list[LabUnit]:
    """Every item of these routes at `seeds` seeds, in suite order: the item's own seed (or
    one drawn from its id), then the next ones; an edit once more at its first seed."""
    units = []
    for suite, path in suites:
        for item in suite.items:
            if item.route not in routes:
                continue
            first = item.seed if item.seed is not None else _seed_of(suite.suite, item.id)
            key = f"{suite.suite}/{item.id}"
            for k in range(seeds):
                units.append(LabUnit(f"{key}/{k}", suite.suite, item, path.parent, first + k))
            if item.route in REPEATED:  # the same request again: does it give the same image?
                again = LabUnit(f"{key}/again", suite.suite, item, path.parent, first, f"{key}/0")
                units.append(again)
    return units


def _seed_of(suite: str, item: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{suite}/{item}".encode()).digest()[:4], "big") >> 1


def routes_served(config: Config, models: Iterable[str]) -> set[Route]:
    """The routes every one of these models can serve (so every unit pairs on all of them)."""
    kinds = [config.models[m].kind for m in models]
    return {route for route, allowed in ROUTE_KINDS.items() if all(k in allowed for k in kinds)}


class LabRenderer:
    """The run's models on Ray Serve, each an application of its own, deployed when first
    asked for (a resumed run with nothing left to render starts nothing)."""

    def __init__(self, config: Config, models: list[str]) -> None:
        self.config = config
        self.apps = {name: APP_PREFIX + name for name in models}
        self.handles: dict[str, Any] = {}

    def _handle(self, model: str) -> Any:
        if model not in self.handles:
            from ray import serve

            from controller.serving.app import model_deployment

            ensure_ray(self.config, list(self.apps))
            self.handles[model] = serve.run(
                model_deployment(self.config, model),
                name=self.apps[model],
                route_prefix=None,
                blocking=False,
            )
            log.info("lab_model_deployed", role=model)
        return self.handles[model]

    def submit(self, model: str, job: ImageJob) -> Any:
        """Start one render; `.result()` on what it returns waits for the ImageResult."""
        return self._handle(model).generate.remote(job)

    @staticmethod
    def result(response: Any, timeout_s: float | None = None) -> ImageResult:
        return response.result(timeout_s=timeout_s)

    def close(self) -> None:
        from ray import serve

        for model in self.handles:  # deleted together: one after another takes seconds each
            serve.delete(self.apps[model], _blocking=False)


def ensure_ray(config: Config, models: list[str]) -> None:
    """A local Ray sized for these models, with Serve but no HTTP proxy (the lab calls its
    models through handles), unless this process is already connected to one."""
    import ray
    from ray import serve

    from controller.serving.app import start_local_ray

    if ray.is_initialized():
        return
    cpus = sum(config.models[m].num_cpus * config.models[m].replicas for m in models)
    start_local_ray(max(math.ceil(cpus) + 1, os.cpu_count() or 1), "cutover-lab")
    serve.start(proxy_location="Disabled")
