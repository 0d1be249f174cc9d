"""Edit and upscale uploads: every malformed one is a 4xx naming the field, before any model."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from controller.config import ServerConfig
from controller.serving.api import BadRequest
from controller.serving.uploads import parse_edit, parse_upscale

LIMITS = ServerConfig(max_size=256, min_size=64, max_upload_bytes=200_000)


def encoded(size=(64, 64), mode="RGB", fmt="PNG", **save) -> bytes:
    channels = {"RGB": 3, "RGBA": 4, "L": None, "LA": 2}[mode]
    shape = (size[1], size[0]) if channels is None else (size[1], size[0], channels)
    pixels = np.random.default_rng(0).integers(0, 255, shape, dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels, mode).save(out, format=fmt, **save)
    return out.getvalue()


def bomb() -> bytes:
    """A PNG whose header declares 20000 x 20000 pixels in a few hundred bytes."""
    out = io.BytesIO()
    Image.new("1", (20000, 20000)).save(out, format="PNG", optimize=True)
    return out.getvalue()


def gif_animation() -> bytes:
    frames = [Image.new("RGB", (64, 64), c) for c in ("red", "blue")]
    out = io.BytesIO()
    frames[0].save(out, format="GIF", save_all=True, append_images=frames[1:])
    return out.getvalue()


IMAGE = encoded()
MASK = encoded(mode="L")


def edit(*extra, image=IMAGE, mask=None, prompt="make it blue"):
    parts = [("prompt", prompt)] if prompt is not None else []
    if image is not None:
        parts.append(("image", ("in.png", image)))
    if mask is not None:
        parts.append(("mask", ("mask.png", mask)))
    return parts + list(extra)


# (case id, parse, parts, status, field named, words in the message)
MALFORMED = [
    ("no-image", parse_edit, edit(image=None), 400, "image", "is required"),
    ("empty-image", parse_edit, edit(image=b""), 400, "image", "is empty"),
    ("not-an-image", parse_edit, edit(image=b"hello, not a picture"), 400, "image", "not an image"),
    (
        "truncated-png",
        parse_edit,
        edit(image=IMAGE[: len(IMAGE) // 2]),
        400,
        "image",
        "could not be decoded",
    ),
    (
        "decompression-bomb",
        parse_edit,
        edit(image=bomb()),
        400,
        "image",
        "decodes to too many pixels",
    ),
    (
        "image-over-the-largest-side",
        parse_edit,
        edit(image=encoded((264, 64))),
        400,
        "image",
        "largest side accepted is 256",
    ),
    (
        "too-many-bytes",
        parse_edit,
        edit(image=encoded((256, 256), mode="RGBA")),
        413,
        "image",
        "the limit is 200000",
    ),
    ("gif-format", parse_edit, edit(image=gif_animation()), 415, "image", "send PNG, JPEG or WebP"),
    ("not-multiple-of-8", parse_edit, edit(image=encoded((65, 64))), 400, "image", "multiple of 8"),
    (
        "too-small",
        parse_edit,
        edit(image=encoded((32, 32))),
        400,
        "image",
        "smallest side accepted is 64",
    ),
    (
        "mask-other-size",
        parse_edit,
        edit(mask=encoded((72, 64), mode="L")),
        400,
        "mask",
        "must be the same size",
    ),
    ("mask-rgb", parse_edit, edit(mask=encoded(mode="RGB")), 400, "mask", "single-channel"),
    ("mask-with-alpha", parse_edit, edit(mask=encoded(mode="LA")), 400, "mask", "single-channel"),
    ("mask-not-an-image", parse_edit, edit(mask=b"\x00\x01"), 400, "mask", "not an image"),
    ("image-twice", parse_edit, edit(("image", ("b.png", IMAGE))), 400, "image", "more than once"),
    ("prompt-twice", parse_edit, edit(("prompt", "again")), 400, "prompt", "more than once"),
    (
        "image-as-text",
        parse_edit,
        [("prompt", "p"), ("image", "data:image/png;base64,AAAA")],
        400,
        "image",
        "must be a file part",
    ),
    (
        "prompt-as-file",
        parse_edit,
        edit(("negative_prompt", ("n.txt", b"x"))),
        400,
        "negative_prompt",
        "only image, mask may be files",
    ),
    ("missing-prompt", parse_edit, edit(prompt=None), 400, "prompt", "is required"),
    (
        "strength-over-one",
        parse_edit,
        edit(("strength", "1.5")),
        400,
        "strength",
        "less than or equal to 1",
    ),
    ("strength-nan", parse_edit, edit(("strength", "nan")), 400, "strength", "finite"),
    ("n-not-a-number", parse_edit, edit(("n", "two")), 400, "n", "integer"),
    (
        "size-differs-from-image",
        parse_edit,
        edit(("size", "128x128")),
        400,
        "size",
        "an edit keeps the image's size",
    ),
    ("unknown-field", parse_edit, edit(("colour", "red")), 400, "colour", "unknown field"),
    (
        "upscale-wrong-scale",
        parse_upscale,
        [("image", ("s.png", encoded((16, 16)))), ("scale", "2")],
        400,
        "scale",
        "enlarge 4x",
    ),
    (
        "upscale-output-too-big",
        parse_upscale,
        [("image", ("s.png", encoded((128, 128))))],
        400,
        "image",
        "over the largest side served",
    ),
    (
        "upscale-mask-given",
        parse_upscale,
        [("image", ("s.png", encoded((16, 16)))), ("mask", ("m.png", MASK))],
        400,
        "mask",
        "only image may be files",
    ),
]


@pytest.mark.parametrize(
    ("parse", "parts", "status", "field", "words"),
    [c[1:] for c in MALFORMED],
    ids=[c[0] for c in MALFORMED],
)
def test_malformed_upload_names_the_field(parse, parts, status, field, words):
    with pytest.raises(BadRequest) as caught:
        parse(parts, LIMITS)
    assert 400 <= caught.value.status < 500
    assert caught.value.status == status, caught.value.errors
    error = caught.value.errors[0]
    assert error["field"] == field and words in error["message"], caught.value.errors


def test_there_are_at_least_fifteen_upload_cases():
    assert len(MALFORMED) >= 15


def test_a_good_edit_is_handed_on_as_clean_pngs_of_the_image_size():
    upload = parse_edit(edit(("n", "2"), ("seed", "5"), ("strength", "0.6"), mask=MASK), LIMITS)
    assert (upload.width, upload.height) == (64, 64)
    assert (upload.fields.n, upload.fields.seed, upload.fields.strength) == (2, 5, 0.6)
    assert Image.open(io.BytesIO(upload.image)).mode == "RGB"
    assert Image.open(io.BytesIO(upload.mask)).mode == "L"


def test_a_jpeg_edit_and_an_upscale_are_accepted():
    jpeg = parse_edit(edit(image=encoded(fmt="JPEG")), LIMITS)
    assert Image.open(io.BytesIO(jpeg.image)).format == "PNG"
    upscale = parse_upscale([("image", ("s.png", encoded((32, 16))))], LIMITS)
    assert (upscale.width, upscale.height) == (128, 64)
