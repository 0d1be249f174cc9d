"""The policy file: which checks the judge runs, and how strict each is.

Loaded with the same line-aware validation as `cutover.yaml`, so a typo in a
check names its file and line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from policies.metrics import RATE_METRICS, SAMPLE_METRICS, SCORE_METRICS, Observed, pair_fails
from policies.yaml_source import load_yaml, validate_source

DEFAULT_POLICY = Path(__file__).parent / "default.yaml"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Tolerance(_Strict):
    """How much worse the candidate may be.

    `rate` and `tail_rate` checks: the candidate's rate may be up to `ratio` x the
    incumbent's plus `absolute` (give one or both; a missing one is 1 or 0). The absolute
    part is what lets a healthy candidate PASS in a few thousand pairs at 1-5% failure rates:
    a ratio alone asks the data to tell 1% from 1.25% (docs/policy.md). `quantile` checks
    take one of the two; `paired_mean` checks take `absolute`.
    """

    absolute: float | None = Field(None, ge=0)
    ratio: float | None = Field(None, ge=1)
    negligible: float | None = Field(
        None, description="replaced by `absolute`; kept only to say so when a file uses it"
    )

    @model_validator(mode="after")
    def _given(self) -> Tolerance:
        if self.negligible is not None:
            raise ValueError(
                "`negligible` was replaced: a rate check now FAILs or PASSes against "
                "ratio x incumbent + absolute, so write {ratio: R, absolute: A} "
                f"(for example absolute: {self.negligible:g}); docs/policy.md explains it"
            )
        if self.absolute is None and self.ratio is None:
            raise ValueError("give absolute, ratio, or (rate checks) both")
        return self

    @property
    def rate_ratio(self) -> float:
        return self.ratio if self.ratio is not None else 1.0

    @property
    def rate_absolute(self) -> float:
        return self.absolute if self.absolute is not None else 0.0


class Check(_Strict):
    name: str = Field(pattern=r"^[a-z0-9_]+$")
    kind: Literal["rate", "quantile", "paired_mean", "tail_rate", "fallback_rate"]
    metric: str
    tolerance: Tolerance
    direction: Literal["lower_is_better", "higher_is_better"] = "lower_is_better"
    critical: bool = True
    min_samples: int = Field(100, ge=1)
    quantile: float | None = Field(None, gt=0, lt=1)
    pair_value: Literal["difference", "candidate"] = "difference"
    range: tuple[float, float] = (-1.0, 1.0)
    # tail_rate: a pair is in the tail when its value is past this (candidate worse); with
    # pair_value difference, a pair past -threshold counts against the incumbent.
    threshold: float | None = None
    # This check's share of its budget (rollback alpha if critical, advisory alpha if not),
    # relative to the other checks of the same criticality.
    weight: float = Field(1.0, gt=0)
    # What a slice FAIL of this check does (`policies/slices.py`): roll the rollout back, hold
    # it and report, or only report. Quantile checks are not sliced.
    slice_action: Literal["rollback", "hold", "report"] = "hold"

    @model_validator(mode="after")
    def _consistent(self) -> Check:
        allowed = {
            "rate": RATE_METRICS,
            "fallback_rate": ("fallback",),
            "quantile": SAMPLE_METRICS,
            "paired_mean": SCORE_METRICS,
            "tail_rate": SCORE_METRICS,
        }[self.kind]
        if self.metric not in allowed:
            raise ValueError(
                f"metric {self.metric!r} does not fit kind {self.kind}; use one of {', '.join(allowed)}"
            )
        if self.kind == "quantile" and self.quantile is None:
            raise ValueError("a quantile check needs `quantile`, for example 0.95")
        both = self.tolerance.absolute is not None and self.tolerance.ratio is not None
        if self.kind == "quantile" and both:
            raise ValueError("a quantile check takes one of absolute or ratio, not both")
        if self.kind == "paired_mean" and self.tolerance.ratio is not None:
            raise ValueError(
                "a paired_mean check takes an absolute tolerance (the pair already compares)"
            )
        if self.kind == "tail_rate" and self.threshold is None:
            raise ValueError(
                "a tail_rate check needs `threshold`: a pair past it counts as a regression, "
                "for example 8 (ΔE) for colour_shift_de"
            )
        if self.range[0] >= self.range[1]:
            raise ValueError(f"range {list(self.range)} must be [low, high] with low < high")
        return self

    @property
    def on_scores(self) -> bool:
        """Whether the check compares the probes' scores of the images (the galleries rank
        pairs by these), rather than outcomes or times."""
        return self.kind in ("paired_mean", "tail_rate")

    @property
    def is_rate(self) -> bool:
        """Rate checks (fallback_rate is a rate over the `fallback` outcomes) share one test."""
        return self.kind in ("rate", "fallback_rate")

    def pair_fails(self, candidate: Observed, incumbent: Observed) -> bool:
        """Whether one pair is on the wrong side of this check (the shadow log's --failing)."""
        return pair_fails(
            self.kind,
            self.metric,
            candidate,
            incumbent,
            ratio=self.tolerance.ratio,
            absolute=self.tolerance.absolute,
            threshold=self.threshold,
            pair_value=self.pair_value,
            higher_is_better=self.direction == "higher_is_better",
        )


class SlicePolicy(_Strict):
    """The judge's search for a slice of prompts where the candidate is worse (docs/policy.md).

    `alpha` bounds the chance that any slice of any check FAILs falsely over an attempt:
    it is split over the sliced checks by weight, and each check's share over
    `max_slices`, the most slices it ever judges (Bonferroni, so the bound holds however
    the slices' data depend on each other).
    """

    enabled: bool = True
    alpha: float = Field(0.05, gt=0, lt=0.5)
    min_samples: int = Field(30, ge=1)
    max_slices: int = Field(64, ge=1, le=1000)
    # Slices of two tags are drawn from these keys only (policies/prompt_tags.py names them):
    # the prompt's content, not its plumbing.
    pair_keys: list[str] = ["text", "script", "people", "colour", "words", "mask"]


class Policy(_Strict):
    """Two error budgets, each split across the checks it covers in proportion to their weights.

    `alpha` bounds the chance of a false rollback over a rollout attempt. Only critical
    checks roll back, so only they share it. `advisory_alpha` (default: `alpha`) bounds the
    chance that a non-critical check falsely FAILs, which holds the rollout but never
    rolls it back.
    """

    alpha: float = Field(0.05, gt=0, lt=0.5)
    advisory_alpha: float | None = Field(None, gt=0, lt=0.5)
    sample_rate: float = Field(
        1.0, gt=0, le=1, description="share of requests each probe scores (both arms together)"
    )
    # Per probe, overriding `sample_rate`: OCR costs a third of a second an image, a colour
    # shift a few milliseconds, so each may be sampled at what the scorer can keep up with.
    sample_rates: dict[str, Annotated[float, Field(gt=0, le=1)]] = {}
    ocr_engine: Literal["rapidocr", "tesseract"] = "rapidocr"
    clip_model: str | None = None
    # A probe erroring on more than this share of the outputs it scored turns its checks
    # INCONCLUSIVE, with the error in the reason, and holds the rollout: no PASS without evidence.
    max_probe_error_share: float = Field(0.05, ge=0, le=1)
    checks: list[Check] = Field(min_length=1)
    slices: SlicePolicy = SlicePolicy()

    @model_validator(mode="after")
    def _unique_names(self) -> Policy:
        names = [c.name for c in self.checks]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"check names must be unique; repeated: {', '.join(repeated)}")
        return self

    @model_validator(mode="after")
    def _known_probes(self) -> Policy:
        unknown = sorted(set(self.sample_rates) - set(SCORE_METRICS))
        if unknown:
            raise ValueError(
                f"sample_rates names no probe: {', '.join(unknown)}; probes are "
                f"{', '.join(SCORE_METRICS)}"
            )
        return self

    def rate_for(self, probe: str) -> float:
        """The share of requests `probe` scores."""
        return self.sample_rates.get(probe, self.sample_rate)

    def alpha_for(self, check: Check) -> float:
        """The check's share of its budget (weighted Bonferroni): the shares add up to the budget."""
        peers = [c for c in self.checks if c.critical == check.critical]
        budget = self.alpha if check.critical else (self.advisory_alpha or self.alpha)
        return budget * check.weight / sum(c.weight for c in peers)

    @property
    def sliced_checks(self) -> list[Check]:
        """The checks the judge also evaluates per slice: every kind but quantiles."""
        return [c for c in self.checks if c.kind != "quantile"] if self.slices.enabled else []

    def slice_alpha_for(self, check: Check) -> float:
        """One slice's test of this check: the slice budget's weighted share, over max_slices."""
        peers = self.sliced_checks
        share = check.weight / sum(c.weight for c in peers)
        return self.slices.alpha * share / self.slices.max_slices


def load_policy(path: str | Path | None = None) -> Policy:
    source = load_yaml(Path(path) if path else DEFAULT_POLICY)
    return validate_source(source, Policy)
