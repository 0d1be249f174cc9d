"""The judge's slice search by simulation: false slice FAILs under A/A, and pairs to find one.

    python -m bench.slice_sim [--runs 1000] [--find-runs 200] [--workers 2]

Every figure comes from `controller.rollout.slice_simulation`, which folds pairs into the
judge's own `JudgeState` (the default policy: every check but latency sliced, 64 slices a
check at most) and reads its slice findings every 25 pairs, as the loop does each tick.

1. A/A: both arms the same model (3% failures, the same CER distribution), 1,500 pairs,
   prompts spread over more than 20 slices (quoted text of three lengths and two scripts,
   people, named and hex colours, three prompt lengths, and pairs of these). The share of
   rollouts with any slice FAIL (a false discovery, so this is also the false-discovery
   rate) with a 95% Wilson interval, against `slices.alpha`.
2. Pairs to find: the candidate's CER is +0.3 on prompts quoting 13 or more characters,
   10% of traffic, and the same elsewhere. Pairs (all mirrored requests, quoted or not)
   until a slice naming `text:13+` FAILs: median and p90; 6,000 pairs at most.
"""

from __future__ import annotations

import argparse
import statistics
import time
from concurrent.futures import ProcessPoolExecutor

from controller.rollout.simulation import wilson
from controller.rollout.slice_simulation import SliceTraffic, simulate_slices
from policies.policy import load_policy

MAX_PAIRS = 6000


def aa(seed: int) -> tuple[bool, int]:
    outcome = simulate_slices(load_policy(), SliceTraffic(pairs=1500), seed)
    return bool(outcome.findings), outcome.slices_judged


def pairs_to_find(seed: int) -> int | None:
    traffic = SliceTraffic(pairs=MAX_PAIRS, worse_on="text:13+", shift=0.3)
    return simulate_slices(load_policy(), traffic, 10_000 + seed).found_at


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--find-runs", type=int, default=200)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    policy = load_policy()
    started = time.monotonic()
    with ProcessPoolExecutor(args.workers) as pool:
        results = list(pool.map(aa, range(args.runs), chunksize=10))
        hits = sum(found for found, _ in results)
        judged = sorted(n for _, n in results)
        low, high = wilson(hits, args.runs)
        print(
            f"A/A, {args.runs} rollouts of 1,500 pairs: slices judged per rollout "
            f"min {judged[0]}, median {statistics.median(judged):.0f}; rollouts with a false "
            f"slice FAIL {hits}/{args.runs} = {hits / args.runs:.2%} (95% CI {low:.2%}-{high:.2%}); "
            f"slices.alpha {policy.slices.alpha:g}: "
            f"{'within' if hits / args.runs <= policy.slices.alpha else 'ABOVE'}"
        )
        found = list(pool.map(pairs_to_find, range(args.find_runs), chunksize=5))
        ranked = sorted(x for x in found if x is not None)
        never = len(found) - len(ranked)
        if ranked:
            p90 = ranked[min(len(ranked) - 1, int(0.9 * len(ranked)))]
            print(
                f"+0.3 CER on a 10% slice (text:13+): pairs until a slice FAIL names it: "
                f"median {statistics.median(ranked):.0f}, p90 {p90} "
                f"({never}/{len(found)} not within {MAX_PAIRS})"
            )
    print(f"({time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    main()
