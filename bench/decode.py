#!/usr/bin/env python
"""Benchmark fast decoding: JPEG decode + resize at a DCT scale against a full decode + resize.

Two modes, each timing the two settings interleaved (alternating order, round by round) in one
process, so their ratio is robust to a busy machine:

* per image (default): for each input size, ``read_for_input`` + ``fit_decoded`` (what
  ``TestImageDataset`` / ``TrainImageDataset`` run for an image) over ``--images`` real photos
  with ``fast_decode`` on and off; ms/image per setting (median of rounds), the per-round
  speedup full/fast (median, min - max), the DCT scale and the mean absolute difference of the
  fast result from the full one (0-255 scale). OpenCV runs ``--threads`` threads (1 = as in a
  DataLoader worker). Ends with ``decode+resize speedup at 256x384: <X>x``.
* ``--loader``: training loader images/s at ``--input-size`` (default 256x384):
  ``TrainImageDataset`` (masks from ``train_masks.csv`` where present, ``train_augmentation``
  on) through a DataLoader with ``--workers`` workers (default 2), first batch (worker
  start-up) excluded, fast against full. Ends with ``loader fast/full at HxW (N workers): <X>x``.

Images come from ``../shared/carvana-sample/train`` or, when absent, a generated demo dataset.

Usage (from the repository root)::

    python bench/decode.py [--images 48] [--repeat 5] [--sizes 128x192,256x384,512x768,1024x1024] [--threads 1]
    python bench/decode.py --loader [--images 96] [--repeat 5] [--input-size 256x384] [--workers 2] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loader import DEFAULT_DATA, find_pairs  # noqa: E402  (bench/loader.py: real pairs or demo data)

from carvana.data.datasets import TrainImageDataset, fit_decoded, seed_worker, train_augmentation  # noqa: E402
from carvana.data.jpeg import decode_scale, jpeg_size, read_for_input  # noqa: E402
from carvana.data.mask_table import mask_table_for  # noqa: E402

SIZES = "128x192,256x384,512x768,1024x1024"


def parse_hw(text: str) -> tuple[int, int]:
    h, w = (int(v) for v in text.lower().split("x"))
    return h, w


def per_image_ms(images: list[Path], hw: tuple[int, int], fast: bool) -> float:
    """ms/image of read_for_input + fit_decoded over ``images``."""
    t0 = time.perf_counter()
    for p in images:
        image, orig_hw = read_for_input(p, hw, fast)
        fit_decoded(image, hw, orig_hw)
    return (time.perf_counter() - t0) * 1e3 / len(images)


def difference(images: list[Path], hw: tuple[int, int]) -> float:
    """Mean absolute difference (0-255) of the fast result from the full one, over ``images``."""
    diffs = []
    for p in images:
        fast_img, orig = read_for_input(p, hw, True)
        full_img, _ = read_for_input(p, hw, False)
        a, b = fit_decoded(fast_img, hw, orig), fit_decoded(full_img, hw, orig)
        diffs.append(float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean()))
    return statistics.mean(diffs)


def run_per_image(images: list[Path], sizes: list[tuple[int, int]], repeat: int) -> int:
    print(f"{len(images)} images, {repeat} rounds, OpenCV threads {cv2.getNumThreads()}; "
          "settings interleaved per size, order alternating by round")
    for hw in sizes:  # warm-up: page cache, first-call costs
        per_image_ms(images[:2], hw, True), per_image_ms(images[:2], hw, False)
    rows = []
    for hw in sizes:
        times: dict[bool, list[float]] = {True: [], False: []}
        for rnd in range(repeat):
            for fast in ((True, False) if rnd % 2 == 0 else (False, True)):
                times[fast].append(per_image_ms(images, hw, fast))
        ratios = [f / s for f, s in zip(times[False], times[True])]
        scale = decode_scale(jpeg_size(images[0]), hw)
        rows.append((hw, scale, statistics.median(times[False]), statistics.median(times[True]),
                     statistics.median(ratios), min(ratios), max(ratios), difference(images, hw)))
    print("\n| input | scale | full ms/image | fast ms/image | speedup full/fast: median (min - max) | "
          "mean abs. difference (0-255) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for hw, scale, full, fast, med, lo, hi, diff in rows:
        print(f"| {hw[0]}x{hw[1]} | 1/{scale} | {full:.2f} | {fast:.2f} | {med:.2f}x ({lo:.2f} - {hi:.2f}) | {diff:.3f} |")
    headline = next((r for r in rows if r[0] == (256, 384)), rows[0])
    print(f"\ndecode+resize speedup at {headline[0][0]}x{headline[0][1]}: {headline[4]:.2f}x")
    return 0


def loader_rate(images: list[Path], masks: list[Path], hw: tuple[int, int], fast: bool, rles: dict | None,
                workers: int, batch_size: int, seed: int) -> float:
    """Images/s of a DataLoader over TrainImageDataset, after its first batch."""
    ds = TrainImageDataset(images, masks, hw, train_augmentation(seed=seed), mask_rles=rles, fast_decode=fast)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers, worker_init_fn=seed_worker,
                        generator=torch.Generator().manual_seed(seed))
    it = iter(loader)
    next(it)
    t0, n = time.perf_counter(), 0
    for batch in it:
        n += len(batch["name"])
    return n / (time.perf_counter() - t0)


def run_loader(images: list[Path], masks: list[Path], hw: tuple[int, int], repeat: int, workers: int,
               batch_size: int) -> int:
    rles = mask_table_for(masks[0].parent.parent)
    print(f"{len(images)} pairs at {hw[0]}x{hw[1]}, TrainImageDataset + train_augmentation, masks from "
          f"{'train_masks.csv' if rles else 'GIFs'}; DataLoader {workers} workers, batch {batch_size}; {repeat} rounds")
    rates: dict[bool, list[float]] = {True: [], False: []}
    for rnd in range(repeat):
        for fast in ((True, False) if rnd % 2 == 0 else (False, True)):
            rates[fast].append(loader_rate(images, masks, hw, fast, rles, workers, batch_size, seed=rnd))
        print(f"round {rnd + 1}: fast {rates[True][-1]:.1f} img/s, full {rates[False][-1]:.1f} img/s")
    ratios = [f / s for f, s in zip(rates[True], rates[False])]
    print(f"\n| setting | images/s (median of rounds) |\n| --- | --- |\n| fast decode | {statistics.median(rates[True]):.1f} |"
          f"\n| full decode | {statistics.median(rates[False]):.1f} |")
    print(f"per-round ratio fast/full: median {statistics.median(ratios):.2f} (min {min(ratios):.2f}, max {max(ratios):.2f})")
    print(f"\nloader fast/full at {hw[0]}x{hw[1]} ({workers} workers): {statistics.median(ratios):.2f}x")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--loader", action="store_true", help="time the training loader instead of decode + resize")
    ap.add_argument("--images", type=int, default=None, help="photos (default 48; --loader 96)")
    ap.add_argument("--repeat", type=int, default=5, help="rounds (default 5)")
    ap.add_argument("--sizes", default=SIZES, help=f"input sizes, per-image mode (default {SIZES})")
    ap.add_argument("--threads", type=int, default=1, help="OpenCV threads, per-image mode (default 1)")
    ap.add_argument("--input-size", default="256x384", help="--loader: input size (default 256x384)")
    ap.add_argument("--workers", type=int, default=2, help="--loader: DataLoader workers (default 2)")
    ap.add_argument("--batch-size", type=int, default=8, help="--loader: batch size (default 8)")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="Carvana-layout folder")
    args = ap.parse_args(argv)
    count = args.images or (96 if args.loader else 48)
    if args.repeat < 1 or count < 1 or (args.loader and count < 2 * args.batch_size):
        ap.error("--repeat and --images must be >= 1 (--loader: --images >= 2 * --batch-size)")
    cv2.setNumThreads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench-decode-") as tmp:
        images, masks = find_pairs(args.data, count, Path(tmp))
        if args.loader:
            return run_loader(images, masks, parse_hw(args.input_size), args.repeat, args.workers, args.batch_size)
        return run_per_image(images, [parse_hw(s) for s in args.sizes.split(",")], args.repeat)


if __name__ == "__main__":
    sys.exit(main())
