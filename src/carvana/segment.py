"""Segment your own photos with a trained checkpoint: masks, transparent cutouts, overlays.

    python -m carvana.segment --checkpoint output/models/<run>/best.pt photos/ car.jpg -o cutouts/
    python -m carvana.segment --checkpoint best.pt photos/ -o out/ --overlay --background white --tta

For each photo ``<stem>.jpg`` it writes, at the photo's own resolution, ``<stem>_mask.png``
(0/255) and ``<stem>_cutout.png`` (RGBA, alpha = mask); ``--overlay`` adds
``<stem>_overlay.jpg`` (mask outline on the photo), ``--background COLOR|IMAGE`` adds
``<stem>_background.jpg`` (the car on that colour or picture). Folders are searched
recursively for .jpg/.jpeg/.png/.webp; their sub-folders are kept under OUT_DIR.

Photos whose outputs all exist are skipped (``--overwrite`` redoes them). A photo that cannot
be read gets a warning naming it and the run goes on; the exit status is the number of photos
that failed (capped at 125), 2 for a usage error, 0 when everything worked.
Geometry (letterbox vs stretch) and decoding (a JPEG's network input comes from a second
decode at the DCT scale that covers the input; ``--no-fast-decode``: from the full decode):
see :mod:`carvana.data.photos`. The model side (checkpoint network -> probabilities) is
:class:`carvana.segmenter.Segmenter`; this module reads, batches and writes the photos.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import cv2
import numpy as np
from tqdm import tqdm

from carvana.data.photos import (FITS, Background, Box, PhotoError, find_photos, output_paths, parse_background,
                                 probabilities_to_mask, read_photo, write_outputs)
from carvana.segmenter import SegmentError, Segmenter
from carvana.training.checkpoint import CheckpointError, load_model, threshold_of
from carvana.training.engines import ENGINES, EngineError

MAX_EXIT_STATUS = 125  # above this, shells give exit statuses other meanings


# ------------------------------------------------------------------------------- the run
@dataclass
class Summary:
    """What a run did."""

    written: int = 0
    skipped: int = 0
    failed: int = 0
    seconds: float = 0.0


@dataclass
class _Photo:
    path: Path
    rel: Path
    rgb: np.ndarray | None = None
    net_input: np.ndarray | None = None
    box: Box | None = None
    error: str = ""


def _load(segmenter: Segmenter, path: Path, rel: Path) -> _Photo:
    """Worker job: read and prepare one photo; a failure is recorded, not raised."""
    try:
        rgb = read_photo(path)  # in full: the outputs are written at the photo's own size
        net_input, box = segmenter.prepare(rgb, path)
        return _Photo(path, rel, rgb, net_input, box)
    except PhotoError as exc:
        return _Photo(path, rel, error=str(exc))


def _bounded_map(pool: ThreadPoolExecutor, fn, items: Iterable, ahead: int) -> Iterator:
    """``pool.map`` that keeps at most ``ahead`` results in flight (bounded memory), in order."""
    pending: deque[Future] = deque()
    for item in items:
        pending.append(pool.submit(fn, *item))
        if len(pending) >= ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _batches(it: Iterator, size: int) -> Iterator[list]:
    batch = []
    for x in it:
        batch.append(x)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _finish(photo: _Photo, prob: np.ndarray, threshold: float, paths: dict[str, Path], background: Background | None) -> None:
    """Writer job: probabilities -> full-resolution mask -> files."""
    mask = probabilities_to_mask(prob, photo.box, photo.rgb.shape[:2], threshold)
    write_outputs(photo.rgb, mask, paths, background)


def segment_photos(segmenter: Segmenter, photos: Sequence[tuple[Path, Path]], out_dir: Path, batch_size: int = 4,
                   workers: int = 2, overwrite: bool = False, overlay: bool = False,
                   background: Background | None = None, progress: bool | None = None) -> Summary:
    """Segment ``photos`` ((path, output stem) pairs) into ``out_dir``; see the module docstring.

    Memory is bounded: about ``2 * batch_size`` photos are read ahead and ``2 * workers`` are
    being written at any time, whatever the number of photos.
    """
    start = time.perf_counter()
    summary = Summary()
    todo = []
    for path, rel in photos:
        paths = output_paths(out_dir, rel, overlay, background is not None)
        if not overwrite and all(p.is_file() for p in paths.values()):
            summary.skipped += 1
        else:
            todo.append((path, rel))
    bar = tqdm(total=len(todo), desc="segment", unit="img", disable=(None if progress is None else not progress),
               dynamic_ncols=True)
    writing: deque[tuple[_Photo, Future]] = deque()

    def collect_oldest() -> None:
        photo, fut = writing.popleft()
        try:
            fut.result()
            summary.written += 1
        except (OSError, ValueError, MemoryError, cv2.error) as exc:  # a full disk, a photo too big to encode:
            summary.failed += 1                                           # this photo fails, not the run
            warnings.warn(f"{photo.path}: could not write its outputs ({type(exc).__name__}: {exc})", stacklevel=3)
        bar.update(1)

    with ThreadPoolExecutor(max(1, workers), thread_name_prefix="read") as readers, \
            ThreadPoolExecutor(max(1, workers), thread_name_prefix="write") as writers:
        loaded = _bounded_map(readers, lambda p, r: _load(segmenter, p, r), todo, ahead=2 * batch_size)
        for batch in _batches(loaded, batch_size):
            good = []
            for photo in batch:
                if photo.error:
                    summary.failed += 1
                    warnings.warn(f"{photo.error}; skipped", stacklevel=2)
                    bar.update(1)
                else:
                    good.append(photo)
            if not good:
                continue
            probs = segmenter.probabilities(np.stack([p.net_input for p in good]))
            for photo, prob in zip(good, probs):
                photo.net_input = None  # keep only what the writer needs
                paths = output_paths(out_dir, photo.rel, overlay, background is not None)
                writing.append((photo, writers.submit(_finish, photo, prob, segmenter.threshold, paths, background)))
            while writing and (writing[0][1].done() or len(writing) > 2 * max(1, workers)):
                collect_oldest()
        while writing:
            collect_oldest()
    bar.close()
    summary.seconds = time.perf_counter() - start
    return summary


# ------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m carvana.segment", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files and/or folders (searched recursively)")
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by main.py (best.pt / last.pt)")
    p.add_argument("-o", "--output", required=True, help="output folder (created if needed)")
    p.add_argument("--overlay", action="store_true", help="also write <stem>_overlay.jpg: the mask outline on the photo")
    p.add_argument("--background", default="", metavar="COLOR|IMAGE",
                   help="also write <stem>_background.jpg: the car on this colour (white, #336699) or picture")
    p.add_argument("--tta", action="store_true", help="average with the horizontally flipped prediction")
    p.add_argument("--threshold", type=float, default=None, help="probability above which a pixel is car (default: the checkpoint's run, else 0.5)")
    p.add_argument("--fit", choices=FITS, default="letterbox", help="how a photo is fitted to the network input")
    p.add_argument("--batch-size", type=int, default=4, help="photos per forward pass")
    p.add_argument("--workers", type=int, default=2, help="threads reading and threads writing images")
    p.add_argument("--device", default="auto", help="auto (CUDA when available) | cpu | cuda | cuda:1")
    p.add_argument("--fast-decode", action=argparse.BooleanOptionalAction, default=True,
                   help="make a JPEG's network input from a second decode at 1/2, 1/4 or 1/8 size (DCT scaling), "
                        "the largest that still covers the input; --no-fast-decode resizes the full decode")
    p.add_argument("--engine", default="auto", choices=ENGINES,
                   help="CPU inference engine: auto (OpenVINO where installed) | torch | openvino | onnxruntime")
    p.add_argument("--no-amp", dest="amp", action="store_false", help="fp32 everywhere (default: bf16/fp16 autocast on CUDA, bf16 weights on CPUs with native bf16)")
    p.add_argument("--overwrite", action="store_true", help="redo photos whose outputs already exist")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (failed photos, capped; 2 for a usage error)."""
    args = build_parser().parse_args(argv)
    out_dir = Path(args.output)
    try:
        if args.batch_size < 1:
            raise SegmentError(f"--batch-size must be >= 1, got {args.batch_size}")
        background = parse_background(args.background) if args.background else None
        photos, problems = find_photos(args.inputs, exclude=out_dir)
        model, config, state = load_model(args.checkpoint)
        threshold = threshold_of(state) if args.threshold is None else args.threshold
        segmenter = Segmenter(model, config, args.device, threshold, args.tta, args.amp, args.fit, args.fast_decode,
                              args.engine)
    except (SegmentError, CheckpointError, PhotoError, EngineError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for problem in problems:
        warnings.warn(f"{problem}; skipped", stacklevel=1)
    print(f"segment: {len(photos)} photo(s) with {config.describe()}, threshold {threshold:g}, "
          f"{segmenter.fit}{', hflip TTA' if args.tta else ''}, on {segmenter.device}", file=sys.stderr)
    summary = segment_photos(segmenter, photos, out_dir, args.batch_size, args.workers, args.overwrite, args.overlay,
                             background, progress=None if args.progress else False)
    failed = summary.failed + len(problems)
    per = f" ({1000 * summary.seconds / summary.written:.0f} ms per photo)" if summary.written else ""
    print(f"segment: wrote {summary.written} photo(s) to {out_dir} in {summary.seconds:.1f} s{per}; "
          f"{summary.skipped} already done (--overwrite redoes them), {failed} failed", file=sys.stderr)
    return min(failed, MAX_EXIT_STATUS)


if __name__ == "__main__":
    warnings.simplefilter("default")
    warnings.formatwarning = lambda message, category, *a, **k: f"warning: {message}\n"
    sys.exit(main())
