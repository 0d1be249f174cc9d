"""Image helpers shared by the serving plane and the probes: PNG in and out, blank detection.

They sit at the bottom of the package graph (`workers/`) so a model server can
encode its output and a probe can decode it without either importing the other's
layer. A blank image (all black, one flat colour, or not numbers at all) must
never pass as a success: a half-precision VAE can decode to NaN, a broken model
can emit a constant image.
"""

from __future__ import annotations

import io
from typing import Any

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


def to_png(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def from_png(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Float [0, 1] HWC to uint8; non-finite pixels become 0 (the image is flagged blank first)."""
    return (
        (np.nan_to_num(image, nan=0.0, posinf=1.0, neginf=0.0).clip(0, 1) * 255)
        .round()
        .astype(np.uint8)
    )


def pil_image(data: bytes, mode: str) -> Any:
    """A PIL image in `mode` (RGB, or L for a mask) from PNG bytes the router already checked."""
    from PIL import Image

    return Image.open(io.BytesIO(data)).convert(mode)


def mask_area(data: bytes) -> float:
    """The share of the image a mask opens for editing (pixels above half grey): the `mask`
    prompt tag's bucket, and the region the edit probes look inside and outside of."""
    return float((np.asarray(pil_image(data, "L")) > 127).mean())
