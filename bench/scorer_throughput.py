"""Scorer throughput with 1, 2 and 4 Ray actors, and its lag under the demo's traffic.

    python -m bench.scorer_throughput [--pairs 150] [--actors 1,2,4] [--skip-demo]

Part 1: `--pairs` mirrored pairs of posters (text the OCR must read, 256x128 PNGs, the
default policy's probes: typography CER on both arms, colour shift on the candidate),
scored from scratch by a pool of N actors (0.5 CPU each) on one local Ray. Printed:
outputs settled per second from 10% to 90% done (actors warm), and the time to the last.
Beside it, the scorer the loop ran before this pool: the same probes in the caller's own
process, one output after another.

Part 2: the demo's healthy scenario (`cutover demo`: its traffic, its models, on this
machine's cores) with the default one scorer actor and the demo policy's sample rate,
sampled every second: the scorer's lag against the rollout's `max_scorer_lag`, and the
router's recorder spills (must stay 0 with no outage).
"""

from __future__ import annotations

import argparse
import io
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import structlog
from PIL import Image, ImageDraw, ImageFont
from sqlalchemy import delete, func, select, update

from controller.config import Config
from controller.rollout.lag import scorer_lag
from controller.rollout.scorer_pool import ScorerPool
from controller.rollout.scoring import Scorer
from controller.rollout.transitions import create_rollout, get_rollout
from controller.storage.artifacts import store_artifact
from controller.storage.store import Store
from controller.storage.tables import Output, Request, Score, utcnow
from policies.policy import load_policy

WORDS = ["SALE", "OPEN", "EXIT", "CAFE", "HOTEL", "PIZZA", "TAXI", "BOOKS"]


def poster(text: str, shift: int) -> bytes:
    image = Image.new("RGB", (256, 128), (235, 232, 220))
    ImageDraw.Draw(image).text(
        (16 + shift, 40), text, fill=(25, 25, 25), font=ImageFont.load_default(size=36)
    )
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def fill(store: Store, config: Config, pairs: int) -> None:
    with store.reader() as session:
        rollout_id = get_rollout(session, config.name).id
    now = utcnow()
    with store.session() as session:
        for k in range(pairs):
            word = WORDS[k % len(WORDS)]
            request = Request(
                id=str(uuid.uuid4()),
                rollout_id=rollout_id,
                stage="shadow",
                primary_role="incumbent",
                sticky_key=f"u{k}",
                prompt=f'a shop sign that says "{word}"',
                params={"n": 1},
                seed=k,
                mirrored=True,
                created_at=now,
            )
            session.add(request)
            session.flush()
            for role, shift in (("incumbent", 0), ("candidate", k % 7)):
                png = store_artifact(config.artifact_path, poster(word, shift))
                session.add(
                    Output(
                        id=str(uuid.uuid4()),
                        request_id=request.id,
                        role=role,
                        image_index=0,
                        is_primary=role == "incumbent",
                        status="ok",
                        latency_ms=100.0,
                        created_at=now,
                        artifact_sha256=png,
                    )
                )


def reset(store: Store) -> int:
    with store.session() as session:
        session.execute(delete(Score))
        session.execute(update(Output).values(scored_at=None, claimed_by=None, claim_expires=None))
        return session.scalar(select(func.count()).select_from(Output)) or 0


def unscored(store: Store) -> int:
    with store.reader() as session:
        return session.scalar(select(func.count()).where(Output.scored_at.is_(None))) or 0


def timed_drain(store: Store, total: int, start: Any) -> dict[str, float]:
    """Run `start()` and poll until every output is settled: the 10%-90% rate and the end."""
    began = time.perf_counter()
    marks: dict[float, float] = {}
    stop = start()
    while True:
        left = unscored(store)
        done = (total - left) / total
        now = time.perf_counter()  # one reading per poll: marks passed together are equal
        for mark in (0.1, 0.9):
            if done >= mark and mark not in marks:
                marks[mark] = now
        if left == 0:
            break
        time.sleep(0.2)
    end = time.perf_counter() - began
    stop()
    if marks[0.9] > marks[0.1]:
        steady = 0.8 * total / (marks[0.9] - marks[0.1])
    else:  # `start` did all the work itself before the first poll (the in-process scorer)
        steady = total / end
    return {"steady": steady, "total_s": end}


def throughput(work: Path, pairs: int, actor_counts: list[int]) -> None:
    import ray

    from controller.serving.app import start_local_ray

    url = f"sqlite:///{work / 'scorer.db'}"
    config = Config.model_validate(
        {
            "name": "bench",
            "database_url": url,
            "artifact_dir": str(work / "artifacts"),
            "log_file": str(work / "events.jsonl"),
            "models": {"incumbent": {"pipeline": "a/b"}, "candidate": {"pipeline": "c/d"}},
            "scorer": {"batch": 4, "poll_interval": 0.1},
        }
    )
    config._base_dir = work
    store = Store(url)
    store.upgrade()
    create_rollout(store, config, "bench")
    fill(store, config, pairs)
    rows = []
    total = reset(store)
    with store.reader() as session:
        rollout_id = get_rollout(session, "bench").id
    inline = Scorer(load_policy(), config.artifact_path)

    def in_process() -> Any:
        while inline.score_pending(store, rollout_id, limit=8):
            pass
        return lambda: None

    rows.append(("in the loop's process", timed_drain(store, total, in_process)))
    start_local_ray(max(actor_counts) + 1, "cutover-bench-scorer")
    try:
        for count in actor_counts:
            total = reset(store)
            pool = ScorerPool(
                config.model_copy(
                    update={"scorer": config.scorer.model_copy(update={"actors": count})}
                ),
                log_level="WARNING",
            )

            def start(pool: ScorerPool = pool) -> Any:
                pool.start()
                return pool.stop

            rows.append(
                (f"{count} actor{'s' if count > 1 else ''}", timed_drain(store, total, start))
            )
    finally:
        ray.shutdown()
        store.close()
    print(f"{total} outputs ({pairs} pairs of 256x128 posters), default policy's probes")
    print(f"{'scorer':<22} {'outputs/s':>10} {'vs 1 actor':>11} {'all done s':>11}")
    one = next(r for name, r in rows if name == "1 actor")["steady"]
    for name, row in rows:
        print(
            f"{name:<22} {row['steady']:>10.2f} {row['steady'] / one:>10.2f}x {row['total_s']:>11.1f}"
        )


def demo_lag(work: Path) -> None:
    from rich.console import Console

    from controller.demo import run_scenario
    from controller.serving.app import free_port

    port = free_port()
    lags: list[float] = []
    spilled: list[int] = []
    seen: dict[str, Any] = {}

    def watch(store: Store, config: Config) -> None:
        now = utcnow()
        with store.reader() as session:
            for name in config.plans():
                lags.append(scorer_lag(session, get_rollout(session, name).id, now) or 0.0)
        plan = config.plan(next(iter(config.plans())))
        seen["bound"] = plan.settings.max_scorer_lag
        seen["policy"] = load_policy(plan.policy_path)
        try:
            stats = httpx.get(f"http://127.0.0.1:{port}/v1/stats", timeout=5).json()
            spilled.append(stats["recorder"]["spilled"])
        except httpx.HTTPError:
            pass

    outcome = run_scenario("healthy", work, port, Console(quiet=True), 600, watch=watch)
    policy = seen["policy"]
    rates = ", ".join(f"{p} {r:.0%}" for p, r in policy.sample_rates.items())
    print(
        f"\ndemo healthy scenario: {outcome.requests} requests in {outcome.seconds:.0f} s, "
        f"rollout {outcome.states}"
    )
    print(
        f"scorer lag, sampled each second: max {max(lags, default=0):.1f} s, median "
        f"{statistics.median(lags) if lags else 0:.1f} s, last {lags[-1] if lags else 0:.1f} s; "
        f"bound (max_scorer_lag) {seen['bound']:.0f} s; sample rate {policy.sample_rate:.0%} "
        f"of requests per probe{f' ({rates})' if rates else ''}"
    )
    print(f"recorder spills during the run: {max(spilled, default=0)} (no outage: must be 0)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pairs", type=int, default=150)
    parser.add_argument("--actors", default="1,2,4")
    parser.add_argument("--skip-demo", action="store_true")
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
    with tempfile.TemporaryDirectory(dir=".", prefix=".bench-scorer-") as tmp:
        # Absolute: the actors run in Ray's working directory, not this one.
        throughput(Path(tmp).resolve(), args.pairs, [int(a) for a in args.actors.split(",")])
    if not args.skip_demo:
        with tempfile.TemporaryDirectory(dir=".", prefix=".bench-scorer-demo-") as tmp:
            demo_lag(Path(tmp).resolve())


if __name__ == "__main__":
    main()
