"""Probes on images made here: Pillow posters read by real OCR, tinted and blank images."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from policies.probes.colour import colour_shift
from policies.probes.typography import (
    RapidOcr,
    Tesseract,
    best_span_cer,
    requested_text,
    typography_cer,
)
from workers.images import is_blank

FONT = ImageFont.load_default(size=40)


def poster(text: str) -> np.ndarray:
    image = Image.new("RGB", (420, 120), (250, 250, 245))
    ImageDraw.Draw(image).text((20, 35), text, fill=(20, 20, 20), font=FONT)
    return np.asarray(image)


@pytest.fixture(scope="module", params=["rapidocr", "tesseract"])
def engine(request):
    if request.param == "rapidocr":
        return RapidOcr()
    if shutil.which("tesseract") is None:
        if os.environ.get("CI"):
            pytest.fail("tesseract must be installed under CI (.ci/run installs it)")
        pytest.skip(
            "Debian's tesseract-ocr is not installed (make test installs it when run as root)"
        )
    return Tesseract()


def test_missing_tesseract_says_how_to_fix_it():
    with pytest.raises(FileNotFoundError, match="apt-get install tesseract-ocr"):
        Tesseract("no-such-tesseract").read(np.zeros((8, 8, 3), dtype=np.uint8))


@pytest.mark.parametrize(
    ("prompt", "wanted"),
    [
        ('a sign that says "OPEN"', ["OPEN"]),
        ("a mug with 'GOOD MORNING' on it", ["GOOD MORNING"]),
        ('a card reading “HAPPY BIRTHDAY” and "TO YOU"', ["HAPPY BIRTHDAY", "TO YOU"]),
        ("the cat's toy, no text at all", []),
        ("a plain landscape", []),
    ],
)
def test_requested_text(prompt, wanted):
    assert requested_text(prompt) == wanted


@pytest.mark.parametrize(
    ("requested", "read", "cer"),
    [
        ("SALE", "BIG SALE TODAY", 0.0),  # found inside longer text
        ("sale", "S A L E", 3 / 4),  # spaces count after collapsing
        ("Open", "  OPEN  ", 0.0),  # case and whitespace do not
        ("ｏｐｅｎ", "open", 0.0),  # NFKC folds full-width letters
        ("OPEN", "OPFN", 0.25),  # one substitution in four
        ("OPEN", "", 1.0),  # nothing read
        ("HELLO", "HELO", 0.2),  # one deletion
    ],
)
def test_best_span_cer_known_values(requested, read, cer):
    assert best_span_cer(requested, read) == pytest.approx(cer)


def test_clean_poster_reads_back_with_cer_zero(engine):
    assert (
        typography_cer('a poster that says "SALE 50% OFF"', poster("SALE 50% OFF"), engine) == 0.0
    )


def test_garbled_poster_reads_back_with_high_cer(engine):
    assert typography_cer('a poster that says "SALE 50% OFF"', poster("XQZW 81# JKP"), engine) > 0.5


def test_prompt_without_text_is_not_scored(engine):
    assert typography_cer("a fox in the snow", poster("SALE"), engine) is None


def test_tinted_image_shifts_colour_and_identical_does_not():
    rng = np.random.default_rng(0)
    image = rng.integers(40, 200, (64, 64, 3), dtype=np.uint8)
    tinted = np.clip(image.astype(int) + [40, 0, -20], 0, 255).astype(np.uint8)
    assert colour_shift(image, image) == 0.0
    assert colour_shift(image, tinted) > 5.0


@pytest.mark.parametrize(
    "image", [np.zeros((32, 32, 3), np.uint8), np.full((32, 32, 3), np.nan, np.float32)]
)
def test_black_and_nan_images_are_blank(image):
    assert is_blank(image)


def tiny_clip(directory):
    """A random-weight CLIP saved and reloaded from disk (no hub): the probe's real code path."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    from workers.tiny import _write_char_tokenizer

    _write_char_tokenizer(directory)
    tokenizer = CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"))
    config = CLIPConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 77,
            "bos_token_id": 0,
            "eos_token_id": 1,
            "pad_token_id": 1,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=16,
    )
    model_dir = directory / "clip"
    CLIPModel(config).save_pretrained(model_dir)
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
        ),
        tokenizer=tokenizer,
    )
    processor.save_pretrained(model_dir)
    return model_dir


def test_clip_score_from_a_small_random_model_built_here(tmp_path):
    from policies.probes.clip_score import ClipScorer

    model_dir = tiny_clip(tmp_path)
    scorer = ClipScorer(model_dir)
    image = poster("OPEN")
    first = scorer.score('a sign that says "OPEN"', image)
    assert 0.0 <= first <= 100.0
    assert scorer.score('a sign that says "OPEN"', image) == pytest.approx(first)
    # The failure clusters' embedding: unit length, the model's projection size, and the
    # same image always lands in the same place.
    vector = scorer.embed(image)
    assert vector.shape == (scorer.dimensions,) == (16,)
    assert float(np.linalg.norm(vector)) == pytest.approx(1.0, abs=1e-5)
    assert np.allclose(scorer.embed(image), vector)
    assert not np.allclose(scorer.embed(255 - image), vector)
