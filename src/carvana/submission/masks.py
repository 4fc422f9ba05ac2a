"""Prediction for multi-class (and non-Carvana) runs: one indexed-palette PNG per image.

``PaletteMaskWriter`` turns each batch's class probabilities into a label map at the image's
own size (bilinear on the probabilities, then argmax) and writes ``<stem>.png`` (mode P, the
fixed palette of carvana.data.palette) into ``output/<run>/masks/``, atomically (temp name,
then rename): a file that exists is complete. Nothing is kept between batches, so memory is
bounded by one batch. ``predict_to_masks`` skips images whose PNG is already there when the
folder was written by the same weights (``.fingerprint``), and writes ``classes.csv`` and
``legend.png`` naming the classes.
"""

from __future__ import annotations

import json
import os
import warnings
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import DataLoader

from carvana.data.datasets import ImageReadError, TestImageDataset, jpeg_size
from carvana.data.palette import PALETTE, legend, palette_bytes
from carvana.submission.gzip_stream import SubmissionWriteError, exclusive_lock, fsync_dir, write_json_atomic
from carvana.submission.progress import DEFAULT_INTERVAL_S, ProgressLine
from carvana.training import distributed as dist
from carvana.training.callbacks import Callback
from carvana.training.tasks import labels_at


def write_png_atomic(labels: np.ndarray, path: Path) -> None:
    """Class ids (H, W) -> an indexed-palette PNG at ``path`` (temp file, then rename)."""
    image = Image.fromarray(np.asarray(labels, dtype=np.uint8), mode="P")
    image.putpalette(palette_bytes())
    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)


class PaletteMaskWriter(Callback):
    """On each predicted batch: resize to each image's size, argmax, write ``<stem>.png``."""

    def __init__(self, out_dir: Path, sizes: dict[str, tuple[int, int]],
                 progress_interval_s: float = DEFAULT_INTERVAL_S) -> None:
        self.out_dir, self.sizes, self.written = Path(out_dir), dict(sizes), 0
        self.progress = ProgressLine(len(self.sizes), "prediction", progress_interval_s)

    def on_predict_start(self, trainer: Any) -> None:
        self.progress.restart()

    def on_predict_batch_end(self, trainer: Any, names: list[str], probs: Any) -> None:
        for name, prob in zip(names, probs):
            labels = labels_at(prob, self.sizes[name]).to(torch.uint8).cpu().numpy()
            write_png_atomic(labels, self.out_dir / f"{Path(name).stem}.png")
            self.written += 1
        self.progress.advance(len(names))

    def on_predict_end(self, trainer: Any) -> None:
        self.progress.finish()


def _read_fingerprint(marker: Path) -> dict | None:
    """The folder's recorded fingerprint; None when absent or unreadable (then nothing is reused)."""
    try:
        return json.loads(marker.read_text())
    except (OSError, ValueError):
        return None


def write_legend(out_dir: Path, class_names: Sequence[str]) -> None:
    """``classes.csv`` (id, name, r, g, b) and ``legend.png`` next to the masks."""
    table = pd.DataFrame({"id": range(len(class_names)), "name": list(class_names)})
    table[["r", "g", "b"]] = PALETTE[: len(class_names)].astype(int)
    tmp = out_dir / ".classes.csv.tmp"
    table.to_csv(tmp, index=False)
    os.replace(tmp, out_dir / "classes.csv")
    strip = legend(class_names, 480)
    tmp = out_dir / ".legend.tmp.png"
    cv2.imwrite(str(tmp), cv2.cvtColor(strip, cv2.COLOR_RGB2BGR))
    os.replace(tmp, out_dir / "legend.png")


def predict_to_masks(classifier: Any, images: Sequence[Path], out_dir: Path, input_hw: tuple[int, int],
                     class_names: Sequence[str], batch_size: int = 8, loader_workers: int = 2, tta: bool = False,
                     tag: str = "", progress_interval_s: float = DEFAULT_INTERVAL_S, fast_decode: bool = True) -> int:
    """Predict ``images`` into ``out_dir``/<stem>.png; returns how many PNGs exist for them.

    Resumes: with the same ``tag`` (the weights), classes, input size, TTA and ``fast_decode``
    (JPEGs decoded at the DCT scale for the input size; False: in full) images whose PNG exists
    are skipped. Under
    torchrun rank r predicts images r, r+W, ... A second run into the same folder while this one
    runs stops at once with :class:`OutputLockedError` (rank 0 holds ``<out_dir>.lock``). Off a
    terminal, rank 0 prints a progress line at most every ``progress_interval_s`` seconds.
    """
    out_dir = Path(out_dir)
    stems = [Path(p).stem for p in images]
    if len(set(stems)) != len(stems):
        raise ValueError(f"{out_dir}: two images to predict share a file stem; masks would overwrite each other")
    with ExitStack() as locks:
        error: BaseException | None = None
        try:  # every run has a rank 0: its lock keeps two runs (of any size) out of one folder
            if dist.is_main_process():
                locks.enter_context(exclusive_lock(out_dir))
        except SubmissionWriteError as exc:
            error = exc
        dist.raise_if_any_failed(error, f"locking {out_dir}")
        return _predict_unlocked(classifier, images, out_dir, input_hw, class_names, batch_size, loader_workers, tta,
                                 tag, progress_interval_s, fast_decode)


def _predict_unlocked(classifier: Any, images: Sequence[Path], out_dir: Path, input_hw: tuple[int, int],
                      class_names: Sequence[str], batch_size: int, loader_workers: int, tta: bool, tag: str,
                      progress_interval_s: float, fast_decode: bool = True) -> int:
    """:func:`predict_to_masks` once the folder is this run's."""
    stems = [Path(p).stem for p in images]
    fingerprint = {"tag": tag, "classes": list(class_names), "input_size": list(input_hw), "tta": tta,
                   "fast_decode": bool(fast_decode)}
    marker = out_dir / ".fingerprint"
    if dist.is_main_process():
        out_dir.mkdir(parents=True, exist_ok=True)
        same = _read_fingerprint(marker) == fingerprint
        if not same:  # other weights: nothing in the folder can be reused
            for stem in stems:
                (out_dir / f"{stem}.png").unlink(missing_ok=True)
            write_json_atomic(marker, fingerprint)  # never a half-written marker, even after a crash
            fsync_dir(out_dir)
        write_legend(out_dir, class_names)
    dist.barrier()
    mine = list(images)[dist.rank()::dist.world_size()]
    todo = [p for p in mine if not (out_dir / f"{Path(p).stem}.png").exists()]
    if len(todo) < len(mine) and dist.is_main_process():
        print(f"prediction: resuming, {len(mine) - len(todo)} mask(s) already written in {out_dir}")
    sizes = {}
    for p in todo:
        try:
            sizes[Path(p).name] = jpeg_size(Path(p))
        except ImageReadError as exc:  # one broken image must not cost the others their masks
            warnings.warn(f"{exc}; no mask written for it", stacklevel=1)
    todo = [p for p in todo if Path(p).name in sizes]
    writer = PaletteMaskWriter(out_dir, sizes, progress_interval_s)
    if todo:
        loader = DataLoader(TestImageDataset(todo, input_hw, fast_decode=fast_decode), batch_size=batch_size,
                            num_workers=loader_workers, pin_memory=classifier.device.type == "cuda")
        classifier.predict(loader, [writer], tta=tta)
    dist.barrier()
    return sum((out_dir / f"{s}.png").exists() for s in stems)

