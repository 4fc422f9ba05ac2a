"""A fixed colour palette for class-id masks, and a legend that names the classes.

Used by the multi-class previews (training) and the indexed-palette PNGs that prediction
writes: the same class always has the same colour, in every run and every file.
"""

from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np

def _voc_colour(i: int) -> tuple[int, int, int]:
    r = g = b = 0
    for shift in range(8):
        r |= ((i >> 0) & 1) << (7 - shift)
        g |= ((i >> 1) & 1) << (7 - shift)
        b |= ((i >> 2) & 1) << (7 - shift)
        i >>= 3
    return r, g, b


# Class c gets Pascal VOC colour c + 1 (a de-facto standard of well-separated colours; VOC's
# colour 0 is black, which would hide class 0 in overlays); 255 (ignore) is white.
PALETTE = np.array([_voc_colour(i + 1) for i in range(256)], dtype=np.uint8)
PALETTE[255] = (255, 255, 255)


def colorize(labels: np.ndarray) -> np.ndarray:
    """(H, W) class ids -> (H, W, 3) uint8 RGB in the fixed palette."""
    return PALETTE[np.asarray(labels, dtype=np.uint8)]


def palette_bytes() -> list[int]:
    """The palette as PIL's ``putpalette`` wants it (768 ints)."""
    return PALETTE.ravel().tolist()


def legend(class_names: Sequence[str], width: int, row_height: int = 16) -> np.ndarray:
    """An RGB strip ``width`` wide: a colour swatch and the name of each class, wrapped into rows."""
    entries = [f"{i} {name}" for i, name in enumerate(class_names)]
    cell = max(90, max((len(e) for e in entries), default=1) * 7 + row_height + 6)
    per_row = max(1, width // cell)
    rows = (len(entries) + per_row - 1) // per_row
    strip = np.full((max(rows, 1) * row_height, width, 3), 255, np.uint8)
    for i, text in enumerate(entries):
        y, x = (i // per_row) * row_height, (i % per_row) * cell
        strip[y + 2:y + row_height - 2, x + 2:x + row_height - 2] = PALETTE[i]
        cv2.putText(strip, text, (x + row_height + 2, y + row_height - 4), cv2.FONT_HERSHEY_SIMPLEX, 0.35,
                    (0, 0, 0), 1, cv2.LINE_AA)
    return strip


def label_grid(images: np.ndarray, truths: np.ndarray, preds: np.ndarray, class_names: Sequence[str]) -> np.ndarray:
    """Rows of image | truth | prediction (palette colours blended over the image), legend below."""
    rows = []
    for image, truth, pred in zip(images, truths, preds):
        blend = [(0.4 * image + 0.6 * colorize(lab)).astype(np.uint8) for lab in (truth, pred)]
        rows.append(np.concatenate([image, *blend], axis=1))
    grid = np.concatenate(rows, axis=0)
    return np.concatenate([grid, legend(class_names, grid.shape[1])], axis=0)
