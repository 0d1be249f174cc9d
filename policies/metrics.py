"""The metric registry: every metric a check can name, declared once.

A metric says what it measures on one output (or one pair) and when a pair
counts against the candidate. The judge, the shadow log's `--failing` filter,
the report's galleries and the policy's validation all read this table, so a
check means the same thing wherever it is shown.

- *status* metrics: the share of a request's images whose outcome is one of
  `statuses` (rate checks).
- *sample* metrics: a number measured on each output (quantile checks).
- *score* metrics: a probe's value on an output, compared across the pair
  (paired_mean and tail_rate checks).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from workers.jobs import OutputStatus


class MetricKind(StrEnum):
    STATUS = "status"
    SAMPLE = "sample"
    SCORE = "score"


@dataclass(frozen=True)
class Metric:
    name: str
    kind: MetricKind
    means: str
    statuses: frozenset[str] = field(default_factory=frozenset)


_S = OutputStatus
METRICS: dict[str, Metric] = {
    m.name: m
    for m in (
        Metric(
            "error",
            MetricKind.STATUS,
            "the model raised or its replica died",
            frozenset({_S.ERROR}),
        ),
        Metric(
            "timeout",
            MetricKind.STATUS,
            "no answer by the pair's deadline",
            frozenset({_S.TIMEOUT}),
        ),
        Metric("oom", MetricKind.STATUS, "out of memory after splitting", frozenset({_S.OOM})),
        Metric("blank", MetricKind.STATUS, "a flat or NaN image", frozenset({_S.BLANK})),
        Metric(
            "failure",
            MetricKind.STATUS,
            "any failure a user would see as an error",
            frozenset({_S.ERROR, _S.TIMEOUT, _S.OVERLOAD}),
        ),
        Metric(
            "fallback",
            MetricKind.STATUS,
            "an outcome that sends the user to the route's fallback model",
            frozenset({_S.TIMEOUT, _S.OOM, _S.ERROR, _S.OVERLOAD}),
        ),
        Metric("latency_ms", MetricKind.SAMPLE, "the request's slowest image, ms"),
        Metric("queue_ms", MetricKind.SAMPLE, "time waiting for a batch, ms"),
        Metric("gpu_seconds", MetricKind.SAMPLE, "GPU time per image, shared by its batch"),
        Metric("typography_cer", MetricKind.SCORE, "OCR character error rate of quoted text"),
        Metric("colour_shift_de", MetricKind.SCORE, "CIEDE2000 colour shift against the incumbent"),
        Metric("frame_drift_de", MetricKind.SCORE, "colour drift between a request's images"),
        Metric("clip_score", MetricKind.SCORE, "prompt-image agreement (CLIP)"),
        Metric("typography_cer_case", MetricKind.SCORE, "case-sensitive CER of quoted text"),
        Metric(
            "typography_word_accuracy",
            MetricKind.SCORE,
            "share of the quoted words read back (higher is better)",
        ),
        Metric("skin_tone_de", MetricKind.SCORE, "skin ΔE2000 on faces, worst face of the pair"),
        Metric("skin_ita_shift", MetricKind.SCORE, "skin ITA° shift on faces, worst face"),
        Metric("brisque", MetricKind.SCORE, "no-reference quality, BRISQUE (lower is better)"),
        Metric(
            "edit_preservation_ssim",
            MetricKind.SCORE,
            "SSIM to the input outside an edit's mask (lab; higher is better)",
        ),
        Metric(
            "edit_preservation_de",
            MetricKind.SCORE,
            "colour ΔE2000 to the input outside an edit's mask (lab)",
        ),
        Metric(
            "edit_determinism",
            MetricKind.SCORE,
            "mean pixel gap between two renders of one edit and seed (lab)",
        ),
        Metric(
            "upscale_psnr",
            MetricKind.SCORE,
            "PSNR of the downscaled output to the input, dB (lab; higher is better)",
        ),
        Metric(
            "upscale_ssim",
            MetricKind.SCORE,
            "SSIM of the downscaled output to the input (lab; higher is better)",
        ),
    )
}


def names(kind: MetricKind) -> tuple[str, ...]:
    return tuple(name for name, m in METRICS.items() if m.kind is kind)


RATE_METRICS = names(MetricKind.STATUS)
SAMPLE_METRICS = names(MetricKind.SAMPLE)
SCORE_METRICS = names(MetricKind.SCORE)


def counts(metric: str, status: str) -> bool:
    """Whether an image with this status counts toward a status metric."""
    return status in METRICS[metric].statuses


def gpu_seconds(latency_ms: float | None, batch_size: int | None, gpus: float) -> float:
    """GPU time of one image: its call's time on its GPUs, shared by the batch it ran in."""
    return (latency_ms or 0.0) / 1000 * gpus / max(batch_size or 1, 1)


@dataclass(frozen=True)
class Observed:
    """One side of a pair as the shadow log and report show it."""

    status: str | None
    samples: Mapping[str, float | None]  # sample metrics by name
    scores: Mapping[str, float]  # probe values by metric name


def pair_fails(
    kind: str,
    metric: str,
    candidate: Observed,
    incumbent: Observed,
    *,
    ratio: float | None = None,
    absolute: float | None = None,
    threshold: float | None = None,
    pair_value: str = "difference",
    higher_is_better: bool = False,
) -> bool:
    """Whether this one pair is on the wrong side of a check (candidate worse).

    The same rule the check's statistic aggregates: a status metric counts the candidate's
    outcome; a sample metric compares the candidate's value with ratio x the incumbent's plus
    absolute (successful pairs only, as the judge does); a score metric compares the pair's
    value (difference, or the candidate's own) with the tolerance, or the threshold for a
    tail check.
    """
    spec = METRICS[metric]
    if spec.kind is MetricKind.STATUS:
        return candidate.status is not None and counts(metric, candidate.status)
    if spec.kind is MetricKind.SAMPLE:
        if candidate.status != OutputStatus.OK or incumbent.status != OutputStatus.OK:
            return False
        mine, theirs = candidate.samples.get(metric), incumbent.samples.get(metric)
        if mine is None or theirs is None or not math.isfinite(mine) or not math.isfinite(theirs):
            return False
        return mine > (ratio or 1.0) * theirs + (absolute or 0.0)
    value = candidate.scores.get(metric)
    if value is None:
        return False
    if pair_value == "difference":
        other = incumbent.scores.get(metric)
        if other is None:
            return False
        value -= other
    if higher_is_better:
        value = -value
    limit = threshold if kind == "tail_rate" else absolute
    return value > (limit or 0.0)
