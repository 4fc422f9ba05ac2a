#!/usr/bin/env python
"""Prediction images/s with DCT-scaled JPEG decoding (--fast-decode) against full decoding.

Same model (UNet1024, random weights: speed does not depend on them), same images, same
settings; only ``fast_decode`` differs. Each pair runs both settings back to back in
alternating order after an untimed warm-up pair; the figure is the median per-pair ratio
fast/full images/s (absolute times drift on a shared machine, a ratio inside one pair much
less). Every run goes through ``predict_to_submission`` end to end: loader workers decode
and resize, the network predicts (with flip TTA unless --no-tta), post-processing threads
upsample to 1918x1280, threshold and RLE-encode, and the gzip stream is written.

Images: ``../shared/carvana-sample/test`` (64 real 1918x1280 photos) linked under distinct
names until there are ``--images`` of them.

Usage (from the repository root)::

    python bench/decode_predict.py [--input-size 128x192] [--width 0.25] [--images 256] [--repeat 3]
                                   [--batch-size 8] [--loader-workers 2] [--no-tta]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from carvana.models.registry import build_model, make_config, parse_size  # noqa: E402
from carvana.submission.sharded import predict_to_submission  # noqa: E402
from carvana.training.classifier import CarvanaClassifier  # noqa: E402

SAMPLE = REPO.parent / "shared" / "carvana-sample" / "test"


def linked_images(folder: Path, n: int) -> list[Path]:
    """``n`` distinct names, each a link to one of the sample's test photos, in turn."""
    photos = sorted(SAMPLE.glob("*.jpg"))
    if not photos:
        raise SystemExit(f"{SAMPLE}: no test photos (this bench needs ../shared/carvana-sample)")
    out = []
    for i in range(n):
        link = folder / f"{i:06d}_{photos[i % len(photos)].name}"
        link.symlink_to(photos[i % len(photos)].resolve())
        out.append(link)
    return out


def one_run(classifier: CarvanaClassifier, images: list[Path], folder: Path, args, fast: bool, tag: str) -> float:
    """Seconds to predict ``images`` into a fresh submission file."""
    output = folder / f"{tag}.csv.gz"
    start = time.perf_counter()
    predict_to_submission(classifier, images, output, parse_size(args.input_size), batch_size=args.batch_size,
                          loader_workers=args.loader_workers, postprocess_workers=2, tta=args.tta,
                          chunk_size=256, fast_decode=fast)
    seconds = time.perf_counter() - start
    output.unlink()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input-size", default="128x192")
    parser.add_argument("--width", type=float, default=0.25)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--loader-workers", type=int, default=2)
    parser.add_argument("--tta", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()
    config = make_config("unet1024", args.width, 1, parse_size(args.input_size))
    classifier = CarvanaClassifier(build_model(config), epochs=1, device="cpu", progress=False, preview_count=0,
                                   model_config=config)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        images = linked_images(folder, args.images)
        one_run(classifier, images, folder, args, True, "warm-fast")
        one_run(classifier, images, folder, args, False, "warm-full")
        ratios = []
        for pair in range(args.repeat):
            order = (True, False) if pair % 2 == 0 else (False, True)
            seconds = {fast: one_run(classifier, images, folder, args, fast, f"p{pair}{fast}") for fast in order}
            ratios.append(seconds[False] / seconds[True])
            print(f"pair {pair + 1}: fast {args.images / seconds[True]:.1f} img/s, full "
                  f"{args.images / seconds[False]:.1f} img/s, ratio {ratios[-1]:.2f}")
    print(f"{args.input_size}, {args.images} images, TTA {args.tta}, torch threads {torch.get_num_threads()}: "
          f"fast/full prediction throughput (median of {args.repeat}): {statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()
