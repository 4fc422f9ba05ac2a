#!/usr/bin/env python
"""Benchmark ``carvana.data.rle.rle_encode`` against the classic Kaggle RLE encoder.

Runs both encoders on real 1918x1280 car masks from
``../shared/carvana-sample/train_masks`` (or, when that folder is absent,
generated car-like masks), checks that every string is identical, then times
them interleaved over ``--repeat`` rounds.  In each round (``--mode block``,
the default) one encoder encodes every image, then the other, the order
alternating between rounds; ``--mode per-call`` alternates them image by
image instead, which also charges each encoder for the caches the other one
just evicted (the reference streams ~60 MB of temporaries per call).  Before
each timed call the mask is read once, so it starts in cache as in the
pipeline, where the mask has just been computed.  Prints per-image
milliseconds (median over rounds) and the median per-image speed ratio, and
ends with ``rle_encode speedup: <X>x``.

Usage (from the repository root)::

    python bench/rle.py [--repeat N] [--images K] [--mode block|per-call] [--masks DIR]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
try:
    from carvana.data.layout import ORIG_SHAPE
    from carvana.data.rle import rle_encode
except ImportError:  # run from a checkout without an installed package
    sys.path.insert(0, str(REPO / "src"))
    from carvana.data.layout import ORIG_SHAPE
    from carvana.data.rle import rle_encode

DEFAULT_MASKS = REPO.parent / "shared" / "carvana-sample" / "train_masks"


def rle_encode_reference(img):
    """The classic Kaggle Carvana encoder, verbatim."""
    pixels = img.flatten()
    pixels = np.concatenate([[0], pixels, [0]])
    runs = np.where(pixels[1:] != pixels[:-1])[0] + 1
    runs[1::2] -= runs[::2]
    return " ".join(str(x) for x in runs)


def load_masks(folder: Path, count: int) -> list[np.ndarray]:
    """Up to ``count`` GIF masks from ``folder`` as (1280, 1918) uint8 0/1 arrays."""
    from PIL import Image

    masks = []
    for path in sorted(folder.glob("*_mask.gif"))[:count]:
        with Image.open(path) as im:
            mask = np.array(im)
        if mask.shape != ORIG_SHAPE:
            raise SystemExit(f"{path}: mask shape {mask.shape}, expected {ORIG_SHAPE}")
        masks.append(mask)
    return masks


def generated_masks(count: int, seed: int = 0) -> list[np.ndarray]:
    """Car-like masks: a filled body polygon, a cabin ellipse and two wheels."""
    import cv2

    rng = np.random.default_rng(seed)
    h, w = ORIG_SHAPE
    masks = []
    for _ in range(count):
        mask = np.zeros(ORIG_SHAPE, dtype=np.uint8)
        cx, cy = w // 2 + rng.integers(-150, 150), h // 2 + rng.integers(-100, 100)
        half_w, half_h = rng.integers(550, 800), rng.integers(120, 220)
        body = np.array(
            [[cx - half_w, cy + half_h], [cx - half_w + 40, cy - half_h // 2],
             [cx + half_w - 60, cy - half_h // 2 - rng.integers(0, 60)], [cx + half_w, cy + half_h // 3],
             [cx + half_w - 20, cy + half_h]],
            dtype=np.int32,
        )
        cv2.fillPoly(mask, [body], 1)
        cabin_axes = (int(half_w * 0.55), int(half_h))
        cv2.ellipse(mask, (int(cx), int(cy - half_h // 2)), cabin_axes, 0, 180, 360, 1, -1)
        for wx in (cx - half_w * 0.6, cx + half_w * 0.6):
            cv2.circle(mask, (int(wx), int(cy + half_h)), int(half_h * 0.7), 1, -1)
        masks.append(mask)
    return masks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=7, help="timing rounds over all images (default 7)")
    parser.add_argument("--images", type=int, default=48, help="number of masks to use (default 48)")
    parser.add_argument("--masks", type=Path, default=DEFAULT_MASKS, help="folder of *_mask.gif files")
    parser.add_argument("--mode", choices=["block", "per-call"], default="block",
                        help="interleave encoders per round over all images (default) or per image")
    args = parser.parse_args(argv)
    if args.repeat < 1 or args.images < 1:
        parser.error("--repeat and --images must be >= 1")

    masks = load_masks(args.masks, args.images) if args.masks.is_dir() else []
    if masks:
        print(f"{len(masks)} real masks from {args.masks}")
    else:
        print(f"note: no masks in {args.masks}; using {args.images} generated car-like masks instead")
        masks = generated_masks(args.images)

    encoders = {"reference": rle_encode_reference, "rle_encode": rle_encode}
    for i, mask in enumerate(masks):
        if rle_encode(mask) != rle_encode_reference(mask):
            raise SystemExit(f"mismatch on mask {i}: rle_encode differs from the reference")
    print(f"all {len(masks)} strings identical")

    times: dict[str, list[list[float]]] = {name: [[] for _ in masks] for name in encoders}

    def timed(name: str, i: int) -> None:
        masks[i].max()  # the mask starts in cache, for both encoders alike
        t0 = time.perf_counter()
        encoders[name](masks[i])
        times[name][i].append(time.perf_counter() - t0)

    for i in range(len(masks)):  # warm-up, untimed: first-call costs, page faults
        for name in encoders:
            encoders[name](masks[i])
    names = list(encoders)
    for rnd in range(args.repeat):
        if args.mode == "block":
            for name in names if rnd % 2 == 0 else names[::-1]:
                for i in range(len(masks)):
                    timed(name, i)
        else:
            for i in range(len(masks)):
                for name in names if (rnd + i) % 2 == 0 else names[::-1]:
                    timed(name, i)

    per_image = {name: [statistics.median(t) * 1e3 for t in ts] for name, ts in times.items()}
    for name, ms in per_image.items():
        print(f"{name:>10}: {statistics.median(ms):7.3f} ms/image "
              f"(median; min {min(ms):.3f}, max {max(ms):.3f})")
    ratios = [r / f for r, f in zip(per_image["reference"], per_image["rle_encode"])]
    speedup = statistics.median(ratios)
    print(f"per-image ratio: median {speedup:.2f}, min {min(ratios):.2f}, max {max(ratios):.2f} "
          f"({args.repeat} rounds x {len(masks)} images, {args.mode} interleaving)")
    print(f"rle_encode speedup: {speedup:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
