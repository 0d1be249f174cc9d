"""The request body of `POST /v1/images/generations`, and its refusals.

Compatible with the OpenAI Images API (`prompt`, `n`, `size`,
`response_format`, `user`; `model`, `quality` and `style` are accepted and
ignored), plus `seed`, `steps`, `guidance` and `negative_prompt`. A bad request
is a 422 that names the field; it never reaches a model and is never recorded
as a model error.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from controller.config import ServerConfig

MAX_SEED = 2**63 - 1
MAX_BODY_BYTES = 1_000_000


def error_envelope(
    message: str,
    type_: str,
    *,
    param: str | None = None,
    errors: list[dict[str, str]] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Every error body, 4xx and 5xx alike: the OpenAI envelope, one shape
    (`message`, `type`, `param`, `errors`, then anything specific to the error)."""
    return {
        "error": {"message": message, "type": type_, "param": param, "errors": errors or []} | extra
    }


class BadRequest(Exception):
    """A client mistake: HTTP status, and one entry per offending field."""

    def __init__(self, status: int, errors: list[dict[str, str]]) -> None:
        self.status = status
        self.errors = errors
        super().__init__("; ".join(f"{e['field']}: {e['message']}" for e in errors))

    def body(self) -> dict[str, Any]:
        return error_envelope(
            str(self), "invalid_request_error", param=self.errors[0]["field"], errors=self.errors
        )


class ImagesRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str
    n: int = 1
    size: str | None = None
    response_format: Literal["b64_json"] = "b64_json"
    user: str | None = Field(None, max_length=256)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    steps: int | None = Field(None, ge=1)
    guidance: float | None = Field(None, ge=0, le=100, allow_inf_nan=False)
    negative_prompt: str | None = None
    model: str | None = None
    quality: str | None = None
    style: str | None = None

    @field_validator("prompt", "negative_prompt")
    @classmethod
    def _text(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return value
        limits: ServerConfig = info.context["limits"]
        if info.field_name == "prompt" and not value.strip():
            raise ValueError("prompt is empty")
        if len(value) > limits.max_prompt_chars:
            raise ValueError(f"is {len(value)} characters; the limit is {limits.max_prompt_chars}")
        if "\x00" in value:
            raise ValueError("contains a NUL character")
        return value

    @field_validator("n")
    @classmethod
    def _n(cls, value: int, info: ValidationInfo) -> int:
        limits: ServerConfig = info.context["limits"]
        if not 1 <= value <= limits.max_n:
            raise ValueError(f"n={value} is out of range: 1..{limits.max_n} images per request")
        return value

    @field_validator("seed")
    @classmethod
    def _seeds_in_range(cls, value: int | None, info: ValidationInfo) -> int | None:
        # Image i uses seed + i: every one must be a seed a client could send back.
        n = info.data.get("n", 1)
        if value is not None and value + n - 1 > MAX_SEED:
            raise ValueError(
                f"seed {value} with n={n} would give image {n - 1} the seed {value + n - 1}, "
                f"over the largest seed {MAX_SEED}; use a seed <= {MAX_SEED - n + 1}"
            )
        return value

    @field_validator("steps")
    @classmethod
    def _steps(cls, value: int | None, info: ValidationInfo) -> int | None:
        limits: ServerConfig = info.context["limits"]
        if value is not None and value > limits.max_steps:
            raise ValueError(f"steps={value} is over the limit of {limits.max_steps}")
        return value

    @field_validator("size")
    @classmethod
    def _size(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return value
        parse_size(value, info.context["limits"])
        return value

    def dimensions(self, limits: ServerConfig) -> tuple[int, int]:
        return parse_size(self.size or limits.default_size, limits)

    def generation_params(self, width: int, height: int) -> dict[str, Any]:
        """The parameters both sides of a pair share (the seed is stored beside them)."""
        return {
            "n": self.n,
            "size": f"{width}x{height}",
            "steps": self.steps,
            "guidance": self.guidance,
            "negative_prompt": self.negative_prompt,
            "response_format": self.response_format,
        }


def parse_size(value: str, limits: ServerConfig) -> tuple[int, int]:
    """`WIDTHxHEIGHT`, each a multiple of 8 inside the configured range."""
    parts = value.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise ValueError(f"size {value!r} is not WIDTHxHEIGHT, for example 512x512")
    width, height = int(parts[0]), int(parts[1])
    for side in (width, height):
        if side % 8:
            raise ValueError(f"size {value!r}: {side} is not a multiple of 8")
        if not limits.min_size <= side <= limits.max_size:
            raise ValueError(
                f"size {value!r}: {side} is outside {limits.min_size}..{limits.max_size}"
            )
    return width, height


def parse_images_request(raw: bytes, limits: ServerConfig) -> ImagesRequest:
    """Validate a raw body; raise BadRequest naming every bad field."""
    if len(raw) > MAX_BODY_BYTES:
        raise BadRequest(
            413, [{"field": "body", "message": f"body is over {MAX_BODY_BYTES} bytes"}]
        )
    try:
        # JSON has no NaN or Infinity, but clients send them; parse them so the field is named.
        data = json.loads(raw, parse_constant=float, object_pairs_hook=_refuse_duplicates)
    except DuplicateKey as exc:
        raise BadRequest(
            422,
            [
                {
                    "field": exc.key,
                    "message": "appears more than once in the body; send each field once",
                }
            ],
        ) from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(
            422, [{"field": "body", "message": f"body is not valid JSON: {exc}"}]
        ) from None
    if not isinstance(data, dict):
        raise BadRequest(
            422,
            [
                {
                    "field": "body",
                    "message": f"body must be a JSON object, not {type(data).__name__}",
                }
            ],
        )
    try:
        return ImagesRequest.model_validate(data, context={"limits": limits}, strict=True)
    except ValidationError as exc:
        raise BadRequest(422, [field_error(e) for e in exc.errors()]) from None


class DuplicateKey(Exception):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _refuse_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """Last-one-wins would silently pick one of two prompts or seeds: refuse, as the config
    loader does."""
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise DuplicateKey(key)
        seen[key] = value
    return seen


def field_error(error: Any) -> dict[str, str]:
    field = ".".join(str(p) for p in error["loc"]) or "body"
    kind = error["type"]
    if kind == "extra_forbidden":
        message = "unknown field"
    elif kind == "missing":
        message = "is required"
    else:
        message = str(error["msg"]).removeprefix("Value error, ")
    return {"field": field, "message": message}
