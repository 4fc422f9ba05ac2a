"""Driving PredictionsSaverCallback without a model, for test_predictions and test_predictions_interrupted.

Synthetic probability maps (smooth blobs at 64x96, deterministic per name) stand in for a
model's output; ``feed`` plays the trainer. The kill test's child process imports this module,
so it imports no torch at module level.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np

from carvana.submission.predictions import PredictionsSaverCallback

H, W = 64, 96


def make_names(n: int, prefix: str = "") -> list[str]:
    """``n`` distinct test-image names in the Carvana form ``<car id>_<angle>.jpg``."""
    return [f"{prefix}{i:012x}_{i % 16 + 1:02d}.jpg" for i in range(n)]


def synthetic_prob(name: str, stripes: bool = False) -> np.ndarray:
    """A few Gaussian blobs, seeded by the name; ``stripes`` adds many runs per mask row."""
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    p = np.zeros((H, W), np.float32)
    for _ in range(int(rng.integers(1, 4))):
        cy, cx = rng.uniform(0, H), rng.uniform(0, W)
        sy, sx = rng.uniform(4, H / 3), rng.uniform(4, W / 3)
        p = np.maximum(p, np.exp(-((yy - cy) ** 2 / (2 * sy**2) + (xx - cx) ** 2 / (2 * sx**2))))
    if stripes:
        p = 0.5 * p + 0.5 * (0.5 + 0.5 * np.sin(xx * (2 * np.pi * 6 / W) + rng.uniform(0, 2 * np.pi)))
    return p.astype(np.float32)


def feed(
    cb: PredictionsSaverCallback, names: list[str], batch: int = 2, tensor: bool = False, stripes: bool = False
) -> None:
    """Play the trainer: one on_predict_batch_end per batch, in order."""
    for i in range(0, len(names), batch):
        part = names[i : i + batch]
        probs = np.stack([synthetic_prob(n, stripes) for n in part])
        if tensor:
            import torch  # only where needed: the kill test's child process imports this module

            probs = torch.from_numpy(probs)
        cb.on_predict_batch_end(None, part, probs)


def run_full(path: Path, names: list[str], batch: int = 2, **kw) -> bytes:
    """Predict ``names`` into ``path`` from start to finish; the finished file's bytes."""
    cb = PredictionsSaverCallback(path, names, **kw)
    feed(cb, cb.remaining(), batch)
    cb.on_predict_end(None)
    return path.read_bytes()


def gzip_members(data: bytes) -> int:
    """How many gzip members ``data`` holds (a truncated one is an error)."""
    n = 0
    while data:
        d = zlib.decompressobj(wbits=31)
        d.decompress(data)
        if not d.eof:
            raise ValueError("truncated gzip member")
        data, n = d.unused_data, n + 1
    return n


def side(path: Path) -> Path:
    """The progress sidecar of the submission at ``path``."""
    return path.with_name(path.name + ".partial.json")


def partial(path: Path) -> Path:
    """The unfinished gzip member of the submission at ``path``."""
    return path.with_name(path.name + ".partial")

