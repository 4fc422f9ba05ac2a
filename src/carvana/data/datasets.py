"""Train / test datasets: items for the loaders, and the true masks they are trained on.

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
full decode followed by :func:`carvana.data.resizing.resize`), then brought to the input size
by :mod:`carvana.data.resizing`; :mod:`carvana.data.image_tensors` makes them tensors.
A mask comes from ``train_masks.csv`` where it has the image's row, else from its GIF
(:func:`true_mask`). Augmentation (:func:`train_augmentation`) runs at network resolution.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Mapping, Sequence

import albumentations as A
import cv2
import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

# Helpers that live in jpeg, resizing and image_tensors are imported here too, where older code and
# the pipeline find them. The items look them up on this module, so a test or bench/loader.py can
# wrap one here (e.g. read_image, image_to_tensor).
from carvana.data.image_tensors import (MEAN, STD, image_to_tensor, mirror_pad, normalize_images,  # noqa: F401
                                        tensor_to_image)
from carvana.data.jpeg import (ImageReadError, decode_scale, decoded_size, jpeg_size, jpeg_truncated,  # noqa: F401
                               read_for_input, read_image)
from carvana.data.mask_table import MASK_TABLE, mask_from_rle
from carvana.data.resizing import (check_native_frame, fit_decoded, fit_to_input, resize, resize_decoded,  # noqa: F401
                                   resize_interpolation, resize_mask)
from carvana.data.sampling import sample_seed


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

