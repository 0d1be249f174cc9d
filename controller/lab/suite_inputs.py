"""The input images and masks of the shipped `edits` and `upscale` suites, drawn from a seed.

Edit, inpaint and upscale items need an image to start from. Ours are drawn by code
(simple scenes: a sky gradient, ground, a sun, a house), so the files in
`controller/lab/suites/inputs/` can be checked against what this module draws, and
anyone can see what an input holds without opening it. Regenerate them with
`python -m controller.lab.suite_inputs`.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

INPUTS = Path(__file__).parent / "suites" / "inputs"
# name: (seed, side in pixels, with a mask?)
SHIPPED = {
    "scene-1": (1, 128, True),
    "scene-2": (2, 128, True),
    "scene-3": (3, 128, True),
    "scene-4": (4, 128, False),
    "small-1": (11, 32, False),
    "small-2": (12, 32, False),
    "small-3": (13, 64, False),
}


def draw_scene(seed: int, side: int) -> Image.Image:
    """A small outdoor scene whose colours and layout follow the seed."""
    rng = np.random.default_rng(seed)
    top, bottom = rng.integers(60, 200, 3), rng.integers(150, 255, 3)
    rows = np.linspace(0.0, 1.0, side)[:, None, None]
    sky = (top * (1 - rows) + bottom * rows).astype(np.uint8)
    image = Image.fromarray(np.broadcast_to(sky, (side, side, 3)).copy())
    draw = ImageDraw.Draw(image)
    horizon = int(side * rng.uniform(0.55, 0.7))
    draw.rectangle([0, horizon, side, side], fill=tuple(int(c) for c in rng.integers(30, 140, 3)))
    sun = int(rng.integers(side // 10, side // 2))
    radius = side // 10
    draw.ellipse([sun, radius, sun + 2 * radius, 3 * radius], fill=(250, 220, 90))
    left = int(rng.integers(side // 2, side - side // 4))
    width = side // 5
    draw.rectangle([left, horizon - width, left + width, horizon], fill=(180, 60, 50))
    draw.polygon(
        [
            (left - 2, horizon - width),
            (left + width // 2, horizon - width * 3 // 2),
            (left + width + 2, horizon - width),
        ],
        fill=(90, 40, 30),
    )
    return image


def draw_mask(seed: int, side: int) -> Image.Image:
    """White where an inpaint should paint: an ellipse over the left of the ground."""
    rng = np.random.default_rng(seed + 1000)
    mask = Image.new("L", (side, side), 0)
    x = int(rng.integers(side // 10, side // 3))
    y = int(side * rng.uniform(0.72, 0.76))  # below the highest horizon a scene draws
    ImageDraw.Draw(mask).ellipse([x, y, x + side // 3, y + side // 5], fill=255)
    return mask


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def expected_files() -> dict[str, bytes]:
    """File name → PNG bytes of every shipped input and mask."""
    files = {}
    for name, (seed, side, masked) in SHIPPED.items():
        files[f"{name}.png"] = png(draw_scene(seed, side))
        if masked:
            files[f"{name}-mask.png"] = png(draw_mask(seed, side))
    return files


def write(directory: Path = INPUTS) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, data in expected_files().items():
        (directory / name).write_bytes(data)
        written.append(directory / name)
    return written


if __name__ == "__main__":
    write()
