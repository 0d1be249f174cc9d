"""A/A calibration: the incumbent against itself, to measure each metric's noise floor.

Two renders of every prompt with different seeds differ for reasons that have
nothing to do with a model swap. Their paired differences are the noise floor
a tolerance must sit above, or healthy candidates would be rolled back.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from controller.config import Config
from policies.policy import Policy, load_policy
from policies.probes.colour import colour_shift
from policies.probes.typography import ENGINES, typography_cer
from workers.jobs import ImageJob
from workers.pipeline import PipelineRunner

PROMPTS = Path(__file__).parents[2] / "policies" / "prompts.txt"


@dataclass(frozen=True)
class NoiseFloor:
    metric: str
    pairs: int
    mean: float
    p95: float
    suggested: float
    note: str


def calibrate(
    config: Config,
    prompts: list[str],
    repeats: int = 1,
    policy: Policy | None = None,
    size: int = 64,
    model: str | None = None,
) -> list[NoiseFloor]:
    """Render every prompt twice with `model` (default: the only rollout's incumbent) and
    measure what each check would see.

    The tail rows use the thresholds of the policy's `tail_rate` checks: the share of A/A
    pairs already past a threshold is the floor its tolerance must sit above.
    """
    policy = policy or load_policy()
    runner = PipelineRunner(config.models[model or config.plan().incumbent], config.base_dir)
    ocr = ENGINES[policy.ocr_engine]()
    shifts, cer_diffs, latency_ratios = [], [], []
    for round_ in range(repeats):
        for index, prompt in enumerate(prompts):
            seeds = (1_000 * round_ + index, 1_000_000 + 1_000 * round_ + index)
            images, latencies = [], []
            for seed in seeds:
                started = time.perf_counter()
                image, _ = runner.call([ImageJob(f"aa-{seed}", 0, prompt, seed, size, size)])[0]
                latencies.append(time.perf_counter() - started)
                images.append(image)
            shifts.append(colour_shift(images[0], images[1]))
            latency_ratios.append(latencies[0] / latencies[1])
            a, b = (typography_cer(prompt, image, ocr) for image in images)
            if a is not None and b is not None:
                cer_diffs.append(a - b)
    tails = {c.metric: c.threshold or 0.0 for c in policy.checks if c.kind == "tail_rate"}
    values = {"colour_shift_de": shifts, "typography_cer": [abs(d) for d in cer_diffs]}
    tail_floors = [
        _floor(
            f"{metric} past {threshold:g} (share of pairs)",
            [float(v > threshold) for v in values[metric]],
            lambda v: max(2 * float(v.mean()), 0.01),
            "A/A pairs already in the tail; tail_rate tolerance: at least twice that share",
        )
        for metric, threshold in tails.items()
        if metric in values
    ]
    return [
        _floor(
            "colour_shift_de",
            shifts,
            lambda v: float(np.quantile(v, 0.99)) * 1.5,
            "mean ΔE2000 between two seeds of one prompt; tolerance: 1.5 x its p99",
        ),
        _floor(
            "typography_cer (paired difference)",
            [abs(d) for d in cer_diffs],
            lambda v: max(float(np.quantile(v, 0.95)), 0.02),
            "|CER difference| between two seeds; tolerance: its p95 (at least 0.02)",
        ),
        _floor(
            "latency ratio (A/A)",
            latency_ratios,
            lambda v: max(float(np.quantile(v, 0.95)), 1.1),
            "render time ratio of two seeds; quantile tolerance ratio: its p95 (at least 1.1)",
        ),
        *tail_floors,
    ]


def _floor(metric: str, values: list[float], suggest: object, note: str) -> NoiseFloor:
    if not values:
        return NoiseFloor(metric, 0, float("nan"), float("nan"), float("nan"), "no pairs: " + note)
    array = np.asarray(values, dtype=float)
    return NoiseFloor(
        metric,
        len(values),
        float(array.mean()),
        float(np.quantile(array, 0.95)),
        suggest(array),
        note,
    )


def default_prompts() -> list[str]:
    return [line.strip() for line in PROMPTS.read_text().splitlines() if line.strip()]
