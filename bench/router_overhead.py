"""Router overhead against bare Ray Serve, measured side by side on one local Ray.

    python -m bench.router_overhead [--requests 150] [--seconds 12] [--delay 0.05]

What a user would run instead of cutover is one Ray Serve deployment serving the model
behind FastAPI: `bare`. Beside it, cutover's whole path (router, model server, recorder
to SQLite, routing table refresh), the incumbent served in the router (`in_router`, the
shape of the bare app), with mirroring `off`, and `on` (every request mirrored to a
candidate in its own deployment, default `mirror_max_in_flight`); `both`, mirroring on
with the candidate served in the router too (a shadow that costs no hop at all); and
`hop`, mirroring off with the incumbent in its own deployment (what one Ray Serve hop costs);
and `nomet`, `off` with Prometheus metrics off (`server.metrics: false`): `off` against
`nomet` is what the metrics cost the primary path (target: <= 1.02x).
Each runs twice over:
  fixed  the model's work is a fixed delay per image and costs no CPU (`--delay`)
  tiny   the real tiny diffusers pipeline (random weights, from_pretrained), 64x64
Printed per app: p50/p99 latency at 1 client (requests interleaved across apps, so
machine noise hits all alike) and throughput at 4 clients (each app alone, twice, in
mirrored order). Ratios against bare, with the targets: without mirroring >= 0.95x
throughput at 4 clients and <= +5 ms p50 at 1 client (fixed model); with mirroring on
the fixed model >= 0.9x. On the tiny model, mirroring doubles the CPU work on 2 cores,
so its figures show that cost rather than the router's.
"""

import argparse
import asyncio
import base64
import io
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import structlog
from fastapi import FastAPI, Request
from PIL import Image
from ray import serve

BODY = {"prompt": 'a poster that says "BENCH"', "size": "64x64"}

bare_api = FastAPI()


@serve.deployment
@serve.ingress(bare_api)
class Bare:
    """The user's own deployment: the model behind FastAPI, nothing else."""

    def __init__(self, delay: float, pipeline: str | None) -> None:
        self.delay = delay
        self.runner = None
        if pipeline is not None:
            from workers.config import ModelConfig
            from workers.pipeline import PipelineRunner

            model = ModelConfig.model_validate({"pipeline": pipeline, "steps": 4})
            self.runner = PipelineRunner(model, Path(pipeline).parent)

    @bare_api.post("/v1/images/generations")
    async def generations(self, request: Request) -> dict[str, Any]:
        body = await request.json()
        if self.runner is None:
            await asyncio.sleep(self.delay)
            pixels = np.full((64, 64, 3), 128, dtype=np.uint8)
        else:
            from workers.jobs import ImageJob

            job = ImageJob("bench", 0, body["prompt"], 1, 64, 64, steps=4)
            ((pixels, _),) = await asyncio.to_thread(self.runner.call, [job])
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        return {"data": [{"b64_json": base64.b64encode(buffer.getvalue()).decode()}]}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def cutover_config(
    name: str,
    work: Path,
    mirror: float,
    model: dict[str, Any],
    in_router: set[str],
    metrics: bool = True,
) -> Any:
    from controller.config import Config

    config = Config.model_validate(
        {
            "name": name,
            "database_url": f"sqlite:///{work / 'bench.db'}",
            "artifact_dir": str(work / "artifacts"),
            "spill_dir": str(work / "spill"),
            "models": {
                role: model | {"in_router": role in in_router}
                for role in ("incumbent", "candidate")
            },
            "rollout": {"mirror_percent": mirror},
            "server": {"num_cpus": 0.1, "metrics": metrics},
        }
    )
    config._base_dir = work
    return config


def deploy(work: Path, delay: float, kinds: list[str]) -> list[str]:
    """Every app under its own route prefix; returns their names."""
    from controller.rollout.transitions import create_rollout
    from controller.serving.app import build_app
    from controller.storage.store import Store
    from workers.tiny import make_tiny_pipeline

    tiny = work / "tiny"
    make_tiny_pipeline(tiny)
    models = {
        "fixed": {
            "pipeline": "stand-in/none",
            "num_cpus": 0.1,
            "faults": {"stand_in": True, "delay": delay},
        },
        "tiny": {"pipeline": str(tiny), "num_cpus": 0.1, "steps": 4},
    }
    store = Store(f"sqlite:///{work / 'bench.db'}")
    store.upgrade()
    names = []
    for kind in kinds:
        model = models[kind]
        bare = f"bare-{kind}"
        pipeline = None if kind == "fixed" else str(tiny)
        app = Bare.options(name=bare, ray_actor_options={"num_cpus": 0.1}).bind(delay, pipeline)
        serve.run(app, name=bare, route_prefix=f"/{bare}", blocking=False)
        names.append(bare)
        for mode, mirror, in_router, metrics in (
            ("off", 0, {"incumbent"}, True),
            ("nomet", 0, {"incumbent"}, False),
            ("on", 100, {"incumbent"}, True),
            ("both", 100, {"incumbent", "candidate"}, True),
            ("hop", 0, set(), True),
        ):
            name = f"{mode}-{kind}"
            config = cutover_config(name, work, mirror, model, in_router, metrics)
            create_rollout(store, config, "bench")
            serve.run(build_app(config), name=name, route_prefix=f"/{name}", blocking=False)
            names.append(name)
    store.close()
    return names


def post(client: httpx.Client, name: str) -> float:
    start = time.perf_counter()
    response = client.post(f"/{name}/v1/images/generations", json=BODY)
    assert response.status_code == 200, (name, response.status_code, response.text[:300])
    return (time.perf_counter() - start) * 1000


def one_client(client: httpx.Client, names: list[str], requests: int) -> dict[str, list[float]]:
    latencies: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(requests):
        for name in names:
            latencies[name].append(post(client, name))
    return latencies


def throughput(base_url: str, name: str, clients: int, seconds: float) -> float:
    """Requests/s completed by `clients` closed-loop clients over `seconds`."""
    done = [0] * clients
    stop = time.perf_counter() + seconds

    def run(k: int) -> None:
        with httpx.Client(base_url=base_url, timeout=120) as client:
            while time.perf_counter() < stop:
                post(client, name)
                done[k] += 1

    threads = [threading.Thread(target=run, args=(k,)) for k in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(done) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=150, help="per app, at 1 client")
    parser.add_argument("--seconds", type=float, default=12.0, help="per app and round, 4 clients")
    parser.add_argument("--delay", type=float, default=0.05, help="the fixed model's work")
    parser.add_argument(
        "--kinds", default="fixed,tiny", help="which models to run: fixed, tiny, or fixed,tiny"
    )
    args = parser.parse_args()
    kinds = args.kinds.split(",")
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))

    import ray

    from controller.serving.app import free_port, start_local_ray

    work = Path(tempfile.mkdtemp(prefix="cutover-overhead-"))
    port = free_port()
    start_local_ray(4, "cutover-bench")
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    base_url = f"http://127.0.0.1:{port}"
    try:
        names = deploy(work, args.delay, kinds)
        client = httpx.Client(base_url=base_url, timeout=120)
        deadline = time.monotonic() + 300
        for name in names:  # every app up and warm
            while True:
                try:
                    post(client, name)
                    break
                except (AssertionError, httpx.HTTPError):
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(1)
            for _ in range(10):
                post(client, name)
        latencies = one_client(client, names, args.requests)
        rates: dict[str, list[float]] = {name: [] for name in names}
        for order in (names, names[::-1]):
            for name in order:
                rates[name].append(throughput(base_url, name, 4, args.seconds))
        stats = {n: client.get(f"/{n}/v1/stats").json() for n in names if not n.startswith("bare")}
    finally:
        serve.shutdown()
        ray.shutdown()
    print(
        f"fixed model: {args.delay * 1000:.0f} ms per image, no CPU; tiny model: 64x64, 4 steps "
        f"on CPU; {args.requests} requests per app at 1 client, {args.seconds:g} s x 2 at 4"
    )
    print(
        f"{'app':<11} {'p50 ms':>8} {'p99 ms':>8} {'p50 - bare':>11} {'req/s @4':>9} "
        f"{'vs bare':>8} {'mirrors':>8} {'skipped':>8}"
    )
    for name in names:
        kind = name.split("-")[1]
        bare = f"bare-{kind}"
        p50 = percentile(latencies[name], 50)
        rate = statistics.fmean(rates[name])
        mirrors = stats.get(name, {}).get("mirrors", {})
        print(
            f"{name:<11} {p50:>8.1f} {percentile(latencies[name], 99):>8.1f} "
            f"{p50 - percentile(latencies[bare], 50):>+11.1f} {rate:>9.1f} "
            f"{rate / statistics.fmean(rates[bare]):>7.2f}x "
            f"{mirrors.get('started', '-'):>8} {mirrors.get('skipped', '-'):>8}"
        )
    for kind in kinds:
        slow = percentile(latencies[f"off-{kind}"], 50) / percentile(latencies[f"nomet-{kind}"], 50)
        fewer = statistics.fmean(rates[f"nomet-{kind}"]) / statistics.fmean(rates[f"off-{kind}"])
        print(
            f"metrics on the primary path ({kind} model): p50 latency {slow:.3f}x, "
            f"throughput cost {fewer:.3f}x (metrics on against off; target <= 1.02)"
        )
    if "fixed" not in kinds:
        return
    off = statistics.fmean(rates["off-fixed"]) / statistics.fmean(rates["bare-fixed"])
    on = statistics.fmean(rates["on-fixed"]) / statistics.fmean(rates["bare-fixed"])
    delta = percentile(latencies["off-fixed"], 50) - percentile(latencies["bare-fixed"], 50)
    print(
        f"targets (fixed model): off {off:.2f}x bare at 4 clients (>= 0.95), "
        f"p50 {delta:+.1f} ms at 1 client (<= +5), on {on:.2f}x bare (>= 0.9)"
    )


if __name__ == "__main__":
    main()
