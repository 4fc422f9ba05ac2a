#!/usr/bin/env python
"""Benchmark the training loader: images/s per worker and where the time goes.

Two measurements of ``carvana.datasets.TrainImageDataset`` with ``train_augmentation``:

* steps: ``dataset[i]`` in a loop over real images in this process, with the module's
  helpers wrapped in timers, so the split is of exactly what ``__getitem__`` runs:
  decode (``read_image``: file read, JPEG decode, colour order), mask (``read_mask``:
  GIF decode), resize (every ``cv2.resize``), augment (the albumentations call),
  to_tensor (``image_to_tensor``) and other (the rest: header read, mask thresholds
  and tensor, ...). OpenCV and torch run one thread here, as in a DataLoader worker
  (the pipeline's workers each take one core).
* loader: a DataLoader with one worker (batch ``--batch-size``, the pipeline's
  ``seed_worker``) end to end, first batch (worker start) excluded.

``--masks both`` (the default where the data has ``train_masks.csv``) times the current
code twice, interleaved: masks from the GIFs ("gif") and from the CSV's RLE rows ("csv",
what the pipeline does; the mask step is then ``mask_from_rle``); ``--masks gif|csv``
times one. Rounds are repeated and medians taken. ``--baseline FILE`` loads another version of
``datasets.py`` (e.g. ``git show <rev>:src/carvana/datasets.py > /tmp/before.py``) and
times it interleaved with the current one, round by round, so their ratio is robust to
a busy machine. Images come from ``../shared/carvana-sample/train`` or, when absent, a
generated demo dataset. Ends with ``loader images/s per worker: <N>`` (the current code's
DataLoader figure).

Usage (from the repository root)::

    python bench/loader.py [--input-size 1024x1024] [--images 24] [--repeat 5] [--batch-size 4]
                           [--no-augment] [--baseline FILE] [--masks both|gif|csv]
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import cv2
import torch
from torch.utils.data import DataLoader

REPO = Path(__file__).resolve().parents[1]
try:
    import carvana.data.datasets  # noqa: F401
except ImportError:  # run from a checkout without an installed package
    sys.path.insert(0, str(REPO / "src"))
    import carvana.data.datasets  # noqa: F401
import carvana.data.resizing  # noqa: E402
from carvana.data.mask_table import MASK_TABLE, mask_table_for  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "carvana-sample"
STEPS = ("decode", "mask", "resize", "augment", "to_tensor", "other")


def find_pairs(data: Path, count: int, tmp: Path) -> tuple[list[Path], list[Path]]:
    """``count`` (image, mask) pairs from ``data``'s train/, else from a generated demo dataset."""
    images = sorted((data / "train").glob("*.jpg")) if data.is_dir() else []
    if images:
        print(f"images from {data}")
    else:
        from carvana.data.demo.dataset import write_demo_dataset

        print(f"note: no images in {data}; using a generated demo dataset instead")
        data = write_demo_dataset(tmp / "demo", n_train_cars=2, n_test_cars=1)
        images = sorted((data / "train").glob("*.jpg"))
    # Spread over cars and views rather than 16 views of the first car.
    step = max(1, len(images) // count)
    images = images[::step][:count]
    return images, [data / "train_masks" / f"{p.stem}_mask.gif" for p in images]


def load_module(path: Path, name: str) -> ModuleType:
    """Import a datasets.py from a file, registered under ``name`` (workers fork a copy)."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


class Timers:
    """Wraps a datasets module's helpers so each call adds its seconds to a step."""

    WRAPPED = {"read_image": "decode", "read_mask": "mask", "mask_from_rle": "mask", "image_to_tensor": "to_tensor"}

    def __init__(self, module: ModuleType) -> None:
        self.module = module
        # cv2.resize runs in carvana.data.resizing (in the module itself in an older datasets.py).
        self.cv2_users = [module, carvana.data.resizing]
        self.seconds: dict[str, float] = defaultdict(float)
        self.originals = {name: getattr(module, name) for name in self.WRAPPED if hasattr(module, name)}

    def _timed(self, step: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[step] += time.perf_counter() - t0
        return wrapper

    def install(self, dataset: Any) -> None:
        for name, fn in self.originals.items():
            setattr(self.module, name, self._timed(self.WRAPPED[name], fn))
        timers = self

        class TimedCv2:  # the module's `cv2`, with resize timed
            def __getattr__(self, attr: str) -> Any:
                return getattr(cv2, attr)

            resize = staticmethod(timers._timed("resize", cv2.resize))

        for user in self.cv2_users:
            user.cv2 = TimedCv2()
        if dataset.transform is not None:
            dataset.transform = _TimedTransform(dataset.transform, self._timed("augment", dataset.transform))

    def uninstall(self, dataset: Any) -> None:
        for name, fn in self.originals.items():
            setattr(self.module, name, fn)
        for user in self.cv2_users:
            user.cv2 = cv2
        if isinstance(dataset.transform, _TimedTransform):
            dataset.transform = dataset.transform.inner


class _TimedTransform:
    """An albumentations Compose stand-in that times calls and forwards everything else."""

    def __init__(self, inner: Any, call: Callable[..., Any]) -> None:
        self.inner, self._call = inner, call

    def __call__(self, **kwargs: Any) -> Any:
        return self._call(**kwargs)

    def __getattr__(self, attr: str) -> Any:
        return getattr(self.inner, attr)


def make_dataset(module: ModuleType, images: list[Path], masks: list[Path], input_hw: tuple[int, int],
                 augment: bool, seed: int, rles: dict | None) -> Any:
    transform = module.train_augmentation(seed=seed) if augment else None
    if rles is None:  # also works with a baseline datasets.py that predates mask_rles
        return module.TrainImageDataset(images, masks, input_hw, transform)
    return module.TrainImageDataset(images, masks, input_hw, transform, mask_rles=rles)


def time_steps(module: ModuleType, images: list[Path], masks: list[Path], input_hw: tuple[int, int],
               augment: bool, seed: int, rles: dict | None = None) -> dict[str, float]:
    """One round over all images: ms/image per step (mean over images) and 'total'."""
    ds = make_dataset(module, images, masks, input_hw, augment, seed, rles)
    timers = Timers(module)
    timers.install(ds)
    try:
        t0 = time.perf_counter()
        for i in range(len(ds)):
            ds[i]
        total = time.perf_counter() - t0
    finally:
        timers.uninstall(ds)
    ms = {step: timers.seconds.get(step, 0.0) * 1e3 / len(ds) for step in STEPS[:-1]}
    ms["total"] = total * 1e3 / len(ds)
    ms["other"] = ms["total"] - sum(ms[s] for s in STEPS[:-1])
    return ms


def loader_rate(module: ModuleType, images: list[Path], masks: list[Path], input_hw: tuple[int, int],
                augment: bool, batch_size: int, seed: int, rles: dict | None = None) -> float:
    """Images/s of a 1-worker DataLoader over the pairs, after its first batch."""
    ds = make_dataset(module, images, masks, input_hw, augment, seed, rles)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=1,
                        worker_init_fn=module.seed_worker, generator=torch.Generator().manual_seed(seed))
    it = iter(loader)
    next(it)  # worker start-up and first-call costs
    t0, n = time.perf_counter(), 0
    for batch in it:
        n += len(batch["name"])
    return n / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input-size", default="1024x1024", help="network input HxW (default 1024x1024)")
    parser.add_argument("--images", type=int, default=24, help="image/mask pairs per round (default 24)")
    parser.add_argument("--repeat", type=int, default=5, help="rounds (default 5)")
    parser.add_argument("--batch-size", type=int, default=4, help="DataLoader batch (default 4)")
    parser.add_argument("--no-augment", action="store_true", help="time without train_augmentation")
    parser.add_argument("--baseline", type=Path, help="another datasets.py to time against, interleaved")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="Carvana-layout folder")
    parser.add_argument("--masks", choices=("both", "gif", "csv"), default=None,
                        help="mask source of the current code: both (default without --baseline), gif, csv")
    args = parser.parse_args(argv)
    h, w = (int(v) for v in args.input_size.lower().split("x"))
    if args.repeat < 1 or args.images < 2 * args.batch_size:
        parser.error("--repeat must be >= 1 and --images >= 2 * --batch-size")
    # One thread each, like a DataLoader worker; the workers forked below inherit this.
    cv2.setNumThreads(1)
    torch.set_num_threads(1)

    current = carvana.data.datasets
    versions: dict[str, tuple[ModuleType, dict | None]] = {}
    if args.baseline:
        versions["baseline"] = (load_module(args.baseline, "bench_datasets_baseline"), None)
    augment = not args.no_augment
    with tempfile.TemporaryDirectory(prefix="bench-loader-") as tmp:
        images, masks = find_pairs(args.data, args.images, Path(tmp))
        table = mask_table_for(masks[0].parent.parent)
        mode = args.masks or ("csv" if args.baseline else "both")
        if table is None and mode != "gif":
            print(f"note: no {MASK_TABLE} next to the images: GIF masks only")
            mode = "gif"
        if mode == "both":
            versions.update(gif=(current, None), csv=(current, table))
        else:
            versions["current"] = (current, table if mode == "csv" else None)
        print(f"{len(images)} pairs at {h}x{w}, augmentation {'on' if augment else 'off'}, "
              f"{args.repeat} rounds; steps in one process (1 thread), loader = DataLoader with 1 worker; "
              f"current code's masks: {mode}")
        for module, rles in versions.values():  # warm-up: page cache, first-call costs
            time_steps(module, images[:4], masks[:4], (h, w), augment, seed=0, rles=rles)
        steps: dict[str, list[dict[str, float]]] = {v: [] for v in versions}
        rates: dict[str, list[float]] = {v: [] for v in versions}
        for rnd in range(args.repeat):
            order = list(versions) if rnd % 2 == 0 else list(versions)[::-1]
            for v in order:  # same seed per round: both versions draw the same augmentations
                module, rles = versions[v]
                steps[v].append(time_steps(module, images, masks, (h, w), augment, seed=rnd, rles=rles))
                rates[v].append(loader_rate(module, images, masks, (h, w), augment, args.batch_size, seed=rnd, rles=rles))

    for v in versions:
        med = {s: statistics.median(r[s] for r in steps[v]) for s in (*STEPS, "total")}
        split = ", ".join(f"{s} {med[s]:.1f}" for s in STEPS)
        print(f"{v:>8} steps (ms/image, median of rounds): {split}; total {med['total']:.1f} "
              f"= {1e3 / med['total']:.1f} img/s")
        print(f"{'':>8} shares: " + ", ".join(f"{s} {100 * med[s] / med['total']:.0f}%" for s in STEPS))
        print(f"{v:>8} DataLoader, 1 worker: {statistics.median(rates[v]):.2f} img/s "
              f"(rounds: {', '.join(f'{r:.2f}' for r in rates[v])})")
    pairs_to_compare = [("current", "baseline")] if args.baseline else []
    if mode == "both":
        pairs_to_compare.append(("csv", "gif"))
    for after, before in pairs_to_compare:
        if after not in rates:
            after = "csv"
        ratios = [c / b for c, b in zip(rates[after], rates[before])]
        step_ratios = [b["total"] / c["total"] for b, c in zip(steps[before], steps[after])]
        print(f"{after}/{before}: DataLoader {statistics.median(ratios):.2f}x "
              f"(min {min(ratios):.2f}, max {max(ratios):.2f}); steps total {statistics.median(step_ratios):.2f}x")
    headline = "csv" if "csv" in rates else "current"
    print(f"loader images/s per worker: {statistics.median(rates[headline]):.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
