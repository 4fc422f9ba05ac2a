"""Bringing a decoded frame, or its 0/1 mask, to the network input size.

Resizing picks its interpolation by how much it shrinks (:func:`resize_interpolation`); a
DCT-reduced decode is resized with the full frame's exact geometry (:func:`resize_decoded`); at
the native input size (1280x1920) the 1918-wide frame is padded by reflection instead, never
resized (:func:`fit_to_input`), so :func:`carvana.data.postprocess.crop_native` undoes it exactly.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from carvana.data.jpeg import ImageReadError, decoded_size
from carvana.data.layout import NATIVE_INPUT, ORIG_SHAPE, is_native


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

