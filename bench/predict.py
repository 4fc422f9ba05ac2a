#!/usr/bin/env python
"""Benchmark end-to-end prediction throughput against forward-only throughput.

Both runs go through ``carvana.sharded.predict_to_submission`` with the same model,
batch, input size and DataLoader (JPEG decode, resize, normalise in ``--loader-workers``
processes) and ``CarvanaClassifier.predict``:

* pipeline: the real ``PredictionsSaverCallback`` (upsample to 1918x1280, threshold,
  RLE encode, gzip chunks) writing a .csv.gz into a temporary folder;
* forward:  the callback swapped for one that does nothing, so only the model (and
  the loader feeding it) remains.

The two are run interleaved, ``--repeat`` pairs in alternating order after an untimed
warm-up pair, and the ratio pipeline/forward images/s is taken per pair; its median is
the figure (absolute times drift on a shared machine, a ratio inside one pair much
less). Each run is timed from its first batch leaving the loader to the end (for the
pipeline: last chunk written, file verified and renamed). Also prints one-process
per-stage costs for context. Test images come from
``../shared/carvana-sample`` (test/, then train/ when ``--images`` asks for more), or a
generated demo dataset when that folder is absent. Ends with
``pipeline/forward throughput: <R>``.

Usage (from the repository root)::

    python bench/predict.py [--width 0.25] [--input-size 256x384] [--batch-size 8] [--images 64]
                            [--repeat 15] [--loader-workers 2] [--postprocess-workers 2]
                            [--threads N] [--device auto|cpu|cuda] [--tta] [--checkpoint PATH]
"""

from __future__ import annotations

import argparse
import gzip
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Iterator

import torch

REPO = Path(__file__).resolve().parents[1]
try:
    import carvana  # noqa: F401
except ImportError:  # run from a checkout without an installed package
    sys.path.insert(0, str(REPO / "src"))

from carvana.submission import sharded  # noqa: E402
from carvana.training.callbacks import Callback  # noqa: E402
from carvana.training.classifier import CarvanaClassifier  # noqa: E402
from carvana.data.datasets import TestImageDataset  # noqa: E402
from carvana.training.checkpoint import load_checkpoint  # noqa: E402
from carvana.models.unet1024 import UNet1024, parse_input_size  # noqa: E402
from carvana.submission.predictions import _encode_row  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "carvana-sample"


class NullSaver(Callback):
    """Stands in for PredictionsSaverCallback: same constructor and remaining(), no work."""

    already_complete = False

    def __init__(self, path: Path, names: list[str], *args: Any, **kwargs: Any) -> None:
        self.names = list(names)

    def remaining(self) -> list[str]:
        return self.names

    def on_predict_end(self, trainer: Any) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # count the last batch's kernels, as the saver's copy does


@contextmanager
def forward_only() -> Iterator[None]:
    """Make predict_to_submission use NullSaver: identical loader and loop, no callback work."""
    real = sharded.PredictionsSaverCallback
    sharded.PredictionsSaverCallback = NullSaver  # type: ignore[misc,assignment]
    try:
        yield
    finally:
        sharded.PredictionsSaverCallback = real  # type: ignore[misc]


def find_images(data: Path, count: int, tmp: Path) -> list[Path]:
    """``count`` JPEGs with unique names: the real sample's test/ then train/, else demo data."""
    pool = sorted((data / "test").glob("*.jpg")) + sorted((data / "train").glob("*.jpg")) if data.is_dir() else []
    if not pool:
        from carvana.data.demo.dataset import write_demo_dataset

        print(f"note: no images in {data}; using a generated demo dataset instead")
        demo = write_demo_dataset(tmp / "demo", n_train_cars=2, n_test_cars=1)
        pool = sorted((demo / "test").glob("*.jpg")) + sorted((demo / "train").glob("*.jpg"))
    else:
        print(f"images from {data}")
    if len(pool) < count:
        print(f"note: only {len(pool)} images available, using all of them")
    return pool[:count]


class ClockedClassifier:
    """Passes predict() through, noting when the first batch leaves the loader: timing from
    there leaves out the loader's start (forking workers, the first batch's decode), a
    fixed cost that would otherwise pull both figures, and so their ratio, towards 1."""

    def __init__(self, classifier: CarvanaClassifier) -> None:
        self.classifier = classifier
        self.first_batch_at, self.after_first = 0.0, 0

    def __getattr__(self, name: str) -> Any:  # device and anything else the caller reads
        return getattr(self.classifier, name)

    def predict(self, loader: Any, callbacks: Any = (), tta: bool = False) -> None:
        def clocked() -> Iterator[dict]:
            for k, batch in enumerate(loader):
                if k == 0:
                    self.first_batch_at = time.perf_counter()
                else:
                    self.after_first += len(batch["name"])
                yield batch

        self.classifier.predict(clocked(), callbacks, tta=tta)


def run_once(classifier: CarvanaClassifier, images: list[Path], out: Path, args: argparse.Namespace, null: bool) -> float:
    """One full prediction of ``images``; returns images/s from the first batch to the end
    (the saver's last chunk written, the file verified and renamed)."""
    out.unlink(missing_ok=True)
    clocked = ClockedClassifier(classifier)
    with forward_only() if null else nullcontext():
        rows = sharded.predict_to_submission(
            clocked, images, out, args.input_hw, chunk_size=args.chunk_size,
            postprocess_workers=args.postprocess_workers, batch_size=args.batch_size,
            loader_workers=args.loader_workers, tta=args.tta,
        )
    seconds = time.perf_counter() - clocked.first_batch_at
    assert rows == len(images) and clocked.after_first == len(images) - min(args.batch_size, len(images))
    return clocked.after_first / seconds


def stage_costs(classifier: CarvanaClassifier, images: list[Path], args: argparse.Namespace,
                repeat: int = 5) -> dict[str, float]:
    """One-process ms/image of loading, forward and post-processing (medians), for context."""
    ds = TestImageDataset(images[: args.batch_size], args.input_hw)

    def per_image(fn: Any) -> float:
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) / len(ds) * 1e3)
        return statistics.median(times)

    load = per_image(lambda: [ds[i] for i in range(len(ds))])
    x = classifier._images_to_device(torch.stack([ds[i]["image"] for i in range(len(ds))]))
    classifier.eval_net.eval()
    probs: list[torch.Tensor] = []

    def forward() -> None:
        with torch.no_grad(), classifier._autocast():
            probs[:] = [torch.sigmoid(classifier.eval_net(x).float())[:, 0]]
        if x.is_cuda:
            torch.cuda.synchronize()

    forward()  # warm-up
    fwd = per_image(forward)
    maps = probs[0].float().cpu().numpy()
    post = per_image(lambda: [_encode_row("x.jpg", m, 0.5, False) for m in maps])
    return {"load": load, "forward": fwd, "postprocess (cv2 path)": post}


def mean_runs(path: Path) -> float:
    """Mean RLE runs per row of a submission: how much work the encoder had."""
    with gzip.open(path, "rt") as f:
        next(f)
        counts = [len(line.split(",", 1)[1].split()) // 2 for line in f]
    return sum(counts) / len(counts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=float, default=0.25, help="UNet1024 channel multiplier (default 0.25)")
    parser.add_argument("--input-size", default="256x384", help="network input HxW (default 256x384)")
    parser.add_argument("--batch-size", type=int, default=8, help="prediction batch (default 8)")
    parser.add_argument("--images", type=int, default=64, help="images per run (default 64)")
    parser.add_argument("--repeat", type=int, default=15, help="timed pipeline/forward pairs (default 15)")
    parser.add_argument("--loader-workers", type=int, default=2, help="DataLoader processes (default 2)")
    parser.add_argument("--postprocess-workers", type=int, default=2, help="saver threads (default 2)")
    parser.add_argument("--chunk-size", type=int, default=256, help="rows per chunk of the gzip member (default 256)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto)")
    parser.add_argument("--tta", action="store_true", help="flip TTA (two forwards per batch) in both runs")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--checkpoint", type=Path, help="weights to load (default: random init, seed 0)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="Carvana-layout folder")
    args = parser.parse_args(argv)
    h, w = args.input_hw = parse_input_size(args.input_size)
    if args.repeat < 1 or args.images <= args.batch_size:
        parser.error("--repeat must be >= 1 and --images > --batch-size (the first batch is not timed)")
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    model = UNet1024(width=args.width)
    if args.checkpoint:
        model.load_state_dict(load_checkpoint(args.checkpoint)["model"])
    classifier = CarvanaClassifier(model, epochs=1, device=args.device, progress=False)
    print(f"device {classifier.device}, torch threads {torch.get_num_threads()}, width {args.width}, "
          f"input {h}x{w}, batch {args.batch_size}, loader workers {args.loader_workers}, "
          f"postprocess workers {args.postprocess_workers}, tta {args.tta}")

    with tempfile.TemporaryDirectory(prefix="bench-predict-") as tmp_name:
        tmp = Path(tmp_name)
        images = find_images(args.data, args.images, tmp)
        for stage, ms in stage_costs(classifier, images, args).items():
            print(f"  {stage:>22}: {ms:7.2f} ms/image (one process)")
        out = tmp / "submit.csv.gz"
        run_once(classifier, images, out, args, null=False)  # warm-up pair, untimed
        print(f"{len(images)} images per run; mean RLE runs per mask {mean_runs(out):.0f}")
        run_once(classifier, images, out, args, null=True)
        pipe, fwd, ratios = [], [], []
        for rnd in range(args.repeat):
            order = (False, True) if rnd % 2 == 0 else (True, False)
            res = {null: run_once(classifier, images, out, args, null) for null in order}
            pipe.append(res[False])
            fwd.append(res[True])
            ratios.append(res[False] / res[True])
            print(f"  pair {rnd + 1}: pipeline {res[False]:6.2f} img/s, forward {res[True]:6.2f} img/s, "
                  f"ratio {ratios[-1]:.3f}")
    ratio = statistics.median(ratios)
    print(f"pipeline {statistics.median(pipe):.2f} img/s, forward-only {statistics.median(fwd):.2f} img/s (medians); "
          f"ratio median {ratio:.3f}, min {min(ratios):.3f}, max {max(ratios):.3f} over {args.repeat} pairs")
    print(f"pipeline/forward throughput: {ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
