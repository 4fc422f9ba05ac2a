"""Pseudo-labels and distillation on real cars, at equal training minutes.

    python bench/pseudo_labels.py --data ../shared/carvana-sample --minutes 3

Every run trains for --time-budget minutes (the clock ends training, so runs are compared at
equal compute on this machine), 256x384 inputs, 6 of the 24 cars held out; test Dice is the
competition metric on the 64 test images against test_solution.csv (never used for choices).

(a) the same recipe with and without a pseudo-label round, at the same total minutes:
    labels only for 2M minutes, against a teacher for M minutes then its student for M minutes
    on labels + the teacher's pseudo-labeled test images;
(b) an ensemble of 2 folds (M minutes each) against a student of half its width
    distilled from it in M minutes, and the same student trained on labels only (Dice and
    prediction images/s).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from carvana.submission.validate import score_submission  # noqa: E402

BASE = ["--input-size", "256x384", "--epochs", "1000", "--validation-size", "0.25", "--workers", "2"]


def run(work: Path, name: str, minutes: float, *args: str) -> dict:
    """One main.py run; returns its summary plus wall seconds, test Dice and prediction img/s."""
    done = work / "logs" / name / "summary.json"
    cmd = [sys.executable, str(ROOT / "main.py"), *BASE, "--time-budget", str(minutes), "--run-name", name,
           "--output", f"output/{name}.csv.gz", *args]
    if not (done.exists() and (work / "output" / f"{name}.csv.gz").exists()):  # --work: finished runs are kept
        result = subprocess.run(cmd, cwd=work, capture_output=True, text=True)
        if result.returncode != 0:
            raise SystemExit(f"{name} failed:\n{result.stderr[-3000:]}")
    summary = json.loads((work / "logs" / name / "summary.json").read_text())
    stages = summary["seconds_per_stage"]
    return {"name": name, "wall": sum(stages.values()), "test": score_submission(
        work / "output" / f"{name}.csv.gz", DATA / "test_solution.csv"), "valid": summary.get(
        "best_valid_dice") or summary.get("mean_oof_dice"), "img_s": summary["test_images"] / stages["predict"]}


def main() -> None:
    global DATA
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "carvana-sample")
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--max-uncertain", default="1.0", help="--pseudo-max-uncertain of the students")
    parser.add_argument("--work", type=Path, default=None, help="a folder of an earlier call: its finished runs are kept")
    args = parser.parse_args()
    DATA, m = args.data.resolve(), args.minutes
    work = args.work or Path(tempfile.mkdtemp(prefix="pseudo-bench-"))
    d, keep = ["--data-dir", str(DATA)], ["--pseudo-max-uncertain", args.max_uncertain]
    rows = [run(work, "labels-2m", 2 * m, *d),
            run(work, "teacher-m", m, *d)]
    rows.append(run(work, "student-m", m, *d, "--teacher", "output/models/teacher-m", *keep))
    rows.append(run(work, "folds2", m, *d, "--folds", "2"))
    rows.append(run(work, "distilled", m, *d, "--width", "0.125", "--teacher", "output/models/folds2", *keep))
    rows.append(run(work, "small-labels", m, *d, "--width", "0.125"))
    print(f"{m:g} training minutes per run (folds: per fold), {os.cpu_count()} cores, {' '.join(BASE)}")
    print("| run | training minutes | run s | valid / OOF Dice | test Dice | predict img/s |")
    print("| --- | --- | --- | --- | --- | --- |")
    minutes = {"labels-2m": 2 * m, "folds2": 2 * m}
    for r in rows:
        print(f"| {r['name']} | {minutes.get(r['name'], m):g} | {r['wall']:.0f} | {r['valid']:.5f} | {r['test']:.5f} | "
              f"{r['img_s']:.1f} |")
    print(f"(runs in {work})")


DATA = Path()
if __name__ == "__main__":
    main()
