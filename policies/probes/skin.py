"""Skin tone: did the candidate change the colour of the people it drew?

Teams that swapped models saw skin-tone artifacts: faces turned grey, orange or paler
under the new model while everything else looked fine, which a whole-image colour mean
dilutes. This probe looks at faces only:

- faces are found on the incumbent's image with the frontal-face Haar cascade that
  ships inside opencv-python (offline; no model download);
- in each face's box, the skin pixels are those in the usual YCrCb skin range on the
  incumbent's image; the same pixels are read on the candidate's image (same prompt and
  seed, so the two images are aligned wherever the models agree);
- per face, the ΔE2000 between the two mean CIELAB colours of those pixels, and the
  shift of the individual typology angle ITA° = atan((L* - 50) / b*), the dermatology
  scale of skin lightness (light skin has a large ITA°).

The pair's value is its worst face: the largest ΔE (`skin_tone_de`) and the largest ITA°
shift in absolute value (`skin_ita_shift`). A pair with no face found gives no value,
as a prompt with no quoted text gives no typography value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

# YCrCb skin range (Chai and Ngan, 1999), wide enough for every tone on the Monk scale.
CR_RANGE = (133, 180)
CB_RANGE = (77, 135)
MIN_SKIN_PIXELS = 50


@dataclass(frozen=True)
class FaceShift:
    box: tuple[int, int, int, int]  # x, y, width, height on the incumbent's image
    pixels: int
    delta_e: float
    ita_incumbent: float
    ita_candidate: float

    @property
    def ita_shift(self) -> float:
        return self.ita_candidate - self.ita_incumbent


@lru_cache(maxsize=1)
def _detector() -> Any:
    import cv2

    path = cv2.data.haarcascades + "haarcascade_frontalface_default.xml"
    detector = cv2.CascadeClassifier(path)
    if detector.empty():
        raise FileNotFoundError(
            f"the face detector {path} did not load: install an opencv-python(-headless) 4.x "
            "wheel, which ships it (the 5.x wheels do not)"
        )
    return detector


def faces(image: np.ndarray) -> list[tuple[int, int, int, int]]:
    """Frontal faces on an RGB uint8 image, largest first."""
    import cv2

    gray = cv2.cvtColor(np.ascontiguousarray(image[..., :3]), cv2.COLOR_RGB2GRAY)
    side = max(24, min(gray.shape) // 12)
    found = _detector().detectMultiScale(
        gray, scaleFactor=1.1, minNeighbors=5, minSize=(side, side)
    )
    boxes = [tuple(int(v) for v in box) for box in found]
    return sorted(boxes, key=lambda b: -b[2] * b[3])  # type: ignore[return-value]


def skin_mask(image: np.ndarray) -> np.ndarray:
    import cv2

    ycrcb = cv2.cvtColor(np.ascontiguousarray(image[..., :3]), cv2.COLOR_RGB2YCrCb)
    cr, cb = ycrcb[..., 1], ycrcb[..., 2]
    return (cr >= CR_RANGE[0]) & (cr <= CR_RANGE[1]) & (cb >= CB_RANGE[0]) & (cb <= CB_RANGE[1])


def ita(lab: np.ndarray) -> float:
    """Individual typology angle of a mean CIELAB colour, in degrees."""
    return math.degrees(math.atan2(float(lab[0]) - 50.0, float(lab[2])))


def face_shifts(candidate: np.ndarray, incumbent: np.ndarray) -> list[FaceShift]:
    """Each face of the incumbent's image with enough skin: how the candidate's differs there."""
    from skimage.color import deltaE_ciede2000, rgb2lab

    if candidate.shape != incumbent.shape:
        raise ValueError(
            f"the pair's images differ in size ({candidate.shape} vs {incumbent.shape})"
        )
    shifts = []
    skin = skin_mask(incumbent)
    for x, y, w, h in faces(incumbent):
        region = np.zeros(skin.shape, dtype=bool)
        region[y : y + h, x : x + w] = True
        pixels = region & skin
        if pixels.sum() < MIN_SKIN_PIXELS:
            continue
        mine = rgb2lab(candidate[pixels][None, :, :3] / 255.0)[0].mean(axis=0)
        theirs = rgb2lab(incumbent[pixels][None, :, :3] / 255.0)[0].mean(axis=0)
        shifts.append(
            FaceShift(
                (x, y, w, h),
                int(pixels.sum()),
                float(deltaE_ciede2000(mine, theirs)),
                ita(theirs),
                ita(mine),
            )
        )
    return shifts
