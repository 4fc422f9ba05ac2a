"""Competition constants and the file-name conventions of the Carvana layout.

A Carvana-layout folder holds::

    train/<car>_<angle>.jpg                 1918x1280 RGB JPEG (angle 01..16)
    train_masks/<car>_<angle>_mask.gif      palette GIF, values 0/1
    train_masks.csv                         img,rle_mask
    test/<car>_<angle>.jpg
    sample_submission.csv                   img,rle_mask (names of the test images)
    metadata.csv                            id,year,make,model,trim1,trim2
"""

from __future__ import annotations

from pathlib import Path

COMPETITION = "carvana-image-masking-challenge"
ORIG_HEIGHT = 1280
ORIG_WIDTH = 1918
ORIG_SHAPE = (ORIG_HEIGHT, ORIG_WIDTH)  # (rows, cols) of every image and mask
ANGLES_PER_CAR = 16
# Native resolution: the original frame padded from 1918 to 1920 columns (a multiple of 64),
# never resized. Predictions at this size are cropped back to ORIG_SHAPE, not resampled.
NATIVE_INPUT = (1280, 1920)


def is_native(hw: tuple[int, int]) -> bool:
    """True for the native input size (pad the original frame instead of resizing it)."""
    return tuple(hw) == NATIVE_INPUT
SUBMISSION_HEADER = ("img", "rle_mask")


def car_id(image_name: str | Path) -> str:
    """'00087a6bd4dc_01.jpg' (or a path to it) -> '00087a6bd4dc'."""
    stem = Path(image_name).stem
    car, sep, _angle = stem.rpartition("_")
    if not sep or not car:
        raise ValueError(f"{image_name}: not a Carvana image name '<car>_<angle>.jpg'")
    return car


def mask_path_for(image_path: Path, masks_dir: Path) -> Path:
    """train/<car>_<angle>.jpg -> <masks_dir>/<car>_<angle>_mask.gif."""
    return masks_dir / f"{Path(image_path).stem}_mask.gif"
