#!/usr/bin/env python
"""Benchmark the submission's deflate level: time and size of levels 1, 2, 3 against 6.

The stream is compressed exactly as the submission writer does it: chunks of ``--chunk-size``
rows (``<name>,<RLE>\\n``, the header line first), each by a fresh raw-deflate compressor
ending in a full flush (``gzip_stream.deflate_chunk``). The rows are realistic: the real
masks' RLE strings of ``../shared/carvana-sample/train_masks.csv`` (~9 KB each), in a
seeded shuffled order that changes every pass over the table, under unique test-like names
(``<12 hex digits>_<angle>.jpg``), repeated until the text reaches ``--mb`` megabytes
(default 16; a full Kaggle submission is ~1200). Only the compression is timed (text
generation is not); levels are interleaved, in alternating order round by round, and
medians taken. Prints a table (compressed size, share of the text, size and time against
level 6, throughput, and the time projected for a 1200 MB submission) and ends with
``gzip level <L>/6: time <T>x, size <S>x`` for the fastest level.

Usage (from the repository root)::

    python bench/gzip_level.py [--mb 16] [--levels 1,2,3,6] [--repeat 3] [--chunk-size 256]
    python bench/gzip_level.py --mb 1200 --repeat 3      # the real submission's size
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import zlib
from pathlib import Path
from typing import Iterator

import numpy as np

REPO = Path(__file__).resolve().parents[1]
try:
    import carvana  # noqa: F401
except ImportError:  # run from a checkout without an installed package
    sys.path.insert(0, str(REPO / "src"))
from carvana.data.mask_table import MASK_TABLE, load_mask_table  # noqa: E402
from carvana.submission.gzip_stream import deflate_chunk  # noqa: E402
from carvana.submission.predictions import HEADER_LINE  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "carvana-sample"
FULL_SUBMISSION_MB = 1200


def chunk_texts(rles: list[str], target_bytes: int, chunk_size: int, seed: int = 0) -> Iterator[bytes]:
    """The submission text in chunks of ``chunk_size`` rows, until ``target_bytes`` of text."""
    rng = np.random.default_rng(seed)
    order: list[int] = []
    written, i = 0, 0
    while written < target_bytes:
        rows = [HEADER_LINE] if i == 0 else []
        for _ in range(chunk_size):
            if not order:
                order = list(rng.permutation(len(rles)))
            rows.append(f"{i:012x}_{i % 16 + 1:02d}.jpg,{rles[order.pop()]}\n")
            i += 1
        text = "".join(rows).encode()
        written += len(text)
        yield text


def compress_pass(rles: list[str], target_bytes: int, chunk_size: int, level: int) -> tuple[float, int, int]:
    """(seconds spent compressing, compressed bytes, text bytes) for one pass at ``level``."""
    seconds, out, text_bytes = 0.0, 0, 0
    for text in chunk_texts(rles, target_bytes, chunk_size):
        t0 = time.perf_counter()
        segment = deflate_chunk(text, level)
        seconds += time.perf_counter() - t0
        out += len(segment)
        text_bytes += len(text)
    return seconds, out, text_bytes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=16, help="text size to compress, MB (default 16; a submission ~1200)")
    ap.add_argument("--levels", default="1,2,3,6", help="zlib levels, the last is the reference (default 1,2,3,6)")
    ap.add_argument("--repeat", type=int, default=3, help="rounds (default 3)")
    ap.add_argument("--chunk-size", type=int, default=256, help="rows per deflate segment (default 256, the pipeline's)")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder holding train_masks.csv")
    args = ap.parse_args(argv)
    levels = [int(v) for v in args.levels.split(",")]
    reference = 6 if 6 in levels else levels[-1]
    if args.repeat < 1 or args.mb <= 0 or args.chunk_size < 1:
        ap.error("--repeat, --mb and --chunk-size must be positive")
    table = args.data / MASK_TABLE
    if not table.is_file():
        print(f"error: {table} not found (the real masks' RLE rows are the realistic text)", file=sys.stderr)
        return 2
    rles = [r for r in load_mask_table(table).values() if r]
    target = int(args.mb * 1e6)
    first = next(chunk_texts(rles, target, args.chunk_size))
    assert zlib.decompressobj(-15).decompress(deflate_chunk(first, levels[0])) == first  # a sanity round trip
    print(f"{len(rles)} real RLE rows (mean {statistics.mean(map(len, rles)) / 1e3:.1f} KB) from {table}, "
          f"repeated to {args.mb:g} MB of text; chunks of {args.chunk_size} rows; {args.repeat} rounds, "
          f"levels {levels} interleaved; zlib {zlib.ZLIB_RUNTIME_VERSION}")
    seconds: dict[int, list[float]] = {lv: [] for lv in levels}
    sizes: dict[int, int] = {}
    text_bytes = 0
    for rnd in range(args.repeat):
        for lv in (levels if rnd % 2 == 0 else levels[::-1]):
            s, out, text_bytes = compress_pass(rles, target, args.chunk_size, lv)
            seconds[lv].append(s)
            sizes[lv] = out
        print(f"round {rnd + 1}: " + ", ".join(f"level {lv} {seconds[lv][-1]:.2f} s" for lv in levels))
    mb = text_bytes / 1e6
    print(f"\n| level | compressed MB | % of text | size vs level {reference} | seconds (median) | text MB/s | "
          f"time vs level {reference} (median of rounds) | projected s for {FULL_SUBMISSION_MB} MB |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    summary = {}
    for lv in levels:
        med = statistics.median(seconds[lv])
        time_ratio = statistics.median(a / b for a, b in zip(seconds[lv], seconds[reference]))
        size_ratio = sizes[lv] / sizes[reference]
        summary[lv] = (time_ratio, size_ratio)
        print(f"| {lv} | {sizes[lv] / 1e6:.2f} | {100 * sizes[lv] / text_bytes:.1f} | {size_ratio:.3f}x | {med:.2f} | "
              f"{mb / med:.1f} | {time_ratio:.2f}x | {med * FULL_SUBMISSION_MB / mb:.0f} |")
    fastest = min(levels, key=lambda lv: summary[lv][0])
    print(f"\ngzip level {fastest}/{reference}: time {summary[fastest][0]:.2f}x, size {summary[fastest][1]:.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
