"""Probe cost per image on this machine: OCR (rapidocr, tesseract), colour shift, blank check.

    python bench/probe_cost.py [--repeats 20]

Images: a 512x512 poster with text (what typography prompts should produce) and a
64x64 image (the tiny models' size). Median seconds per image over the repeats.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from policies.probes.colour import colour_shift
from policies.probes.typography import RapidOcr, Tesseract, typography_cer
from workers.images import is_blank


def poster(side: int) -> np.ndarray:
    image = Image.new("RGB", (side, side), (235, 230, 220))
    font = ImageFont.load_default(size=max(side // 8, 10))
    ImageDraw.Draw(image).text((side // 10, side // 3), "SALE 50%", fill=(30, 20, 20), font=font)
    return np.asarray(image)


def median_seconds(fn: object, repeats: int) -> float:
    fn()  # warm up (model loading is not per-image cost)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    prompt = 'a poster that says "SALE 50%"'
    print(f"{'probe':<26} {'512x512 s':>10} {'64x64 s':>10}")
    engines = {"typography (rapidocr)": RapidOcr(), "typography (tesseract)": Tesseract()}
    images = {side: poster(side) for side in (512, 64)}
    tinted = {
        side: np.clip(image.astype(int) + 30, 0, 255).astype(np.uint8)
        for side, image in images.items()
    }
    rows = {
        name: (lambda side, e=engine: typography_cer(prompt, images[side], e))
        for name, engine in engines.items()
    }
    rows["colour shift (CIEDE2000)"] = lambda side: colour_shift(images[side], tinted[side])
    rows["blank check"] = lambda side: is_blank(images[side])
    for name, probe in rows.items():
        cost = [median_seconds(lambda s=side, p=probe: p(s), args.repeats) for side in (512, 64)]
        print(f"{name:<26} {cost[0]:>10.4f} {cost[1]:>10.4f}")


if __name__ == "__main__":
    main()
