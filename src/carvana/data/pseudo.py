"""Pseudo-labels: a teacher's probabilities for unlabeled images, stored once and streamed.

A store is one folder per (teacher weights, resolution, TTA, decoding)::

    output/pseudo/<key>/teacher.json         what the key stands for
    output/pseudo/<key>/<image key>.png      8-bit probabilities (p * 255) at the student's data size
    output/pseudo/<key>/<image key>.unreadable  the image could not be read: it has no label
    output/pseudo/<key>/labels.csv           image, key, unreadable, uncertain (fraction of pixels
                                             with 0.1 < p < 0.9), kept

An image's key (:func:`image_key`) is a digest of its resolved path, size and mtime, never its
name: ``a.jpg`` and ``a.jpeg``, or two folders' ``IMG_0001.jpg``, get two labels, and an image
replaced under the same name is labeled again. The same key decides that an image is a labeled
train image (never pseudo-labeled) and finds its label.

Each file is written through :func:`carvana.data.files.atomic_path`, so a labeling killed at
any moment resumes by labeling only the images without one, and gives the same files as an
uninterrupted run. Training reads the PNGs from disk per item: nothing is held in RAM.

:class:`MixedBatchSampler` makes each batch a set share labeled and the rest pseudo-labeled;
an epoch is one pass over the labeled images.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from carvana.data.datasets import fit_decoded, fit_to_input, image_to_tensor
from carvana.data.files import atomic_path, write_text_atomic
from carvana.data.jpeg import ImageReadError, decode_scale, jpeg_size, read_image
from carvana.data.layout import is_native
from carvana.data.sampling import sample_seed

UNCERTAIN = (0.1, 0.9)  # a pixel whose probability lies between these is uncertain
LABEL_FORMAT = 2  # part of the store key: 1 named labels by image stem, 2 by image key (and pads native labels)


class KeyedImage(NamedTuple):
    """An unlabeled image and the key its label is stored under."""

    path: Path
    key: str


def image_key(path: Path) -> str:
    """The identity of an image file: a digest of its resolved path, size and mtime (a stat,
    not a read of 100,000 files)."""
    resolved = Path(path).resolve()
    st = resolved.stat()
    return hashlib.sha256(f"{resolved}\n{st.st_size}\n{st.st_mtime_ns}".encode()).hexdigest()[:32]


def keyed(paths: Sequence[Path]) -> list[KeyedImage]:
    return [KeyedImage(Path(p), image_key(p)) for p in paths]


def store_key(teacher: dict[str, Any]) -> str:
    """The store folder's name: a digest of the teacher's weights, resolution, TTA and decoding."""
    return hashlib.sha256(json.dumps({**teacher, "label_format": LABEL_FORMAT}, sort_keys=True).encode()
                          ).hexdigest()[:16]


def label_path(folder: Path, key: str) -> Path:
    return Path(folder) / f"{key}.png"


def unreadable_path(folder: Path, key: str) -> Path:
    return Path(folder) / f"{key}.unreadable"


def to_label(probs: np.ndarray, data_hw: tuple[int, int] | None = None) -> np.ndarray:
    """(H, W) probabilities in [0, 1] as an 8-bit label. At the native data size (1280x1920) a
    1280x1918 map is padded exactly as its image is (:func:`fit_to_input`), never stretched,
    so label pixel (r, c) stays image pixel (r, c)."""
    label = np.clip(np.rint(probs * 255.0), 0, 255).astype(np.uint8)
    if data_hw is not None and is_native(data_hw) and label.shape != tuple(data_hw):
        label = fit_to_input(label, data_hw)
    return label


def write_label(folder: Path, key: str, probs: np.ndarray, data_hw: tuple[int, int] | None = None) -> None:
    """One image's probabilities (H, W floats in [0, 1]) as an 8-bit PNG, atomically."""
    with atomic_path(label_path(folder, key)) as tmp:
        Image.fromarray(to_label(probs, data_hw)).save(tmp, format="PNG")


def mark_unreadable(folder: Path, key: str, image: Path) -> None:
    """Record that ``image`` could not be read: it gets no label, and is not tried again
    (a changed file has another key)."""
    write_text_atomic(unreadable_path(folder, key), f"{image}\n")


def remove_stale_temporaries(folder: Path) -> None:
    """Delete the half-written labels of labelings that were killed (their process is gone).
    Temp names are ``.<name>.<pid>-<thread>.tmp`` (carvana.data.files.temp_name) or, from older
    labelings, ``.<name>.<pid>.tmp``."""
    for tmp in Path(folder).glob(".*.tmp"):
        found = re.fullmatch(r"\..+\.(\d+)(?:-\d+)?\.tmp", tmp.name)
        if found and not _alive(int(found.group(1))):
            tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def uncertain_fraction(label: np.ndarray) -> float:
    """The fraction of a stored label's pixels (uint8) the teacher was unsure of."""
    low, high = (round(t * 255) for t in UNCERTAIN)
    return float(((label > low) & (label < high)).mean())


def select_confident(folder: Path, images: Sequence[KeyedImage], max_uncertain: float
                     ) -> tuple[list[KeyedImage], list[dict]]:
    """The images whose labels have at most ``max_uncertain`` uncertain pixels, and a row per
    image for labels.csv. An unreadable image is never kept: no label is trusted for it."""
    kept, rows = [], []
    for image in images:
        row = {"image": str(image.path), "key": image.key, "unreadable": False, "uncertain": None, "kept": False}
        if unreadable_path(folder, image.key).exists():
            row["unreadable"] = True
        elif not label_path(folder, image.key).exists():
            raise ImageReadError(f"{image.path}: no pseudo-label in {folder} (its labeling did not finish); "
                                 "run the command again to label it")
        else:
            row["uncertain"] = round(uncertain_fraction(np.asarray(Image.open(label_path(folder, image.key)))), 6)
            row["kept"] = row["uncertain"] <= max_uncertain
        rows.append(row)
        if row["kept"]:
            kept.append(image)
    return kept, rows


def images_without_label(folder: Path, images: Sequence[KeyedImage]) -> list[KeyedImage]:
    """The images with neither a label nor an unreadable mark: what a (resumed) labeling does."""
    return [i for i in images if not label_path(folder, i.key).exists() and not unreadable_path(folder, i.key).exists()]


class PseudoLabeledDataset(Dataset):
    """Unlabeled images with their stored labels, like TrainImageDataset's items but with a
    float mask: the probabilities (soft) or the probabilities thresholded at 0.5 (hard).
    ``images`` are KeyedImages (the keys they were labeled under) or paths (keyed here)."""

    def __init__(self, images: Sequence[KeyedImage | Path], folder: Path, input_hw: tuple[int, int],
                 transform: Any = None, hard: bool = False, seed: int = 0, fast_decode: bool = True) -> None:
        self.images = [i if isinstance(i, KeyedImage) else KeyedImage(Path(i), image_key(i)) for i in images]
        self.folder, self.input_hw = Path(folder), tuple(input_hw)
        self.transform, self.hard, self.seed, self.fast_decode = transform, hard, seed, fast_decode

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        epoch, i = key if isinstance(key, tuple) else (None, key)
        if epoch is not None and self.transform is not None:
            self.transform.set_random_seed(sample_seed(self.seed + 7919, epoch, i))  # its own stream
        path, label_key = self.images[i]
        image_hw = jpeg_size(path)
        image = fit_decoded(read_image(path, decode_scale(image_hw, self.input_hw, self.fast_decode)),
                            self.input_hw, image_hw)
        label = np.asarray(Image.open(label_path(self.folder, label_key)))
        if self.transform is not None:
            out = self.transform(image=image, mask=label)
            image, label = out["image"], out["mask"]
        mask = (label >= 128).astype(np.float32) if self.hard else label.astype(np.float32) / 255.0
        return {"image": image_to_tensor(image), "mask": torch.from_numpy(np.ascontiguousarray(mask))[None],
                "name": path.name}


class MixedDataset(Dataset):
    """Labeled items (indices 0..L-1) then pseudo-labeled ones (L..), every mask a float."""

    def __init__(self, labeled: Dataset, pseudo: Dataset) -> None:
        self.labeled, self.pseudo = labeled, pseudo

    def __len__(self) -> int:
        return len(self.labeled) + len(self.pseudo)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        epoch, i = key
        n = len(self.labeled)
        item = self.labeled[(epoch, i)] if i < n else self.pseudo[(epoch, i - n)]
        item["mask"] = item["mask"].float()
        item.pop("full_mask", None)
        return item


class MixedBatchSampler(Sampler):
    """Batches of ``batch_size`` with ``round(batch_size * share)`` pseudo-labeled items and the
    rest labeled; an epoch is one pass over this rank's share of the labeled items, and the
    pseudo-labeled ones continue, reshuffled, from epoch to epoch. Yields (epoch, index) pairs
    like EpochSampler, shuffled from (seed, epoch) only, so a resumed run sees the same batches."""

    def __init__(self, n_labeled: int, n_pseudo: int, batch_size: int, share: float, seed: int,
                 rank: int = 0, world: int = 1) -> None:
        if n_pseudo and batch_size < 2:  # main.py refuses it first (pipeline/plans.py)
            raise ValueError(f"batch size {batch_size}: no room for a pseudo-labeled item beside a labeled one")
        self.n_labeled, self.n_pseudo, self.seed, self.rank, self.world = n_labeled, n_pseudo, seed, rank, world
        self.n_pseudo_per_batch = min(batch_size - 1, max(1, round(batch_size * share))) if n_pseudo else 0
        self.n_labeled_per_batch = batch_size - self.n_pseudo_per_batch
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return (self.n_labeled // self.world) // self.n_labeled_per_batch

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        labeled = rng.permutation(self.n_labeled)[self.rank::self.world]
        pseudo = rng.permutation(self.n_pseudo)[self.rank::self.world] if self.n_pseudo else np.empty(0, int)
        for b in range(len(self)):
            batch = [int(i) for i in labeled[b * self.n_labeled_per_batch:(b + 1) * self.n_labeled_per_batch]]
            picks = [(b * self.n_pseudo_per_batch + j) % max(len(pseudo), 1) for j in range(self.n_pseudo_per_batch)]
            batch += [self.n_labeled + int(pseudo[j]) for j in picks]
            yield [(self.epoch, i) for i in batch]
