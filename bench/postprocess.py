#!/usr/bin/env python
"""The submission's post-processing per image: ``upsampled_rle`` against upsampling to
1918x1280, thresholding and ``rle_encode``.

Maps as a network gives them: real car masks of ``../shared/carvana-sample/train_masks.csv``
area-downsampled to each input size and blurred. Both paths run on the same maps,
interleaved in alternating order round by round, on ``--threads`` threads at once (the
prediction's post-processing pool has 2: shared caches and memory bandwidth are part of the
cost); every pair of strings is compared (a pixel within float rounding of the threshold may
differ: counted). Prints per size the ms per map of each (median of rounds) and the ratio.

Usage (from the repository root)::

    python bench/postprocess.py [--images 48] [--repeat 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from carvana.data.layout import ORIG_SHAPE  # noqa: E402
from carvana.data.postprocess import upsample_mask, upsampled_rle  # noqa: E402
from carvana.data.rle import rle_decode, rle_encode  # noqa: E402

MASKS = REPO.parent / "shared" / "carvana-sample" / "train_masks.csv"


def plain(prob: np.ndarray) -> str:
    return rle_encode(upsample_mask(prob, 0.5))


def timed(fn, maps: list[np.ndarray], threads: int) -> tuple[float, list[str]]:
    """Wall seconds per map with ``threads`` threads sharing the maps, and the strings."""
    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        out = list(pool.map(fn, maps))
    return (time.perf_counter() - start) / len(maps), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if not MASKS.is_file():
        raise SystemExit(f"{MASKS}: missing (this bench needs ../shared/carvana-sample)")
    cv2.setNumThreads(1)
    rles = MASKS.read_text().splitlines()[1: args.images + 1]
    masks = [rle_decode(line.split(",", 1)[1], ORIG_SHAPE).astype(np.float32) for line in rles]
    print("| input | upsample + threshold + rle_encode ms | upsampled_rle ms | speedup | differing pixels |")
    print("| --- | --- | --- | --- | --- |")
    for hw in [(128, 192), (256, 384), (512, 768), (1024, 1024)]:
        maps = [cv2.GaussianBlur(cv2.resize(m, hw[::-1], interpolation=cv2.INTER_AREA), (5, 5), 0) for m in masks]
        times: dict[str, list[float]] = {"plain": [], "fast": []}
        results: dict[str, list[str]] = {}
        for r in range(args.repeat):
            for name in (("plain", "fast") if r % 2 == 0 else ("fast", "plain")):
                seconds, results[name] = timed(plain if name == "plain" else upsampled_rle, maps, args.threads)
                times[name].append(seconds)
        differ = sum(int((rle_decode(a, ORIG_SHAPE) != rle_decode(b, ORIG_SHAPE)).sum())
                     for a, b in zip(results["plain"], results["fast"]) if a != b)
        slow, fast = statistics.median(times["plain"]) * 1e3, statistics.median(times["fast"]) * 1e3
        print(f"| {hw[0]}x{hw[1]} | {slow:.3f} | {fast:.3f} | {slow / fast:.2f}x | {differ} |")
    print(f"{args.images} real masks, {args.repeat} rounds, {args.threads} thread(s)")


if __name__ == "__main__":
    main()
