"""Tiny offline pipelines, loaded with from_pretrained, sampled by seed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from diffusers import StableDiffusionPipeline

from tests.conftest import image_distance
from workers.batching import BatchExecutor, CostModel
from workers.config import ModelConfig
from workers.images import from_png, to_png
from workers.jobs import ImageJob
from workers.memory import CpuProbe
from workers.pipeline import SCHEDULERS, PipelineRunner
from workers.tiny import MARKER, ensure_tiny_pipeline

TOLERANCE = 2.0  # mean pixel values; batching changes a few pixels by a few values


def job(seed, prompt='a cat holding a sign that says "OPEN"', size=64, index=0):
    return ImageJob(
        request_id=f"r{seed}", image_index=index, prompt=prompt, seed=seed, width=size, height=size
    )


class Renderer:
    """A pipeline behind the batch executor, as a model server drives it (CPU, no memory limits)."""

    def __init__(self, model):
        self.runner = PipelineRunner(model, Path("/"))
        self.executor = BatchExecutor(
            self.runner, CpuProbe(), CostModel(1.0), oom_unhealthy_after=3
        )

    def generate(self, jobs):
        outcomes = self.executor.render(jobs)
        assert all(o.status == "ok" for o in outcomes), outcomes
        return [o.image for o in outcomes]


@pytest.fixture(scope="module")
def runners(tiny_models):
    return {
        role: Renderer(ModelConfig(pipeline=str(path), steps=3))
        for role, path in tiny_models.items()
    }


def test_make_tiny_saves_a_real_pipeline_that_from_pretrained_loads(tiny_models):
    path = tiny_models["incumbent"]
    index = json.loads((path / "model_index.json").read_text())
    assert {"unet", "vae", "text_encoder", "tokenizer", "scheduler"} <= set(index)
    assert json.loads((path / MARKER).read_text())["variant"] == "incumbent"
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    assert size < 20e6
    pipeline = StableDiffusionPipeline.from_pretrained(path, local_files_only=True)
    assert pipeline.unet.config.block_out_channels == [32, 64]
    assert pipeline.text_encoder.config.hidden_size == 32


def test_ensure_reuses_a_built_pipeline(tiny_models):
    path = tiny_models["candidate"]
    before = (path / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    assert ensure_tiny_pipeline(path, variant="candidate") == path
    assert (path / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == before


def test_same_seed_same_image_other_seed_other_image(runners):
    runner = runners["incumbent"]
    first, second, other = (runner.generate([job(s)])[0] for s in (7, 7, 8))
    assert first.shape == (64, 64, 3) and first.dtype == np.uint8
    assert image_distance(first, second) <= TOLERANCE
    assert image_distance(first, other) > 5 * TOLERANCE


def test_variants_have_different_weights(runners):
    a = runners["incumbent"].generate([job(3)])[0]
    b = runners["candidate"].generate([job(3)])[0]
    assert image_distance(a, b) > 5 * TOLERANCE


def test_seeds_reproducible_across_batch_sizes(runners):
    runner = runners["incumbent"]
    alone = [runner.generate([job(s)])[0] for s in (11, 12, 13)]
    batched = runner.generate([job(s) for s in (11, 12, 13)])
    for a, b in zip(alone, batched, strict=True):
        assert image_distance(a, b) <= TOLERANCE


def test_mixed_sizes_are_grouped_and_returned_in_order(runners):
    jobs = [job(1, size=64), job(2, size=80), job(3, size=64)]
    images = runners["incumbent"].generate(jobs)
    assert [im.shape[:2] for im in images] == [(64, 64), (80, 80), (64, 64)]
    assert image_distance(images[0], runners["incumbent"].generate([job(1)])[0]) <= TOLERANCE


@pytest.mark.parametrize("sampler", sorted(SCHEDULERS))
def test_every_sampler_loads_and_samples(tiny_models, sampler):
    path = tiny_models["incumbent"]
    runner = Renderer(ModelConfig(pipeline=str(path), sampler=sampler, steps=2))
    assert type(runner.runner.pipeline.scheduler).__name__ == SCHEDULERS[sampler]
    image = runner.generate([job(5)])[0]
    assert image.shape == (64, 64, 3) and image.std() > 0


def test_png_round_trip_is_lossless(runners):
    image = runners["incumbent"].generate([job(9)])[0]
    assert np.array_equal(from_png(to_png(image)), image)
