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


def make_tiny_pipeline(
    out_dir: str | Path, *, seed: int | None = None, variant: str = "incumbent"
) -> Path:
    """Build a random-weight text-to-image pipeline and save it to `out_dir`."""
    import torch
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    out = Path(out_dir)
    seed = variant_seed(variant) if seed is None else seed
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=16,
    )
    vae = AutoencoderKL(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=16,
    )
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
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        steps_offset=1,
        set_alpha_to_one=False,
    )
    pipeline = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    out.mkdir(parents=True, exist_ok=True)
    pipeline.save_pretrained(out, safe_serialization=True)
    (out / MARKER).write_text(json.dumps({"variant": variant, "seed": seed}))
    return out


def ensure_tiny_pipeline(out_dir: str | Path, *, variant: str) -> Path:
    """Build the pipeline once; later calls reuse the directory (a cache for demos and tests)."""
    out = Path(out_dir)
    if (out / MARKER).exists() and (out / "model_index.json").exists():
        return out
    return make_tiny_pipeline(out, variant=variant)
