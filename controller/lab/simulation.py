"""Seeded bake-offs without rendering: what the comparison's promises have to survive.

Each model renders each unit (a suite item at a seed) with outcomes drawn from its
`Engine`: a failure rate, a latency, and a typography CER that shares the item's
difficulty with every other model (a hard prompt is hard for all of them, which is why
a bake-off pairs). Units arrive in rounds; after each round every model still running is
judged, by the same `ModelTally` and `standing` a real bake-off uses, and a clearly
losing one is stopped. `tests/test_bakeoff_compare.py` and `bench/bakeoff_sim.py` run it.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass

from controller.lab.compare import (
    LabImage,
    ModelTally,
    Standing,
    bakeoff_alpha,
    lab_policy,
    losing,
)
from policies.checks import FAIL
from policies.policy import Policy
from workers.jobs import OutputStatus


@dataclass(frozen=True)
class Engine:
    """How one model behaves on the simulated suite."""

    failure: float = 0.03
    latency_median_ms: float = 1000.0
    latency_sigma: float = 0.3
    cer_shift: float = 0.0  # added to every typography CER it reads back
    colour_de: float = 1.5  # mean ΔE of its images against the baseline's (exponential)


@dataclass(frozen=True)
class Suite:
    units: int = 300
    typography_share: float = 0.4  # share of items that quote text
    round_size: int = 30


@dataclass
class Result:
    """One simulated bake-off: each model's last standing, and the pairs each needed before
    it was first called worse (None: never)."""

    standings: dict[str, Standing]
    worse_after: dict[str, int | None]


def simulate(
    policy: Policy,
    baseline: Engine,
    models: dict[str, Engine],
    suite: Suite,
    rng: random.Random,
    early_stop: bool = True,
) -> Result:
    """One bake-off of `models` against `baseline` on `suite`, judged after every round."""
    lab = lab_policy(policy)
    alpha_for = bakeoff_alpha(lab, len(models))
    figure_alpha = lab.alpha / (len(models) + 1)
    tallies = {name: ModelTally(name, lab) for name in models}
    worse_after: dict[str, int | None] = dict.fromkeys(models)
    last: dict[str, Standing] = {}
    for start in range(0, suite.units, suite.round_size):
        for index in range(start, min(start + suite.round_size, suite.units)):
            unit = f"u{index}"
            typography = rng.random() < suite.typography_share
            difficulty = rng.uniform(0.0, 0.6)
            base = _render(baseline, unit, typography, difficulty, rng, reference=True)
            for name, engine in models.items():
                tally = tallies[name]
                if tally.stopped is None:
                    tally.fold(_render(engine, unit, typography, difficulty, rng), base)
        for name, tally in tallies.items():
            if tally.stopped is not None:
                continue
            now = tally.standing(alpha_for, figure_alpha)
            if worse_after[name] is None and any(r.decision == FAIL for r in now.results):
                worse_after[name] = tally.state.units
            if early_stop:
                tally.stopped = losing(now)
            last[name] = dataclasses.replace(now, stopped=tally.stopped)
    return Result(last, worse_after)


def _render(
    engine: Engine,
    unit: str,
    typography: bool,
    difficulty: float,
    rng: random.Random,
    reference: bool = False,
) -> LabImage:
    if rng.random() < engine.failure:
        return LabImage(unit, OutputStatus.ERROR, latency_ms=rng.lognormvariate(0, 0.1) * 50)
    scores: dict[str, float | None] = {}
    if typography:
        cer = difficulty + engine.cer_shift + rng.gauss(0.0, 0.15)
        scores["typography_cer"] = min(max(cer, 0.0), 1.0)
    if not reference:
        scores["colour_shift_de"] = rng.expovariate(1 / engine.colour_de)
    latency = engine.latency_median_ms * rng.lognormvariate(0.0, engine.latency_sigma)
    return LabImage(unit, OutputStatus.OK, latency_ms=latency, batch_size=1, scores=scores)
