"""upsampled_rle: the submission's RLE straight from the network-size map, the same mask as
upsampling to 1918x1280, thresholding and encoding."""

from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from carvana.data.layout import NATIVE_INPUT, ORIG_SHAPE
from carvana.data.postprocess import upsample_mask, upsample_probs, upsampled_rle
from carvana.data.rle import rle_decode, rle_encode

REAL_MASKS = Path(__file__).resolve().parents[2] / "shared" / "carvana-sample" / "train_masks.csv"
SIZES = [(128, 192), (256, 384), (320, 448), (64, 96), (100, 150), (1280, 640), (40, 1000)]


def plain(prob: np.ndarray, threshold: float) -> str:
    return rle_encode(upsample_mask(prob, threshold))


def assert_same_mask(prob: np.ndarray, threshold: float = 0.5) -> int:
    """upsampled_rle's mask is upsample_mask's, except pixels whose upsampled value lies within
    float rounding of the threshold (the two sum the row and column passes in another order);
    returns how many pixels differ (a well-formed RLE either way)."""
    fast = upsampled_rle(prob, threshold)
    if fast == plain(prob, threshold):
        return 0
    differ = rle_decode(fast, ORIG_SHAPE) != upsample_mask(prob, threshold)
    values = upsample_probs(prob)[differ]
    assert np.abs(values - np.float32(threshold)).max() <= 1e-6, values
    assert differ.sum() <= 4, differ.sum()
    return int(differ.sum())


def network_like(mask: np.ndarray, hw: tuple[int, int], rng: np.random.Generator, noise: float) -> np.ndarray:
    """A (h, w) probability map as a network would give for ``mask``: area-downsampled, blurred, noisy."""
    small = cv2.GaussianBlur(cv2.resize(mask.astype(np.float32), hw[::-1], interpolation=cv2.INTER_AREA), (5, 5), 0)
    return np.clip(small * rng.uniform(0.8, 1.2) + rng.normal(0, noise, small.shape), 0, 1).astype(np.float32)


def car_like(rng: np.random.Generator) -> np.ndarray:
    mask = np.zeros(ORIG_SHAPE, np.uint8)
    cx, cy = rng.integers(700, 1200), rng.integers(500, 800)
    cv2.ellipse(mask, (int(cx), int(cy)), (int(rng.integers(300, 800)), int(rng.integers(150, 400))), 0, 0, 360, 1, -1)
    cv2.rectangle(mask, (int(cx) - 300, int(cy) - 350), (int(cx) + 250, int(cy)), 1, -1)
    return mask


@pytest.mark.parametrize("hw", SIZES)
def test_the_same_runs_as_upsampling_then_encoding(hw):
    rng = np.random.default_rng(sum(hw))
    differing = 0
    for k in range(12):
        prob = network_like(car_like(rng), hw, rng, noise=(0.0, 0.05, 0.3)[k % 3])
        for threshold in (0.3, 0.5, 0.7):
            differing += assert_same_mask(prob, threshold)
    assert differing <= 3  # of 36 masks of 2.45 million pixels


def test_many_crossings_per_row_and_crossings_that_cancel():
    rng = np.random.default_rng(1)
    for hw in [(128, 192), (64, 96), (16, 1900)]:
        for _ in range(5):  # white noise: crossings in neighbouring segments, values near the threshold
            assert_same_mask(rng.random(hw, dtype=np.float32))
        stripes = np.tile(np.array([0.0, 1.0, 0.45, 0.55], np.float32), (hw[0], hw[1] // 4 + 1))[:, : hw[1]]
        assert upsampled_rle(stripes, 0.5) == plain(stripes, 0.5)


def test_edge_cases():
    for prob in (np.zeros((128, 192), np.float32), np.ones((128, 192), np.float32),
                 np.full((128, 192), 0.5, np.float32)):  # exactly at the threshold: not set
        assert upsampled_rle(prob, 0.5) == plain(prob, 0.5)
    assert upsampled_rle(np.full((128, 192), 0.5, np.float32)) == ""
    assert upsampled_rle(np.ones((128, 192), np.float32)) == f"1 {ORIG_SHAPE[0] * ORIG_SHAPE[1]}"
    last_pixel = np.zeros((128, 192), np.float32)
    last_pixel[-1, -1] = 1.0  # a run that ends at the last pixel
    assert upsampled_rle(last_pixel) == plain(last_pixel, 0.5) != ""
    with pytest.raises(ValueError, match="expected a \\(h, w\\)"):
        upsampled_rle(np.zeros((1, 128, 192), np.float32))


def test_full_width_maps_take_the_plain_path():
    rng = np.random.default_rng(2)
    native = rng.random(NATIVE_INPUT, dtype=np.float32)  # native input: cropped, not resampled
    assert upsampled_rle(native) == plain(native, 0.5) == rle_encode(native[:, : ORIG_SHAPE[1]] > 0.5)
    full = rng.random(ORIG_SHAPE, dtype=np.float32)
    assert upsampled_rle(full) == rle_encode(full > 0.5)


@pytest.mark.skipif(not REAL_MASKS.is_file(), reason="../shared/carvana-sample is absent")
def test_real_car_masks_at_the_input_sizes_the_pipeline_uses():
    rows = pd.read_csv(REAL_MASKS).head(24)
    rng = np.random.default_rng(3)
    differing = 0
    for rle in rows["rle_mask"]:
        mask = rle_decode(rle, ORIG_SHAPE)
        for hw in [(128, 192), (256, 384), (320, 448), (512, 768), (1024, 1024)]:
            differing += assert_same_mask(network_like(mask, hw, rng, noise=0.02))
    assert differing <= 2  # of 120 real-car masks
