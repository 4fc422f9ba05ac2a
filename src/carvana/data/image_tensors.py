"""Images as tensors: uint8 (H, W, 3) <-> (3, H, W), normalisation on the device, mirror padding.

Items stay uint8 until they reach the device (a float32 1024x1024 image costs ~17 ms to pass
from a loader worker and 4x the host-to-GPU bandwidth): :func:`normalize_images` turns a batch
into normalised float32 there, with the model config's mean and std (ImageNet's by default).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

# ImageNet statistics: a standard, harmless choice for normalising RGB inputs.
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32) * 255
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32) * 255


def image_to_tensor(rgb: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> uint8 (3, H, W), contiguous (normalised later, on the device)."""
    return torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))


def normalize_images(x: torch.Tensor, mean: Sequence[float] = MEAN, std: Sequence[float] = STD) -> torch.Tensor:
    """A uint8 (B, 3, H, W) batch -> float32 (x - mean) / std, on x's device.

    ``mean``/``std`` are per channel on the 0..255 scale (the model config's; ImageNet's by
    default). A float batch is taken to be normalised already and returned as is.
    """
    if x.dtype != torch.uint8:
        return x
    mean = torch.as_tensor(np.asarray(mean, np.float32), device=x.device).view(1, 3, 1, 1)
    std = torch.as_tensor(np.asarray(std, np.float32), device=x.device).view(1, 3, 1, 1)
    return (x.float() - mean) / std


def tensor_to_image(x: torch.Tensor) -> np.ndarray:
    """For previews: a uint8 or normalised float (3, H, W) image -> uint8 (H, W, 3)."""
    x = x.detach().cpu()
    if x.dtype == torch.uint8:
        return x.numpy().transpose(1, 2, 0).copy()
    rgb = x.float().numpy().transpose(1, 2, 0) * STD + MEAN
    return np.clip(rgb, 0, 255).astype(np.uint8)


def mirror_pad(x: torch.Tensor, margin: int) -> torch.Tensor:
    """Mirror (reflect, edge not repeated) a (B, C, H, W) batch outwards by ``margin`` per side.

    torch's reflect padding needs pad < side, so a small image is mirrored in rounds, as
    the paper's overlap-tile strategy does at the image border.
    """
    left = margin
    while left > 0:
        step = min(left, x.shape[-1] - 1, x.shape[-2] - 1)
        if step < 1:
            raise ValueError(f"cannot mirror-pad a {x.shape[-2]}x{x.shape[-1]} image")
        x = F.pad(x, (step, step, step, step), mode="reflect")
        left -= step
    return x
