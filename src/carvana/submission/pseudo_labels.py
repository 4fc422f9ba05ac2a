"""A teacher (one model or an ensemble) labels unlabeled images into a pseudo-label store.

The images stream through the same predictor and loader as a submission (bounded memory);
each label is written as soon as its batch is predicted, so a labeling killed at any moment
resumes with the images that have none. Under torchrun rank 0 lists the images still to
label and broadcasts that list; rank r then labels its entries r, r+W, ... (each rank listing
for itself could skip images while faster ranks are already writing labels).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from carvana.data.files import write_json_atomic
from carvana.data.layout import ORIG_SHAPE, is_native
from carvana.data.pseudo import KeyedImage, images_without_label, mark_unreadable, remove_stale_temporaries, \
    write_label
from carvana.training import distributed as dist
from carvana.training.callbacks import Callback

UNREADABLE = "!unreadable"  # appended to an item's name when the loader could not read the image (ok=False)


class KeyedItems(Dataset):
    """The predictor's test items with each name replaced by the image's label key, plus
    UNREADABLE where ok is False: callbacks receive names and probabilities only, so the key
    and the flag travel in the name (two photos may share a name, never a key)."""

    def __init__(self, items: Dataset, images: Sequence[KeyedImage]) -> None:
        self.items, self.keys = items, [i.key for i in images]

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> dict:
        item = self.items[i]
        item["name"] = self.keys[i] + ("" if bool(item["ok"]) else UNREADABLE)
        return item


class LabelWriter(Callback):
    """Writes each predicted image's probabilities, at the student's data size, as its label;
    an unreadable image gets an unreadable mark instead (its all-zero map is no label)."""

    def __init__(self, folder: Path, images: Sequence[KeyedImage], data_hw: tuple[int, int]) -> None:
        self.folder, self.data_hw = Path(folder), tuple(data_hw)
        # The map a label is made from: the image's own frame at the native size (padded after,
        # as the image is), else the data size itself.
        self.map_hw = ORIG_SHAPE if is_native(self.data_hw) else self.data_hw
        self.paths = {i.key: i.path for i in images}
        self.written = 0

    def on_predict_batch_end(self, trainer: Any, names: list[str], probs: torch.Tensor) -> None:
        probs = probs.float()
        if tuple(probs.shape[-2:]) != self.map_hw:
            probs = F.interpolate(probs[:, None], size=self.map_hw, mode="bilinear", align_corners=False)[:, 0]
        for name, p in zip(names, probs.cpu().numpy()):
            key = name.removesuffix(UNREADABLE)
            if key != name:
                mark_unreadable(self.folder, key, self.paths[key])
            else:
                write_label(self.folder, key, p, self.data_hw)
            self.written += 1


def label_images(predictor: Any, images: Sequence[KeyedImage], folder: Path, data_hw: tuple[int, int],
                 teacher: dict[str, Any], tta: bool, batch_size: int, workers: int, fast_decode: bool) -> int:
    """Label every image of ``images`` that has no label (nor unreadable mark) in ``folder``
    yet; returns how many were labeled now (over all ranks). ``teacher`` (what the folder's key
    stands for) goes into teacher.json."""
    folder = Path(folder)
    remaining, error = None, None
    if dist.is_main_process():
        try:
            remaining = open_store(folder, images, teacher)
        except OSError as exc:  # a full or read-only disk: every rank stops, none waits at the broadcast
            error = exc
    dist.raise_if_any_failed(error, "opening the pseudo-label store")
    mine = list(dist.broadcast_object(remaining))[dist.rank()::dist.world_size()]
    writer = LabelWriter(folder, mine, data_hw)
    if mine:
        items = KeyedItems(predictor.test_dataset([i.path for i in mine], fast_decode), mine)
        loader = DataLoader(items, batch_size=batch_size, num_workers=workers, shuffle=False)
        predictor.predict(loader, [writer], tta=tta)
    total = dist.all_reduce_sums(float(writer.written))[0]
    dist.barrier()
    return int(total)


def open_store(folder: Path, images: Sequence[KeyedImage], teacher: dict[str, Any]) -> list[KeyedImage]:
    """Rank 0: create the store (teacher.json), clear killed labelings' temporaries, and list
    the images still to label."""
    folder.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(folder)  # labels half-written when a labeling was killed
    if not (folder / "teacher.json").exists():
        write_json_atomic(folder / "teacher.json", json.loads(json.dumps(teacher, default=str)), indent=2)
    return images_without_label(folder, images)
