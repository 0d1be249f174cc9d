"""The bake-off's statistics by simulation: false "worse" under A/A, and pairs to rank.

    python -m bench.bakeoff_sim [--runs 500] [--workers 2]

Every figure comes from `controller.lab.simulation`, which judges with the bake-off's own
`ModelTally`, zero-tolerance checks and split alpha, after every round of 30 units, and
stops a clearly losing model, as `cutover bakeoff` does.

1. A/A: four models identical to the baseline (3% failures, the same latency and CER
   distributions), 300 units. The share of bake-offs in which any model is called worse
   on any check, with a 95% Wilson interval, against the policy's alpha.
2. The boundary: two models whose failure rate (20%) and CER equal the baseline's, every
   item quoting text, 300 units, 15 looks: any claim, worse or better, is an error.
3. Pairs to rank: one model (and, separately, one of four) whose typography CER is 0.05
   above the baseline's, every item quoting text: typography pairs until it is first
   called worse, median and p90 (none are stopped early; 4,000 pairs at most).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from concurrent.futures import ProcessPoolExecutor

from controller.lab.simulation import Engine, Suite, simulate
from controller.rollout.simulation import wilson
from policies.policy import load_policy

MAX_PAIRS = 4000


def aa(seed: int) -> bool:
    result = simulate(
        load_policy(),
        Engine(),
        {name: Engine() for name in ("a", "b", "c", "d")},
        Suite(units=300),
        random.Random(seed),
    )
    return any(after is not None for after in result.worse_after.values())


def boundary(seed: int) -> bool:
    result = simulate(
        load_policy(),
        Engine(failure=0.2),
        {"a": Engine(failure=0.2), "b": Engine(failure=0.2)},
        Suite(units=300, round_size=20, typography_share=1.0),
        random.Random(10_000 + seed),
        early_stop=False,
    )
    return any(s.worse or s.better for s in result.standings.values())


def pairs_to_rank(args: tuple[int, int]) -> int | None:
    seed, others = args
    models = {"worse-text": Engine(cer_shift=0.05)}
    models.update({f"level-{k}": Engine() for k in range(others)})
    result = simulate(
        load_policy(),
        Engine(),
        models,
        Suite(units=MAX_PAIRS, round_size=25, typography_share=1.0),
        random.Random(20_000 + seed),
        early_stop=False,
    )
    standing = result.standings["worse-text"]
    found = [r for r in standing.results if r.name == "typography_cer" and r.decision == "FAIL"]
    return result.worse_after["worse-text"] if found else None


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=500)
    parser.add_argument("--rank-runs", type=int, default=100)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    alpha = load_policy().alpha
    started = time.monotonic()
    with ProcessPoolExecutor(args.workers) as pool:
        for label, fn in (("A/A, 4 models", aa), ("boundary, 2 models", boundary)):
            hits = sum(pool.map(fn, range(args.runs), chunksize=8))
            low, high = wilson(hits, args.runs)
            print(
                f"{label:<20} false claims {hits}/{args.runs} = {hits / args.runs:.3%} "
                f"(95% CI {low:.3%}-{high:.3%}); alpha {alpha:g}: "
                f"{'within' if hits / args.runs <= alpha else 'ABOVE'}"
            )
        for others in (0, 3):
            found = list(pool.map(pairs_to_rank, [(s, others) for s in range(args.rank_runs)]))
            ranked = sorted(x for x in found if x is not None)
            never = len(found) - len(ranked)
            if ranked:
                p90 = ranked[min(len(ranked) - 1, int(0.9 * len(ranked)))]
                print(
                    f"+0.05 CER, 1 of {others + 1} models: typography pairs to rank it worse: "
                    f"median {statistics.median(ranked):.0f}, p90 {p90} "
                    f"({never}/{len(found)} not within {MAX_PAIRS})"
                )
    print(f"({time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    main()
