"""The probe pack, each probe on images whose right answer is known."""

from __future__ import annotations

import numpy as np
import pytest
import skimage.data
from PIL import Image, ImageDraw
from scipy.ndimage import gaussian_filter
from skimage.color import deltaE_ciede2000, lab2rgb, rgb2lab

from policies.probes.fidelity import (
    determinism_gap,
    preservation_de,
    preservation_ssim,
    upscale_psnr,
    upscale_ssim,
)
from policies.probes.pack import OPT_IN, ProbeContext, probes_for
from policies.probes.quality import Brisque
from policies.probes.skin import face_shifts, faces, ita, skin_mask
from policies.probes.typography import RapidOcr, best_span_cer, word_accuracy


@pytest.fixture(scope="module")
def portrait():
    return skimage.data.astronaut()  # a photograph with one frontal face, shipped in the wheel


def recolour_skin(image, shift_lab):
    """The image with the skin pixels of its face moved by `shift_lab` in CIELAB."""
    (x, y, w, h) = faces(image)[0]
    region = np.zeros(image.shape[:2], dtype=bool)
    region[y : y + h, x : x + w] = True
    pixels = region & skin_mask(image)
    lab = rgb2lab(image[pixels][None] / 255.0)[0] + np.asarray(shift_lab)
    out = image.copy()
    out[pixels] = (lab2rgb(lab[None])[0] * 255).round().clip(0, 255).astype(np.uint8)
    return out, pixels


def test_skin_tone_shift_on_a_face_recoloured_by_a_known_amount(portrait):
    assert len(faces(portrait)) == 1
    recoloured, pixels = recolour_skin(portrait, (-8.0, 0.0, 6.0))  # darker and yellower
    before = rgb2lab(portrait[pixels][None] / 255.0)[0].mean(axis=0)
    expected_de = float(deltaE_ciede2000(before, before + [-8.0, 0.0, 6.0]))
    expected_ita = ita(before + [-8.0, 0.0, 6.0]) - ita(before)
    [face] = face_shifts(recoloured, portrait)
    assert face.delta_e == pytest.approx(expected_de, abs=0.5)
    assert face.ita_shift == pytest.approx(expected_ita, abs=1.0)
    assert face.ita_shift < -5  # darker skin has a smaller typology angle
    # Through the pack, as the scorer runs it: the worst face's figures.
    context = ProbeContext("a portrait", "generate", RapidOcr, partner=lambda: portrait)
    probes = probes_for(context, {"skin_tone_de", "skin_ita_shift"})
    assert probes["skin_tone_de"](recoloured) == pytest.approx(expected_de, abs=0.5)
    assert probes["skin_ita_shift"](recoloured) == pytest.approx(abs(expected_ita), abs=1.0)
    [same] = face_shifts(portrait, portrait)
    assert same.delta_e == 0.0 and same.ita_shift == 0.0
    # The rest of the picture moved by the same amount would not move the face's figures.
    scene = portrait.copy()
    scene[~pixels] = 255 - scene[~pixels]
    assert face_shifts(scene, portrait)[0].delta_e == pytest.approx(0.0, abs=1e-6)


def test_no_face_gives_no_skin_value():
    flat = np.full((128, 128, 3), (200, 150, 120), dtype=np.uint8)
    context = ProbeContext("a wall", "generate", RapidOcr, partner=lambda: flat)
    probes = probes_for(context, {"skin_tone_de"})
    assert probes["skin_tone_de"](flat) is None


def test_word_accuracy_and_the_case_sensitive_cer():
    assert word_accuracy("SUMMER SALE", "big SUMMER SALF today") == 0.5
    assert word_accuracy("la la land", "la land") == pytest.approx(2 / 3)  # each word used once
    assert best_span_cer("Sale", "SALE") == 0.0
    assert best_span_cer("Sale", "SALE", keep_case=True) == 0.75


def test_the_typography_probes_share_one_ocr_read():
    class Counting(RapidOcr):
        reads = 0

        def read(self, image):
            Counting.reads += 1
            return super().read(image)

    canvas = Image.new("RGB", (320, 80), "white")
    ImageDraw.Draw(canvas).text((10, 25), "OPEN DAILY", fill="black", font_size=32)
    image = np.asarray(canvas)
    engine = Counting()
    context = ProbeContext('a sign that says "Open Daily"', "generate", lambda: engine)
    wanted = {"typography_cer_case", "typography_word_accuracy"}
    probes = probes_for(context, wanted)
    values = {name: probes[name](image) for name in ("typography_cer", *sorted(wanted))}
    assert Counting.reads == 1
    assert values["typography_cer"] == 0.0
    assert values["typography_word_accuracy"] == 1.0
    assert values["typography_cer_case"] > 0.5  # "OPEN DAILY" is not "Open Daily"


def edit_case():
    source = skimage.data.astronaut()[::2, ::2].copy()  # 256 x 256
    mask = np.zeros(source.shape[:2], dtype=np.uint8)
    mask[64:160, 64:160] = 255
    return source, mask


def test_an_edit_inside_its_mask_preserves_and_one_outside_does_not():
    source, mask = edit_case()
    inside = source.copy()
    inside[64:160, 64:160] = (0, 200, 0)  # repainted where the mask allows
    assert preservation_ssim(inside, source, mask) == pytest.approx(1.0, abs=1e-6)
    assert preservation_de(inside, source, mask) == pytest.approx(0.0, abs=1e-6)
    leaked = inside.copy()
    leaked[200:, :] = np.clip(leaked[200:, :].astype(int) + (40, 0, 0), 0, 255)  # outside
    assert preservation_ssim(leaked, source, mask) < 0.99
    assert preservation_de(leaked, source, mask) > 1.0
    full = np.full_like(mask, 255)
    assert preservation_ssim(inside, source, full) is None
    with pytest.raises(ValueError, match="keeps the input's size"):
        preservation_ssim(source[:128], source, mask)


def test_determinism_is_a_pixel_gap_not_a_hash():
    source, _ = edit_case()
    assert determinism_gap(source, source.copy()) == 0.0
    off_by_three = np.clip(source.astype(int) + 3, 0, 255).astype(np.uint8)
    assert 2.5 < determinism_gap(source, off_by_three) <= 3.0


def test_an_upscale_that_blurs_scores_lower_fidelity():
    small = skimage.data.astronaut()[::4, ::4].copy()  # 128 x 128
    faithful = np.asarray(Image.fromarray(small).resize((512, 512), Image.BICUBIC))
    blurred = gaussian_filter(faithful.astype(float), (6, 6, 0)).astype(np.uint8)
    assert upscale_psnr(faithful, small) > upscale_psnr(blurred, small) + 5
    assert upscale_ssim(faithful, small) > 0.9 > upscale_ssim(blurred, small)


def test_brisque_scores_noise_and_blur_worse_than_the_photograph(portrait):
    engine = Brisque()
    clean = engine.score(portrait)
    noisy = np.clip(portrait + np.random.default_rng(0).normal(0, 25, portrait.shape), 0, 255)
    blurred = gaussian_filter(portrait.astype(float), (3, 3, 0))
    assert engine.score(noisy.astype(np.uint8)) > clean + 10
    assert engine.score(blurred.astype(np.uint8)) > clean + 10


def test_opt_in_probes_run_only_where_a_check_names_them(portrait):
    source, mask = edit_case()
    context = ProbeContext(
        "a portrait",
        "edit",
        RapidOcr,
        partner=lambda: portrait,
        source=lambda: source,
        mask=lambda: mask,
    )
    assert set(probes_for(context, set())) == {"typography_cer", "colour_shift_de"}
    assert set(probes_for(context, OPT_IN)) >= {
        "skin_tone_de",
        "brisque",
        "edit_preservation_ssim",
        "edit_preservation_de",
    }
    assert "upscale_psnr" not in probes_for(context, OPT_IN)  # an edit is not an upscale


def test_the_lab_renders_each_edit_twice_and_scores_the_gap(tmp_path):
    from controller.config import Route
    from controller.lab.render import units_of
    from controller.lab.runs import LabScorer
    from controller.lab.suites import find_suite, load_suite
    from controller.storage.artifacts import store_artifact
    from policies.policy import Policy, load_policy
    from workers.images import to_png

    path = find_suite("edits")
    suite = load_suite(path)
    units = units_of([(suite, path)], 2, {Route.EDIT, Route.INPAINT})
    again = [u for u in units if u.repeat_of]
    assert len(again) == len(suite.items) and all(u.key.endswith("/again") for u in again)
    first = {u.key: u for u in units}[again[0].repeat_of]
    assert first.seed == again[0].seed and first.item == again[0].item

    body = load_policy().model_dump()
    body["checks"].append(
        {
            "name": "edit_determinism",
            "kind": "paired_mean",
            "metric": "edit_determinism",
            "range": [-50, 50],
            "tolerance": {"absolute": 2},
            "critical": False,
        }
    )
    scorer = LabScorer(Policy.model_validate(body), tmp_path)
    source, _ = edit_case()
    one = store_artifact(tmp_path, to_png(source))
    other = store_artifact(
        tmp_path, to_png(np.clip(source.astype(int) + 3, 0, 255).astype(np.uint8))
    )
    scored = scorer.score(again[0], other, None, one)
    assert 2.5 < scored["values"]["edit_determinism"] <= 3.0
    assert "edit_determinism" not in scorer.score(first, one, None)["values"]  # no first render
