#!/usr/bin/env python
"""Paired recipe runs at the hidden check's speed: two (or more) arms side by side, one core each.

How the CPU recipe's levers are measured (docs/results.md, "A/B pairs at the hidden check's
speed"). No test photo is involved: the recipe's fold 0 cars of the real sample
(``--folds 4 --seed 42`` over ``../shared/carvana-sample/train``) become a **stand-in** data
set, the other 18 cars its ``train/`` and those 6 its ``test/``, scored with their true masks.
Each arm is ``main.py --config configs/carvana-cpu-45min.toml`` on the stand-in with the arm's
own extra flags, pinned to its own core (``taskset``, one thread) and, with ``--isa avx2``
(the default), under the AVX2 emulation of bench/isa.py in fp32: about the hidden check's
per-core speed. The arms share the machine and the hour, so neither waits for the other and a
slow hour slows both.

Usage (from the repository root)::

    python bench/paired.py --arm base= --arm wide="--width 0.3125" --seed 42 --work /tmp/pair42
    python bench/paired.py --arm s42="--seed 42" --arm s1="--seed 1" --work /tmp/pair    # one lever, two seeds
    python bench/paired.py --report /tmp/pair42                                            # its tables again

Prints, per arm: epochs trained (of them coarse), the fold's OOF Dice and threshold, the
held-out cars' Dice of the submission, the wall time; each held-out car's Dice per arm; then ``paired: <arm> - <first arm>``.
Each arm's console is in ``<work>/<arm>/console.log``; ``--work`` is kept (models, logs).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "bench"))

from isa import AVX2_ENV, isa_line  # noqa: E402

from carvana.data.mask_table import load_mask_table  # noqa: E402
from carvana.submission.scoring import car_scores, image_scores, mean_dice  # noqa: E402
from carvana.training.folds import assign_folds  # noqa: E402

SAMPLE = REPO.parent / "shared" / "carvana-sample"
RECIPE = REPO / "configs" / "carvana-cpu-45min.toml"
ARM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,40}")


def build_stand_in(sample: Path, dest: Path, folds: int = 4, seed: int = 42) -> tuple[int, int]:
    """The stand-in data set in ``dest`` (links into ``sample``): fold 0's cars as the test set,
    with their true masks as ``test_solution.csv``. Returns (train images, test images)."""
    images = sorted((sample / "train").glob("*.jpg"))
    table = assign_folds(images, folds, seed)
    held = set(table.loc[table["fold"] == 0, "image"])
    masks = load_mask_table(sample / "train_masks.csv")
    for sub in ("train", "train_masks", "test"):
        (dest / sub).mkdir(parents=True, exist_ok=True)
    train_rows, test_rows = [], []
    for image in images:
        if image.name in held:
            (dest / "test" / image.name).symlink_to(image.resolve())
            test_rows.append(f"{image.name},{masks[image.name]}")
        else:
            (dest / "train" / image.name).symlink_to(image.resolve())
            gif = sample / "train_masks" / f"{image.stem}_mask.gif"
            if gif.exists():
                (dest / "train_masks" / gif.name).symlink_to(gif.resolve())
            train_rows.append(f"{image.name},{masks[image.name]}")
    header = "img,rle_mask\n"
    (dest / "train_masks.csv").write_text(header + "\n".join(train_rows) + "\n")
    (dest / "test_solution.csv").write_text(header + "\n".join(test_rows) + "\n")
    (dest / "sample_submission.csv").write_text(header + "".join(f"{r.split(',')[0]},1 1\n" for r in test_rows))
    if (sample / "metadata.csv").exists():
        (dest / "metadata.csv").symlink_to((sample / "metadata.csv").resolve())
    return len(train_rows), len(test_rows)


def parse_arm(text: str) -> tuple[str, list[str]]:
    """'name=flags' -> (name, [flags]); the name becomes a folder, so it is checked."""
    name, _, flags = text.partition("=")
    if not ARM_NAME.fullmatch(name):
        raise SystemExit(f"--arm {text!r}: the name before '=' must be letters, digits, '_', '.', '-' (a folder name)")
    return name, shlex.split(flags)


def start_arm(name: str, flags: list[str], core: int, work: Path, stand_in: Path, seed: int, isa: str,
              recipe: Path) -> subprocess.Popen:
    """One arm's main.py, pinned to ``core`` with one thread; its console to <work>/<name>/console.log."""
    folder = work / name
    folder.mkdir(parents=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(AVX2_ENV if isa == "avx2" else {})}
    command = ["taskset", "-c", str(core), sys.executable, str(REPO / "main.py"), "--config", str(recipe),
               "--data-dir", str(stand_in), "--no-amp", "--seed", str(seed), "--run-name", name, *flags]
    (folder / "command.txt").write_text(shlex.join(command) + "\n")
    log = (folder / "console.log").open("w")
    return subprocess.Popen(command, cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT)


def arm_figures(folder: Path, name: str, solution: Path) -> dict:
    """What one finished arm measured: epochs, the fold's OOF Dice and threshold, held-out Dice."""
    console = (folder / "console.log").read_text(errors="replace")
    epochs = re.findall(r"^epoch \d+/\d+ .*$", console, flags=re.M)
    summary_path = folder / "logs" / name / "oof_summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    submission = folder / "output" / "submit.csv.gz"
    coarse = sum(bool(re.search(r"train_loss \S+ \([^)]*@\d+x\d+\)", e)) for e in epochs)  # "(bce+dice@192x256)"
    scores = image_scores(submission, solution) if submission.exists() else {}
    return {"epochs": len(epochs), "coarse": coarse, "oof": summary.get("mean_oof_dice"), "threshold": summary.get("threshold"),
            "held_out": mean_dice(scores) if scores else None, "cars": car_scores(scores)}


def report(arms: list[tuple[str, list[str]]], cores: dict[str, int], rows: dict[str, dict], walls: dict[str, float]) -> None:
    """The arms' table, each held-out car's Dice per arm, and each arm's difference from the first."""
    print("\n| arm | core | flags | epochs (coarse) | fold OOF | threshold | held-out Dice | wall |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, flags in arms:
        r = rows[name]
        oof = f"{r['oof']:.5f}" if r["oof"] is not None else "-"
        held = f"{r['held_out']:.5f}" if r["held_out"] is not None else "-"
        wall = f"{walls[name] / 60:.1f} min" if name in walls else "-"
        print(f"| {name} | {cores[name]} | {shlex.join(flags) or '(the recipe)'} | {r['epochs']} ({r['coarse']}) | {oof} | "
              f"{r['threshold']} | {held} | {wall} |")
    cars = sorted({car for r in rows.values() for car in r["cars"]})
    if cars:  # one hard car can move the mean more than a lever does: show which
        print("\n| held-out car | " + " | ".join(name for name, _ in arms) + " |")
        print("| --- |" + " --- |" * len(arms))
        for car in cars:
            cells = [f"{rows[name]['cars'][car]:.5f}" if car in rows[name]["cars"] else "-" for name, _ in arms]
            print(f"| {car} | " + " | ".join(cells) + " |")
    first = arms[0][0]
    for name, _ in arms[1:]:
        if rows[name]["held_out"] is not None and rows[first]["held_out"] is not None:
            print(f"paired: {name} - {first} held-out Dice {rows[name]['held_out'] - rows[first]['held_out']:+.5f}")


def report_again(work: Path) -> None:
    """The tables of a finished ``--work`` folder again, from each arm's command.txt (arms in core order)."""
    arms, cores = [], {}
    for command_file in sorted(work.glob("*/command.txt")):
        command, name = shlex.split(command_file.read_text()), command_file.parent.name
        cores[name] = int(command[command.index("-c") + 1])
        arms.append((name, command[command.index("--run-name") + 2:]))
    if not arms:
        raise SystemExit(f"--report {work}: no <arm>/command.txt in it (not a paired.py --work folder)")
    arms.sort(key=lambda arm: cores[arm[0]])
    rows = {name: arm_figures(work / name, name, work / "stand-in" / "test_solution.csv") for name, _ in arms}
    report(arms, cores, rows, {})  # the walls are not on disk


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arm", action="append", metavar="NAME=FLAGS",
                        help="one arm: a name and main.py flags added to the recipe's (repeat; one core each)")
    parser.add_argument("--report", type=Path, metavar="WORK",
                        help="print the tables of a finished --work folder again (runs nothing)")
    parser.add_argument("--seed", type=int, default=42, help="every arm's --seed (an arm's own --seed wins)")
    parser.add_argument("--work", type=Path, help="a new folder: the stand-in and each arm's run")
    parser.add_argument("--isa", choices=("native", "avx2"), default="avx2")
    parser.add_argument("--recipe", type=Path, default=RECIPE)
    args = parser.parse_args()
    if args.report:
        return report_again(args.report)
    if not args.arm or not args.work:
        parser.error("--arm and --work are required (or --report WORK alone)")
    arms = [parse_arm(a) for a in args.arm]
    cores = sorted(os.sched_getaffinity(0))
    if len({n for n, _ in arms}) != len(arms):
        raise SystemExit("--arm: two arms have the same name")
    if len(arms) > len(cores):
        raise SystemExit(f"--arm: {len(arms)} arms need {len(arms)} cores; this process may use {len(cores)}")
    if args.work.exists():
        raise SystemExit(f"--work {args.work}: exists; give a new folder (nothing is overwritten)")
    if not (SAMPLE / "train_masks.csv").is_file():
        raise SystemExit(f"{SAMPLE}: missing (this bench needs the real sample)")
    stand_in = args.work / "stand-in"
    n_train, n_test = build_stand_in(SAMPLE, stand_in)
    print(f"stand-in: {n_train} train images, {n_test} held-out images ({stand_in}); kernels {isa_line(args.isa)}",
          flush=True)
    start = time.perf_counter()
    procs = [(n, start_arm(n, f, core, args.work, stand_in, args.seed, args.isa, args.recipe.resolve()), core)
             for (n, f), core in zip(arms, cores)]
    walls = {}
    for name, proc, _ in procs:
        if proc.wait() != 0:
            print(f"{name}: main.py exited {proc.returncode}; see {args.work / name / 'console.log'}")
        walls[name] = time.perf_counter() - start
    rows = {name: arm_figures(args.work / name, name, stand_in / "test_solution.csv") for name, _, _ in procs}
    report(arms, {name: core for name, _, core in procs}, rows, walls)


if __name__ == "__main__":
    main()
