"""Callbacks that report training: console line, metrics.csv, TensorBoard, preview PNGs.

All of them write only on rank 0, so a torchrun job logs once.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np

from carvana.data.files import write_bytes_atomic, write_text_atomic
from carvana.training.callbacks import Callback, Preview
from carvana.training import distributed as dist
from carvana.training.epoch import loss_name

METRIC_COLUMNS = ("epoch", "train_loss", "valid_loss", "valid_dice", "lr", "seconds", "is_best", "loss_fn")


def overlay_grid(preview: Preview, threshold: float = 0.5) -> np.ndarray:
    """One row per sample: image | truth (green) | prediction (red) overlaid, as RGB uint8.

    In the third panel, yellow is where truth and prediction agree on the car,
    green is missed car, red is false car: errors stand out at a glance.
    """
    rows = []
    for image, truth, prob in zip(preview.images, preview.truths, preview.probs):
        pred = prob > threshold
        truth_panel = image.copy()
        truth_panel[truth] = (0.5 * truth_panel[truth] + [0, 127, 0]).astype(np.uint8)
        pred_panel = image.copy() // 2
        pred_panel[..., 0] = np.where(pred, 255, pred_panel[..., 0])
        pred_panel[..., 1] = np.where(truth, 255, pred_panel[..., 1])
        rows.append(np.concatenate([image, truth_panel, pred_panel], axis=1))
    return np.concatenate(rows, axis=0)


class ConsoleLogger(Callback):
    """One line per epoch: losses, valid Dice, LR, time."""

    def on_epoch_end(self, trainer: Any, epoch: int, metrics: dict[str, float], preview: Preview | None) -> None:
        if not dist.is_main_process():
            return
        parts = [f"epoch {epoch + 1}/{trainer.epochs}", f"train_loss {metrics['train_loss']:.4f}"]
        if metrics.get("loss_fn", plain_loss(trainer)) != plain_loss(trainer):  # --coarse-size, --lovasz
            parts[-1] += f" ({metrics['loss_fn']})"
        if "valid_dice" in metrics:
            parts += [f"valid_loss {metrics['valid_loss']:.4f}", f"valid_dice {metrics['valid_dice']:.5f}"]
        if "valid_miou" in metrics:  # multi-class runs
            parts += [f"valid_loss {metrics['valid_loss']:.4f}", f"valid_miou {metrics['valid_miou']:.4f}",
                      f"valid_acc {metrics['valid_accuracy']:.4f}"]
        parts += [f"lr {metrics['lr']:.2e}", f"{metrics['seconds']:.0f}s"]
        if metrics.get("train_seconds"):  # training steps only, this process: what --time-budget buys
            parts.append(f"train {metrics['train_images'] / metrics['train_seconds']:.1f} img/s")
        parts.append("*best*" if metrics.get("is_best") else "")
        print("  ".join(p for p in parts if p), flush=True)


def plain_loss(trainer: Any) -> str:
    """The name of the task's own loss at the full size, as metrics rows give it ("bce+dice")."""
    return loss_name(trainer.loss_fn) if hasattr(trainer, "loss_fn") else ""


class CSVLogger(Callback):
    """One row per epoch in ``<log_dir>/metrics.csv``, rewritten atomically each epoch.

    Rows of this epoch and later are dropped first: a resumed run replaces the epochs it
    re-trains, and a fresh run under an existing ``--run-name`` (whose checkpoints it
    overwrites) starts a fresh table rather than appending to the old run's.
    """

    def __init__(self, log_dir: Path, columns: tuple[str, ...] = METRIC_COLUMNS) -> None:
        self.path = Path(log_dir) / "metrics.csv"
        self.columns = columns

    def on_epoch_end(self, trainer: Any, epoch: int, metrics: dict[str, float], preview: Preview | None) -> None:
        if not dist.is_main_process():
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        rows = []
        if self.path.exists():
            with open(self.path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if _epoch_of(r) < epoch]
        rows.append({k: metrics.get(k, "") for k in self.columns})
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=self.columns, extrasaction="ignore", restval="")
        writer.writeheader()
        writer.writerows(rows)
        write_text_atomic(self.path, text.getvalue())


def _epoch_of(row: dict[str, str]) -> float:
    """A metrics.csv row's epoch; rows without a readable one sort last (dropped on rewrite)."""
    try:
        return float(row.get("epoch") or "inf")
    except ValueError:
        return float("inf")


class PreviewLogger(Callback):
    """Each epoch, the validation preview as ``<log_dir>/preview_epoch<NNN>.png`` and, when
    TensorBoard is installed, as scalars + an image in ``<log_dir>`` (``tensorboard --logdir logs``)."""

    def __init__(self, log_dir: Path, threshold: float = 0.5, tensorboard: bool = True,
                 grid_fn: Callable[[Preview], np.ndarray] | None = None) -> None:
        self.log_dir = Path(log_dir)
        self.grid_fn = grid_fn  # Preview -> RGB grid; None = the binary overlay_grid
        self.threshold = threshold
        self.use_tensorboard = tensorboard
        self.writer = None

    def on_train_start(self, trainer: Any, start_epoch: int, epochs: int) -> None:
        if not (self.use_tensorboard and dist.is_main_process()):
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # optional dependency: the PNGs still get written
            print("tensorboard is not installed: writing preview PNGs only")
            return
        self.writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=start_epoch)

    def on_epoch_end(self, trainer: Any, epoch: int, metrics: dict[str, float], preview: Preview | None) -> None:
        if not dist.is_main_process():
            return
        make_grid = self.grid_fn or (lambda p: overlay_grid(p, self.threshold))
        grid = make_grid(preview) if preview is not None else None
        if grid is not None:
            path = self.log_dir / f"preview_epoch{epoch + 1:03d}.png"
            ok, png = cv2.imencode(".png", cv2.cvtColor(grid, cv2.COLOR_RGB2BGR))
            if not ok:
                raise RuntimeError(f"{path}: PNG encoding failed")
            write_bytes_atomic(path, png.tobytes())
        if self.writer is not None:
            for key in ("train_loss", "valid_loss", "valid_dice", "valid_miou", "valid_accuracy", "lr"):
                if key in metrics:
                    self.writer.add_scalar(key, metrics[key], epoch + 1)
            if grid is not None:
                self.writer.add_image("valid/image_truth_prediction", grid, epoch + 1, dataformats="HWC")
            self.writer.flush()

    def _close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def on_train_end(self, trainer: Any) -> None:
        self._close()

    def on_exception(self, trainer: Any, exc: BaseException) -> None:
        self._close()
