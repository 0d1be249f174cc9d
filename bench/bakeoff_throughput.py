"""Bake-off throughput: four tiny models rendering side by side, against one after another.

    python -m bench.bakeoff_throughput [--seeds 2]

Four tiny Stable Diffusion pipelines (the same architecture, different weights) on one
local Ray, each its own Serve deployment (0.5 CPU each). Both rows render the same
units (the shipped colour and composition suites, 64x64, 2 steps) on the same
deployments, after one warm-up image per model:
- sequential: what a user would otherwise run: every unit on the first model, then
  every unit on the next, each model's units sent at once (its batcher fills);
- bakeoff: `cutover bakeoff`'s own session (`LabSession`): every model's share of a
  round sent at once, with recording to SQLite and the scorer (colour shift against
  the baseline) running.
It prints images per second for each and the ratio.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import yaml

from controller.config import load_config
from controller.lab.render import LabRenderer, ensure_ray
from controller.lab.runs import LabSession, bakeoff_judging, plan_run
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

    started = time.perf_counter()
    for name in MODELS:
        for response in [renderer.submit(name, job) for job in jobs]:
            renderer.result(response)
    sequential = len(jobs) * len(MODELS) / (time.perf_counter() - started)

    started = time.perf_counter()
    session = LabSession(
        config, store, plan, bakeoff_judging(load_policy(), 3), renderer, early_stop=False
    )
    session.run()
    bakeoff = session.stats.rendered / (time.perf_counter() - started)
    renderer.close()
    store.close()
    print(f"units {len(jobs)} x {len(MODELS)} models = {len(jobs) * len(MODELS)} images each way")
    print(f"sequential (one model after another): {sequential:6.2f} images/s")
    print(f"bakeoff (side by side, recording and scoring): {bakeoff:6.2f} images/s")
    print(f"ratio {bakeoff / sequential:.2f}x (target >= 1.5x)")


if __name__ == "__main__":
    main()
