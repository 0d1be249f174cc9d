"""Wall time and peak memory of `cutover demo`, per scenario and both together.

    python bench/demo_footprint.py [--scenarios healthy regression both]

Memory is the peak of the summed resident memory of the demo's whole process tree
(the CLI, Ray's raylet and GCS, every worker and replica), sampled every 0.2 s.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil


def tree_rss(root: psutil.Process) -> int:
    total = 0
    for proc in [root, *root.children(recursive=True)]:
        try:
            total += proc.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return total


def measure(scenario: str) -> tuple[float, int, int]:
    workdir = Path(tempfile.mkdtemp(prefix="cutover-demo-bench-"))
    started = time.perf_counter()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "controller",
            "demo",
            "--scenario",
            scenario,
            "--workdir",
            str(workdir),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    root = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, tree_rss(root))
        time.sleep(0.2)
    return time.perf_counter() - started, peak, proc.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--scenarios", nargs="+", default=["healthy", "regression", "both"])
    args = parser.parse_args()
    print(
        f"{'scenario':<12} {'wall s':>8} {'peak GiB':>9} {'exit':>5}   target: both < 300 s, < 4 GiB"
    )
    for scenario in args.scenarios:
        seconds, peak, code = measure(scenario)
        print(f"{scenario:<12} {seconds:>8.1f} {peak / 2**30:>9.2f} {code:>5}")


if __name__ == "__main__":
    main()
