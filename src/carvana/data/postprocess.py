"""Turn network-resolution probabilities into competition-resolution masks.

One function serves both the validation metric and the submission writer, so
the Dice reported during training is computed on exactly the masks that would
be submitted.
"""

from __future__ import annotations

import cv2
import numpy as np

from carvana.data.layout import ORIG_HEIGHT, ORIG_WIDTH


def upsample_mask(prob: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Bilinearly upsample a (h, w) probability map to (1280, 1918), then threshold.

    cv2's INTER_LINEAR uses half-pixel centres, i.e. the same sampling as
    ``torch.nn.functional.interpolate(..., mode="bilinear", align_corners=False)``,
    and is ~6x faster than torch on the CPU (about 1 ms per mask on one core).
    Returns a C-contiguous bool array.
    """
    if prob.ndim != 2:
        raise ValueError(f"expected a (h, w) probability map, got shape {prob.shape}")
    prob = np.ascontiguousarray(prob, dtype=np.float32)
    if prob.shape != (ORIG_HEIGHT, ORIG_WIDTH):
        prob = cv2.resize(prob, (ORIG_WIDTH, ORIG_HEIGHT), interpolation=cv2.INTER_LINEAR)
    return prob > threshold
