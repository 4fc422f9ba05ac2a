"""Turn network-resolution probabilities into competition-resolution masks.

One function serves both the validation metric and the submission writer, so
the Dice reported during training is computed on exactly the masks that would
be submitted.
"""

from __future__ import annotations

import cv2
import numpy as np

from carvana.data.layout import NATIVE_INPUT, ORIG_HEIGHT, ORIG_WIDTH


def crop_native(probs):
    """Maps (..., 1280, 1920) of a native-resolution model -> (..., 1280, 1918): the padding
    (right columns, see datasets.fit_to_input) is dropped; any other size is returned as is.
    Works on numpy arrays and torch tensors alike (a view, no copy)."""
    if tuple(probs.shape[-2:]) == NATIVE_INPUT:
        return probs[..., :ORIG_HEIGHT, :ORIG_WIDTH]
    return probs


def upsample_mask(prob: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Bilinearly upsample a (h, w) probability map to (1280, 1918), then threshold.

    A native-resolution (1280, 1920) map is cropped instead (:func:`crop_native`).

    cv2's INTER_LINEAR uses half-pixel centres, i.e. the same sampling as
    ``torch.nn.functional.interpolate(..., mode="bilinear", align_corners=False)``,
    and is ~6x faster than torch on the CPU (about 1 ms per mask on one core).
    Returns a C-contiguous bool array.
    """
    return upsample_probs(prob) > threshold


def upsample_probs(prob: np.ndarray) -> np.ndarray:
    """The float32 (1280, 1918) probabilities :func:`upsample_mask` thresholds (crop or bilinear)."""
    if prob.ndim != 2:
        raise ValueError(f"expected a (h, w) probability map, got shape {prob.shape}")
    prob = crop_native(prob)  # a native-resolution map needs no resampling at all
    prob = np.ascontiguousarray(prob, dtype=np.float32)
    if prob.shape != (ORIG_HEIGHT, ORIG_WIDTH):
        prob = cv2.resize(prob, (ORIG_WIDTH, ORIG_HEIGHT), interpolation=cv2.INTER_LINEAR)
    return prob
