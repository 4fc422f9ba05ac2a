"""MedianPruner against Hyperband at equal wall time, on the demo data.

Two studies run side by side, each in its own process with one thread (so each has one of the
two cores for the same minutes), with the same fixed settings, the same default search space
and the same TPE seed; only --tune-pruner differs. Each worker starts trials until
--tune-timeout minutes have passed. Compared: the best valid Dice found, and how many trials
finished and were pruned in that time.

    python bench/tune_pruners.py --minutes 8            # results: bench/README.md, docs/tuning.md
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from carvana.data.demo.dataset import write_demo_dataset  # noqa: E402
FIXED = ["--input-size", "64x128", "--epochs", "12", "--workers", "0"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=8.0)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="tune-pruners-"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    demo = write_demo_dataset(work / "demo", seed=args.seed)  # once, so neither study pays for writing it
    procs, start = {}, time.perf_counter()
    for pruner in ("median", "hyperband"):
        cmd = [sys.executable, str(ROOT / "main.py"), "--tune", "1000", "--study", pruner, "--tune-pruner", pruner,
               "--tune-timeout", str(args.minutes), "--seed", str(args.seed), "--data-dir", str(demo),
               *FIXED]
        procs[pruner] = subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    for p in procs.values():
        p.wait()
    wall = time.perf_counter() - start
    print(f"{args.minutes:g} minutes per study (wall {wall:.0f} s), one core each, demo data, {' '.join(FIXED)}")
    print("| pruner | trials finished | of them pruned | best valid Dice | trial of the best |")
    print("| --- | --- | --- | --- | --- |")
    for pruner in procs:
        rows = list(csv.DictReader(open(work / "logs" / pruner / "trials.csv")))
        done = [r for r in rows if r["state"] in ("COMPLETE", "PRUNED")]
        complete = [r for r in rows if r["state"] == "COMPLETE"]
        best = max(complete, key=lambda r: float(r["value"]))
        print(f"| {pruner} | {len(done)} | {len(done) - len(complete)} | {float(best['value']):.5f} | {best['number']} |")
    print(f"(studies in {work})")


if __name__ == "__main__":
    main()
