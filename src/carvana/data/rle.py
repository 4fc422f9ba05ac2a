"""Run-length encoding in the Kaggle Carvana format: the rules, parsing and decoding.

The mask is flattened row-major (left to right, then top to bottom) and written
as space-separated ``start length`` pairs with 1-indexed starts; an all-zero
mask is the empty string.

``rle_to_runs`` parses and checks a string (every rule broken is an ``RLEError``
with a ``kind``), ``rle_decode`` turns one into a mask. Encoding is
carvana.data.rle_encoder (a fast encoder giving exactly the classic Kaggle
snippet's string); ``rle_encode`` and ``rle_from_transitions`` are imported here
too, so this module is the one place to import the format from.
"""

from __future__ import annotations

import numpy as np

from carvana.data.layout import ORIG_SHAPE
from carvana.data.rle_encoder import rle_encode, rle_from_transitions

__all__ = ["RLEError", "rle_encode", "rle_decode", "rle_from_transitions", "rle_to_runs"]


class RLEError(ValueError):
    """A malformed RLE string; ``kind`` says which rule it broke.

    Kinds: ``malformed`` (a token that is not a non-negative decimal integer),
    ``odd_count``, ``nonpositive`` (a start or length < 1), ``out_of_bounds``
    (a run past the last pixel), ``order`` (starts not increasing, or runs
    overlapping), ``touching`` (a run starting right where the previous one
    ends; only rejected when ``strict``).
    """

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


_DIGITS_AND_SPACE = b"0123456789 "
_BIG = 2**61  # values are clipped here when there is no pixel bound, so sums cannot overflow


def _parse_ints(text: str) -> np.ndarray:
    """Space-separated non-negative decimal integers -> int64 array (strict)."""
    try:
        raw = text.encode("ascii")
    except UnicodeEncodeError:
        raw = b"\xff"  # forces the bad-token path below
    if raw.translate(None, _DIGITS_AND_SPACE):
        bad = next(t for t in text.split(" ") if t and not (t.isascii() and t.isdigit()))
        raise RLEError("malformed", f"token {bad[:20]!r} is not a non-negative integer")
    # Only digits and spaces remain, so numpy's C parser reads every token
    # (~3x faster than int() per token); values too large for int64 saturate,
    # which the bounds checks then reject.
    return np.fromstring(text, dtype=np.int64, sep=" ")


def rle_to_runs(rle: str, n_pixels: int | None = None, *, strict: bool = True) -> np.ndarray:
    """Parse and check an RLE string; returns a (k, 2) int64 array of (start, length).

    Starts are 1-indexed as in the string.  Raises ``RLEError`` (a ValueError
    with a ``kind``) for non-integer tokens, an odd count, starts or lengths < 1,
    runs past ``n_pixels`` (when given), starts that do not increase or runs
    that overlap, and, when ``strict``, runs that touch (``start == previous
    start + previous length``; a canonical encoder would have merged them).
    """
    if not isinstance(rle, str):
        raise RLEError("malformed", f"RLE must be a string, got {type(rle).__name__}")
    text = rle.strip()
    if not text:
        return np.empty((0, 2), dtype=np.int64)
    nums = _parse_ints(text)
    if nums.size % 2:
        raise RLEError("odd_count", f"odd number of values ({nums.size}): not start/length pairs")
    runs = nums.reshape(-1, 2)
    # Fast path: a few whole-array reductions; the slow path below only runs
    # to say which pair is wrong.
    if nums.min() < 1:
        i, col = divmod(int(np.argmax(nums < 1)), 2)
        raise RLEError("nonpositive", f"pair {i + 1} {_pair(runs, i)}: {('start', 'length')[col]} < 1")
    if n_pixels is None:
        nums = np.minimum(nums, _BIG)
    elif nums.max() > n_pixels:  # also keeps start + length from overflowing
        i = int(np.argmax(nums > n_pixels)) // 2
        raise RLEError("out_of_bounds", f"pair {i + 1} {_pair(runs, i)} ends past pixel {n_pixels}")
    starts = nums[0::2]
    ends = starts + nums[1::2]  # exclusive, 1-indexed
    if n_pixels is not None and ends.max() > n_pixels + 1:
        i = int(np.argmax(ends > n_pixels + 1))
        raise RLEError("out_of_bounds", f"pair {i + 1} {_pair(runs, i)} ends past pixel {n_pixels}")
    if len(runs) > 1:
        gaps = starts[1:] - ends[:-1]  # pixels between a run and the next one
        if gaps.min() < (1 if strict else 0):
            i = int(np.argmax(gaps < (1 if strict else 0)))
            if starts[i + 1] <= starts[i]:
                kind, what = "order", "does not come after"
            elif gaps[i] < 0:
                kind, what = "order", "overlaps"
            else:
                kind, what = "touching", "touches (should be merged with)"
            raise RLEError(kind, f"pair {i + 2} {_pair(runs, i + 1)} {what} pair {i + 1} {_pair(runs, i)}")
    return runs


def _pair(runs: np.ndarray, i: int) -> str:
    return f"({int(runs[i, 0])} {int(runs[i, 1])})"


def rle_decode(rle: str, shape: tuple[int, int] = ORIG_SHAPE) -> np.ndarray:
    """Decode an RLE string to a uint8 (0/1) array of ``shape``.

    Raises ``RLEError`` (a ValueError) for malformed strings, runs out of
    bounds, and unsorted or overlapping runs; touching runs are accepted.
    """
    if len(shape) != 2 or min(shape) < 0:
        raise ValueError(f"rle_decode: shape must be (rows, cols), got {shape!r}")
    n = int(shape[0]) * int(shape[1])
    runs = rle_to_runs(rle, n, strict=False)
    if len(runs) == 0:
        return np.zeros(shape, dtype=np.uint8)
    starts = runs[:, 0] - 1
    ends = starts + runs[:, 1]
    # Alternating 0/1 segments: gap before each run, the run, then the tail.
    counts = np.empty(2 * len(runs) + 1, dtype=np.int64)
    counts[0] = starts[0]
    counts[2:-1:2] = starts[1:] - ends[:-1]
    counts[1::2] = runs[:, 1]
    counts[-1] = n - ends[-1]
    values = np.zeros(counts.size, dtype=np.uint8)
    values[1::2] = 1
    return np.repeat(values, counts).reshape(shape)
