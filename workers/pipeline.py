"""A diffusers pipeline, loaded and driven the way a model server needs it.

Kept apart from Ray so it can be tested, benchmarked and reasoned about on its
own: load with `from_pretrained`, pick the sampler, generate a batch of jobs
with one CPU generator per job so each image depends only on its seed.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from workers.config import ModelConfig, ModelKind
from workers.deadlines import StepCallback
from workers.images import is_blank, pil_image, to_uint8
from workers.jobs import DEFAULT_STRENGTH, ImageJob

log = structlog.get_logger("cutover.pipeline")

SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_ancestral": "EulerAncestralDiscreteScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "lcm": "LCMScheduler",  # distilled few-step models (1-4 steps)
}

UPSCALE_NOISE_LEVEL = 20


def component_dtypes(precision: str) -> dict[str, Any]:
    """The dtype of each component: `mixed_float16` keeps the VAE in float32, which avoids the
    all-black (NaN) images a half-precision VAE decode can produce."""
    import torch

    half = {
        "float32": torch.float32,
        "float16": torch.float16,
        "bfloat16": torch.bfloat16,
        "mixed_float16": torch.float16,
    }[precision]
    vae = torch.float32 if precision == "mixed_float16" else half
    return {"unet": half, "text_encoder": half, "vae": vae}


def load_pipeline(model: ModelConfig, base_dir: Path, device: str) -> Any:
    """`from_pretrained` on a local directory or hub id (offline when HF_HUB_OFFLINE=1)."""
    import diffusers
    from diffusers import DiffusionPipeline

    diffusers.utils.logging.disable_progress_bar()
    dtypes = component_dtypes(model.precision)
    source = str(model.pipeline_path(base_dir)) if model.is_local(base_dir) else model.pipeline
    pipeline = DiffusionPipeline.from_pretrained(
        source,
        dtype=dtypes["unet"],
        local_files_only=os.environ.get("HF_HUB_OFFLINE") == "1" or model.is_local(base_dir),
    )
    if hasattr(pipeline, "safety_checker"):
        pipeline.safety_checker = None
    pipeline.vae.to(dtypes["vae"])
    scheduler_cls = getattr(diffusers, SCHEDULERS[model.sampler])
    pipeline.scheduler = scheduler_cls.from_config(pipeline.scheduler.config)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device)


class PipelineRunner:
    """One pipeline, entered by one thread at a time (diffusers pipelines are not re-entrant)."""

    def __init__(self, model: ModelConfig, base_dir: Path, device: str | None = None) -> None:
        import torch

        self.model = model
        self.device = device or (
            "cuda" if torch.cuda.is_available() and model.num_gpus > 0 else "cpu"
        )
        if model.num_gpus > 0 and self.device == "cpu":
            log.warning(
                "no_cuda_device",
                pipeline=model.pipeline,
                precision=model.precision,
                note="num_gpus > 0 but torch sees no CUDA device; running on the CPU",
            )
        self.pipeline = load_pipeline(model, base_dir, self.device)
        self._lock = threading.Lock()

    def call(
        self, jobs: list[ImageJob], on_step: StepCallback | None = None
    ) -> list[tuple[np.ndarray, bool]]:
        """One pipeline call for jobs of one group: (uint8 image, blank?) per job, in order.

        `on_step` runs after every denoising step and may raise to stop the call there.

        Sampling returns latents; the VAE decodes them in its own dtype (float32 under
        mixed precision), so the half-precision part never touches the pixels. The upscaler
        decodes itself (it upcasts its VAE on its own).
        """
        import torch

        first = jobs[0]
        kwargs: dict[str, Any] = {
            "prompt": [job.prompt for job in jobs],
            "num_inference_steps": first.steps or self.model.steps,
            "guidance_scale": self.model.guidance if first.guidance is None else first.guidance,
            "generator": [torch.Generator("cpu").manual_seed(job.seed) for job in jobs],
            "output_type": "latent",
        }
        if first.negative_prompt is not None:
            kwargs["negative_prompt"] = [job.negative_prompt or "" for job in jobs]
        kwargs |= self._inputs(jobs)
        if on_step is not None:
            if self.model.kind is ModelKind.UPSCALE:  # this pipeline has the older callback only
                kwargs["callback"] = lambda step, timestep, latents: on_step(
                    self.pipeline, step, timestep, {"latents": latents}
                )
            else:
                kwargs["callback_on_step_end"] = on_step
        with self._lock, torch.inference_mode():
            if self.model.kind is ModelKind.UPSCALE:
                images = self.pipeline(**kwargs).images
            else:
                images = self._decode(self.pipeline(**kwargs).images, len(jobs))
        return [(to_uint8(image), is_blank(image)) for image in images]

    def _inputs(self, jobs: list[ImageJob]) -> dict[str, Any]:
        """What each kind of pipeline takes besides the prompt: a size, an image, a mask."""
        first, kind = jobs[0], self.model.kind
        if kind is ModelKind.TEXT2IMG:
            return {"height": first.height, "width": first.width}
        images = [pil_image(job.image or b"", "RGB") for job in jobs]
        strength = DEFAULT_STRENGTH if first.strength is None else first.strength
        if kind is ModelKind.IMG2IMG:
            return {"image": images, "strength": strength}
        if kind is ModelKind.INPAINT:
            masks = [pil_image(job.mask or b"", "L") for job in jobs]
            return {
                "image": images,
                "mask_image": masks,
                "height": first.height,
                "width": first.width,
                "strength": strength,
            }
        return {"image": images, "noise_level": UPSCALE_NOISE_LEVEL, "output_type": "np"}

    def _decode(self, latents: Any, count: int) -> Any:
        vae = self.pipeline.vae
        decoded = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[
            0
        ]
        return self.pipeline.image_processor.postprocess(
            decoded.float(), output_type="np", do_denormalize=[True] * count
        )
