"""Fixed batch sizes against `batch_size: auto` on a mixed-resolution workload.

    python bench/gpu_batching.py                 # CUDA if present, else the simulated budget
    python bench/gpu_batching.py --simulate      # the CPU path with a simulated memory budget
    python bench/gpu_batching.py --model PATH    # a real checkpoint instead of the tiny pipeline

Every mode serves the same queue (sizes cycling full, 3/4 and 1/2 of --size)
with the model server's own parts: the batch planner takes the longest prefix
that fits, the executor runs it and splits on out-of-memory errors. On CUDA the
device is capped (torch's per-process memory fraction, a real allocator limit)
at about 2.5 full-size images of activations, so a fixed batch of 8 (whose
largest same-size group often holds three or more) runs out of
memory. Printed: images/s, peak memory, OOM count, failed images, mean batch.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

import structlog

from workers.batching import BatchExecutor, BatchPlanner, CostModel
from workers.config import ModelConfig
from workers.jobs import ImageJob
from workers.memory import NvmlProbe, SimulatedProbe
from workers.pipeline import PipelineRunner
from workers.tiny import ensure_tiny_pipeline

MODES: list[int | str] = [1, 4, 8, 16, "auto"]


def workload(size: int, count: int, steps: int) -> list[ImageJob]:
    sides = [size, size * 3 // 4 // 8 * 8, size // 2]
    rng = random.Random(0)
    queue = [
        ImageJob(f"b{i}", 0, f'a poster that says "SALE {i}"', i, s, s, steps=steps)
        for i, s in enumerate(sides[i % 3] for i in range(count))
    ]
    rng.shuffle(queue)
    return queue


def serve(
    queue: list[ImageJob], model: ModelConfig, runner: PipelineRunner, probe: object
) -> dict[str, float]:
    cost = CostModel(model.initial_bytes_per_pixel)
    planner = BatchPlanner(model, probe, cost)
    executor = BatchExecutor(runner, probe, cost, oom_unhealthy_after=10**9)
    batches, done, failed = [], 0, 0
    started = time.perf_counter()
    while queue:
        batch = planner.take(queue)
        queue = queue[len(batch) :]
        batches.append(len(batch))
        outcomes = executor.render(batch)
        done += sum(o.status == "ok" for o in outcomes)
        failed += sum(o.status != "ok" for o in outcomes)
    _sync(runner)
    elapsed = time.perf_counter() - started
    return {
        "images_per_s": done / elapsed,
        "ooms": executor.total_ooms,
        "failed": failed,
        "mean_batch": statistics.fmean(batches),
        "seconds": elapsed,
    }


def _sync(runner: PipelineRunner) -> None:
    if runner.device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="pipeline directory (default: a tiny pipeline built here)")
    parser.add_argument(
        "--simulate", action="store_true", help="use the simulated budget even with a GPU"
    )
    parser.add_argument(
        "--size", type=int, help="largest side (default 512 on CUDA, 128 simulated)"
    )
    parser.add_argument(
        "--images", type=int, help="images per mode (default 96 on CUDA, 24 simulated)"
    )
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument(
        "--fits", type=float, default=2.5, help="full-size images the memory cap holds"
    )
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))

    import torch

    cuda = torch.cuda.is_available() and not args.simulate
    size = args.size or (512 if cuda else 128)
    count = args.images or (96 if cuda else 24)
    path = (
        Path(args.model)
        if args.model
        else ensure_tiny_pipeline(
            Path(tempfile.gettempdir()) / "cutover-bench-tiny", variant="incumbent"
        )
    )
    base = {"pipeline": str(path), "steps": args.steps, "max_batch_size": 16, "memory_headroom": 0}
    if cuda:
        base |= {"num_gpus": 1, "precision": "mixed_float16"}
    runner = PipelineRunner(ModelConfig.model_validate(base | {"batch_size": 1}), path.parent)
    full = ImageJob("calibrate", 0, "calibration", 0, size, size, steps=args.steps)

    if cuda:
        probe = NvmlProbe(0)
        runner.call([full])  # warm up kernels before measuring
        _, one_image = probe.run([full], lambda: runner.call([full]))
        weights = torch.cuda.memory_allocated()
        limit = int(weights + args.fits * one_image)
        probe = NvmlProbe(0, limit=limit)
        what = (
            f"CUDA {torch.cuda.get_device_name()}, cap {limit / 2**20:.0f} MiB "
            f"(weights {weights / 2**20:.0f} MiB + {args.fits:g} x {one_image / 2**20:.0f} MiB per {size}px image)"
        )
    else:
        bytes_per_pixel = 20_000.0
        probe = SimulatedProbe(int(args.fits * size * size * bytes_per_pixel), bytes_per_pixel)
        what = (
            f"CPU, simulated budget {probe.budget / 2**20:.0f} MiB ({args.fits:g} full-size images)"
        )

    print(
        f"{what}; {count} images per mode, sizes {size}/{size * 3 // 4 // 8 * 8}/{size // 2}, {args.steps} steps"
    )
    print(
        f"{'mode':<8} {'images/s':>9} {'peak MiB':>9} {'OOMs':>5} {'failed':>7} {'mean batch':>11}"
    )
    results = {}
    for mode in MODES:
        model = ModelConfig.model_validate(base | {"batch_size": mode})
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        else:
            probe.peak_seen = 0
        result = serve(workload(size, count, args.steps), model, runner, probe)
        peak = torch.cuda.max_memory_allocated() if cuda else probe.peak_seen
        results[mode] = result
        label = f"fixed {mode}" if mode != "auto" else "auto"
        print(
            f"{label:<8} {result['images_per_s']:>9.2f} {peak / 2**20:>9.0f} {result['ooms']:>5} "
            f"{result['failed']:>7} {result['mean_batch']:>11.1f}"
        )
    best = max((m for m in MODES if m != "auto"), key=lambda m: results[m]["images_per_s"])
    ratio = results["auto"]["images_per_s"] / results[best]["images_per_s"]
    print(
        f"auto / best fixed (batch {best}): {ratio:.3f} of its images/s; auto OOMs {results['auto']['ooms']}; "
        f"fixed 8 OOMs {results[8]['ooms']}   (target on GPU: >= 0.90 with 0 OOMs)"
    )


if __name__ == "__main__":
    main()
