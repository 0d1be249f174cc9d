"""Blank images: all black, one flat colour, or not numbers at all.

A half-precision VAE can decode to NaN (shown as black); a broken model can
emit a constant image. Either must never pass as a success.
"""

from __future__ import annotations

import numpy as np

# Largest spread of pixel values (on a 0..1 scale) an image may have and still count as flat.
FLAT_SPREAD = 2 / 255


def is_blank(image: np.ndarray) -> bool:
    """True for a non-finite or near-constant image (float in [0, 1] or uint8)."""
    values = np.asarray(image)
    if values.size == 0:
        return True
    if values.dtype.kind == "f" and not np.isfinite(values).all():
        return True
    scale = 255.0 if values.dtype == np.uint8 else 1.0
    return float(values.max() - values.min()) / scale <= FLAT_SPREAD
