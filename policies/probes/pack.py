"""Which probes score an image: one choice for the rollout's scorer and the lab's.

A probe is a function of the image being scored; what else it needs (the prompt, the
other arm's image, the request's input image and mask) comes from a `ProbeContext`, lazily,
so nothing is read or decoded for a probe that does not run. Every probe of one image
shares one OCR read and one face search: they are the expensive parts.

The first probes (typography CER, colour shift, frame drift, CLIP when configured) run
wherever they apply. The probe pack added for the failures teams saw runs where a check of
the policy names its metric (`OPT_IN`): BRISQUE costs about a second an image, and a
scorer's time is the shadow's throughput. docs/policy.md lists each probe's cost.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from policies.probes.colour import colour_shift
from policies.probes.fidelity import (
    determinism_gap,
    preservation_de,
    preservation_ssim,
    upscale_psnr,
    upscale_ssim,
)
from policies.probes.quality import Brisque
from policies.probes.skin import FaceShift, face_shifts
from policies.probes.typography import OcrEngine, Reading

Probe = Callable[[np.ndarray], float | None]
Image = Callable[[], np.ndarray]

OPT_IN = frozenset(
    {
        "typography_cer_case",
        "typography_word_accuracy",
        "skin_tone_de",
        "skin_ita_shift",
        "brisque",
        "edit_preservation_ssim",
        "edit_preservation_de",
        "upscale_psnr",
        "upscale_ssim",
        "edit_determinism",
    }
)
_BRISQUE = Brisque()


@dataclass
class ProbeContext:
    """What the probes of one image may compare it with; each image is read when asked for."""

    prompt: str
    route: str
    ocr: Callable[[], OcrEngine]
    partner: Image | None = None  # the incumbent's (or the baseline's) image of the pair
    previous: Image | None = None  # this arm's previous image of the same request
    source: Image | None = None  # the request's input image (lab only)
    mask: Callable[[], np.ndarray] | None = None  # an edit's mask, L mode (lab only)
    first_render: Image | None = None  # this model's first render of the same request and seed
    clip: Any = None


class _Shared:
    """The OCR read and the face search of the image being scored, done once."""

    def __init__(self, context: ProbeContext, image: np.ndarray) -> None:
        self.context, self.image = context, image

    @cached_property
    def reading(self) -> Reading:
        return Reading(self.context.prompt, self.image, self.context.ocr())

    @cached_property
    def faces(self) -> list[FaceShift]:
        assert self.context.partner is not None
        return face_shifts(self.image, self.context.partner())


def probes_for(context: ProbeContext, wanted: Collection[str]) -> dict[str, Probe]:
    """The probes that apply to an image in this context, by metric name."""
    shared: dict[int, _Shared] = {}

    def of(image: np.ndarray) -> _Shared:
        return shared.setdefault(id(image), _Shared(context, image))

    def on(metric: str) -> bool:
        return metric not in OPT_IN or metric in wanted

    probes: dict[str, Probe] = {"typography_cer": lambda img: of(img).reading.cer()}
    if on("typography_cer_case"):
        probes["typography_cer_case"] = lambda img: of(img).reading.cer(keep_case=True)
    if on("typography_word_accuracy"):
        probes["typography_word_accuracy"] = lambda img: of(img).reading.word_accuracy()
    partner = context.partner
    if partner is not None:
        probes["colour_shift_de"] = lambda img: colour_shift(img, partner())
        if on("skin_tone_de"):
            probes["skin_tone_de"] = lambda img: _worst(of(img).faces, "delta_e")
        if on("skin_ita_shift"):
            probes["skin_ita_shift"] = lambda img: _worst(of(img).faces, "ita_shift")
    previous = context.previous
    if previous is not None:
        probes["frame_drift_de"] = lambda img: colour_shift(img, previous())
    if context.clip is not None:
        clip = context.clip
        probes["clip_score"] = lambda img: clip.score(context.prompt, img)
    if on("brisque"):
        probes["brisque"] = _BRISQUE.score
    source, mask = context.source, context.mask
    if source is not None and mask is not None:
        if on("edit_preservation_ssim"):
            probes["edit_preservation_ssim"] = lambda img: preservation_ssim(img, source(), mask())
        if on("edit_preservation_de"):
            probes["edit_preservation_de"] = lambda img: preservation_de(img, source(), mask())
    first_render = context.first_render
    if first_render is not None and on("edit_determinism"):
        probes["edit_determinism"] = lambda img: determinism_gap(img, first_render())
    if source is not None and context.route == "upscale":
        if on("upscale_psnr"):
            probes["upscale_psnr"] = lambda img: upscale_psnr(img, source())
        if on("upscale_ssim"):
            probes["upscale_ssim"] = lambda img: upscale_ssim(img, source())
    return probes


def _worst(shifts: list[FaceShift], what: str) -> float | None:
    """The face furthest from the incumbent's, or None when no face was found."""
    if not shifts:
        return None
    return max(abs(getattr(s, what)) for s in shifts)
