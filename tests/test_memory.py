"""Memory-adaptive batching: sizing from (simulated) free memory, OOM split-and-retry, precision, blanks."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging

import numpy as np
import pytest
import structlog
import torch

from workers import memory
from workers.batching import UNITS, BatchExecutor, BatchPlanner, CostModel
from workers.config import ModelConfig
from workers.images import is_blank
from workers.jobs import ImageJob
from workers.memory import CpuProbe, SimulatedProbe, make_probe
from workers.pipeline import PipelineRunner, component_dtypes, load_pipeline

B = 1000  # true activation bytes per pixel of the simulated device
SIDE = 64
FITS_THREE = 3 * SIDE * SIDE * B


def jobs(n, side=SIDE, start=0):
    return [
        ImageJob(f"r{i}", 0, 'a sign that says "SALE"', i, side, side, steps=1)
        for i in range(start, start + n)
    ]


def model_config(path, **overrides):
    data = {
        "pipeline": str(path),
        "steps": 1,
        "batch_size": "auto",
        "max_batch_size": 16,
        "memory_headroom": 0,
        "initial_bytes_per_pixel": B,
        "simulated_memory": {"budget": FITS_THREE, "bytes_per_pixel": B},
    }
    return ModelConfig.model_validate(data | overrides)


@pytest.fixture(scope="module")
def runner(tiny_models):
    return PipelineRunner(
        ModelConfig(pipeline=str(tiny_models["incumbent"]), steps=1), tiny_models["incumbent"]
    )


def serve_queue(model, runner, queue):
    """Drain `queue` as a model server does: plan a batch, render it, repeat."""
    probe = make_probe(model, "cpu")
    cost = CostModel(model.initial_bytes_per_pixel)
    planner, executor = (
        BatchPlanner(model, probe, cost),
        BatchExecutor(runner, probe, cost, model.oom_unhealthy_after),
    )
    batches, outcomes = [], []
    while queue:
        batch = planner.take(queue)
        queue = queue[len(batch) :]
        batches.append(len(batch))
        outcomes += executor.render(batch)
    return batches, outcomes, executor, cost


def test_budget_for_three_serves_a_queue_of_eight_in_batches_of_at_most_three(runner, tiny_models):
    batches, outcomes, executor, _ = serve_queue(
        model_config(tiny_models["incumbent"]), runner, jobs(8)
    )
    assert batches == [3, 3, 2]
    assert [o.status for o in outcomes] == ["ok"] * 8
    assert executor.total_ooms == 0 and all(o.oom_count == 0 for o in outcomes)


def test_underestimated_cost_ooms_then_splits_and_every_request_succeeds(runner, tiny_models):
    model = model_config(tiny_models["incumbent"], initial_bytes_per_pixel=B / 4)
    batches, outcomes, executor, cost = serve_queue(model, runner, jobs(8))
    assert batches[0] == 8, "the wrong estimate let all eight into one batch"
    assert [o.status for o in outcomes] == ["ok"] * 8
    assert executor.total_ooms >= 2 and all(o.oom_count >= 1 for o in outcomes[:8])
    assert all(o.batch_ooms == executor.total_ooms for o in outcomes)
    assert cost.bytes_per_pixel >= B, "the learned cost caught up with the measured peaks"


def test_one_request_too_large_gets_oom_and_the_others_succeed(runner, tiny_models):
    batch = jobs(2) + jobs(
        1, side=128, start=2
    )  # 4x the pixels of the others: over the whole budget
    probe = SimulatedProbe(FITS_THREE, B)
    executor = BatchExecutor(runner, probe, CostModel(B), oom_unhealthy_after=3)
    outcomes = executor.render(batch)
    assert [o.status for o in outcomes] == ["ok", "ok", "oom"]
    assert "128x128 does not fit in device memory even as a batch of one" in outcomes[2].error
    assert outcomes[2].image is None and outcomes[2].oom_count == 1


def test_consecutive_single_image_ooms_make_the_replica_unhealthy(runner):
    executor = BatchExecutor(runner, SimulatedProbe(10, B), CostModel(B), oom_unhealthy_after=3)
    for i in range(2):
        assert executor.render(jobs(1, start=i))[0].status == "oom"
        assert executor.health_problem(wedged_after=60) is None
    executor.render(jobs(1, start=5))
    assert "3 single images in a row ran out of memory" in executor.health_problem(60)


def test_planner_counts_when_memory_is_not_managed(tiny_models):
    planner = BatchPlanner(ModelConfig(pipeline="a/b", batch_size=4), CpuProbe(), CostModel(B))
    assert len(planner.take(jobs(10))) == 4
    auto = BatchPlanner(
        ModelConfig(pipeline="a/b", batch_size="auto", max_batch_size=6), CpuProbe(), CostModel(B)
    )
    assert len(auto.take(jobs(10))) == 6
    assert auto.units(jobs(1)) <= UNITS


def test_seeds_reproducible_across_planned_batch_sizes(runner, tiny_models):
    _, alone, _, _ = serve_queue(
        model_config(tiny_models["incumbent"], simulated_memory=None, batch_size=1), runner, jobs(4)
    )
    _, together, _, _ = serve_queue(
        model_config(tiny_models["incumbent"], simulated_memory=None, batch_size=4), runner, jobs(4)
    )
    for a, b in zip(alone, together, strict=True):
        assert np.abs(a.image.astype(int) - b.image.astype(int)).mean() <= 2.0


def test_without_nvml_the_cpu_path_is_logged_once_and_nvml_never_called(monkeypatch, runner):
    calls = []
    import pynvml

    for name in ("nvmlInit", "nvmlDeviceGetHandleByIndex", "nvmlDeviceGetMemoryInfo"):
        monkeypatch.setattr(pynvml, name, lambda *a, _n=name: calls.append(_n))
    previous = structlog.get_config()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG))
    with structlog.testing.capture_logs() as logs:
        probe = make_probe(ModelConfig(pipeline="a/b"), "cpu")
        executor = BatchExecutor(runner, probe, CostModel(B), 3)
        planner = BatchPlanner(ModelConfig(pipeline="a/b", batch_size="auto"), probe, CostModel(B))
        for _ in range(3):
            executor.render(planner.take(jobs(3)))
    structlog.configure(**previous)
    assert calls == []
    assert [e["event"] for e in logs].count("memory_probe") == 1


def test_nvml_failure_on_a_cuda_device_falls_back_once(monkeypatch):
    calls = []

    def broken_init():
        calls.append("init")
        raise RuntimeError("NVML Shared Library Not Found")

    import pynvml

    monkeypatch.setattr(pynvml, "nvmlInit", broken_init)
    probe = make_probe(ModelConfig(pipeline="a/b", num_gpus=1), "cuda:0")
    assert isinstance(probe, memory.CpuProbe) and probe.free_bytes() is None
    assert calls == ["init"]


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_cpu_precisions_reach_every_component_and_sample(tiny_models, precision):
    model = ModelConfig(pipeline=str(tiny_models["incumbent"]), precision=precision, steps=1)
    runner = PipelineRunner(model, tiny_models["incumbent"])
    expected = component_dtypes(precision)
    for name, dtype in expected.items():
        assert getattr(runner.pipeline, name).dtype == dtype, name
    image, blank = runner.call(jobs(1))[0]
    assert image.shape == (64, 64, 3) and not blank


@pytest.mark.parametrize(
    ("precision", "unet", "vae"),
    [("float16", torch.float16, torch.float16), ("mixed_float16", torch.float16, torch.float32)],
)
def test_gpu_precisions_set_component_dtypes(tiny_models, precision, unet, vae):
    model = ModelConfig(pipeline=str(tiny_models["incumbent"]), precision=precision, num_gpus=1)
    pipeline = load_pipeline(
        model, tiny_models["incumbent"], "cpu"
    )  # dtypes only; sampling needs the GPU
    assert (
        pipeline.unet.dtype == unet
        and pipeline.text_encoder.dtype == unet
        and pipeline.vae.dtype == vae
    )


def test_blank_outputs_get_their_own_status(tiny_models):
    runner = PipelineRunner(
        ModelConfig(pipeline=str(tiny_models["candidate"]), steps=1), tiny_models["candidate"]
    )
    with torch.no_grad():  # a VAE whose last layer outputs zeros: a flat grey image, every time
        runner.pipeline.vae.decoder.conv_out.weight.zero_()
        runner.pipeline.vae.decoder.conv_out.bias.zero_()
    outcome = BatchExecutor(runner, CpuProbe(), CostModel(B), 3).render(jobs(1))[0]
    assert outcome.status == "blank" and "constant or non-finite" in outcome.error


@pytest.mark.parametrize(
    ("image", "blank"),
    [
        (np.zeros((8, 8, 3), np.uint8), True),
        (np.full((8, 8, 3), 200, np.uint8), True),
        (np.full((8, 8, 3), np.nan, np.float32), True),
        (np.linspace(0, 1, 192, dtype=np.float32).reshape(8, 8, 3), False),
        (np.random.default_rng(0).integers(0, 255, (8, 8, 3), dtype=np.uint8), False),
    ],
)
def test_is_blank(image, blank):
    assert is_blank(image) is blank


@pytest.mark.ray
def test_ray_serve_batches_by_memory_and_survives_oom(tiny_models, ray_serve):
    """The same rules inside a real Serve replica: `@serve.batch` with batch_size_fn."""
    from ray import serve

    from workers.model_server import ModelServer

    def deploy(name, **overrides):
        model = model_config(tiny_models["incumbent"], batch_wait=0.5, **overrides).model_dump(
            mode="json"
        )
        app = ModelServer.options(name=name, ray_actor_options={"num_cpus": 0.25}).bind(
            name, model, "/"
        )
        return serve.run(app, name=name, route_prefix=None)

    fits = deploy("fits3")
    wrong = deploy("wrong", initial_bytes_per_pixel=B / 4)
    tiny = deploy("tiny", simulated_memory={"budget": 10, "bytes_per_pixel": B})
    try:
        for handle, expect_ooms in ((fits, False), (wrong, True)):
            # The eight images of one request: the replica knows the rest are on their way
            # (`workers/batch_wait.py`), so it waits for them and batches by memory.
            request = [
                dataclasses.replace(j, request_id="r-many", image_index=i, images=8)
                for i, j in enumerate(jobs(8))
            ]
            with concurrent.futures.ThreadPoolExecutor(8) as pool:
                results = list(
                    pool.map(
                        lambda j, h=handle: h.generate.remote(j).result(timeout_s=120), request
                    )
                )
            assert [r.status for r in results] == ["ok"] * 8
            if expect_ooms:
                assert any(r.oom_count for r in results)
            else:
                assert all(r.oom_count == 0 and r.batch_size <= 3 for r in results), [
                    (r.oom_count, r.batch_size, r.batch_ooms) for r in results
                ]
                assert max(r.batch_size for r in results) >= 2, "requests were batched"
        for i in range(3):
            result = tiny.generate.remote(jobs(1, start=i)[0]).result(timeout_s=60)
            assert result.status == "oom" and "does not fit" in result.error
        with pytest.raises(Exception, match="ran out of memory"):
            tiny.check_health.remote().result(timeout_s=30)
    finally:
        for name in ("fits3", "wrong", "tiny"):
            serve.delete(name)
