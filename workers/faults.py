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


def apply_tint(image: np.ndarray, tint: tuple[int, int, int] | None) -> np.ndarray:
    """Shift an RGB uint8 image's channels, the colour-grading drift a swap can cause."""
    if not tint:
        return image
    shifted = image.astype(np.int16) + np.asarray(tint, dtype=np.int16)
    return np.clip(shifted, 0, 255).astype(np.uint8)
