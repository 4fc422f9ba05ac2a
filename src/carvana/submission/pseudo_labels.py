"""A teacher (one model or an ensemble) labels unlabeled images into a pseudo-label store.

The images stream through the same predictor and loader as a submission (bounded memory);
each label is written as soon as its batch is predicted, so a labeling killed at any moment
resumes with the images that have none. Under torchrun rank r labels images r, r+W, ...
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from carvana.data.files import write_json_atomic
from carvana.data.pseudo import images_without_label, remove_stale_temporaries, write_label
from carvana.training import distributed as dist
from carvana.training.callbacks import Callback


class LabelWriter(Callback):
    """Writes each predicted image's probabilities, at the student's data size, as its label."""

    def __init__(self, folder: Path, images: Sequence[Path], data_hw: tuple[int, int]) -> None:
        self.folder, self.data_hw = Path(folder), tuple(data_hw)
        self.by_name = {Path(p).name: Path(p) for p in images}
        self.written = 0

    def on_predict_batch_end(self, trainer: Any, names: list[str], probs: torch.Tensor) -> None:
        probs = probs.float()
        if tuple(probs.shape[-2:]) != self.data_hw:
            probs = F.interpolate(probs[:, None], size=self.data_hw, mode="bilinear", align_corners=False)[:, 0]
        for name, p in zip(names, probs.cpu().numpy()):
            write_label(self.folder, self.by_name[name], p)
            self.written += 1


def label_images(predictor: Any, images: Sequence[Path], folder: Path, data_hw: tuple[int, int],
                 teacher: dict[str, Any], tta: bool, batch_size: int, workers: int, fast_decode: bool) -> int:
    """Label every image of ``images`` that has no label in ``folder`` yet; returns how many
    were labeled now (over all ranks). ``teacher`` (what the folder's key stands for) goes into
    teacher.json."""
    folder = Path(folder)
    if dist.is_main_process():
        folder.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(folder)  # labels half-written when a labeling was killed
        if not (folder / "teacher.json").exists():
            write_json_atomic(folder / "teacher.json", json.loads(json.dumps(teacher, default=str)), indent=2)
    dist.barrier()
    remaining = images_without_label(folder, images)[dist.rank()::dist.world_size()]
    writer = LabelWriter(folder, remaining, data_hw)
    if remaining:
        loader = DataLoader(predictor.test_dataset(remaining, fast_decode), batch_size=batch_size,
                            num_workers=workers, shuffle=False)
        predictor.predict(loader, [writer], tta=tta)
    total = dist.all_reduce_sums(float(writer.written))[0]
    dist.barrier()
    return int(total)
