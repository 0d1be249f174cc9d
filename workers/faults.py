"""Fault injection: make a model server misbehave on purpose, to rehearse rollbacks.

Off unless configured (`models.<role>.faults`). The decision for a request is a
function of its id, so a rehearsal can be replayed and a test knows what to
expect. Injected failures take the same code paths as real ones: an injected
OOM raises torch's own OutOfMemoryError, an injected error a RuntimeError.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from workers.config import FaultConfig
from workers.prompts import requested_text


class InjectedError(RuntimeError):
    """A model error that fault injection raised (recorded like any other model error)."""


@dataclass(frozen=True)
class FaultPlan:
    """What happens to one request."""

    delay_s: float = 0.0
    error: bool = False
    hang: bool = False
    oom: bool = False


def _fraction(request_id: str, salt: str) -> float:
    """A number in [0, 1) fixed by the request id, independent per kind of fault."""
    digest = hashlib.sha256(f"{salt}:{request_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def plan_for(faults: FaultConfig, request_id: str) -> FaultPlan:
    if not faults.active:
        return FaultPlan()

    def drawn(salt: str, percent: float) -> bool:
        return percent > 0 and _fraction(request_id, salt) * 100 < percent

    delayed = faults.delay > 0 and drawn("delay", faults.delay_percent)
    return FaultPlan(
        delay_s=faults.delay if delayed else 0.0,
        error=drawn("error", faults.error_percent),
        hang=drawn("timeout", faults.timeout_percent),
        oom=drawn("oom", faults.oom_percent),
    )


def text_card(prompt: str, width: int, height: int, garble_over: int | None = None) -> np.ndarray:
    """A white card with the prompt's quoted text in black: what a typography-capable model
    draws, for rehearsals (the tiny random-weight models cannot draw text).

    With `garble_over`, quoted text longer than that many characters comes out garbled
    (each letter rotated 13 places): the headline failure of past swaps, a model that
    writes short words and mangles long ones.
    """
    from PIL import Image, ImageDraw

    text = " ".join(requested_text(prompt))
    if garble_over is not None and len(text) > garble_over:
        text = text.translate(_ROT13)
    card = Image.new("RGB", (width, height), "white")
    if text:
        size = max(8, min(int(height * 0.45), int(width / (0.6 * len(text)))))
        ImageDraw.Draw(card).text((4, (height - size) // 2), text, fill="black", font_size=size)
    return np.asarray(card)


_ROT13 = str.maketrans(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz",
    "NOPQRSTUVWXYZABCDEFGHIJKLMnopqrstuvwxyzabcdefghijklm",
)


def apply_tint(image: np.ndarray, tint: tuple[int, int, int] | None) -> np.ndarray:
    """Shift an RGB uint8 image's channels, the colour-grading drift a swap can cause."""
    if not tint:
        return image
    shifted = image.astype(np.int16) + np.asarray(tint, dtype=np.int16)
    return np.clip(shifted, 0, 255).astype(np.uint8)
