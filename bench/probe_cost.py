"""Probe cost per image on this machine, every probe of the pack, and the scorer's budget.

    python -m bench.probe_cost [--repeats 20] [--text-share 0.4]

Images: a 512x512 poster with text (what typography prompts should produce), a 512x512
photograph with a face (scikit-image's astronaut) for the skin-tone and quality probes, and
both at 64x64 (the tiny models' size). Median seconds per image over the repeats.

Then the budget: the seconds one mirrored pair costs the scorer with the default policy's
probes (OCR on both arms of the share of prompts that quote text, colour shift on the
candidate) and with every opt-in probe on, and the request rate at which 1 and 2 scorer
actors (one CPU each) stop keeping up: past it the lag grows until `max_scorer_lag` holds
the rollout, or the costly probe is sampled (`sample_rates`).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import skimage.data
from PIL import Image, ImageDraw, ImageFont

from policies.probes.colour import colour_shift
from policies.probes.fidelity import preservation_de, preservation_ssim, upscale_psnr, upscale_ssim
from policies.probes.pack import OPT_IN, ProbeContext, probes_for
from policies.probes.quality import Brisque
from policies.probes.skin import face_shifts
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


def shrink(image: np.ndarray, side: int) -> np.ndarray:
    return np.asarray(Image.fromarray(image).resize((side, side), Image.BICUBIC))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--text-share", type=float, default=0.4)
    args = parser.parse_args()
    prompt = 'a poster that says "SALE 50%"'
    print(f"{'probe':<40} {'512x512 s':>10} {'64x64 s':>10}")
    engines = {"typography (rapidocr)": RapidOcr(), "typography (tesseract)": Tesseract()}
    images = {side: poster(side) for side in (512, 64)}
    tinted = {
        side: np.clip(image.astype(int) + 30, 0, 255).astype(np.uint8)
        for side, image in images.items()
    }
    photo = {512: skimage.data.astronaut(), 64: shrink(skimage.data.astronaut(), 64)}
    warmer = {
        s: np.clip(p.astype(int) + (12, 0, -8), 0, 255).astype(np.uint8) for s, p in photo.items()
    }
    mask = {s: np.zeros((s, s), np.uint8) for s in photo}
    for s in mask:
        mask[s][s // 4 : s // 2, s // 4 : s // 2] = 255
    small = {s: shrink(photo[s], s // 4) for s in photo}
    brisque = Brisque()
    rows = {
        name: (lambda side, e=engine: typography_cer(prompt, images[side], e))
        for name, engine in engines.items()
    }

    def all_typography(side: int) -> None:
        context = ProbeContext(prompt, "generate", lambda: engines["typography (rapidocr)"])
        probes = probes_for(context, OPT_IN)
        for name in ("typography_cer", "typography_cer_case", "typography_word_accuracy"):
            probes[name](images[side])

    rows["typography, 3 metrics, one read"] = all_typography
    rows["colour shift (CIEDE2000)"] = lambda side: colour_shift(images[side], tinted[side])
    rows["skin tone (faces, ΔE, ITA)"] = lambda side: face_shifts(warmer[side], photo[side])
    rows["brisque"] = lambda side: brisque.score(photo[side])
    rows["edit preservation (SSIM + ΔE)"] = lambda side: (
        preservation_ssim(warmer[side], photo[side], mask[side]),
        preservation_de(warmer[side], photo[side], mask[side]),
    )
    rows["upscale fidelity (PSNR + SSIM)"] = lambda side: (
        upscale_psnr(photo[side], small[side]),
        upscale_ssim(photo[side], small[side]),
    )
    rows["blank check"] = lambda side: is_blank(images[side])
    cost = {}
    for name, probe in rows.items():
        cost[name] = [
            median_seconds(lambda s=side, p=probe: p(s), args.repeats) for side in (512, 64)
        ]
        print(f"{name:<40} {cost[name][0]:>10.4f} {cost[name][1]:>10.4f}")
    print()
    for label, side in (("512x512", 0), ("64x64", 1)):
        ocr = cost["typography, 3 metrics, one read"][side]
        default = 2 * args.text_share * ocr + cost["colour shift (CIEDE2000)"][side]
        opt_in = default + cost["skin tone (faces, ΔE, ITA)"][side] + 2 * cost["brisque"][side]
        for what, seconds in (("default probes", default), ("every opt-in probe too", opt_in)):
            print(
                f"{label} {what:<24} {seconds:.3f} s a pair ({args.text_share:.0%} quoting "
                f"text): 1 actor keeps up to {1 / seconds:.2f} req/s, 2 actors to "
                f"{2 / seconds:.2f} req/s ({7200 / seconds:,.0f} req/h)"
            )


if __name__ == "__main__":
    main()
