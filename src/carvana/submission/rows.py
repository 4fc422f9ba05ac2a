"""From probability maps to submission rows: upsample to 1918x1280, threshold, RLE-encode."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from carvana.data.layout import ORIG_SHAPE
from carvana.data.postprocess import upsampled_rle
from carvana.data.rle import rle_encode
from carvana.submission.gzip_stream import iter_single_member_lines


def upsample_masks_torch(probs: Any, threshold: float) -> np.ndarray:
    """Upsample a (B, h, w) probability tensor to (B, 1280, 1918) bool masks on its own device.

    Same sampling as :func:`carvana.postprocess.upsample_mask` (bilinear, half-pixel
    centres); it can differ only where a value is within float rounding of ``threshold``.
    Used for CUDA tensors, where it is far faster than cv2 and copies back 1 byte/pixel.
    """
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        up = F.interpolate(probs[:, None].float(), size=ORIG_SHAPE, mode="bilinear", align_corners=False)
        return (up[:, 0] > threshold).cpu().numpy()


def _encode_row(name: str, data: np.ndarray, threshold: float, is_mask: bool) -> tuple[str, float]:
    """Worker job: probability map (or ready mask) -> 'name,rle\\n' and the seconds it took."""
    t0 = time.perf_counter()
    row = f"{name},{rle_encode(data) if is_mask else upsampled_rle(data, threshold)}\n"
    return row, time.perf_counter() - t0


def check_names(names: Sequence[str]) -> None:
    """Raise ValueError unless ``names`` are non-empty, unique and safe inside a CSV row."""
    if not names:
        raise ValueError("names is empty: there is nothing to predict")
    bad = [n for n in names if not isinstance(n, str) or not n or any(c in n for c in ",\r\n")]
    if bad:
        raise ValueError(f"invalid image name(s) for a CSV row (empty, or with ',' or a newline): {bad[:3]}")
    dupes = [n for n, c in Counter(names).items() if c > 1]
    if dupes:
        raise ValueError(f"names must be unique; duplicated: {dupes[:3]}")


def to_arrays(probs: Any, threshold: float, gpu_upsample: bool) -> tuple[bool, np.ndarray, float]:
    """(is_mask, arrays, seconds): CUDA tensors are upsampled on the GPU (timed), the rest go to CPU float32."""
    if hasattr(probs, "detach"):  # a torch tensor; torch is only imported where it is needed
        probs = probs.detach()
        if gpu_upsample and probs.is_cuda:
            t0 = time.perf_counter()
            masks = upsample_masks_torch(probs, threshold)
            return True, masks, time.perf_counter() - t0
        probs = probs.cpu().float().numpy()
    # Copy: worker threads read the maps later, and the caller may reuse its buffer meanwhile.
    return False, np.array(probs, dtype=np.float32, copy=True), 0.0


def verify_rows(path: Path, names: Sequence[str], header_line: str, raw: bool = False) -> None:
    """Stream ``path`` once as a first-member-only reader: ``header_line``, then one row per name, in order.

    Raises ValueError naming the file and the first problem.
    """
    lines = iter_single_member_lines(path, raw=raw)
    if header_line and (header := next(lines, "")) != header_line:
        raise ValueError(f"{path}: bad header {header!r}")
    count = 0
    for line in lines:
        name = line.split(",", 1)[0]
        if count >= len(names) or name != names[count] or not line.endswith("\n"):
            raise ValueError(f"{path}: row {count + 1} is {name!r}, not the expected name")
        count += 1
    if count != len(names):
        raise ValueError(f"{path}: {count} rows written, expected {len(names)}")
