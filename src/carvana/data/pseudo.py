"""Pseudo-labels: a teacher's probabilities for unlabeled images, stored once and streamed.

A store is one folder per (teacher weights, resolution, TTA, decoding)::

    output/pseudo/<key>/teacher.json      what the key stands for
    output/pseudo/<key>/<image stem>.png  8-bit probabilities (p * 255) at the student's data size
    output/pseudo/<key>/labels.csv        image, uncertain (fraction of pixels with 0.1 < p < 0.9), kept

Each PNG is written under a temporary name and renamed, so a labeling killed at any moment
resumes by labeling only the images without one, and gives the same files as an
uninterrupted run. Training reads the PNGs from disk per item: nothing is held in RAM.

:class:`MixedBatchSampler` makes each batch a set share labeled and the rest pseudo-labeled;
an epoch is one pass over the labeled images.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from carvana.data.datasets import fit_decoded, image_to_tensor
from carvana.data.jpeg import decode_scale, jpeg_size, read_image
from carvana.data.sampling import sample_seed

UNCERTAIN = (0.1, 0.9)  # a pixel whose probability lies between these is uncertain


def store_key(teacher: dict[str, Any]) -> str:
    """The store folder's name: a digest of the teacher's weights, resolution, TTA and decoding."""
    return hashlib.sha256(json.dumps(teacher, sort_keys=True).encode()).hexdigest()[:16]


def label_path(folder: Path, image: Path) -> Path:
    return Path(folder) / f"{Path(image).stem}.png"


def write_label(folder: Path, image: Path, probs: np.ndarray) -> None:
    """One image's probabilities (H, W floats in [0, 1]) as an 8-bit PNG, atomically."""
    path = label_path(folder, image)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # own name: workers of a study may label one store
    Image.fromarray(np.clip(np.rint(probs * 255.0), 0, 255).astype(np.uint8)).save(tmp, format="PNG")
    tmp.replace(path)


def remove_stale_temporaries(folder: Path) -> None:
    """Delete the half-written labels of labelings that were killed (their process is gone)."""
    for tmp in Path(folder).glob(".*.tmp"):
        pid = tmp.name.rsplit(".", 2)[-2]
        if pid.isdigit() and not _alive(int(pid)):
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


def select_confident(folder: Path, images: Sequence[Path], max_uncertain: float) -> tuple[list[Path], list[dict]]:
    """The images whose labels have at most ``max_uncertain`` uncertain pixels, and a row per
    image (image, uncertain, kept) for labels.csv."""
    kept, rows = [], []
    for image in images:
        fraction = uncertain_fraction(np.asarray(Image.open(label_path(folder, image))))
        keep = fraction <= max_uncertain
        rows.append({"image": Path(image).name, "uncertain": round(fraction, 6), "kept": keep})
        if keep:
            kept.append(Path(image))
    return kept, rows


class PseudoLabeledDataset(Dataset):
    """Unlabeled images with their stored labels, like TrainImageDataset's items but with a
    float mask: the probabilities (soft) or the probabilities thresholded at 0.5 (hard)."""

    def __init__(self, images: Sequence[Path], folder: Path, input_hw: tuple[int, int], transform: Any = None,
                 hard: bool = False, seed: int = 0, fast_decode: bool = True) -> None:
        self.images, self.folder, self.input_hw = list(images), Path(folder), tuple(input_hw)
        self.transform, self.hard, self.seed, self.fast_decode = transform, hard, seed, fast_decode

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        epoch, i = key if isinstance(key, tuple) else (None, key)
        if epoch is not None and self.transform is not None:
            self.transform.set_random_seed(sample_seed(self.seed + 7919, epoch, i))  # its own stream
        path = self.images[i]
        image_hw = jpeg_size(path)
        image = fit_decoded(read_image(path, decode_scale(image_hw, self.input_hw, self.fast_decode)),
                            self.input_hw, image_hw)
        label = np.asarray(Image.open(label_path(self.folder, path)))
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


def images_without_label(folder: Path, images: Sequence[Path]) -> list[Path]:
    return [Path(i) for i in images if not label_path(folder, i).exists()]
