#!/usr/bin/env python
"""Benchmark JPEG decoding libraries against the project's DCT-scaled OpenCV decode.

Per network input size, every decoder decodes the same real 1918x1280 photos at the project's
DCT scale (:func:`carvana.data.jpeg.decode_scale`: 1/8 at 128x192, 1/4 at 320x448, 1/2 at 512x768, full at
1024x1024 and at the native size) and hands the RGB image to the project's own
``fit_decoded`` (exact-geometry resize, or padding at the native size):

* ``project``: ``read_for_input`` + ``fit_decoded``, what ``TestImageDataset`` runs per image,
  from the path: file read, PIL header, truncation check, ``cv2.imdecode(IMREAD_REDUCED_COLOR_N)``,
  BGR->RGB;
* ``opencv``: the same ``cv2.imdecode`` + ``cvtColor`` from bytes already in memory (the
  like-for-like baseline of the libraries below, which decode from bytes too);
* ``simplejpeg``: ``decode_jpeg(data, 'RGB', min_height, min_width, min_factor=scale)``;
* ``turbojpeg``: PyTurboJPEG's ``TurboJPEG().decode(data, TJPF_RGB, scaling_factor=(1, scale))``;
* ``pillow``: Pillow (already a dependency) with ``Image.draft`` at the same scale, ``np.asarray``.

File bytes are read once outside the timed part (except by ``project``, which reads its file,
as the datasets do). Variants are interleaved per size, their order rotating round by
round; times are CPU time of this thread (``time.thread_time``; all decoders run single-threaded
here, OpenCV with ``cv2.setNumThreads(1)``), wall time printed alongside; ratios are medians of
per-round ratios against ``opencv``; minor page faults per image alongside (glibc's malloc
returning large buffers to the kernel between images costs time; see ``--fresh``). Pixels: mean absolute difference (0-255) of each
output from the project's, and of the channel-reversed output (a large value there confirms the
channel order matches). A library that is not installed is skipped.

Usage (from the repository root)::

    python bench/decode_libs.py [--images 48] [--repeat 5] [--sizes 128x192,320x448,512x768,1024x1024,native]
    python bench/decode_libs.py --fresh --sizes 320x448 --decoders project,opencv   # as a loader worker

By default every size and decoder is warmed up first (full-size decodes included, which lifts
glibc's dynamic mmap threshold, so later buffers are reused, not page-faulted in: decoder cost
alone). ``--fresh`` warms up on the timed size only, as a worker process decoding one size
does; use it with one size and few decoders (each decoder's allocations change the others').
"""

from __future__ import annotations

import argparse
import io
import resource
import statistics
import sys
import time
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from carvana.data.jpeg import _REDUCED_FLAGS, decode_scale, decoded_size, jpeg_size, read_for_input
from carvana.data.layout import NATIVE_INPUT
from carvana.data.resizing import fit_decoded

DEFAULT_DIR = Path(__file__).resolve().parents[2] / "shared" / "carvana-sample" / "test"
SIZES = "128x192,320x448,512x768,1024x1024,native"
DECODERS = "project,opencv,simplejpeg,turbojpeg,pillow"
BUDGET_MS = 2 * 600e3 / 100_064  # CPU-ms per image: 100,064 test images in 10 minutes on 2 cores


def parse_hw(text: str) -> tuple[int, int]:
    if text == "native":
        return NATIVE_INPUT
    h, w = (int(v) for v in text.lower().split("x"))
    return h, w


def opencv_bytes(data: bytes, orig_hw: tuple[int, int], scale: int) -> np.ndarray:
    return cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), _REDUCED_FLAGS[scale]), cv2.COLOR_BGR2RGB)


def pillow_bytes(data: bytes, orig_hw: tuple[int, int], scale: int) -> np.ndarray:
    im = Image.open(io.BytesIO(data))
    if scale > 1:  # draft picks the largest scale whose size covers the request: ask for orig // scale
        im.draft("RGB", (orig_hw[1] // scale, orig_hw[0] // scale))
    return np.asarray(im.convert("RGB"))


def make_decoders(wanted: list[str]) -> dict:
    """key -> fn(path, data, orig_hw, scale, hw) giving the decoded RGB image (before fit_decoded)."""
    decoders = {
        "project": lambda p, d, o, s, hw: read_for_input(p, hw, True)[0],
        "opencv": lambda p, d, o, s, hw: opencv_bytes(d, o, s),
        "pillow": lambda p, d, o, s, hw: pillow_bytes(d, o, s),
    }
    try:
        import simplejpeg

        def sj(p, d, o, s, hw):
            h, w = decoded_size(o, s)
            return simplejpeg.decode_jpeg(d, "RGB", min_height=h, min_width=w, min_factor=s)
        decoders["simplejpeg"] = sj
    except ImportError as exc:
        print(f"simplejpeg skipped: {exc}")
    try:
        from turbojpeg import TJPF_RGB, TurboJPEG
        tj = TurboJPEG()
        decoders["turbojpeg"] = lambda p, d, o, s, hw: tj.decode(d, TJPF_RGB, scaling_factor=(1, s) if s > 1 else None)
    except (ImportError, OSError, RuntimeError) as exc:
        print(f"turbojpeg skipped: {exc}")
    return {k: decoders[k] for k in wanted if k in decoders}


def run_once(fn, item: tuple, hw: tuple[int, int], scale: int) -> np.ndarray:
    """One image, ``item`` = (path, bytes, orig_hw), through a decoder and fit_decoded."""
    path, data, orig_hw = item
    return fit_decoded(fn(path, data, orig_hw, scale, hw), hw, orig_hw)


def time_variant(fn, items: list, hw: tuple[int, int], scale: int) -> tuple[float, float, float]:
    """(CPU ms/image, wall ms/image, minor page faults/image) of a decoder + fit_decoded over ``items``."""
    f0 = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    c0, w0 = time.thread_time(), time.perf_counter()
    for it in items:
        run_once(fn, it, hw, scale)
    c1, w1 = time.thread_time(), time.perf_counter()
    n = len(items)
    return (c1 - c0) * 1e3 / n, (w1 - w0) * 1e3 / n, (resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - f0) / n


def pixel_check(decoders: dict, items: list, hw: tuple[int, int], scale: int) -> dict:
    """key -> (MAD against the project's output, MAD of the channel-reversed output)."""
    out = {}
    for name, fn in decoders.items():
        mads, swapped = [], []
        for it in items:
            ref = run_once(decoders["project"], it, hw, scale).astype(np.int16)
            img = run_once(fn, it, hw, scale)
            if img.shape != ref.shape:
                raise SystemExit(f"{name}: shape {img.shape} != project's {ref.shape} at {hw}")
            mads.append(np.abs(img.astype(np.int16) - ref).mean())
            swapped.append(np.abs(img[..., ::-1].astype(np.int16) - ref).mean())
        out[name] = (float(np.mean(mads)), float(np.mean(swapped)))
    return out


def bench_size(decoders: dict, items: list, hw: tuple[int, int], repeat: int) -> dict:
    """key -> (median CPU ms, median wall ms, median faults, median ratio to the baseline, min, max)."""
    scale = decode_scale(items[0][2], hw)
    names = list(decoders)
    base = "opencv" if "opencv" in names else names[0]
    runs: dict[str, list[tuple[float, float, float]]] = {n: [] for n in names}
    for rnd in range(repeat):
        for name in names[rnd % len(names):] + names[:rnd % len(names)]:
            runs[name].append(time_variant(decoders[name], items, hw, scale))
    res = {}
    for n in names:
        ratios = [a[0] / b[0] for a, b in zip(runs[n], runs[base])]
        res[n] = (*(statistics.median(r[i] for r in runs[n]) for i in range(3)), statistics.median(ratios),
                  min(ratios), max(ratios))
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=48, help="photos (default 48)")
    ap.add_argument("--repeat", type=int, default=5, help="rounds (default 5)")
    ap.add_argument("--sizes", default=SIZES, help=f"input sizes HxW or 'native' (default {SIZES})")
    ap.add_argument("--decoders", default=DECODERS, help=f"decoders to time (default {DECODERS}; project is always run)")
    ap.add_argument("--fresh", action="store_true", help="warm up on the timed size only (see the docstring)")
    ap.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="folder of JPEG photos")
    args = ap.parse_args(argv)
    cv2.setNumThreads(1)
    paths = sorted(args.dir.glob("*.jpg"))[:args.images]
    if not paths:
        ap.error(f"no *.jpg in {args.dir}")
    items = [(p, p.read_bytes(), jpeg_size(p)) for p in paths]
    decoders = make_decoders(["project"] + [k for k in args.decoders.split(",") if k != "project"])
    sizes = [parse_hw(text) for text in args.sizes.split(",")]
    for hw in (sizes if args.fresh else sizes + [NATIVE_INPUT]):  # warm-up: page cache, first calls, malloc
        for fn in decoders.values():
            time_variant(fn, items[:2] if args.fresh else items[:8], hw, decode_scale(items[0][2], hw))
    print(f"{len(items)} photos from {args.dir}, {args.repeat} rounds, OpenCV {cv2.__version__} threads "
          f"{cv2.getNumThreads()}, warm-up {'on the timed size only' if args.fresh else 'of every size'}; "
          "CPU ms/image (thread time) median of rounds, wall ms in brackets")
    print("\n| input | scale | decoder | CPU ms/image (wall) | x opencv: median (min - max) | page faults/image | "
          "MAD vs project | MAD, channels reversed |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    shares = {}
    for hw in sizes:
        scale = decode_scale(items[0][2], hw)
        res = bench_size(decoders, items, hw, args.repeat)
        pix = pixel_check(decoders, items, hw, scale)
        for n, (c, w, flt, med, lo, hi) in res.items():
            print(f"| {hw[0]}x{hw[1]} | 1/{scale} | {n} | {c:.2f} ({w:.2f}) | {med:.2f}x ({lo:.2f} - {hi:.2f}) | "
                  f"{flt:.0f} | {pix[n][0]:.3f} | {pix[n][1]:.1f} |")
        shares[hw] = res["project"][0]
    print()
    for hw, ms in shares.items():
        print(f"project decode + resize at {hw[0]}x{hw[1]}: {ms:.2f} CPU-ms/image = {100 * ms / BUDGET_MS:.0f}% "
              f"of the {BUDGET_MS:.2f} CPU-ms/image budget (100,064 images in 10 min on 2 cores)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
