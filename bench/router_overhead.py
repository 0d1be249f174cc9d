"""Router overhead and mirror isolation, measured side by side on a real local Ray.

    python bench/router_overhead.py [--requests 300] [--delay 0.05]

Three applications run at once, each a router with two stand-in model servers
whose work is a fixed delay (fault injection, no compute):
  off   mirroring off
  on    every request mirrored to a healthy candidate (same delay)
  slow  every request mirrored to a candidate 10x slower
Requests go to them in rotation (off, on, slow, off, …), one at a time, so
machine noise hits all three alike. Printed: p50/p99 per app and the ratios
on/off (router + mirroring overhead, target <= 1.05) and slow/on (isolation
from a slow candidate, target <= 1.10).
"""

from __future__ import annotations

import argparse
import statistics
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
    parser.add_argument("--requests", type=int, default=300, help="per application")
    parser.add_argument("--delay", type=float, default=0.05, help="seconds of work per image")
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))

    import ray
    from ray import serve

    from controller.config import Config
    from controller.rollout.transitions import create_rollout
    from controller.serving.app import build_app, free_port, start_local_ray
    from controller.storage.store import Store

    work = Path(tempfile.mkdtemp(prefix="cutover-overhead-"))
    url = f"sqlite:///{work / 'bench.db'}"
    store = Store(url)
    store.upgrade()
    variants = {"off": (0, args.delay), "on": (100, args.delay), "slow": (100, args.delay * 10)}
    port = free_port()
    start_local_ray(4, "cutover-bench")
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    for name, (mirror, candidate_delay) in variants.items():

        def model(delay: float) -> dict:
            return {
                "pipeline": "stand-in/none",
                "num_cpus": 0.1,
                "batch_size": 8,
                "faults": {"stand_in": True, "delay": delay},
            }

        config = Config.model_validate(
            {
                "name": name,
                "database_url": url,
                "artifact_dir": str(work / "artifacts"),
                "spill_dir": str(work / "spill"),
                "models": {"incumbent": model(args.delay), "candidate": model(candidate_delay)},
                "rollout": {"mirror_percent": mirror},
                "server": {"num_cpus": 0.1, "mirror_max_in_flight": 64},
            }
        )
        config._base_dir = work
        create_rollout(store, config, "bench")
        serve.run(build_app(config), name=name, route_prefix=f"/{name}", blocking=False)

    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
    body = {"prompt": 'a poster that says "BENCH"', "size": "64x64"}
    for name in variants:  # warm up every path
        for _ in range(20):
            assert client.post(f"/{name}/v1/images/generations", json=body).status_code == 200
    latencies: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.requests):
        for name in variants:
            start = time.perf_counter()
            response = client.post(f"/{name}/v1/images/generations", json=body)
            latencies[name].append((time.perf_counter() - start) * 1000)
            assert response.status_code == 200, response.text
    stats = {name: client.get(f"/{name}/v1/stats").json() for name in variants}
    serve.shutdown()
    ray.shutdown()

    print(
        f"model work: {args.delay * 1000:.0f} ms per image; {args.requests} requests per app, interleaved"
    )
    print(f"{'app':<6} {'p50 ms':>8} {'p99 ms':>8} {'mean ms':>8} {'mirrors':>8} {'skipped':>8}")
    for name, values in latencies.items():
        mirrors = stats[name]["mirrors"]
        print(
            f"{name:<6} {percentile(values, 50):>8.1f} {percentile(values, 99):>8.1f} "
            f"{statistics.fmean(values):>8.1f} {mirrors['started']:>8} {mirrors['skipped']:>8}"
        )
    p = {name: (percentile(v, 50), percentile(v, 99)) for name, v in latencies.items()}
    print(
        f"overhead  on/off   p50 {p['on'][0] / p['off'][0]:.3f}  p99 {p['on'][1] / p['off'][1]:.3f}"
        "   (target <= 1.05)"
    )
    print(
        f"isolation slow/on  p50 {p['slow'][0] / p['on'][0]:.3f}  p99 {p['slow'][1] / p['on'][1]:.3f}"
        "   (target p99 <= 1.10)"
    )


if __name__ == "__main__":
    main()
