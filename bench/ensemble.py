#!/usr/bin/env python
"""Benchmark a streaming ensemble of N models against N x one model's forward time.

Both go through ``predict_to_submission`` with the same images, batch, input size and
DataLoader:

* one:      a single model with the saver swapped for a no-op (``bench/predict.py``'s
            NullSaver): loader + forward (+TTA) only, i.e. "one model's forward time";
* ensemble: ``EnsemblePredictor`` over N models of the same architecture (different
            random weights), with the real ``PredictionsSaverCallback``: one loader, N
            forwards, one average, ONE upsample/threshold/RLE/gzip per image.

Timed from the first batch leaving the loader to the end, as in ``bench/predict.py``;
``--repeat`` pairs run interleaved in alternating order after an untimed warm-up pair,
the ratio ensemble_seconds / (N x one_seconds) is taken per pair and its median printed
(target <= 1.05: post-processing and encoding must not be paid once per model).

Usage (from the repository root)::

    python bench/ensemble.py [--members 4] [--width 0.25] [--input-size 256x384] [--images 32]
                             [--batch-size 8] [--repeat 5] [--loader-workers 1] [--threads N] [--tta]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import predict as bench_predict  # noqa: E402  (bench/predict.py: NullSaver, find_images, run_once)

from carvana.models.registry import ModelConfig, build_model  # noqa: E402
from carvana.models.unet1024 import parse_input_size  # noqa: E402
from carvana.submission.ensemble import EnsemblePredictor, load_members  # noqa: E402
from carvana.training.checkpoint import save_checkpoint  # noqa: E402
from carvana.training.classifier import CarvanaClassifier  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--members", type=int, default=4)
    ap.add_argument("--width", type=float, default=0.25)
    ap.add_argument("--input-size", default="256x384")
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--loader-workers", type=int, default=1)
    ap.add_argument("--postprocess-workers", type=int, default=2)
    ap.add_argument("--chunk-size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--tta", action="store_true")
    ap.add_argument("--data", type=Path, default=bench_predict.DEFAULT_DATA)
    args = ap.parse_args()
    args.input_hw = parse_input_size(args.input_size)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        images = bench_predict.find_images(args.data, args.images, tmp)
        config = ModelConfig(arch="unet1024", width=args.width, input_size=args.input_hw)
        paths = []
        for k in range(args.members):
            torch.manual_seed(k)
            paths.append(tmp / f"m{k}.pt")
            save_checkpoint({"model": build_model(config).state_dict(), "model_config": config.to_dict()}, paths[-1])
        members = load_members(paths, [1 / args.members] * args.members)
        one = CarvanaClassifier(members[0].classifier.model, epochs=1, progress=False)
        ensemble = EnsemblePredictor(members, progress=False)

        def timed(which: str) -> float:
            out = tmp / f"{which}.csv.gz"
            rate = bench_predict.run_once(one if which == "one" else ensemble, images, out, args, null=which == "one")
            return (len(images) - min(args.batch_size, len(images))) / rate  # seconds after the first batch

        timed("one"), timed("ensemble")  # warm-up pair
        ratios = []
        for r in range(args.repeat):
            order = ("one", "ensemble") if r % 2 == 0 else ("ensemble", "one")
            t = {w: timed(w) for w in order}
            ratios.append(t["ensemble"] / (args.members * t["one"]))
            print(f"pair {r + 1}: one model forward {t['one']:.2f} s, ensemble of {args.members} {t['ensemble']:.2f} s, "
                  f"ratio {ratios[-1]:.3f}", flush=True)
        print(f"{len(images)} images, {args.input_size}, width {args.width}, tta={args.tta}, batch {args.batch_size}, "
              f"threads {torch.get_num_threads()}")
        print(f"ensemble / ({args.members} x one model forward): {statistics.median(ratios):.3f} "
              f"(median of {len(ratios)}; min {min(ratios):.3f}, max {max(ratios):.3f})")


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"total {time.perf_counter() - t0:.0f} s")
