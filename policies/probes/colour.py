"""Colour: CIEDE2000 between mean CIELAB colours.

Between the candidate's and the incumbent's image of one pair (same prompt and
seed) it measures a grading shift; between consecutive images of one request
it measures frame-to-frame drift. Means, not per-pixel differences: two models
draw different pictures, but a consistent cast moves the mean.
"""

from __future__ import annotations

import numpy as np


def mean_lab(image: np.ndarray) -> np.ndarray:
    from skimage.color import rgb2lab

    rgb = np.asarray(image, dtype=np.float64)
    if rgb.max() > 1.0:
        rgb = rgb / 255.0
    return rgb2lab(rgb[..., :3]).reshape(-1, 3).mean(axis=0)


def colour_shift(a: np.ndarray, b: np.ndarray) -> float:
    """ΔE2000 between the mean colours of two images (0 for identical images)."""
    from skimage.color import deltaE_ciede2000

    return float(deltaE_ciede2000(mean_lab(a), mean_lab(b)))
