"""Bake-off throughput: four tiny models rendering side by side, against one after another.

    python -m bench.bakeoff_throughput [--seeds 2]

Four tiny Stable Diffusion pipelines (the same architecture, different weights) on one
local Ray, each its own Serve deployment (0.5 CPU each). Both rows render the same
units (the shipped colour and composition suites, 64x64, 2 steps) on the same
deployments, after one warm-up image per model:
- one model after another, then scored: what a user would otherwise run: every unit on
  the first model (all sent at once, so its batcher fills), then on the next; then the
  same probes as the bake-off (OCR of quoted text, colour shift against the baseline's
  image) on every image, on 2 threads;
- cutover bakeoff: its own session (`LabSession`): every model rendering at once,
  each image recorded to SQLite and scored while the others render.
Rendering alone is also shown both ways (one after another; every job of every model
sent at once), which bounds what side by side can gain on this machine.
It prints images per second for each and the ratio.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

from controller.config import load_config
from controller.lab.render import LabRenderer, ensure_ray
from controller.lab.runs import LabScorer, LabSession, bakeoff_judging, plan_run
from controller.storage.artifacts import store_artifact
from controller.storage.store import Store
from policies.policy import load_policy
from workers.tiny import make_tiny_pipeline

MODELS = ("base", "a", "b", "c")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, default=2)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cutover-bakeoff-bench-"))
    model = {"steps": 2, "guidance": 4.0, "batch_size": 4, "num_cpus": 0.5, "batch_wait": 0.02}
    data = {
        "name": "bench",
        "database_url": f"sqlite:///{work / 'lab.db'}",
        "artifact_dir": str(work / "artifacts"),
        "models": {
            name: {"pipeline": str(make_tiny_pipeline(work / name, variant=name)), **model}
            for name in MODELS
        },
        "routes": {"generate": {"model": "base"}},
    }
    (work / "cutover.yaml").write_text(yaml.safe_dump(data))
    config = load_config(work / "cutover.yaml")
    store = Store.for_config(config)
    store.upgrade()
    plan = plan_run(config, ["colour", "composition"], list(MODELS[1:]), "base", args.seeds)
    ensure_ray(config, list(MODELS))
    renderer = LabRenderer(config, list(MODELS))
    size = config.server.default_size
    jobs = [unit.job(size) for unit in plan.units]
    for name in MODELS:  # deploy and warm every model
        renderer.result(renderer.submit(name, jobs[0]))

    # One model after another, then the same probes on the same images (2 threads, as the
    # bake-off scores): what a user would run without cutover.
    started, cpu = time.perf_counter(), time.process_time()
    images: dict[tuple[str, int], str | None] = {}
    for name in MODELS:
        for index, response in enumerate([renderer.submit(name, job) for job in jobs]):
            result = renderer.result(response)
            images[(name, index)] = (
                store_artifact(config.artifact_path, result.png) if result.png else None
            )
    rendered = time.perf_counter() - started
    scorer = LabScorer(load_policy(), config.artifact_path)
    with ThreadPoolExecutor(2) as pool:
        list(
            pool.map(
                lambda key: scorer.score(
                    jobs[key[1]].prompt,
                    images[key],
                    None if key[0] == MODELS[0] else images[(MODELS[0], key[1])],
                ),
                [k for k, sha in images.items() if sha],
            )
        )
    elapsed = time.perf_counter() - started
    sequential_render = len(images) / rendered
    sequential = len(images) / elapsed
    sequential_cpu = time.process_time() - cpu

    started = time.perf_counter()
    responses = [renderer.submit(name, job) for job in jobs for name in MODELS]
    for response in responses:
        renderer.result(response)
    side_by_side = len(responses) / (time.perf_counter() - started)

    started, cpu = time.perf_counter(), time.process_time()
    session = LabSession(
        config, store, plan, bakeoff_judging(load_policy(), 3), renderer, early_stop=False
    )
    session.run()
    bakeoff = session.stats.rendered / (time.perf_counter() - started)
    bakeoff_cpu = time.process_time() - cpu
    renderer.close()
    store.close()
    print(f"units {len(jobs)} x {len(MODELS)} models = {len(jobs) * len(MODELS)} images each way")
    print("rendering only:")
    print(f"  one model after another:          {sequential_render:6.2f} images/s")
    print(f"  side by side, every job at once:  {side_by_side:6.2f} images/s")
    print("rendering and scoring (the probes on every image):")
    print(f"  one model after another, then scored:  {sequential:6.2f} images/s")
    print(f"  cutover bakeoff (recording and scoring as it renders): {bakeoff:6.2f} images/s")
    print(f"ratio {bakeoff / sequential:.2f}x (target >= 1.5x)")
    print(
        f"this process's CPU: sequential {sequential_cpu:.1f} s, bakeoff {bakeoff_cpu:.1f} s "
        "(calling the handles, recording, scoring, judging)"
    )


if __name__ == "__main__":
    main()
