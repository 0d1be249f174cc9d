"""Judge scaling: one controller tick against the history of a 72-hour shadow, side by side
with the judge it replaced (a full read of the attempt every tick), on SQLite and PostgreSQL.

    python -m bench.judge_scaling [--sizes 1000,10000,100000,1000000] [--new 300]

For each history size the database holds that many mirrored pairs already judged (two
outputs each, scored by two probes: the rows a 72-hour shadow leaves), then `--new` pairs
arrive and one real `RolloutController.tick()` runs (after ANALYZE: a database that
grew for 72 hours has statistics, a bulk load has none): lease, lost-output reconciliation,
scorer query, fold of what is new, verdict, gates. Printed per size: the tick's time, its
peak Python memory (tracemalloc, a second tick on another `--new` pairs), and the same two
figures for a full recomputation from the raw rows (what every tick cost before), which is
skipped past `--old-max` pairs (it grows linearly: 15.6 s and 682 MiB at 100k before).
Target: tick time flat within 2x from 10k to 1M; peak memory independent of history.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
import tracemalloc
import uuid
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import structlog
from sqlalchemy import insert

from bench.databases import DEFAULT_POSTGRES, backends, bench_rollout
from controller.rollout.analysis import attempt_started, fingerprint, recompute
from controller.rollout.loop import RolloutController
from controller.rollout.stage_count import settle_stage_count
from controller.rollout.transitions import get_rollout
from controller.storage.lost import lost_after
from controller.storage.store import Store
from controller.storage.tables import (
    JUDGE_DONE,
    JUDGE_PENDING,
    Output,
    Request,
    Score,
    StoredJudgeState,
    utcnow,
)
from policies.judge import JudgeState, OutputFacts, evaluate, unit_of


def pair_rows(
    rng: random.Random, rollout_id: int, created: datetime, progress: int
) -> tuple[dict, list[dict], list[dict]]:
    """One mirrored request, its two outputs (97% ok), and the probes' scores of each ok one."""
    request_id = str(uuid.uuid4())
    request = {
        "id": request_id,
        "rollout_id": rollout_id,
        "route": "generate",
        "stage": "shadow",
        "primary_role": "incumbent",
        "sticky_key": f"u{rng.randrange(5000)}",
        "prompt": 'a poster that says "SALE"',
        "params": {"n": 1, "size": "512x512"},
        "seed": rng.randrange(2**31),
        "mirrored": True,
        "created_at": created,
        "judge_progress": progress,
    }
    outputs, scores = [], []
    for role in ("incumbent", "candidate"):
        status = rng.choices(("ok", "error", "timeout"), (97, 2, 1))[0]
        output_id = str(uuid.uuid4())
        outputs.append(
            {
                "id": output_id,
                "request_id": request_id,
                "role": role,
                "image_index": 0,
                "is_primary": role == "incumbent",
                "status": status,
                "latency_ms": rng.lognormvariate(7, 0.3),
                "queue_ms": rng.expovariate(0.05),
                "batch_size": rng.choice((1, 2, 4)),
                "oom_count": 0,
                "batch_ooms": 0,
                "created_at": created,
                "scored_at": created,
                "timeout_s": 60.0,
                "model": role,
            }
        )
        if status != "ok":
            continue
        scores.append(
            {
                "output_id": output_id,
                "probe": "typography_cer",
                "value": rng.betavariate(1, 8),
                "created_at": created,
                "sampled": True,
            }
        )
        if role == "candidate":
            scores.append(
                {
                    "output_id": output_id,
                    "probe": "colour_shift_de",
                    "value": rng.expovariate(0.6),  # a healthy candidate: mean 1.7 ΔE
                    "created_at": created,
                    "sampled": True,
                }
            )
    return request, outputs, scores


def bulk_insert(store: Store, requests: list, outputs: list, scores: list) -> None:
    """COPY on PostgreSQL, executemany on SQLite: the fastest load each offers."""
    if store.engine.dialect.name == "postgresql":
        raw = store.engine.raw_connection()
        try:
            cursor = raw.cursor()
            for table, rows in (("requests", requests), ("outputs", outputs), ("scores", scores)):
                if not rows:
                    continue
                columns = list(rows[0])
                with cursor.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
                    for row in rows:
                        copy.write_row(
                            [json.dumps(v) if isinstance(v, dict) else v for v in row.values()]
                        )
            raw.commit()
        finally:
            raw.close()
        return
    with store.engine.begin() as conn:
        for table, rows in ((Request, requests), (Output, outputs), (Score, scores)):
            if rows:
                conn.execute(insert(table), rows)


def fold_in_memory(
    state: JudgeState, gpus: dict[str, float], requests: list, outputs: list, scores: list
) -> None:
    """The judged history's summary, folded with the judge's own code (a 72-hour state)."""
    by_request: dict[str, dict[str, list[OutputFacts]]] = {}
    for o in outputs:
        by_request.setdefault(o["request_id"], {}).setdefault(o["role"], []).append(
            OutputFacts(
                o["id"],
                o["request_id"],
                o["role"],
                0,
                o["status"],
                o["latency_ms"],
                o["queue_ms"],
                o["batch_size"],
                o["timeout_s"],
            )
        )
    rows: dict[str, list] = {}
    for s in scores:
        rows.setdefault(s["output_id"], []).append((s["output_id"], s["probe"], s["value"], None))
    for request in requests:
        facts = by_request[request["id"]]
        unit = unit_of(request["id"], facts, gpus, rows)
        assert unit is not None
        state.fold_arms(unit)
        state.fold_scores(
            unit, [r for outs in facts.values() for o in outs for r in rows.get(o.id, [])]
        )


def add_pairs(
    store: Store,
    rng: random.Random,
    rollout_id: int,
    count: int,
    start: datetime,
    progress: int,
    state: JudgeState | None = None,
    gpus: dict[str, float] | None = None,
) -> None:
    """`count` pairs, inserted 50,000 at a time (and folded into `state` when given)."""
    for begin in range(0, count, 50_000):
        requests, outputs, scores = [], [], []
        for k in range(begin, min(count, begin + 50_000)):
            at = start + timedelta(microseconds=k)
            request, outs, scored = pair_rows(rng, rollout_id, at, progress)
            requests.append(request)
            outputs += outs
            scores += scored
        bulk_insert(store, requests, outputs, scores)
        if state is not None:
            fold_in_memory(state, gpus or {}, requests, outputs, scores)


def run_backend(url: str, sizes: list[int], new: int, old_max: int) -> list[dict[str, Any]]:
    store, config = bench_rollout(
        url, auto_advance=False, min_samples=0, min_duration=0, max_duration="1000h"
    )
    controller = RolloutController(config, store)
    with store.reader() as session:
        rollout = get_rollout(session, "bench")
        since = attempt_started(session, rollout)
    rng = random.Random(7)
    state = JudgeState(controller.policy)
    controller.tick()  # first connections and imports: not what a tick costs
    import scipy.special  # noqa: F401  (the quantile bounds' first use would import it)

    clock = since + timedelta(seconds=1)
    have, results = 0, []
    for size in sizes:
        add_pairs(store, rng, rollout.id, size - have, clock, JUDGE_DONE, state, controller.gpus)
        have, clock = size, clock + timedelta(seconds=1)
        now = utcnow() + timedelta(hours=1)
        with store.session() as session:
            stored = session.get(StoredJudgeState, rollout.id) or StoredJudgeState(
                rollout_id=rollout.id
            )
            stored.attempt_started, stored.fingerprint = (
                since,
                fingerprint(controller.policy, controller.gpus),
            )
            stored.state, stored.updated_at = state.to_json(), now
            stored.reconciled_until = now - lost_after(config)
            session.merge(stored)
        with store.session() as session:
            # The earlier ticks of a 72-hour shadow counted its old requests into the stage's
            # mark, a slice at a time; the bulk load stands in for them here, untimed.
            settle_stage_count(session, get_rollout(session, "bench"), now - lost_after(config))
        row: dict[str, Any] = {"pairs": size}
        add_pairs(store, rng, rollout.id, new, clock, JUDGE_PENDING)
        # A database that grew over 72 hours has planner statistics; a bulk load has none.
        with store.engine.begin() as conn:
            conn.exec_driver_sql("ANALYZE")
        started = time.perf_counter()
        tick = controller.tick(now)
        row["tick_s"] = time.perf_counter() - started
        assert tick.leader and tick.verdict is not None, tick
        add_pairs(store, rng, rollout.id, new, clock + timedelta(milliseconds=500), JUDGE_PENDING)
        tracemalloc.start()
        controller.tick(now)
        row["tick_peak_mib"] = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
        clock += timedelta(seconds=1)
        state = _stored_state(store, rollout.id, controller)
        if size <= old_max:
            started = time.perf_counter()
            tracemalloc.start()
            with store.reader() as session:
                evaluate(recompute(session, rollout, controller.policy, controller.gpus))
            row["old_peak_mib"] = tracemalloc.get_traced_memory()[1] / 2**20
            tracemalloc.stop()
            row["old_s"] = time.perf_counter() - started
        results.append(row)
        have += 2 * new
    store.close()
    return results


def _stored_state(store: Store, rollout_id: int, controller: RolloutController) -> JudgeState:
    with store.reader() as session:
        return JudgeState.from_json(
            controller.policy, session.get(StoredJudgeState, rollout_id).state
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="1000,10000,100000,1000000")
    parser.add_argument("--new", type=int, default=300, help="pairs arriving between ticks")
    parser.add_argument("--old-max", type=int, default=100_000)
    parser.add_argument("--postgres", default=DEFAULT_POSTGRES)
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
    sizes = [int(s) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory() as tmp, backends(Path(tmp), args.postgres) as urls:
        for backend, url in urls.items():
            rows = run_backend(url, sizes, args.new, args.old_max)
            print(f"\n{backend}: one tick after {args.new} new pairs")
            print(
                f"{'pairs':>9} {'tick s':>8} {'peak MiB':>9} {'full read s':>12} "
                f"{'peak MiB':>9} {'full/tick':>10}"
            )
            for row in rows:
                old = row.get("old_s")
                print(
                    f"{row['pairs']:>9} {row['tick_s']:>8.3f} {row['tick_peak_mib']:>9.1f} "
                    + (
                        f"{old:>12.2f} {row['old_peak_mib']:>9.1f} {old / row['tick_s']:>9.1f}x"
                        if old is not None
                        else f"{'skipped':>12} {'':>9} {'':>10}"
                    )
                )
            ten_k = next((r for r in rows if r["pairs"] >= 10_000), rows[0])
            worst = max(r["tick_s"] for r in rows if r["pairs"] >= ten_k["pairs"])
            print(
                f"tick from {ten_k['pairs']} to {rows[-1]['pairs']} pairs: "
                f"{worst / ten_k['tick_s']:.2f}x the {ten_k['pairs']} figure (target <= 2x)"
            )


if __name__ == "__main__":
    main()
