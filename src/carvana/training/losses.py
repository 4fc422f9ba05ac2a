"""The training losses (BCE + soft Dice; the Lovász hinge for --lovasz) and the competition Dice metric.

The losses work on torch logits at network resolution. The metric works on
numpy arrays at competition resolution (1280x1918), after the same
upsample-and-threshold step the submission uses (:mod:`carvana.postprocess`),
and scores each image on its own, as Kaggle does: the leaderboard number is
the mean of per-image Dice coefficients, not one Dice over all pixels pooled.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from carvana.data.layout import ORIG_SHAPE
from carvana.data.postprocess import upsample_mask


def soft_dice_per_image(
    logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0
) -> torch.Tensor:
    """Soft Dice of ``sigmoid(logits)`` against ``target``, one value per image.

    For each sample ``b`` (sums over C, H, W)::

        dice_b = (2 * sum(p * t) + eps) / (sum(p) + sum(t) + eps)

    ``eps`` smooths the ratio: an image whose target is empty and whose
    prediction is (near) empty scores (near) 1 instead of 0/0, and the gradient
    stays finite. Computed in float32 whatever the input dtype. Returns (B,).
    """
    if logits.shape != target.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} differ")
    probs = torch.sigmoid(logits.float()).flatten(1)
    target = target.float().flatten(1)
    intersection = (probs * target).sum(dim=1)
    total = probs.sum(dim=1) + target.sum(dim=1)
    return (2.0 * intersection + eps) / (total + eps)


def boundary_weights(target: torch.Tensor, band: int, weight: float) -> torch.Tensor:
    """Per-pixel loss weights: ``weight`` on a band around the mask's edge, 1 elsewhere.

    A pixel is in the band when the (2*band+1)-square average of the mask around it is
    strictly between 0 and 1, i.e. both car and background lie within ``band`` pixels
    (Chebyshev distance) of it: a band of about ``band`` pixels on each side of the
    edge. The average ignores the zero padding at the image border, so the border
    itself is not an edge. Takes and returns (B, 1, H, W) float32.
    """
    if band < 1:
        raise ValueError(f"boundary band must be >= 1 pixel, got {band}")
    target = target.float()
    avg = F.avg_pool2d(target, kernel_size=2 * band + 1, stride=1, padding=band, count_include_pad=False)
    # 1e-6 margins: the average of 0/1 values is exact up to float rounding.
    edge = (avg > 1e-6) & (avg < 1 - 1e-6)
    return 1.0 + (weight - 1.0) * edge.float()


def weighted_soft_dice_per_image(logits: torch.Tensor, target: torch.Tensor, weights: torch.Tensor,
                                 eps: float = 1.0) -> torch.Tensor:
    """:func:`soft_dice_per_image` with each pixel counted ``weights`` times. Returns (B,)."""
    probs = torch.sigmoid(logits.float()).flatten(1)
    target, weights = target.float().flatten(1), weights.flatten(1)
    intersection = (weights * probs * target).sum(dim=1)
    total = (weights * probs).sum(dim=1) + (weights * target).sum(dim=1)
    return (2.0 * intersection + eps) / (total + eps)


class BCEDiceLoss(nn.Module):
    """``bce_weight * BCE-with-logits + dice_weight * (1 - mean per-image soft Dice)``.

    BCE is the mean over all pixels. The Dice term averages per-image Dice
    (see :func:`soft_dice_per_image`), matching how the competition scores.
    Both terms are computed in float32 with autocast disabled: the pixel sums
    of a 1024x1024 mask (up to ~1e6) would overflow float16 (max 65504).

    ``boundary_weight`` W > 1 weights the pixels of a ``boundary_band``-pixel band around
    the true mask's edge W times (:func:`boundary_weights`): BCE becomes the weighted
    mean ``sum(w * bce) / sum(w)`` per batch (same scale as the plain mean), and with
    ``boundary_dice`` the Dice term counts those pixels W times too. W = 1 is the plain loss.
    """

    name = "bce+dice"  # what a metrics row calls it (training/epoch.py)

    def __init__(self, bce_weight: float = 1.0, dice_weight: float = 1.0, eps: float = 1.0,
                 boundary_weight: float = 1.0, boundary_band: int = 3, boundary_dice: bool = False) -> None:
        super().__init__()
        if boundary_weight < 1.0:
            raise ValueError(f"boundary_weight must be >= 1 (1 = off), got {boundary_weight}")
        self.bce_weight = bce_weight
        self.dice_weight = dice_weight
        self.eps = eps
        self.boundary_weight = boundary_weight
        self.boundary_band = boundary_band
        self.boundary_dice = boundary_dice

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if logits.shape != target.shape:
            raise ValueError(
                f"logits {tuple(logits.shape)} and target {tuple(target.shape)} differ"
            )
        with torch.autocast(device_type=logits.device.type, enabled=False):
            logits = logits.float()
            target = target.float()
            if self.boundary_weight == 1.0:
                bce = F.binary_cross_entropy_with_logits(logits, target)
                dice = soft_dice_per_image(logits, target, eps=self.eps).mean()
            else:
                w = boundary_weights(target, self.boundary_band, self.boundary_weight)
                bce = (F.binary_cross_entropy_with_logits(logits, target, reduction="none") * w).sum() / w.sum()
                dice = (weighted_soft_dice_per_image(logits, target, w, self.eps) if self.boundary_dice
                        else soft_dice_per_image(logits, target, eps=self.eps)).mean()
            return self.bce_weight * bce + self.dice_weight * (1.0 - dice)


def lovasz_hinge(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image Lovász hinge loss (Berman, Triki & Blaschko, CVPR 2018), averaged over the batch.

    For each image, with signs s = 2y - 1 and hinge errors e = 1 - logit * s, the pixels are
    sorted by error (descending) and ``sum(relu(e_sorted) * g)``, where ``g`` is the gradient of
    the Jaccard loss along that order: the Lovász extension of the Jaccard loss at relu(e), a
    convex surrogate of 1 - IoU. As the reference ``lovasz_hinge(per_image=True)``: an image with
    an empty true mask gets ``g = (1, 0, ..., 0)``, i.e. the relu of its largest error. Targets
    above 0.5 are car (soft pseudo-labels are hardened). Computed in float32 with autocast off,
    all images at once (one sort per row). Takes (B, ...) logits and targets; returns a scalar.
    """
    if logits.shape != target.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} differ")
    with torch.autocast(device_type=logits.device.type, enabled=False):
        logits = logits.float().flatten(1)
        labels = (target.flatten(1) > 0.5).float()
        errors = 1.0 - logits * (2.0 * labels - 1.0)
        errors_sorted, order = torch.sort(errors, dim=1, descending=True)
        gt_sorted = labels.gather(1, order)
        # Jaccard loss of the first k pixels in error order, for every k (exact counts in fp32 up to 2^24 pixels).
        positives = gt_sorted.sum(dim=1, keepdim=True)
        intersection = positives - gt_sorted.cumsum(dim=1)
        union = positives + (1.0 - gt_sorted).cumsum(dim=1)  # >= 1: never 0/0
        jaccard = 1.0 - intersection / union
        grad = torch.cat([jaccard[:, :1], jaccard[:, 1:] - jaccard[:, :-1]], dim=1)
        return (F.relu(errors_sorted) * grad).sum(dim=1).mean()


class LovaszHingeLoss(nn.Module):
    """:func:`lovasz_hinge` as a loss module: what ``--lovasz`` fine-tunes with instead of BCE + Dice."""

    name = "lovasz"

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return lovasz_hinge(logits, target)


def _as_bool_mask(a: np.ndarray, name: str) -> np.ndarray:
    """Non-zero is foreground; float arrays must hold only 0 and 1 (not probabilities)."""
    a = np.asarray(a)
    if a.dtype == np.bool_:
        return a
    if np.issubdtype(a.dtype, np.floating) and np.any((a != 0) & (a != 1)):
        raise ValueError(
            f"{name}: float masks must contain only 0 and 1; threshold probabilities first"
        )
    return a != 0


def dice_per_image(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Kaggle's Dice, ``2|A and B| / (|A| + |B|)``, per image; both empty scores 1.0.

    Takes (N, H, W) or (H, W) masks (bool, or integer/float 0-1; non-zero is
    foreground) and returns float64 (N,) or a 0-d array respectively. Counting
    with ``np.count_nonzero`` on bool arrays is several times faster than float
    sums at 1280x1918.
    """
    pred = _as_bool_mask(pred, "pred")
    truth = _as_bool_mask(truth, "truth")
    if pred.shape != truth.shape:
        raise ValueError(f"pred {pred.shape} and truth {truth.shape} differ")
    if pred.ndim not in (2, 3):
        raise ValueError(f"expected (N, H, W) or (H, W) masks, got shape {pred.shape}")
    single = pred.ndim == 2
    if single:
        pred, truth = pred[None], truth[None]
    scores = np.empty(len(pred), dtype=np.float64)
    # A per-image loop: count_nonzero without an axis is the fast path.
    for i, (p, t) in enumerate(zip(pred, truth)):
        total = np.count_nonzero(p) + np.count_nonzero(t)
        scores[i] = 1.0 if total == 0 else 2.0 * np.count_nonzero(p & t) / total
    return scores[0, ...] if single else scores


def _drop_channel_axis(a: np.ndarray, name: str) -> np.ndarray:
    """(N, 1, H, W) -> (N, H, W); (N, H, W) unchanged; anything else is an error."""
    a = np.asarray(a)
    if a.ndim == 4 and a.shape[1] == 1:
        a = a[:, 0]
    if a.ndim != 3:
        raise ValueError(f"{name}: expected (N, H, W) or (N, 1, H, W), got shape {a.shape}")
    return a


def competition_dice(
    probs: np.ndarray, truths: np.ndarray, threshold: float = 0.5
) -> np.ndarray:
    """Per-image competition Dice of network probabilities against full-size truths.

    ``probs`` (N, h, w) float probabilities at any resolution are upsampled and
    thresholded by :func:`carvana.postprocess.upsample_mask` (exactly as for
    the submission), then scored against ``truths`` (N, 1280, 1918) with
    :func:`dice_per_image`. A channel axis of size 1 is accepted on either.
    Returns float64 (N,); its mean is the leaderboard score.
    """
    probs = _drop_channel_axis(probs, "probs")
    truths = _drop_channel_axis(truths, "truths")
    if len(probs) != len(truths):
        raise ValueError(f"{len(probs)} probability maps but {len(truths)} truth masks")
    if truths.shape[1:] != ORIG_SHAPE:
        raise ValueError(f"truths must be {ORIG_SHAPE} masks, got {truths.shape[1:]}")
    scores = np.empty(len(probs), dtype=np.float64)
    for i, (prob, truth) in enumerate(zip(probs, truths)):
        scores[i] = dice_per_image(upsample_mask(prob, threshold), truth)
    return scores
