"""Console page render time with 10,000 recorded pairs, against the static report.

    python -m bench.console_render [--pairs 10000] [--renders 20] [--database-url URL]

Seeds one rollout with `--pairs` mirrored requests as the router leaves them (request
and output rows through the real Recorder, real PNGs, the scorer's colour scores), runs
one controller tick so a verdict exists, then times the console's pages in process
(server time: routing, auth, SQL and rendering, no network): the rollout page (first
gallery page, worst first), its live fragment, the overview, and the admin API's status.
Beside them, what a user runs today for the same view: `cutover report` (the static
HTML report, which inlines its images). Target: the rollout page under 300 ms.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import structlog
from fastapi.testclient import TestClient

from bench.pairs import seed_pairs


def timed(fn: Callable[[], None], renders: int) -> list[float]:
    times = []
    for _ in range(renders):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pairs", type=int, default=10_000)
    parser.add_argument("--renders", type=int, default=20)
    parser.add_argument("--database-url", default=None, help="default: SQLite in a temp dir")
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))

    from controller.config import Config
    from controller.operations import tokens
    from controller.operations.console import build_console
    from controller.review.report import build_report
    from controller.rollout.loop import RolloutController
    from controller.rollout.transitions import create_rollout, get_rollout
    from controller.storage.store import Store
    from policies.policy import load_policy

    work = Path(tempfile.mkdtemp(prefix="cutover-console-"))
    url = args.database_url or f"sqlite:///{work / 'console.db'}"
    config = Config.model_validate(
        {
            "name": "console-bench",
            "database_url": url,
            "artifact_dir": str(work / "artifacts"),
            "spill_dir": str(work / "spill"),
            "models": {
                "incumbent": {"pipeline": "org/incumbent"},
                "candidate": {"pipeline": "org/candidate"},
            },
            "scorer": {"actors": 0},
        }
    )
    store = Store(url)
    store.upgrade()
    create_rollout(store, config, "bench")
    started = time.perf_counter()
    prompts = [f'a poster number {i} that says "SALE {i % 97}"' for i in range(args.pairs)]
    seed_pairs(config, store, prompts)
    seeded = time.perf_counter() - started
    RolloutController(config, store, score_inline=False).tick()
    token = tokens.create(store, "bench", "viewer", "bench")
    client = TestClient(build_console(config, store))
    headers = {"authorization": f"Bearer {token}"}

    def get(path: str) -> Callable[[], None]:
        def call() -> None:
            response = client.get(path, headers=headers)
            assert response.status_code == 200, (path, response.status_code, response.text[:300])

        return call

    name = config.name
    pages = {
        "rollout page (first gallery page)": get(f"/rollouts/{name}"),
        "live fragment (polled every 5 s)": get(f"/rollouts/{name}/live"),
        "overview": get("/"),
        "admin API status (JSON)": get(f"/api/rollouts/{name}"),
    }
    policy = load_policy(config.plan().policy_path)

    def report() -> None:
        with store.reader() as session:
            build_report(session, get_rollout(session, name), config, policy)

    for fn in pages.values():  # warm: templates compiled, policy loaded
        fn()
    results = {label: timed(fn, args.renders) for label, fn in pages.items()}
    results["cutover report (static HTML)"] = timed(report, max(args.renders // 4, 3))
    backend = url.split(":", 1)[0]
    print(
        f"{args.pairs} pairs recorded through the Recorder in {seeded:.1f} s ({backend}); "
        f"{args.renders} renders each, server time"
    )
    print(f"{'page':<36} {'p50 ms':>8} {'max ms':>8}")
    for label, times in results.items():
        print(f"{label:<36} {statistics.median(times):>8.1f} {max(times):>8.1f}")
    page = statistics.median(results["rollout page (first gallery page)"])
    ratio = statistics.median(results["cutover report (static HTML)"]) / page
    print(
        f"target: rollout page p50 {page:.0f} ms (< 300 ms); the static report takes "
        f"{ratio:.1f}x as long"
    )
    store.close()


if __name__ == "__main__":
    main()
