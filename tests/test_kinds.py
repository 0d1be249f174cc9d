"""Every kind of model make-tiny builds loads with from_pretrained, renders through the same
memory-adaptive batching as text-to-image, and gives the same image for the same seed."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from tests.conftest import image_distance
from tests.test_memory import FITS_THREE, B, serve_queue
from workers.config import UPSCALE_FACTOR, ModelConfig, ModelKind
from workers.deadlines import warmup_job
from workers.pipeline import PipelineRunner
from workers.tiny import make_tiny_pipeline

KINDS = [
    (ModelKind.IMG2IMG, "StableDiffusionImg2ImgPipeline"),
    (ModelKind.INPAINT, "StableDiffusionInpaintPipeline"),
    (ModelKind.UPSCALE, "StableDiffusionUpscalePipeline"),
]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("kinds")
    made = {kind: make_tiny_pipeline(root / kind.value, kind=kind.value) for kind, _ in KINDS}
    made["distilled"] = make_tiny_pipeline(root / "fast", distilled=True)
    return made


def jobs_of(kind: ModelKind, n: int, side: int = 64) -> list:
    from dataclasses import replace

    return [replace(warmup_job(kind, side, steps=2), request_id=f"r{i}", seed=i) for i in range(n)]


@pytest.mark.parametrize(("kind", "pipeline_class"), KINDS, ids=[k.value for k, _ in KINDS])
def test_each_kind_batches_by_memory_and_renders_reproducibly(built, kind, pipeline_class):
    path = built[kind]
    assert json.loads((path / "model_index.json").read_text())["_class_name"] == pipeline_class
    model = ModelConfig.model_validate(
        {
            "pipeline": str(path),
            "kind": kind.value,
            "steps": 2,
            "batch_size": "auto",
            "max_batch_size": 16,
            "memory_headroom": 0,
            "initial_bytes_per_pixel": B,
            "simulated_memory": {"budget": FITS_THREE, "bytes_per_pixel": B},
        }
    )
    runner = PipelineRunner(model, path)
    batches, outcomes, _, _ = serve_queue(model, runner, jobs_of(kind, 5))
    assert max(batches) <= 3 and sum(batches) == 5, batches
    assert [o.status for o in outcomes] == ["ok"] * 5
    assert all(o.image.shape == (64, 64, 3) for o in outcomes)
    # Same seed, alone or in a batch: the same image (within batching's few pixel values).
    alone = runner.call(jobs_of(kind, 1))[0][0]
    assert image_distance(alone, outcomes[0].image) < 2.0
    assert image_distance(outcomes[0].image, outcomes[1].image) > 1.0  # other seed


def test_the_upscaler_enlarges_its_image_by_its_factor(built):
    model = ModelConfig(pipeline=str(built[ModelKind.UPSCALE]), kind="upscale", steps=2)
    job = warmup_job(ModelKind.UPSCALE, 128, steps=2)
    source = Image.open(io.BytesIO(job.image)).size
    image, blank = PipelineRunner(model, built[ModelKind.UPSCALE]).call([job])[0]
    assert source == (128 // UPSCALE_FACTOR,) * 2  # what went in: a quarter of the side
    assert image.shape == (128, 128, 3) and not blank


def test_the_distilled_model_samples_in_two_steps_with_the_lcm_scheduler(built):
    path = built["distilled"]
    scheduler = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "LCMScheduler"
    model = ModelConfig(pipeline=str(path), sampler="lcm", steps=2, guidance=1.0)
    image, blank = PipelineRunner(model, path).call(jobs_of(ModelKind.TEXT2IMG, 1))[0]
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8 and not blank
