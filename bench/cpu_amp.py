#!/usr/bin/env python
"""Benchmark bf16 autocast against fp32 on the CPU: training and inference images/s.

Runs ``CarvanaClassifier``'s own training step (``_train_one_epoch``: normalise, forward,
fp32 BCE + Dice, backward, AdamW) and its ``predict`` loop (forward + sigmoid, no TTA, a
no-op callback) on synthetic uint8 batches like the loader's, for each variant:

* ``fp32``      ``amp=False, channels_last=False``, inference on the live model with its
                BatchNorms: the CPU path before bf16 (the baseline)
* ``bf16``      ``amp=True, channels_last=False``
* ``bf16-cl``   ``amp=True, channels_last=True``: what the pipeline runs on a CPU with native bf16
* ``fp32-cl``   ``amp=False, channels_last=True``: the pipeline with ``--no-amp``
* ``bf16-cl-ac`` bf16-cl with inference under autocast on the live model (BatchNorm not folded,
                weights re-cast each forward): the pipeline before training/inference.py

Every variant but ``fp32`` and ``-ac`` infers through the classifier's folded, cast copy
(``training/inference.py``); each inference block follows a training block, so its time
includes bringing that copy up to date with the new weights, once, as a validation after an
epoch does. Since that change CPU *training* is NCHW whatever the variant
(channels_last measured slower for it, see ``training/precision.py``): ``-cl`` selects the
inference copy's memory format only, so training rates differ only by precision.

Variants are interleaved round by round (the order rotates each round) at every input
size, and the figures are **medians of per-round ratios** against fp32 of the same round,
because other processes share this machine. On a heavily loaded machine, ``--threads 1
--clock cpu`` times CPU seconds of one thread instead of wall time: the compute ratio,
without the waits of a 2-thread OpenMP team whose threads are descheduled. Targets on a native-bf16 CPU: training >= 1.8x,
inference >= 2x. Ends with ``CPU bf16/fp32: training <X>x, inference <Y>x`` (the
medians of bf16-cl, else bf16, at the first ``--sizes`` entry).

Usage (from the repository root)::

    python bench/cpu_amp.py [--sizes 128x192,256x384] [--width 0.25] [--batch-size 4]
                            [--train-steps 3] [--infer-batches 6] [--repeat 7] [--variants fp32,bf16,bf16-cl,fp32-cl,bf16-cl-ac]
                            [--threads N] [--clock wall|cpu]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
try:
    import carvana  # noqa: F401
except ImportError:  # run from a checkout without an installed package
    sys.path.insert(0, str(REPO / "src"))

from carvana.models.unet1024 import UNet1024, parse_input_size  # noqa: E402
from carvana.training.callbacks import Callback  # noqa: E402
from carvana.training.classifier import CarvanaClassifier  # noqa: E402
from carvana.training.precision import cpu_bf16_flags  # noqa: E402

VARIANTS = ("fp32", "bf16", "bf16-cl", "fp32-cl", "bf16-cl-ac")


def cpu_model() -> str:
    """lscpu's 'Model name' (from /proc/cpuinfo), else platform.processor()."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def train_batches(n: int, batch: int, hw: tuple[int, int]) -> list[dict]:
    """``n`` batches of uint8 noise images and 0/1 blob masks, as the training loader gives them."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        images = torch.randint(0, 256, (batch, 3, *hw), generator=g, dtype=torch.uint8)
        blobs = torch.nn.functional.avg_pool2d(torch.rand(batch, 1, *hw, generator=g), 15, 1, 7)
        out.append({"image": images, "mask": (blobs > 0.5).to(torch.uint8)})
    return out


def make_classifier(variant: str, width: float) -> CarvanaClassifier:
    """The same initial weights for every variant; channels_last only for the -cl ones."""
    torch.manual_seed(0)
    clf = CarvanaClassifier(UNet1024(width=width), epochs=1, device="cpu", amp=variant.startswith("bf16"),
                            channels_last="-cl" in variant, progress=False)
    if variant == "fp32" or variant.endswith("-ac"):
        clf.inference = None  # eval forwards on the live model (autocast where bf16): the former path
    expected = torch.bfloat16 if variant.startswith("bf16") else None
    if clf.amp_dtype != expected:
        sys.exit(f"bench/cpu_amp.py: variant {variant} needs native bf16, which this CPU lacks "
                 "(the classifier chose fp32); run --variants fp32,fp32-cl")
    return clf


CLOCK = time.perf_counter  # --clock cpu: time.process_time (CPU seconds of this process)


def train_rate(clf: CarvanaClassifier, batches: list[dict]) -> float:
    t0 = CLOCK()
    clf._train_one_epoch(batches, 0, 1)
    return sum(len(b["image"]) for b in batches) / (CLOCK() - t0)


def infer_rate(clf: CarvanaClassifier, batches: list[dict]) -> float:
    t0 = CLOCK()
    clf.predict([{"image": b["image"], "name": ["x"] * len(b["image"])} for b in batches], [Callback()])
    return sum(len(b["image"]) for b in batches) / (CLOCK() - t0)


def bench_size(args: argparse.Namespace, hw: tuple[int, int]) -> dict[str, dict[str, float]]:
    """Per-variant median images/s and median per-round ratio to fp32, training and inference."""
    batches = train_batches(max(args.train_steps, args.infer_batches), args.batch_size, hw)
    clfs = {v: make_classifier(v, args.width) for v in args.variants}
    for clf in clfs.values():  # warm-up: oneDNN primitives for these shapes, allocator
        train_rate(clf, batches[:1])
        infer_rate(clf, batches[:1])
    rates: dict[str, dict[str, list[float]]] = {v: {"train": [], "infer": []} for v in clfs}
    order = list(clfs)
    for rnd in range(args.repeat):
        shift = rnd % len(order)
        for v in order[shift:] + order[:shift]:  # rotate, so no variant always runs first
            rates[v]["train"].append(train_rate(clfs[v], batches[: args.train_steps]))
            rates[v]["infer"].append(infer_rate(clfs[v], batches[: args.infer_batches]))
        print(f"  round {rnd + 1}: " + "  ".join(
            f"{v} {rates[v]['train'][-1]:.2f}/{rates[v]['infer'][-1]:.2f}" for v in order), flush=True)
    result = {}
    for v in order:
        row: dict[str, float] = {}
        for kind in ("train", "infer"):
            ratios = [a / b for a, b in zip(rates[v][kind], rates["fp32"][kind])]
            row[f"{kind}_rate"] = statistics.median(rates[v][kind])
            row[f"{kind}_ratio"] = statistics.median(ratios)
            row[f"{kind}_min"], row[f"{kind}_max"] = min(ratios), max(ratios)
        result[v] = row
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="128x192,256x384", help="input sizes HxW, comma-separated")
    parser.add_argument("--width", type=float, default=0.25, help="UNet1024 channel multiplier (default 0.25)")
    parser.add_argument("--batch-size", type=int, default=4, help="batch for training and inference (default 4)")
    parser.add_argument("--train-steps", type=int, default=3, help="training steps per timed block (default 3)")
    parser.add_argument("--infer-batches", type=int, default=6, help="inference batches per timed block (default 6)")
    parser.add_argument("--repeat", type=int, default=7, help="interleaved rounds (default 7)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's, one per core)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall: images/s; cpu: images per CPU-second of this process (with --threads 1 "
                             "a compute ratio that other processes' load barely moves)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"subset of {','.join(VARIANTS)} (fp32 always runs)")
    args = parser.parse_args(argv)
    args.variants = ["fp32"] + [v for v in args.variants.split(",") if v != "fp32"]
    if unknown := set(args.variants) - set(VARIANTS):
        parser.error(f"unknown variants {sorted(unknown)}: choose from {', '.join(VARIANTS)}")
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    if args.threads:
        torch.set_num_threads(args.threads)
    flags = cpu_bf16_flags()
    print(f"{cpu_model()}; {torch.get_num_threads()} torch threads; native bf16: {', '.join(flags) or 'no'}; "
          f"torch {torch.__version__}; UNet1024 width {args.width}, batch {args.batch_size}; "
          f"{args.train_steps} train steps / {args.infer_batches} inference batches per block, {args.repeat} rounds; "
          f"{'wall' if args.clock == 'wall' else 'CPU'} clock")
    summary: dict[str, Any] = {}
    for size in args.sizes.split(","):
        hw = parse_input_size(size)
        print(f"{size}: rounds (train/inference images/s per variant)")
        result = bench_size(args, hw)
        for v, row in result.items():
            print(f"{size} {v:>8}: train {row['train_rate']:6.2f} img/s ({row['train_ratio']:.2f}x fp32, rounds "
                  f"{row['train_min']:.2f}-{row['train_max']:.2f}); inference {row['infer_rate']:6.2f} img/s "
                  f"({row['infer_ratio']:.2f}x, rounds {row['infer_min']:.2f}-{row['infer_max']:.2f})")
        summary.setdefault("first", result)
    best = next((v for v in ("bf16-cl", "bf16") if v in summary["first"]), None)
    if best:
        first = summary["first"][best]
        print(f"CPU bf16/fp32: training {first['train_ratio']:.2f}x, inference {first['infer_ratio']:.2f}x "
              f"({best} against fp32 NCHW; targets 1.8x / 2x, at {args.sizes.split(',')[0]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
