"""Tiny random-weight Stable Diffusion pipelines, built offline.

Model hubs are unreachable on development and CI machines, yet every test should
run the real loading and sampling code. A pipeline of the same architecture as
Stable Diffusion, a few MB in size, saved with `save_pretrained` and loaded
back with `from_pretrained`, is the smallest honest stand-in.
"""

from __future__ import annotations

import hashlib
import json
import string
import tempfile
from pathlib import Path

MARKER = "cutover_tiny.json"
KINDS = ("text2img", "img2img", "inpaint", "upscale")
_CHARS = string.ascii_lowercase + string.digits + string.punctuation


def variant_seed(variant: str) -> int:
    """A stable seed per variant name, so `incumbent` and `candidate` differ by default."""
    return int.from_bytes(hashlib.sha256(variant.encode()).digest()[:4], "big")


def _write_char_tokenizer(directory: Path) -> None:
    """A character-level CLIP BPE vocabulary: every character, plain and word-final, no merges."""
    tokens = ["<|startoftext|>", "<|endoftext|>"]
    for char in _CHARS:
        tokens += [char, char + "</w>"]
    (directory / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (directory / "merges.txt").write_text("#version: 0.2\n")


def _text_parts() -> tuple[object, object]:
    """A CLIP tokenizer (character level, no merges) and a two-layer text encoder of width 32."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        _write_char_tokenizer(Path(tmp))
        tokenizer = CLIPTokenizer(
            str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"), model_max_length=77
        )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=len(tokenizer),
            max_position_embeddings=77,
        )
    )
    return tokenizer, text_encoder


def _unet(in_channels: int, levels: int = 2, **extra: object) -> object:
    from diffusers import UNet2DConditionModel

    channels = (32, 64) if levels == 2 else (32, 32, 64)
    down = ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (levels - 1)
    up = ("CrossAttnUpBlock2D",) * (levels - 1) + ("UpBlock2D",)
    return UNet2DConditionModel(
        block_out_channels=channels,
        layers_per_block=1,
        sample_size=32,
        in_channels=in_channels,
        out_channels=4,
        down_block_types=down,
        up_block_types=up,
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=16,
        **extra,
    )


def _vae(levels: int = 2) -> object:
    """Each level past the first halves the latent's side: 2 levels decode 2x, 3 levels 4x."""
    from diffusers import AutoencoderKL

    channels = (32, 64) if levels == 2 else (32, 32, 64)
    return AutoencoderKL(
        block_out_channels=channels,
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        latent_channels=4,
        norm_num_groups=16,
    )


def _scheduler(distilled: bool) -> object:
    """DDIM, or for a distilled (few-step) model an LCM scheduler, as LCM-distilled models ship."""
    from diffusers import DDIMScheduler, LCMScheduler

    common = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
    if distilled:
        return LCMScheduler(**common, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return DDIMScheduler(**common, clip_sample=False, steps_offset=1, set_alpha_to_one=False)


def make_tiny_pipeline(
    out_dir: str | Path,
    *,
    seed: int | None = None,
    variant: str = "incumbent",
    kind: str = "text2img",
    distilled: bool = False,
) -> Path:
    """Build a random-weight pipeline of `kind` and save it to `out_dir`.

    text2img, img2img and inpaint are Stable Diffusion pipelines (inpaint's UNet takes the
    masked image and the mask as 5 more input channels); upscale is the x4 upscaler, whose
    UNet takes the low-resolution image beside the latents and whose VAE decodes 4x larger.
    """
    import torch
    from diffusers import (
        DDPMScheduler,
        StableDiffusionImg2ImgPipeline,
        StableDiffusionInpaintPipeline,
        StableDiffusionPipeline,
        StableDiffusionUpscalePipeline,
    )

    if kind not in KINDS:
        raise ValueError(f"kind {kind!r} is not one of {', '.join(KINDS)}")
    out = Path(out_dir)
    seed = variant_seed(variant) if seed is None else seed
    torch.manual_seed(seed)
    tokenizer, text_encoder = _text_parts()
    common = {"tokenizer": tokenizer, "text_encoder": text_encoder}
    if kind == "upscale":
        pipeline = StableDiffusionUpscalePipeline(
            unet=_unet(7, levels=3, num_class_embeds=1000),
            vae=_vae(levels=3),
            low_res_scheduler=DDPMScheduler(),
            scheduler=_scheduler(distilled),
            max_noise_level=350,
            **common,
        )
    else:
        sd = {
            "vae": _vae(),
            "scheduler": _scheduler(distilled),
            "safety_checker": None,
            "feature_extractor": None,
            "requires_safety_checker": False,
            **common,
        }
        if kind == "inpaint":
            pipeline = StableDiffusionInpaintPipeline(unet=_unet(9), **sd)
        elif kind == "img2img":
            pipeline = StableDiffusionImg2ImgPipeline(unet=_unet(4), **sd)
        else:
            pipeline = StableDiffusionPipeline(unet=_unet(4), **sd)
    out.mkdir(parents=True, exist_ok=True)
    pipeline.save_pretrained(out, safe_serialization=True)
    marker = {"variant": variant, "seed": seed, "kind": kind, "distilled": distilled}
    (out / MARKER).write_text(json.dumps(marker))
    return out


def ensure_tiny_pipeline(
    out_dir: str | Path, *, variant: str, kind: str = "text2img", distilled: bool = False
) -> Path:
    """Build the pipeline once; later calls reuse the directory (a cache for demos and tests)."""
    out = Path(out_dir)
    if (out / MARKER).exists() and (out / "model_index.json").exists():
        return out
    return make_tiny_pipeline(out, variant=variant, kind=kind, distilled=distilled)
