"""The task objects ``CarvanaClassifier`` delegates to: targets, loss, activation, the
monitored metric and validation. Every classifier has one:

* :class:`BinaryTask` (the Carvana car masks): sigmoid, BCE + Dice, the competition's Dice.
* :class:`MultiClassTask` (``--classes N``, N >= 2), with its loss and metrics below.

* Loss: ``ce_weight * cross-entropy + dice_weight * (1 - soft Dice)``, where the soft Dice
  is computed per image and class on the softmax and averaged over the classes present in
  that image's target (a class absent from an image says nothing about its overlap).
  Pixels labelled ``IGNORE_INDEX`` (255) count in neither term.
* Metrics: a confusion matrix over the validation set at each image's original resolution
  (probabilities resized back bilinearly, then argmax; labels are never interpolated), from
  which pixel accuracy, per-class IoU and Dice and mean IoU follow.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from carvana.data.datasets import tensor_to_image
from carvana.data.files import write_text_atomic
from carvana.training import distributed as dist
from carvana.training.callbacks import Callback, Preview
from carvana.training.evaluation import validate_binary
from carvana.training.losses import BCEDiceLoss
from carvana.training.streams import ordered_map

IGNORE_INDEX = 255
# The per-epoch columns of metrics.csv for a multi-class run (one row per epoch).
# loss_fn as for binary runs: the loss each epoch stepped on (e.g. "ce+dice@64x64" under --coarse-size).
MULTICLASS_COLUMNS = ("epoch", "train_loss", "valid_loss", "valid_miou", "valid_accuracy", "valid_mdice",
                      "lr", "seconds", "is_best", "loss_fn")


def multiclass_soft_dice(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = IGNORE_INDEX,
                         eps: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft Dice of ``softmax(logits)`` (B, C, H, W) against class ids ``target`` (B, H, W).

    Returns ``(dice, present)``, both (B, C): per image b and class c (sums over valid pixels)::

        dice[b, c] = (2 * sum(p_c * t_c) + eps) / (sum(p_c) + sum(t_c) + eps)

    and whether class c occurs in image b's target. Ignored pixels are left out of every sum.
    """
    if logits.ndim != 4 or target.shape != (logits.shape[0], *logits.shape[2:]):
        raise ValueError(f"logits {tuple(logits.shape)} must be (B, C, H, W) and target {tuple(target.shape)} (B, H, W)")
    classes = logits.shape[1]
    valid = (target != ignore_index)[:, None].float()
    probs = torch.softmax(logits.float(), dim=1) * valid
    onehot = F.one_hot(torch.where(target == ignore_index, 0, target).long(), classes).permute(0, 3, 1, 2).float() * valid
    intersection = (probs * onehot).sum(dim=(2, 3))
    truth = onehot.sum(dim=(2, 3))
    dice = (2.0 * intersection + eps) / (probs.sum(dim=(2, 3)) + truth + eps)
    return dice, truth > 0


class CEDiceLoss(nn.Module):
    """``ce_weight * CE + dice_weight * (1 - mean soft Dice over (image, present class))``.

    The Dice term averages each image's Dice over the classes present in it, then over the
    images that have any valid pixel. ``class_weights`` weight the cross-entropy (as
    ``torch.nn.CrossEntropyLoss`` does). Computed in float32 with autocast off.
    """

    def __init__(self, ce_weight: float = 1.0, dice_weight: float = 1.0, class_weights: Sequence[float] | None = None,
                 ignore_index: int = IGNORE_INDEX, eps: float = 1.0) -> None:
        super().__init__()
        self.ce_weight, self.dice_weight, self.ignore_index, self.eps = ce_weight, dice_weight, ignore_index, eps
        weights = torch.tensor(list(class_weights), dtype=torch.float32) if class_weights else None
        self.register_buffer("class_weights", weights, persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.class_weights is not None and len(self.class_weights) != logits.shape[1]:
            raise ValueError(f"{len(self.class_weights)} class weights for {logits.shape[1]} classes")
        with torch.autocast(device_type=logits.device.type, enabled=False):
            logits, target = logits.float(), target.long()
            valid = target != self.ignore_index
            weight = self.class_weights.to(logits.device) if self.class_weights is not None else None
            # All pixels ignored: CE's mean would be 0/0; that batch teaches nothing.
            ce = (F.cross_entropy(logits, target, weight=weight, ignore_index=self.ignore_index)
                  if bool(valid.any()) else logits.sum() * 0.0)
            dice, present = multiclass_soft_dice(logits, target, self.ignore_index, self.eps)
            counted = present.any(dim=1)
            per_image = (dice * present).sum(dim=1) / present.sum(dim=1).clamp(min=1)
            dice_loss = (1.0 - per_image[counted]).mean() if bool(counted.any()) else logits.sum() * 0.0
            return self.ce_weight * ce + self.dice_weight * dice_loss


def confusion_matrix(pred: np.ndarray, truth: np.ndarray, classes: int, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """(classes, classes) int64 counts, rows = truth, columns = prediction; ignored pixels skipped."""
    pred, truth = np.asarray(pred).ravel(), np.asarray(truth).ravel()
    if pred.shape != truth.shape:
        raise ValueError(f"prediction and truth differ in size: {pred.size} vs {truth.size} pixels")
    keep = truth != ignore_index
    pred, truth = pred[keep].astype(np.int64), truth[keep].astype(np.int64)
    if truth.size and (truth.max() >= classes or pred.max() >= classes):
        raise ValueError(f"class id {max(truth.max(), pred.max())} out of range for {classes} classes")
    return np.bincount(truth * classes + pred, minlength=classes * classes).reshape(classes, classes)


def metrics_from_confusion(cm: np.ndarray, class_names: Sequence[str] | None = None) -> tuple[dict[str, float], pd.DataFrame]:
    """Pixel accuracy, mean IoU and mean Dice, and a per-class table, from a confusion matrix.

    A class absent from both truth and prediction has IoU and Dice NaN and is left out of
    the means (the usual convention); one predicted but absent from the truth scores 0.
    """
    cm = np.asarray(cm, dtype=np.float64)
    classes = cm.shape[0]
    names = list(class_names) if class_names else [str(c) for c in range(classes)]
    tp, truth, pred = np.diag(cm), cm.sum(axis=1), cm.sum(axis=0)
    union = truth + pred - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
        dice = np.where(truth + pred > 0, 2 * tp / (truth + pred), np.nan)
    total = cm.sum()
    table = pd.DataFrame({"class_id": range(classes), "name": names, "iou": iou, "dice": dice,
                          "truth_pixels": truth.astype(np.int64), "pred_pixels": pred.astype(np.int64)})
    summary = {
        "valid_accuracy": float(tp.sum() / total) if total else float("nan"),
        "valid_miou": float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan"),
        "valid_mdice": float(np.nanmean(dice)) if np.isfinite(dice).any() else float("nan"),
    }
    return summary, table


def labels_at(probs: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """(C, h, w) class probabilities -> (H, W) labels: resized bilinearly to ``hw``, then argmax."""
    if tuple(probs.shape[-2:]) != tuple(hw):
        probs = F.interpolate(probs[None].float(), size=tuple(hw), mode="bilinear", align_corners=False)[0]
    return probs.argmax(dim=0)


class BinaryTask:
    """The binary Carvana task: (B, 1, H, W) logits against 0/1 masks, BCE + Dice loss, best
    checkpoint by the competition's Dice (thresholded at 1918x1280, per image)."""

    monitor = "valid_dice"
    classes = 1

    def __init__(self, loss_fn: nn.Module | None = None) -> None:
        self.loss_fn = loss_fn if loss_fn is not None else BCEDiceLoss()

    @staticmethod
    def target_to_device(mask: torch.Tensor, device: torch.device) -> torch.Tensor:
        """0/1 masks -> float on the device (the loss compares probabilities with them)."""
        return mask.to(device, non_blocking=True).float()

    @staticmethod
    def activate(logits: torch.Tensor) -> torch.Tensor:
        """Logits (B, 1, h, w) -> car probabilities (B, h, w)."""
        return torch.sigmoid(logits.float())[:, 0]

    def validate(self, trainer: Any, loader: Iterable[dict]) -> tuple[dict[str, float], Preview | None]:
        """Mean loss and mean competition Dice over the validation set."""
        loss, dice, preview = validate_binary(trainer, loader)
        return {"valid_loss": loss, "valid_dice": dice}, preview


class MultiClassTask:
    """What ``CarvanaClassifier`` delegates to for N >= 2 classes: targets, loss, activation,
    validation metrics. ``last_table`` holds the latest per-class table (pandas)."""

    monitor = "valid_miou"  # best checkpoint by mean IoU

    def __init__(self, classes: int, class_names: Sequence[str] | None = None, ce_weight: float = 1.0,
                 dice_weight: float = 1.0, class_weights: Sequence[float] | None = None) -> None:
        if classes < 2:
            raise ValueError(f"a multi-class task needs >= 2 classes, got {classes}")
        self.classes = classes
        self.class_names = list(class_names) if class_names else [f"class {c}" for c in range(classes)]
        if len(self.class_names) != classes:
            raise ValueError(f"{len(self.class_names)} class names for {classes} classes")
        self.loss_fn = CEDiceLoss(ce_weight, dice_weight, class_weights)
        self.last_table: pd.DataFrame | None = None

    def target_to_device(self, mask: torch.Tensor, device: torch.device) -> torch.Tensor:
        """(B, H, W) or (B, 1, H, W) uint8 class ids -> (B, H, W) int64 on the device."""
        if mask.ndim == 4:
            mask = mask[:, 0]
        return mask.to(device, non_blocking=True).long()

    @staticmethod
    def activate(logits: torch.Tensor) -> torch.Tensor:
        """Logits (B, C, h, w) -> class probabilities (B, C, h, w)."""
        return torch.softmax(logits.float(), dim=1)

    @torch.no_grad()  # grad mode is per thread: each stream's batch needs it itself
    def _validation_batch(self, trainer: Any, batch: dict) -> tuple[float, np.ndarray, torch.Tensor, torch.Tensor]:
        """One validation batch, on any stream: (summed loss, its confusion matrix at each
        image's original resolution, the targets and the probabilities at network resolution)."""
        images = trainer._images_to_device(batch["image"])
        masks = self.target_to_device(batch["mask"], trainer.device)
        logits = trainer.eval_forward(images)
        loss = self.loss_fn(logits, masks).item() * images.shape[0]
        probs = self.activate(logits)
        cm = np.zeros((self.classes, self.classes), dtype=np.int64)
        for prob, full in zip(probs, batch["full_mask"]):
            cm += confusion_matrix(labels_at(prob, tuple(full.shape)).cpu().numpy(), full.numpy(), self.classes)
        return loss, cm, masks, probs

    @torch.no_grad()
    def validate(self, trainer: Any, loader: Iterable[dict]) -> tuple[dict[str, float], Preview | None]:
        """Loss and metrics over the validation set (sharded under torchrun, sums reduced). On a
        CPU, ``trainer.streams`` batches are scored at once (training/streams.py), as binary
        validation does; the sums do not depend on the order the batches finish in."""
        cm = np.zeros((self.classes, self.classes), dtype=np.int64)
        loss_sum, count, preview = 0.0, 0, None
        bar = tqdm(loader, desc="valid", leave=False, disable=trainer._bar_off, dynamic_ncols=True)  # none in logs
        with trainer.fixed_weights():  # an eval loop: the weights are checked once, here
            scored = ordered_map(partial(self._validation_batch, trainer), bar, trainer.streams)
            for batch, (loss, batch_cm, masks, probs) in scored:
                loss_sum += loss
                cm += batch_cm
                count += masks.shape[0]
                if preview is None and trainer.preview_count > 0:
                    k = trainer.preview_count
                    # Previews hold class ids at network resolution: truth, and the prediction in `probs`.
                    preview = Preview(images=np.stack([tensor_to_image(x) for x in batch["image"][:k]]),
                                      truths=masks[:k].cpu().numpy().astype(np.uint8),
                                      probs=probs[:k].argmax(dim=1).cpu().numpy().astype(np.uint8))
        *cm_flat, loss_sum, count = dist.all_reduce_sums(*cm.ravel().tolist(), loss_sum, count)
        if count == 0:
            raise ValueError("the validation loader yielded no images")
        cm = np.asarray(cm_flat, dtype=np.int64).reshape(self.classes, self.classes)
        summary, self.last_table = metrics_from_confusion(cm, self.class_names)
        return {"valid_loss": loss_sum / count, **summary}, preview


class PerClassTableLogger(Callback):
    """Writes ``<log_dir>/per_class.csv``: one row per (epoch, class) with IoU, Dice and pixel
    counts (rewritten atomically each epoch; rows of epochs past a resume point are replaced)."""

    def __init__(self, log_dir: Any) -> None:
        self.path = Path(log_dir) / "per_class.csv"

    def on_epoch_end(self, trainer: Any, epoch: int, metrics: dict[str, float], preview: Preview | None) -> None:
        table = getattr(getattr(trainer, "task", None), "last_table", None)
        if table is None or not dist.is_main_process():
            return
        old = pd.read_csv(self.path) if self.path.exists() else None
        new = table.assign(epoch=epoch)[["epoch", *table.columns]]
        if old is not None:
            new = pd.concat([old[old["epoch"] < epoch], new], ignore_index=True)
        write_text_atomic(self.path, new.to_csv(index=False, float_format="%.6f"))
