"""What a model server needs to know: its model, its batching, its faults.

Owned by `workers/` because a model server is started from this alone (the
controller sends it across to the Ray replica), and so the serving plane never
imports the controller. `controller/config.py` places these inside the whole
`cutover.yaml` (pool, routes, rollouts).
"""

from __future__ import annotations

import math
import re
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationInfo, field_validator

SAMPLERS = ("ddim", "euler", "euler_ancestral", "dpmpp_2m", "lcm")
PRECISIONS = ("float32", "float16", "bfloat16", "mixed_float16")
UPSCALE_FACTOR = 4  # the Stable Diffusion x4 upscaler's, and the tiny one's


class ModelKind(StrEnum):
    """What a model does with a request: the pipeline class it loads and the inputs it takes."""

    TEXT2IMG = "text2img"
    IMG2IMG = "img2img"
    INPAINT = "inpaint"
    UPSCALE = "upscale"


_DURATION = re.compile(
    r"^\s*(?:(\d+(?:\.\d+)?)\s*d)?\s*(?:(\d+(?:\.\d+)?)\s*h)?\s*(?:(\d+(?:\.\d+)?)\s*m)?\s*(?:(\d+(?:\.\d+)?)\s*s)?\s*$"
)


def parse_duration(value: Any) -> float:
    """Seconds from a number or a string like `90s`, `5m`, `1h30m`, `2d`."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a duration")
    if isinstance(value, int | float):
        if not math.isfinite(value) or value < 0:
            raise ValueError(
                f"{value!r} is not a duration: it must be a finite number of seconds >= 0"
            )
        return float(value)
    if isinstance(value, str):
        match = _DURATION.match(value)
        if match and any(match.groups()):
            days, hours, minutes, seconds = (float(g) if g else 0.0 for g in match.groups())
            return days * 86400 + hours * 3600 + minutes * 60 + seconds
    raise ValueError(
        f"{value!r} is not a duration: use seconds (90) or a value like 30s, 5m, 2h, 1h30m, 1d"
    )


Duration = Annotated[float, BeforeValidator(parse_duration)]

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|KiB|MiB|GiB|TiB)?\s*$")
_SIZE_UNITS = {
    None: 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "KiB": 2**10,
    "MiB": 2**20,
    "GiB": 2**30,
    "TiB": 2**40,
}


def parse_size(value: Any) -> int:
    """Bytes from a number or a string like `512MiB`, `2GiB`, `1.5GB`."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str):
        match = _SIZE.match(value)
        if match:
            return int(float(match.group(1)) * _SIZE_UNITS[match.group(2)])
    raise ValueError(f"{value!r} is not a size: use bytes (1048576) or a value like 512MiB, 2GiB")


ByteSize = Annotated[int, BeforeValidator(parse_size)]


class Strict(BaseModel):
    """Unknown keys are errors (a typo must never be silently ignored); values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class FaultConfig(Strict):
    """Faults a model server injects on purpose, to rehearse rollbacks (off by default)."""

    error_percent: float = Field(0.0, ge=0, le=100)
    delay: Duration = 0.0
    delay_percent: float = Field(100.0, ge=0, le=100)
    timeout_percent: float = Field(0.0, ge=0, le=100)
    oom_percent: float = Field(0.0, ge=0, le=100)
    hang: Duration = 600.0
    step_delay: Duration = Field(
        0.0, description="added to every denoising step, as on a slow or throttled device"
    )
    tint: tuple[int, int, int] | None = Field(None, description="RGB added to every output")
    stand_in: bool = Field(
        False, description="skip the pipeline: a solid image after `delay` (overhead benchmarks)"
    )
    text_card: bool = Field(
        False,
        description="skip the pipeline: a card with the prompt's quoted text (typography "
        "rehearsals; the tiny models cannot draw text)",
    )
    garble_text_over: int | None = Field(
        None, ge=0, description="with text_card: quoted text longer than this comes out garbled"
    )

    @field_validator("tint")
    @classmethod
    def _tint_range(cls, value: tuple[int, int, int] | None) -> tuple[int, int, int] | None:
        if value is not None and not all(-255 <= c <= 255 for c in value):
            raise ValueError(f"tint {list(value)} must be three integers between -255 and 255")
        return value

    @property
    def active(self) -> bool:
        return bool(
            self.error_percent
            or self.delay
            or self.timeout_percent
            or self.oom_percent
            or self.tint
            or self.step_delay
        )


class SimulatedMemory(Strict):
    """A pretend GPU for CPU machines: the adaptive batching path runs against this budget."""

    budget: ByteSize
    bytes_per_pixel: float = Field(gt=0, description="true activation bytes per image pixel")


class ModelConfig(Strict):
    """One model of the pool: its pipeline and how a replica serves it."""

    pipeline: str = Field(description="local directory or hub id loaded with from_pretrained")
    kind: ModelKind = ModelKind.TEXT2IMG
    num_gpus: float = Field(0.0, ge=0)
    precision: Literal["float32", "float16", "bfloat16", "mixed_float16"] = "float32"
    sampler: Literal["ddim", "euler", "euler_ancestral", "dpmpp_2m", "lcm"] = "ddim"
    steps: int = Field(20, ge=1, le=1000)
    guidance: float = Field(7.5, ge=0, le=100, allow_inf_nan=False)
    batch_size: int | Literal["auto"] = 1
    max_batch_size: int = Field(16, ge=1, le=1024)
    batch_wait: Duration = 0.01
    memory_headroom: ByteSize = Field(
        512 * 2**20, description="bytes kept free when sizing a batch"
    )
    initial_bytes_per_pixel: float = Field(
        20_000.0,
        gt=0,
        description="first guess of activation bytes per pixel, before any batch was measured",
    )
    gpu_memory_limit: ByteSize | None = Field(
        None, description="cap this server's share of the GPU"
    )
    simulated_memory: SimulatedMemory | None = None
    oom_unhealthy_after: int = Field(
        3, ge=1, description="consecutive OOMs of single images before unhealthy"
    )
    warmup: list[int] = Field(
        [64, 128, 256],
        description="square sizes sampled for a few steps at start, so admission can judge "
        "sizes not served yet; [] skips it",
    )
    wedged_after: Duration = Field(
        60.0,
        description="a pipeline call still running this long after every caller's deadline "
        "fails the health check (it did not stop between steps)",
    )
    num_cpus: float = Field(1.0, gt=0)
    resources: dict[str, float] = Field(
        {}, description="custom Ray resources each replica needs, to place it on labelled nodes"
    )
    replicas: int = Field(1, ge=1, le=1024)
    in_router: bool = Field(
        False,
        description="serve this model inside each router replica instead of its own "
        "deployment: no hop on its requests, and it scales with the router",
    )
    faults: FaultConfig = FaultConfig()

    @field_validator("precision")
    @classmethod
    def _cpu_precision(cls, value: str, info: ValidationInfo) -> str:
        if info.data.get("num_gpus", 0) == 0 and value in ("float16", "mixed_float16"):
            raise ValueError(
                f"precision {value} needs a GPU: on CPU use float32 or bfloat16, or give the model num_gpus > 0"
            )
        return value

    @field_validator("in_router")
    @classmethod
    def _one_replica_setting(cls, value: bool, info: ValidationInfo) -> bool:
        if value and info.data.get("replicas", 1) != 1:
            raise ValueError(
                "a model served in the router has as many replicas as the router: "
                "drop `replicas` and set `server.replicas` instead"
            )
        return value

    @field_validator("batch_size", mode="before")
    @classmethod
    def _batch_size(cls, value: Any) -> Any:
        if value == "auto" or (
            isinstance(value, int) and not isinstance(value, bool) and value >= 1
        ):
            return value
        raise ValueError(f"{value!r} is not a batch size: use a whole number >= 1 or 'auto'")

    def is_local(self, base_dir: Path) -> bool:
        """A pipeline written as a path (or an existing directory) is local, else a hub id."""
        text = self.pipeline
        return text.startswith(("/", ".", "~")) or (base_dir / text).expanduser().exists()

    def pipeline_path(self, base_dir: Path) -> Path:
        return (base_dir / Path(self.pipeline).expanduser()).resolve()
