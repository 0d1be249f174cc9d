"""Wall time of `cutover status` (and `--json`): median of N runs against a prepared SQLite rollout.

python bench/cli_latency.py [--runs 5]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cutover-bench-"))
    shutil.copy(REPO / "examples" / "cutover.yaml", work / "cutover.yaml")
    base = [sys.executable, "-m", "controller", "-c", str(work / "cutover.yaml")]
    subprocess.run(
        [*base, "init", "--skip-validation", "--reason", "bench"], check=True, capture_output=True
    )
    print(f"{'command':<28} {'median s':>9} {'min s':>7} {'max s':>7}  (runs={args.runs})")
    for label, extra in (
        ("cutover status", ["status"]),
        ("cutover status --json", ["status", "--json"]),
        ("cutover --help", ["--help"]),
    ):
        times = [timed([*base, *extra]) for _ in range(args.runs)]
        print(f"{label:<28} {statistics.median(times):>9.3f} {min(times):>7.3f} {max(times):>7.3f}")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
