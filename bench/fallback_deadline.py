"""How close to its deadline a fallback answers, measured side by side on a real local Ray.

    python bench/fallback_deadline.py [--requests 100] [--fallback-after 0.5]

Two applications run at once with real tiny pipelines (64x64 images):
  direct    the distilled model (LCM, 2 steps) serves generate itself: what a user
            would get from the fast model alone, and its own latency distribution
  fallback  generate's model stalls (fault injection: a delay far past the deadline);
            past `fallback_after` the router answers from the same distilled model
Requests alternate between the two, one at a time, so machine noise hits both
alike. Printed: p50/p99 of each, and how far the fallback-served p99 lies from
fallback_after + the distilled model's own p99 (target: within 50 ms).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import httpx
import structlog


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=100, help="per application")
    parser.add_argument("--fallback-after", type=float, default=0.5, help="seconds")
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))

    import ray
    from ray import serve

    from controller.config import Config
    from controller.serving.app import build_app, free_port, start_local_ray
    from controller.storage.store import Store
    from workers.tiny import make_tiny_pipeline

    work = Path(tempfile.mkdtemp(prefix="cutover-fallback-"))
    url = f"sqlite:///{work / 'bench.db'}"
    Store(url).upgrade()
    fast = make_tiny_pipeline(work / "fast", variant="fast", distilled=True)
    slow = make_tiny_pipeline(work / "slow", variant="slow")
    common = {"num_cpus": 0.25, "warmup": [64], "batch_size": 4}
    distilled = {"pipeline": str(fast), "sampler": "lcm", "steps": 2, "guidance": 1.0, **common}
    stalled = {"pipeline": str(slow), "steps": 2, "faults": {"delay": 30}, **common}
    apps = {
        "direct": {"models": {"fast": distilled}, "routes": {"generate": {"model": "fast"}}},
        "fallback": {
            "models": {"slow": stalled, "fast": distilled},
            "routes": {
                "generate": {
                    "model": "slow",
                    "fallback": "fast",
                    "fallback_after": args.fallback_after,
                }
            },
        },
    }
    port = free_port()
    start_local_ray(4, "cutover-bench")
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    for name, shape in apps.items():
        config = Config.model_validate(
            {
                "name": name,
                "database_url": url,
                "artifact_dir": str(work / "artifacts"),
                "spill_dir": str(work / "spill"),
                "server": {"num_cpus": 0.25, "request_timeout": 30},
                **shape,
            }
        )
        config._base_dir = work
        serve.run(build_app(config), name=name, route_prefix=f"/{name}", blocking=False)

    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
    body = {"prompt": 'a poster that says "BENCH"', "size": "64x64"}
    for name in apps:  # warm up every path (and wait for the deployments)
        for _ in range(60):
            try:
                if client.post(f"/{name}/v1/images/generations", json=body).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        for _ in range(5):
            client.post(f"/{name}/v1/images/generations", json=body)
    latencies: dict[str, list[float]] = {name: [] for name in apps}
    fell_back = 0
    for _ in range(args.requests):
        for name in apps:
            start = time.perf_counter()
            response = client.post(f"/{name}/v1/images/generations", json=body)
            latencies[name].append((time.perf_counter() - start) * 1000)
            assert response.status_code == 200, response.text
            fell_back += response.headers.get("x-cutover-fallback") == "timeout"
    serve.shutdown()
    ray.shutdown()

    print(f"{args.requests} requests per app, interleaved; fallback_after {args.fallback_after}s")
    print(f"{'app':<9} {'p50 ms':>8} {'p99 ms':>8}")
    for name, values in latencies.items():
        print(f"{name:<9} {percentile(values, 50):>8.1f} {percentile(values, 99):>8.1f}")
    bound = args.fallback_after * 1000 + percentile(latencies["direct"], 99)
    served = percentile(latencies["fallback"], 99)
    print(f"fallback-served: {fell_back}/{args.requests} carried x-cutover-fallback: timeout")
    print(
        f"fallback p99 {served:.1f} ms vs fallback_after + direct p99 {bound:.1f} ms: "
        f"{served - bound:+.1f} ms apart   (target: within 50 ms)"
    )


if __name__ == "__main__":
    main()
