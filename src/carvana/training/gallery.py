"""Error gallery: the worst out-of-fold images with their errors coloured.

Each entry is one row: the photo, and the photo dimmed with the prediction coloured by
outcome at full resolution (then shrunk): true positive green, false positive red
(predicted car, is background), false negative blue (car the model missed). The image's
name and Dice are written on it; a legend sits on top.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from carvana.data.files import write_bytes_atomic

TP_COLOUR = (40, 200, 40)  # RGB
FP_COLOUR = (255, 30, 30)
FN_COLOUR = (30, 110, 255)
LEGEND = (("true positive: car, found", TP_COLOUR), ("false positive: predicted car, is background", FP_COLOUR),
          ("false negative: car, missed", FN_COLOUR))


@dataclass
class GalleryEntry:
    name: str
    image: np.ndarray  # (H, W, 3) uint8 RGB at 1280x1918
    pred: np.ndarray  # (H, W) bool
    truth: np.ndarray  # (H, W) bool
    dice: float


def error_overlay(image: np.ndarray, pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """The image at half brightness with TP / FP / FN pixels blended with their colours."""
    out = (image.astype(np.float32) * 0.5)
    for where, colour in ((pred & truth, TP_COLOUR), (pred & ~truth, FP_COLOUR), (~pred & truth, FN_COLOUR)):
        out[where] = 0.3 * image[where] + 0.7 * np.array(colour, np.float32)
    return out.astype(np.uint8)


def _text(panel: np.ndarray, text: str, org: tuple[int, int], scale: float = 0.7) -> None:
    """White text with a black outline, readable on any background (draws in place, RGB)."""
    cv2.putText(panel, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 4, cv2.LINE_AA)
    cv2.putText(panel, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 2, cv2.LINE_AA)


def render_gallery(entries: Sequence[GalleryEntry], scale: float = 1 / 3) -> np.ndarray:
    """One row per entry: photo | coloured errors, shrunk by ``scale``; legend on top. RGB uint8."""
    if not entries:
        raise ValueError("no images for the error gallery")
    rows = []
    for e in entries:
        h, w = e.truth.shape
        size = (round(w * scale), round(h * scale))
        # INTER_AREA averages: a one-pixel error stays visible as a tint instead of vanishing.
        photo = cv2.resize(e.image, size, interpolation=cv2.INTER_AREA)
        errors = cv2.resize(error_overlay(e.image, e.pred, e.truth), size, interpolation=cv2.INTER_AREA)
        _text(photo, e.name, (10, 28))
        _text(errors, f"Dice {e.dice:.4f}", (10, 28))
        fp, fn = int(np.count_nonzero(e.pred & ~e.truth)), int(np.count_nonzero(~e.pred & e.truth))
        _text(errors, f"FP {fp} px  FN {fn} px", (10, size[1] - 12), 0.6)
        rows.append(np.concatenate([photo, np.full((size[1], 4, 3), 255, np.uint8), errors], axis=1))
        rows.append(np.full((4, rows[-1].shape[1], 3), 255, np.uint8))
    body = np.concatenate(rows[:-1], axis=0)
    legend = np.full((44, body.shape[1], 3), 30, np.uint8)
    x = 10
    for label, colour in LEGEND:
        cv2.rectangle(legend, (x, 10), (x + 24, 34), colour, -1)
        cv2.putText(legend, label, (x + 32, 29), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (255, 255, 255), 1, cv2.LINE_AA)
        x += 44 + cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, 0.55, 1)[0][0]
    return np.concatenate([legend, body], axis=0)


def write_gallery(entries: Sequence[GalleryEntry], path: Path, scale: float = 1 / 3) -> Path:
    """Render and write the gallery PNG atomically; returns ``path``."""
    path = Path(path)
    ok, png = cv2.imencode(".png", cv2.cvtColor(render_gallery(entries, scale), cv2.COLOR_RGB2BGR))
    if not ok:
        raise RuntimeError(f"{path}: PNG encoding failed")
    write_bytes_atomic(path, png.tobytes())
    return path
