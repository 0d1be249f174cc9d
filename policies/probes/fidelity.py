"""Fidelity to the input: what an edit must keep, and what an upscale must still show.

These probes compare an output with the image the request sent, so they run where
the input is at hand: the lab (a suite item's `image` and `mask`, in validation and
bake-off). The router records an edit's size and mask area, not its pixels, so shadow
traffic gets them only once inputs are stored as artifacts (docs/policy.md says so).

- *Preservation outside the mask.* An edit may repaint inside its mask and nowhere
  else. Outside it, SSIM against the input (1: untouched) and the ΔE2000 between mean
  colours (0: untouched). The mask is dilated a few pixels first, since every model
  blends at the mask's edge (and SSIM's window reaches 3 pixels across it).
- *Determinism.* The same request and seed, rendered twice, gives the same image within
  a tolerance (batched and unbatched runs differ by a few pixel values, so never by
  hash): the mean absolute difference in 0-255 pixel values.
- *Upscale fidelity.* Downscaled back to the input's size, the output should be the
  input: PSNR (dB) and SSIM between the two. A model that blurs or invents detail
  scores low on both.
"""

from __future__ import annotations

import numpy as np

MASK_MARGIN = 4  # the mask grown by this: blending at its edge, and SSIM's 7-pixel window


def _gray(image: np.ndarray) -> np.ndarray:
    from skimage.color import rgb2gray

    return rgb2gray(np.asarray(image, dtype=np.float64)[..., :3] / 255.0)


def _ssim(a: np.ndarray, b: np.ndarray, where: np.ndarray | None = None) -> float:
    from skimage.metrics import structural_similarity

    side = min(a.shape[:2])
    window = min(7, side if side % 2 else side - 1)
    _, full = structural_similarity(_gray(a), _gray(b), data_range=1.0, win_size=window, full=True)
    return float(full[where].mean() if where is not None else full.mean())


def outside(mask: np.ndarray, margin: int = MASK_MARGIN) -> np.ndarray:
    """Pixels an edit must leave alone: outside the mask grown by `margin`."""
    from scipy.ndimage import binary_dilation

    inside = np.asarray(mask) > 127
    if margin:
        inside = binary_dilation(inside, structure=np.ones((3, 3), bool), iterations=margin)
    return ~inside


def _same_size(output: np.ndarray, source: np.ndarray, what: str) -> None:
    if output.shape[:2] != source.shape[:2]:
        raise ValueError(
            f"the output is {output.shape[1]}x{output.shape[0]}, the {what} "
            f"{source.shape[1]}x{source.shape[0]}: an edit keeps the input's size"
        )


def preservation_ssim(output: np.ndarray, source: np.ndarray, mask: np.ndarray) -> float | None:
    """SSIM outside the mask (1: untouched), or None when the mask covers everything."""
    _same_size(output, source, "input")
    keep = outside(mask)
    return _ssim(output, source, keep) if keep.any() else None


def preservation_de(output: np.ndarray, source: np.ndarray, mask: np.ndarray) -> float | None:
    """ΔE2000 between the mean colours outside the mask (0: untouched)."""
    from skimage.color import deltaE_ciede2000, rgb2lab

    _same_size(output, source, "input")
    keep = outside(mask)
    if not keep.any():
        return None
    mine = rgb2lab(output[keep][None, :, :3] / 255.0)[0].mean(axis=0)
    theirs = rgb2lab(source[keep][None, :, :3] / 255.0)[0].mean(axis=0)
    return float(deltaE_ciede2000(mine, theirs))


def determinism_gap(first: np.ndarray, second: np.ndarray) -> float:
    """Mean absolute pixel difference (0-255) between two renders of one request and seed."""
    _same_size(first, second, "other render")
    return float(np.abs(first.astype(np.float64) - second.astype(np.float64)).mean())


def _downscaled(output: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    small = Image.fromarray(np.ascontiguousarray(output[..., :3])).resize(size, Image.BICUBIC)
    return np.asarray(small)


def upscale_psnr(output: np.ndarray, source: np.ndarray) -> float:
    """PSNR (dB) of the output downscaled to the input's size, against the input."""
    from skimage.metrics import peak_signal_noise_ratio

    small = _downscaled(output, (source.shape[1], source.shape[0]))
    if np.array_equal(small, source[..., :3]):
        return 100.0  # identical: PSNR is infinite, capped so it stays a number
    return float(peak_signal_noise_ratio(source[..., :3], small, data_range=255))


def upscale_ssim(output: np.ndarray, source: np.ndarray) -> float:
    """SSIM of the output downscaled to the input's size, against the input."""
    return _ssim(_downscaled(output, (source.shape[1], source.shape[0])), source)
