"""The multipart bodies of `POST /v1/images/edits` and `/v1/images/upscales`, and their refusals.

Following the OpenAI Images API: an edit sends `image`, an optional `mask`,
`prompt`, `n`, `size`, `user` (plus `seed`, `strength`, `steps`, `guidance`,
`negative_prompt`); an upscale sends `image` and `scale`. An upload is checked
before any model sees it: a bad one is a 4xx naming the field, never a model
error, never recorded as one. Images are decoded once here and handed on as
clean PNGs, so a model server never parses what a client sent.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any

from pydantic import Field, ValidationError, field_validator

from controller.config import ServerConfig
from controller.serving.api import BadRequest, ImagesRequest, field_error
from workers.config import UPSCALE_FACTOR
from workers.images import mask_area
from workers.jobs import DEFAULT_STRENGTH

FORMATS = ("PNG", "JPEG", "WEBP")
FILE_FIELDS = ("image", "mask")


class EditFields(ImagesRequest):
    """The text fields of an edit: the generation fields plus how far the edit may go."""

    strength: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)


class UpscaleFields(ImagesRequest):
    """The text fields of an upscale: the prompt is optional, the factor is the model's."""

    prompt: str = ""
    scale: int = UPSCALE_FACTOR

    @field_validator("scale")
    @classmethod
    def _scale(cls, value: int) -> int:
        if value != UPSCALE_FACTOR:
            raise ValueError(
                f"scale={value}: the upscale route's models enlarge {UPSCALE_FACTOR}x; send scale={UPSCALE_FACTOR}"
            )
        return value


@dataclass(frozen=True)
class Upload:
    """A checked edit or upscale: its fields, the image (and mask) as PNG, the output size."""

    fields: EditFields | UpscaleFields
    image: bytes
    mask: bytes | None
    width: int  # of the output
    height: int
    mask_area: float | None = None  # the mask's share of the image (a prompt tag's bucket)


Part = str | tuple[str, bytes]  # a text field, or a file field: (file name, content)


def parse_edit(parts: list[tuple[str, Part]], limits: ServerConfig) -> Upload:
    """Validate an edit's multipart fields; raise BadRequest naming the first bad field."""
    fields, files = _split(parts, EditFields, limits, allowed_files=("image", "mask"))
    strength = DEFAULT_STRENGTH if fields.strength is None else fields.strength
    if fields.steps is not None and int(fields.steps * strength) < 1:
        _refuse(
            400,
            "steps",
            f"steps={fields.steps} at strength {strength:g} leaves no denoising step "
            f"(an edit runs steps x strength of them); send steps >= {math.ceil(1 / strength)}",
        )
    image, (width, height) = _image(files, "image", limits, "RGB")
    if fields.size is not None and fields.dimensions(limits) != (width, height):
        _refuse(
            400,
            "size",
            f"size {fields.size} differs from the image's {width}x{height}; an edit keeps "
            "the image's size (leave size out, or resize the image)",
        )
    mask = None
    if "mask" in files:
        mask, mask_size = _image(files, "mask", limits, "L")
        if mask_size != (width, height):
            _refuse(
                400,
                "mask",
                f"mask is {mask_size[0]}x{mask_size[1]} but the image is {width}x{height}; "
                "they must be the same size",
            )
    return Upload(fields, image, mask, width, height, mask_area(mask) if mask else None)


def parse_upscale(parts: list[tuple[str, Part]], limits: ServerConfig) -> Upload:
    """Validate an upscale's multipart fields; the output is the image times the model's factor."""
    fields, files = _split(parts, UpscaleFields, limits, allowed_files=("image",))
    image, (width, height) = _image(files, "image", limits, "RGB", min_side=8)
    out_w, out_h = width * fields.scale, height * fields.scale
    if max(out_w, out_h) > limits.max_size:
        _refuse(
            400,
            "image",
            f"image is {width}x{height}: {fields.scale}x larger is {out_w}x{out_h}, over the "
            f"largest side served ({limits.max_size}); send at most "
            f"{limits.max_size // fields.scale} px a side",
        )
    return Upload(fields, image, None, out_w, out_h)


def _refuse(status: int, field: str, message: str) -> None:
    raise BadRequest(status, [{"field": field, "message": message}])


def _split(
    parts: list[tuple[str, Part]],
    model: type[EditFields] | type[UpscaleFields],
    limits: ServerConfig,
    allowed_files: tuple[str, ...],
) -> tuple[Any, dict[str, bytes]]:
    """Text fields validated by `model`; file fields by name. Each field may appear once."""
    seen: set[str] = set()
    text: dict[str, str] = {}
    files: dict[str, bytes] = {}
    for name, value in parts:
        if name in seen:
            _refuse(400, name, f"{name} appears more than once in the form; send each field once")
        seen.add(name)
        if isinstance(value, tuple):
            if name not in allowed_files:
                _refuse(
                    400, name, f"{name} is a file; only {', '.join(allowed_files)} may be files"
                )
            if len(value[1]) > limits.max_upload_bytes:
                _refuse(
                    413,
                    name,
                    f"{name} is {len(value[1])} bytes; the limit is {limits.max_upload_bytes}",
                )
            files[name] = value[1]
        elif name in FILE_FIELDS:
            _refuse(400, name, f"{name} must be a file part (an image), not a text field")
        else:
            text[name] = value
    try:
        fields = model.model_validate(text, context={"limits": limits})
    except ValidationError as exc:
        raise BadRequest(400, [field_error(e) for e in exc.errors()]) from None
    return fields, files


def _image(
    files: dict[str, bytes],
    field: str,
    limits: ServerConfig,
    mode: str,
    min_side: int | None = None,
) -> tuple[bytes, tuple[int, int]]:
    """Decode, check and re-encode one uploaded image as PNG in `mode` (RGB, or L for a mask)."""
    from PIL import Image, UnidentifiedImageError

    data = files.get(field)
    if data is None:
        _refuse(400, field, f"{field} is required: send it as a file part (PNG, JPEG or WebP)")
    if not data:
        _refuse(400, field, f"{field} is empty (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as picture:
            _check_header(picture, field, limits, mode, min_side or limits.min_size)
            picture.load()  # a truncated file fails here, before any model sees it
            converted = picture.convert(mode)
    except BadRequest:
        raise
    except Image.DecompressionBombError as exc:
        _refuse(400, field, f"{field} decodes to too many pixels: {exc}")
    except UnidentifiedImageError:
        _refuse(400, field, f"{field} is not an image PNG, JPEG or WebP can decode")
    except (OSError, SyntaxError, ValueError) as exc:
        _refuse(400, field, f"{field} could not be decoded ({exc}); is the file complete?")
    out = io.BytesIO()
    converted.save(out, format="PNG")
    return out.getvalue(), converted.size


def _check_header(picture: Any, field: str, limits: ServerConfig, mode: str, min_side: int) -> None:
    """What the header says, checked before decoding: format, frames, size, channels."""
    if picture.format not in FORMATS:
        _refuse(415, field, f"{field} is {picture.format}; send PNG, JPEG or WebP")
    if getattr(picture, "n_frames", 1) > 1:
        _refuse(400, field, f"{field} is animated ({picture.n_frames} frames); send one frame")
    width, height = picture.size
    # A decompression bomb declares a huge size in a few bytes: refused from the header alone.
    if max(width, height) > limits.max_size:
        _refuse(
            400,
            field,
            f"{field} is {width}x{height}; the largest side accepted is {limits.max_size}",
        )
    if min(width, height) < min_side:
        _refuse(
            400, field, f"{field} is {width}x{height}; the smallest side accepted is {min_side}"
        )
    if width % 8 or height % 8:
        _refuse(400, field, f"{field} is {width}x{height}; each side must be a multiple of 8")
    if mode == "L" and picture.mode not in ("L", "1"):
        _refuse(
            400,
            field,
            f"{field} has mode {picture.mode} ({len(picture.getbands())} channels); a mask is "
            "single-channel (greyscale): white where the image is repainted, black where it is kept",
        )
