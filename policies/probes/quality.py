"""No-reference quality: BRISQUE, with the model that ships inside the `brisque` wheel.

BRISQUE scores how natural an image's local statistics look (lower is better, about 0
to 100): noise, blur and blocking push it up. It needs no reference image, so it scores
a candidate on prompts where the incumbent's image is no guide, and the pair's
difference says which model's output looks more damaged.

`brisque` 0.2.0 computes its features as arrays of one element, which numpy 2 no
longer converts to floats; the features are flattened here before its own scaling and
SVR, so the score is the package's.
"""

from __future__ import annotations

from functools import cached_property
from itertools import chain
from typing import Any

import numpy as np


class Brisque:
    @cached_property
    def _engine(self) -> Any:
        from brisque import BRISQUE

        return BRISQUE(url=False)  # the wheel's own svm.txt and normalize.pickle

    def score(self, image: np.ndarray) -> float:
        import cv2
        from skimage.color import rgb2gray

        gray = rgb2gray(np.asarray(image)[..., :3])
        half = cv2.resize(gray, None, fx=0.5, fy=0.5, interpolation=cv2.INTER_CUBIC)
        features = chain(
            self._engine.calculate_brisque_features(gray, kernel_size=7, sigma=7 / 6),
            self._engine.calculate_brisque_features(half, kernel_size=7, sigma=7 / 6),
        )
        flat = np.array([float(np.ravel(f)[0]) for f in features], dtype=np.float64)
        return float(self._engine.calculate_image_quality_score(flat))
