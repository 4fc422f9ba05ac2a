"""Train / test datasets: OpenCV JPEG decoding, GIF masks, resize, albumentations.

Each item is a dict so the default collate keeps names next to tensors:

* TrainImageDataset -> {"image": (3,H,W) uint8 RGB, "mask": (1,H,W) uint8 0/1,
  "name": str} and, with ``full_masks=True`` (validation), "full_mask":
  (1280,1918) uint8 for the competition metric at the original resolution.

Items stay uint8: a float32 1024x1024 image costs ~17 ms to pass from a worker process
and 4x the host-to-GPU bandwidth; ``normalize_images`` turns the batch into normalised
float32 on the device instead (the classifier does this).
* TestImageDataset  -> {"image", "name", "ok": bool}; an unreadable test image
  gives a zero image with ok=False and a warning naming it, because Kaggle
  rejects a submission with a row missing (the classifier predicts an empty mask).

JPEGs are decoded at the DCT scale :func:`carvana.data.jpeg.decode_scale` picks for the
input size (``fast_decode=True``, the default) or in full (``fast_decode=False``: exactly a
full decode followed by :func:`resize`), then resized by :func:`resize_decoded`.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Mapping, Sequence

import albumentations as A
import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

# The JPEG readers live in carvana.data.jpeg; imported here too, where older code finds them.
from carvana.data.jpeg import (ImageReadError, decode_scale, decoded_size, jpeg_reduction, jpeg_size,  # noqa: F401
                               jpeg_truncated, read_for_input, read_image)
from carvana.data.mask_table import MASK_TABLE, mask_from_rle
from carvana.data.sampling import sample_seed
from carvana.data.layout import NATIVE_INPUT, ORIG_SHAPE, is_native

# ImageNet statistics: a standard, harmless choice for normalising RGB inputs.
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32) * 255
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32) * 255

def read_mask(path: Path) -> np.ndarray:
    """Read a Carvana GIF mask as uint8 0/1 (H, W)."""
    if not Path(path).is_file():
        raise ImageReadError(f"{path}: mask file missing")
    try:
        with Image.open(path) as im:
            mask = np.asarray(im.convert("L") if im.mode not in ("P", "L", "1") else im)
    except (OSError, SyntaxError) as exc:
        raise ImageReadError(f"{path}: not a readable mask image ({exc})") from exc
    return (mask > 0).astype(np.uint8)


def true_mask(image_path: Path, mask_path: Path, mask_rles: Mapping[str, str] | None = None,
              image_hw: tuple[int, int] | None = None) -> np.ndarray:
    """An image's true 0/1 mask: its ``train_masks.csv`` row where the table has one (decoded at
    the image's size: same values as the GIF, faster), else its GIF."""
    rle = (mask_rles or {}).get(Path(image_path).name)
    if rle is None:
        return read_mask(mask_path)
    table = getattr(mask_rles, "path", MASK_TABLE)
    return mask_from_rle(rle, image_hw or jpeg_size(image_path), f"{table}, row {Path(image_path).name}")


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


def resize_interpolation(src_hw: tuple[int, int], dst_hw: tuple[int, int]) -> int:
    """INTER_LINEAR when shrinking by less than 2x in both axes, else INTER_AREA.

    Below 2x, bilinear sampling already reads every source pixel, so area averaging adds
    next to no anti-aliasing (0.2-0.3 grey levels mean difference on Carvana images, under
    0.01% of mask pixels) at ~8x its cost: 1918x1280 -> 1024x1024 takes ~24 ms with INTER_AREA,
    ~3 ms with INTER_LINEAR. Stronger shrinking (small inputs) keeps INTER_AREA.
    """
    if src_hw[0] < 2 * dst_hw[0] and src_hw[1] < 2 * dst_hw[1]:
        return cv2.INTER_LINEAR
    return cv2.INTER_AREA


def resize(image: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Resize an image to ``hw`` (H, W) with :func:`resize_interpolation`."""
    h, w = hw
    return cv2.resize(image, (w, h), interpolation=resize_interpolation(image.shape[:2], hw))


def resize_decoded(image: np.ndarray, hw: tuple[int, int], orig_hw: tuple[int, int]) -> np.ndarray:
    """Resize an image decoded from an ``orig_hw`` frame, possibly DCT-reduced, to ``hw`` (H, W).

    A full-size image goes through :func:`resize`, unchanged. A reduced one (1/s of the frame,
    each side rounded up: 1918 columns give 480 at 1/4, the last one covering 2 columns of
    the frame) is resized with the frame's exact geometry: the scale factors are
    ``hw * s / orig_hw`` (passed to cv2 as fx/fy) rather than ``hw / decoded size``, so every
    output pixel samples the same place of the frame as after a full decode; the extra row
    or column cv2 may round up to is cropped. Interpolation is :func:`resize_interpolation`'s
    on the decoded size (bilinear below a 2x shrink, area above): the closest to full decode +
    :func:`resize` of those measured (mean absolute differences: :mod:`carvana.data.jpeg`).
    """
    h, w = hw
    if tuple(image.shape[:2]) == tuple(orig_hw):
        return resize(image, hw)
    scale = next((s for s in (2, 4, 8) if decoded_size(orig_hw, s) == tuple(image.shape[:2])), None)
    if scale is None:
        raise ValueError(f"a {image.shape[1]}x{image.shape[0]} image is no DCT scale of a "
                         f"{orig_hw[1]}x{orig_hw[0]} frame")
    out = cv2.resize(image, None, fx=w * scale / orig_hw[1], fy=h * scale / orig_hw[0],
                     interpolation=resize_interpolation(image.shape[:2], hw))
    if out.shape[0] < h or out.shape[1] < w:  # rounding cannot make it smaller; never hand back a wrong size
        return cv2.resize(image, (w, h), interpolation=resize_interpolation(image.shape[:2], hw))
    return np.ascontiguousarray(out[:h, :w])


def resize_mask(mask: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Resize a 0/1 uint8 mask to ``hw`` (H, W); the result is 0/1 again.

    Resized as uint8, the interpolated value comes out rounded: the same pixels as a
    float resize thresholded at 0.5, without converting the full-resolution mask to float
    (exactly so for INTER_AREA; within 1e-3 of 0.5 for bilinear, which must be the
    INTER_LINEAR_EXACT variant: plain INTER_LINEAR rounds between its passes, which on
    0/1 values flips pixels interpolated as far as 0.17 from 0.5).
    """
    h, w = hw
    interpolation = resize_interpolation(mask.shape[:2], hw)
    if interpolation == cv2.INTER_LINEAR:
        interpolation = cv2.INTER_LINEAR_EXACT
    return cv2.resize(mask, (w, h), interpolation=interpolation)


def fit_to_input(image: np.ndarray, hw: tuple[int, int], mask: bool = False) -> np.ndarray:
    """An original-frame image or 0/1 mask at the network input size ``hw``.

    At the native size (1280x1920) the 1918-wide frame is padded on the right by
    reflection (cv2 BORDER_REFLECT_101, numpy's 'reflect'), never resized, so pixel (r, c)
    stays pixel (r, c) and :func:`carvana.data.postprocess.crop_native` undoes it exactly.
    Any other size is resized (:func:`resize` / :func:`resize_mask`).
    """
    if is_native(hw):
        h, w = image.shape[:2]
        if (h, w) != ORIG_SHAPE:
            raise ValueError(f"native input {NATIVE_INPUT} expects {ORIG_SHAPE} frames, got {h}x{w}")
        return cv2.copyMakeBorder(image, 0, hw[0] - h, 0, hw[1] - w, cv2.BORDER_REFLECT_101)
    return resize_mask(image, hw) if mask else resize(image, hw)


def fit_decoded(image: np.ndarray, hw: tuple[int, int], orig_hw: tuple[int, int]) -> np.ndarray:
    """:func:`fit_to_input` for an image decoded from an ``orig_hw`` frame, possibly DCT-reduced
    (native size: padded, and always decoded in full; else :func:`resize_decoded`)."""
    return fit_to_input(image, hw) if is_native(hw) else resize_decoded(image, hw, orig_hw)


def check_native_frame(path: Path, image: np.ndarray, hw: tuple[int, int]) -> None:
    """At the native input size, an ImageReadError (naming the file and its size) for an image
    that is not 1918x1280: padding needs the exact frame, so a test image gets an empty mask."""
    if is_native(hw) and image.shape[:2] != ORIG_SHAPE:
        raise ImageReadError(f"{path}: image is {image.shape[1]}x{image.shape[0]}, native-size prediction "
                             f"({NATIVE_INPUT[1]}x{NATIVE_INPUT[0]}) needs {ORIG_SHAPE[1]}x{ORIG_SHAPE[0]}")


def tensor_to_image(x: torch.Tensor) -> np.ndarray:
    """For previews: a uint8 or normalised float (3, H, W) image -> uint8 (H, W, 3)."""
    x = x.detach().cpu()
    if x.dtype == torch.uint8:
        return x.numpy().transpose(1, 2, 0).copy()
    rgb = x.float().numpy().transpose(1, 2, 0) * STD + MEAN
    return np.clip(rgb, 0, 255).astype(np.uint8)


def train_augmentation(seed: int | None = None, crop: tuple[int, int] | None = None,
                       augment: bool = True) -> A.Compose | None:
    """Joint image+mask augmentation at network resolution (cheaper than at 1918x1280).

    Small shifts/scales/rotations (cars sit centred on a turntable), horizontal flip
    (views are left/right symmetric in distribution), colour jitter (car paint varies).
    Masks use nearest-neighbour so they stay 0/1. ``crop`` (H, W) first takes a random
    crop of the network-resolution image and mask (at the native input size: of the full
    frame), so the rest runs on the crop; ``augment=False`` keeps only the crop.
    Returns None when there is nothing to do.
    """
    steps = [A.RandomCrop(*crop)] if crop else []
    if not augment:
        return A.Compose(steps, seed=seed) if steps else None
    return A.Compose(
        steps + [
            A.Affine(
                scale=(0.9, 1.1),
                translate_percent=(-0.0625, 0.0625),
                rotate=(-5, 5),
                interpolation=cv2.INTER_LINEAR,
                mask_interpolation=cv2.INTER_NEAREST,
                border_mode=cv2.BORDER_REFLECT_101,
                p=0.5,
            ),
            A.HorizontalFlip(p=0.5),
            A.HueSaturationValue(hue_shift_limit=10, sat_shift_limit=15, val_shift_limit=10, p=0.5),
        ],
        seed=seed,
    )


def seed_worker(worker_id: int) -> None:
    """DataLoader worker_init_fn: give each worker (and each epoch) its own augmentation
    stream. torch seeds worker ``i`` with base_seed + i, and base_seed is drawn from the
    loader's generator every epoch, so seeding albumentations from it is reproducible
    for a seeded generator and different per worker and per epoch."""
    info = torch.utils.data.get_worker_info()
    transform = getattr(info.dataset, "transform", None) if info else None
    if transform is not None:
        transform.set_random_seed(torch.initial_seed() % 2**32)


class TrainImageDataset(Dataset):
    """Train/valid images with their masks, resized to ``input_hw`` (H, W).

    ``mask_rles`` ({image name: RLE}, e.g. ``mask_table.load_mask_table``'s) is decoded
    instead of the GIF where it has the image's row (same values, faster); GIFs otherwise.
    ``fast_decode``: JPEGs decoded at the DCT scale for ``input_hw`` (see the module docstring).
    """

    def __init__(
        self,
        images: Sequence[Path],
        masks: Sequence[Path],
        input_hw: tuple[int, int],
        transform: A.Compose | None = None,
        full_masks: bool = False,
        seed: int = 0,
        mask_rles: Mapping[str, str] | None = None,
        fast_decode: bool = True,
    ) -> None:
        if len(images) != len(masks):
            raise ValueError(f"{len(images)} images but {len(masks)} masks")
        self.images, self.masks = list(images), list(masks)
        self.input_hw = tuple(input_hw)
        self.transform = transform
        self.full_masks = full_masks
        self.seed = seed  # with an (epoch, index) key: augmentation seeded from (seed, epoch, index)
        self.mask_rles = mask_rles or {}
        self.fast_decode = fast_decode

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        """Item ``key``; an ``(epoch, index)`` key (from EpochSampler) also fixes the augmentation."""
        epoch, i = key if isinstance(key, tuple) else (None, key)
        if epoch is not None and self.transform is not None:
            self.transform.set_random_seed(sample_seed(self.seed, epoch, i))
        image_path, mask_path = self.images[i], self.masks[i]
        image_hw = jpeg_size(image_path)
        if Path(image_path).name not in self.mask_rles and not Path(mask_path).is_file():
            raise ImageReadError(f"{image_path}: its mask {mask_path} is missing")
        full_mask = true_mask(image_path, mask_path, self.mask_rles, image_hw)
        # A size mismatch means a wrong or corrupt pair, which would silently misalign
        # the training target: refuse it, naming both files.
        if image_hw != full_mask.shape:
            raise ImageReadError(
                f"{mask_path}: mask is {full_mask.shape[1]}x{full_mask.shape[0]} but image {image_path} "
                f"is {image_hw[1]}x{image_hw[0]} (W x H)"
            )
        return self._item(image_path, image_hw, full_mask)

    def _item(self, image_path: Path, image_hw: tuple[int, int], full_mask: np.ndarray) -> dict:
        scale = decode_scale(image_hw, self.input_hw, self.fast_decode)
        image = fit_decoded(read_image(image_path, scale), self.input_hw, image_hw)
        mask = fit_to_input(full_mask, self.input_hw, mask=True)
        if self.transform is not None:
            out = self.transform(image=image, mask=mask)
            image, mask = out["image"], out["mask"]
        item = {
            "image": image_to_tensor(image),
            "mask": torch.from_numpy(np.ascontiguousarray(mask, dtype=np.uint8))[None],
            "name": Path(image_path).name,
        }
        if self.full_masks:
            item["full_mask"] = torch.from_numpy(full_mask)
        return item


class TestImageDataset(Dataset):
    """Test images resized to ``input_hw``; unreadable ones, and at the native size images that
    are not 1918x1280, give ok=False (an empty mask) and a warning naming the file. Each JPEG is
    decoded at the DCT scale for its own size (:func:`read_for_input`; in full with
    ``fast_decode=False``)."""

    __test__ = False  # not a pytest test class, despite the name

    def __init__(self, images: Sequence[Path], input_hw: tuple[int, int], fast_decode: bool = True) -> None:
        self.images = list(images)
        self.input_hw = tuple(input_hw)
        self.fast_decode = fast_decode

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        path = self.images[i]
        h, w = self.input_hw
        try:
            image, orig_hw = read_for_input(path, self.input_hw, self.fast_decode)
            check_native_frame(path, image, self.input_hw)
            image, ok = fit_decoded(image, self.input_hw, orig_hw), True
        except ImageReadError as exc:
            warnings.warn(f"{exc}; predicting an empty mask for it", stacklevel=1)
            image, ok = np.zeros((h, w, 3), np.uint8), False
        return {"image": image_to_tensor(image), "name": Path(path).name, "ok": ok}


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
