"""The scorer pool: probes run in Ray actors with CPUs of their own, never in the loop.

OCR costs about a third of a second an image: run in the controller loop's process it
halved the router's throughput and fell behind the traffic. Each actor reserves
`scorer.num_cpus` from Ray, so the serving replicas keep theirs, and the pool grows by
adding actors: they claim disjoint batches (`scoring.claim`), so two never score the same
output, and one that dies leaves claims that expire and are taken over.
"""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import structlog
from sqlalchemy import select

from controller.config import Config
from controller.rollout.scoring import Scorer, claim, default_holder
from controller.storage.artifact_store import artifacts_for
from controller.storage.store import Store
from controller.storage.tables import Rollout, utcnow
from policies.policy import load_policy
from workers.logs import configure_logging, log_to_file, one_line

log = structlog.get_logger("cutover.scorer")

REPEAT_AFTER = 60.0  # s between two log lines of the same failure


class ScorerWorker:
    """One scorer: claims a batch of any of the config's rollouts, probes it, writes it.

    A plain class, so it runs in a thread as well as in a Ray actor (`ScorerPool`).
    """

    def __init__(self, config: Config, index: int = 0, store: Store | None = None) -> None:
        self.config = config
        self.settings = config.scorer
        self.store = store or Store.for_config(config)
        artifacts_for(config)  # images only the object store has are fetched from it
        self.holder = default_holder(f"scorer-{index}")
        self._scorers: dict[int, Scorer] = {}
        self._stop = threading.Event()
        self.scored = 0

    def _rollouts(self) -> dict[int, Scorer]:
        """The config's rollouts that exist in the database, each with its policy's scorer."""
        plans = self.config.plans()
        with self.store.reader() as session:
            rows = session.execute(
                select(Rollout.id, Rollout.name).where(Rollout.name.in_(list(plans)))
            ).all()
        for rollout_id, name in rows:
            if rollout_id not in self._scorers:
                policy = load_policy(plans[name].policy_path)
                self._scorers[rollout_id] = Scorer(
                    policy, self.config.artifact_path, holder=self.holder
                )
        return self._scorers

    def step(self) -> int:
        """Claim one batch and settle it; how many outputs were settled (0: nothing to do)."""
        scorers = self._rollouts()
        if not scorers:
            return 0
        now = utcnow()
        ttl = timedelta(seconds=self.settings.claim_ttl)
        claimed = claim(self.store, self.holder, list(scorers), self.settings.batch, now, ttl)
        settled = 0
        for rollout_id, output_ids in claimed.items():
            with structlog.contextvars.bound_contextvars(scorer=self.holder):
                settled += scorers[rollout_id].score(self.store, output_ids, now)
        self.scored += settled
        return settled

    def run(self) -> int:
        """Score until `stop`; an idle worker waits `poll_interval` between claims. A failing
        step (the database is down) is tried again after the same wait, and logged once a
        minute while it keeps failing the same way."""
        log.info("scorer_started", holder=self.holder)
        said: tuple[str, float] | None = None  # the last error logged, and when
        while not self._stop.is_set():
            try:
                busy = self.step() > 0
            except Exception as exc:
                error, now = one_line(exc), time.monotonic()
                if said is None or said[0] != error or now - said[1] > REPEAT_AFTER:
                    # Once a minute for the same error: an outage must not flood the log.
                    log.error("scorer_step_failed", holder=self.holder, error=error)
                    said = (error, now)
                busy = False
            if not busy:
                self._stop.wait(self.settings.poll_interval)
        log.info("scorer_stopped", holder=self.holder, scored=self.scored)
        return self.scored

    def stop(self) -> None:
        self._stop.set()

    def stats(self) -> dict[str, Any]:
        return {"holder": self.holder, "scored": self.scored}


class _ActorScorer(ScorerWorker):
    """The worker as a Ray actor: rebuilt from the config's wire form, logging where the
    replicas log."""

    def __init__(self, wire: tuple[dict[str, Any], str], index: int, log_level: str) -> None:
        configure_logging(level=log_level)
        config = Config.from_wire(*wire)
        log_to_file(Path(config.log_path))
        super().__init__(config, index)


class ScorerPool:
    """`scorer.actors` Ray actors, each reserving `scorer.num_cpus`, placed by `placement`."""

    def __init__(self, config: Config, log_level: str = "INFO") -> None:
        self.config = config
        self.log_level = log_level
        self.actors: list[Any] = []
        self._runs: list[Any] = []

    def start(self) -> None:
        import ray

        settings = self.config.scorer
        remote = ray.remote(_ActorScorer)
        for index in range(settings.actors):
            actor = remote.options(
                name=f"cutover-scorer-{self.config.name}-{index}",
                num_cpus=settings.num_cpus,
                resources=dict(settings.resources),
                scheduling_strategy="SPREAD" if settings.placement == "spread" else "DEFAULT",
                max_concurrency=2,  # `stop` and `stats` answer while `run` works
            ).remote(self.config.to_wire(), index, self.log_level)
            self.actors.append(actor)
            self._runs.append(actor.run.remote())
        log.info("scorer_pool_started", actors=settings.actors, num_cpus=settings.num_cpus)

    def stats(self) -> list[dict[str, Any]]:
        import ray

        return list(ray.get([a.stats.remote() for a in self.actors], timeout=30))

    def stop(self, timeout: float = 30.0) -> int:
        """Stop every actor after its current batch; how many outputs the pool scored."""
        import ray

        if not self.actors:
            return 0
        ray.get([a.stop.remote() for a in self.actors], timeout=timeout)
        scored = sum(ray.get(self._runs, timeout=timeout))
        for actor in self.actors:
            ray.kill(actor)
        self.actors, self._runs = [], []
        log.info("scorer_pool_stopped", scored=scored)
        return scored
