#!/usr/bin/env python
"""Benchmark UNet1024 on a GPU: AMP training speed-up, inference rate, test-set projection.

Three measurements, on synthetic input tensors (the loader is measured by bench/loader.py),
all through ``CarvanaClassifier`` as the pipeline uses it:

* training images/s at ``--input-size`` (default 1024x1024, width 1, batch 4): fp32
  (``amp=False, channels_last=False``; PyTorch's defaults, so cuDNN may use TF32 unless
  ``--no-tf32``) against bf16 autocast + channels_last (``amp=True, channels_last=True``),
  blocks of ``--steps`` steps interleaved over ``--repeat`` rounds; the figure is the
  median per-round ratio (target >= 2x);
* inference images/s (forward + sigmoid) at each of ``--infer-batches`` (default 8,16);
* the projected wall time for the 100,064 Kaggle test images: ``predict`` with the real
  ``PredictionsSaverCallback`` (GPU upsample to 1918x1280, threshold, RLE in its thread
  pool, gzip chunks into a temporary folder), with and without flip TTA (target <= 15
  minutes on one H100). The loader must keep up with the rate printed (bench/loader.py
  gives images/s per worker).

Exits with a message when no CUDA device is present; ``--device cpu --tiny`` runs the same
code at a tiny size on the CPU (where AMP and channels_last are off, so ratios are ~1), to
check the code path. Ends with ``AMP training speedup: <X>x; projected test prediction:
<M> min``.

Usage (from the repository root)::

    python bench/gpu.py [--width 1] [--input-size 1024x1024] [--train-batch 4] [--infer-batches 8,16]
                        [--steps 10] [--repeat 5] [--predict-images 512] [--no-tf32] [--cudnn-benchmark]
    python bench/gpu.py --device cpu --tiny
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import torch

REPO = Path(__file__).resolve().parents[1]
try:
    import carvana  # noqa: F401
except ImportError:  # run from a checkout without an installed package
    sys.path.insert(0, str(REPO / "src"))

from carvana.training.callbacks import Callback  # noqa: E402
from carvana.training.classifier import CarvanaClassifier  # noqa: E402
from carvana.models.unet1024 import UNet1024, parse_input_size  # noqa: E402
from carvana.submission.predictions import PredictionsSaverCallback  # noqa: E402

TEST_IMAGES = 100_064  # Kaggle's Carvana test set


class Sync(Callback):
    """Forward-only stand-in for the saver: waits for the batch's kernels and nothing else."""

    def on_predict_batch_end(self, trainer: Any, names: list[str], probs: Any) -> None:
        if probs.is_cuda:
            torch.cuda.synchronize()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_batches(n: int, batch: int, hw: tuple[int, int], pin: bool) -> list[dict]:
    """``n`` batches of random images and blob masks on the CPU, pinned as the pipeline's loader pins them."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        images = torch.randn(batch, 3, *hw, generator=g)
        masks = (torch.nn.functional.avg_pool2d(torch.rand(batch, 1, *hw, generator=g), 31, 1, 15) > 0.5).float()
        if pin:
            images, masks = images.pin_memory(), masks.pin_memory()
        out.append({"image": images, "mask": masks})
    return out


def predict_batches(n_images: int, batch: int, hw: tuple[int, int], pin: bool) -> Iterator[dict]:
    """Test-loader-like batches of random images with unique names (a few tensors, reused)."""
    g = torch.Generator().manual_seed(1)
    pool = [torch.randn(batch, 3, *hw, generator=g) for _ in range(4)]
    if pin:
        pool = [x.pin_memory() for x in pool]
    for k, start in enumerate(range(0, n_images, batch)):
        size = min(batch, n_images - start)
        yield {"image": pool[k % len(pool)][:size], "name": [f"synthetic_{i:06d}.jpg" for i in range(start, start + size)],
               "ok": torch.ones(size, dtype=torch.bool)}


def make_classifier(args: argparse.Namespace, amp: bool) -> CarvanaClassifier:
    torch.manual_seed(0)  # the same weights for every variant
    return CarvanaClassifier(UNet1024(width=args.width), epochs=1, device=args.device, amp=amp, channels_last=amp,
                             progress=False)


def train_rate(clf: CarvanaClassifier, batches: list[dict]) -> float:
    """Images/s of ``CarvanaClassifier``'s own training loop over ``batches``."""
    synchronize(clf.device)
    t0 = time.perf_counter()
    clf._train_one_epoch(batches, 0, 1)
    synchronize(clf.device)
    return sum(len(b["image"]) for b in batches) / (time.perf_counter() - t0)


def predict_rate(clf: CarvanaClassifier, n_images: int, batch: int, args: argparse.Namespace, saver: bool,
                 tta: bool = False) -> float:
    """Images/s of ``CarvanaClassifier.predict`` with the real saver (or only a sync)."""
    pin = clf.device.type == "cuda"
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        names = [f"synthetic_{i:06d}.jpg" for i in range(n_images)]
        callback: Callback = (PredictionsSaverCallback(Path(tmp) / "submit.csv.gz", names,
                                                       workers=args.postprocess_workers) if saver else Sync())
        batches = list(predict_batches(n_images, batch, args.input_hw, pin))
        synchronize(clf.device)
        t0 = time.perf_counter()
        clf.predict(batches, [callback], tta=tta)
        synchronize(clf.device)
        return n_images / (time.perf_counter() - t0)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu (with --tiny)")
    parser.add_argument("--tiny", action="store_true", help="width 0.125, 128x128, 4 steps: a quick code-path check")
    parser.add_argument("--width", type=float, default=1.0, help="UNet1024 channel multiplier (default 1)")
    parser.add_argument("--input-size", default="1024x1024", help="network input HxW (default 1024x1024)")
    parser.add_argument("--train-batch", type=int, default=4, help="training batch (default 4)")
    parser.add_argument("--infer-batches", default="8,16", help="inference batches to time (default 8,16)")
    parser.add_argument("--steps", type=int, default=10, help="training steps per timed block (default 10)")
    parser.add_argument("--repeat", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--predict-images", type=int, default=512, help="images per projection run (default 512)")
    parser.add_argument("--postprocess-workers", type=int, default=2, help="saver threads (default 2)")
    parser.add_argument("--no-tf32", action="store_true", help="fp32 baseline without TF32 convolutions")
    parser.add_argument("--cudnn-benchmark", action="store_true", help="let cuDNN autotune (the pipeline does not)")
    args = parser.parse_args(argv)
    if args.tiny:
        args.width, args.input_size, args.train_batch, args.infer_batches = 0.125, "128x128", 2, "2,4"
        args.steps, args.repeat, args.predict_images = 2, 2, 16
    args.input_hw = parse_input_size(args.input_size)
    if args.device.startswith("cpu") and not args.tiny:
        parser.error("--device cpu is only a code-path check: add --tiny")
    return args


def bench_training(args: argparse.Namespace, device: torch.device) -> tuple[CarvanaClassifier, float]:
    """fp32 against bf16 autocast + channels_last, interleaved blocks: (the amp classifier, speedup)."""
    batches = train_batches(args.steps, args.train_batch, args.input_hw, device.type == "cuda")
    variants = {"fp32": make_classifier(args, amp=False), "amp": make_classifier(args, amp=True)}
    print(f"amp classifier: autocast {variants['amp'].amp_dtype}, channels_last {variants['amp'].channels_last}")
    for clf in variants.values():  # warm-up: cuDNN plans, allocator
        train_rate(clf, batches[:2])
    rates: dict[str, list[float]] = {v: [] for v in variants}
    for rnd in range(args.repeat):
        for v in (list(variants) if rnd % 2 == 0 else list(variants)[::-1]):
            rates[v].append(train_rate(variants[v], batches))
    ratios = [a / f for a, f in zip(rates["amp"], rates["fp32"])]
    speedup = statistics.median(ratios)
    for v, r in rates.items():
        print(f"train {v:>4}: {statistics.median(r):8.2f} img/s (batch {args.train_batch}; rounds "
              f"{', '.join(f'{x:.2f}' for x in r)})")
    print(f"train amp/fp32: median {speedup:.2f}x (min {min(ratios):.2f}, max {max(ratios):.2f}; target >= 2x)")
    if device.type == "cuda":
        print(f"peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB")
    clf = variants.pop("amp")
    del variants
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return clf, speedup


def bench_prediction(clf: CarvanaClassifier, args: argparse.Namespace) -> float:
    """Forward-only rates per batch, then the projection with the real saver: minutes for the test set."""
    infer_batches = [int(b) for b in args.infer_batches.split(",")]
    for b in infer_batches:
        predict_rate(clf, 2 * b, b, args, saver=False)  # warm-up at this shape
        r = [predict_rate(clf, max(4 * b, args.predict_images // 2), b, args, saver=False) for _ in range(args.repeat)]
        print(f"inference batch {b:>3}: {statistics.median(r):8.2f} img/s (forward only, median of {args.repeat})")
    # The projection: the real saver (GPU upsample, RLE threads, gzip), interleaved with forward only.
    b = max(infer_batches)
    projections = {}
    for tta in (False, True):
        pipe, fwd = [], []
        predict_rate(clf, 2 * b, b, args, saver=True, tta=tta)  # warm-up
        for rnd in range(args.repeat):
            for saver in ((True, False) if rnd % 2 == 0 else (False, True)):
                (pipe if saver else fwd).append(predict_rate(clf, args.predict_images, b, args, saver=saver, tta=tta))
        rate = statistics.median(pipe)
        projections[tta] = TEST_IMAGES / rate / 60
        print(f"predict{' + TTA' if tta else ''} batch {b}: {rate:8.2f} img/s with post-processing, "
              f"{statistics.median(fwd):.2f} forward only (ratio {statistics.median(p / f for p, f in zip(pipe, fwd)):.2f}); "
              f"{TEST_IMAGES:,} test images in {projections[tta]:.1f} min (target <= 15), if the loader supplies "
              f"{rate:.0f} img/s")
    return projections[False]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench/gpu.py: no CUDA device found (torch.cuda.is_available() is False); this benchmark measures "
              "GPU throughput. Run it on a machine with an NVIDIA GPU, or use --device cpu --tiny to check its "
              "code path.", file=sys.stderr)
        return 2
    if device.type == "cuda":
        if args.no_tf32:
            torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.benchmark = args.cudnn_benchmark
        name = torch.cuda.get_device_name(device)
    else:
        name = "CPU"
    h, w = args.input_hw
    print(f"{name}, torch {torch.__version__}; UNet1024 width {args.width} at {h}x{w}; "
          f"TF32 convolutions {'on' if device.type == 'cuda' and torch.backends.cudnn.allow_tf32 else 'off'}, "
          f"cudnn.benchmark {args.cudnn_benchmark}")
    clf, speedup = bench_training(args, device)
    minutes = bench_prediction(clf, args)
    print(f"AMP training speedup: {speedup:.2f}x; projected test prediction: {minutes:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
