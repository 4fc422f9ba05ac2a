"""Native full resolution: pad 1918 -> 1920 (reflect), never resize; crop predictions back exactly."""

from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

from carvana.data.datasets import TestImageDataset, TrainImageDataset, fit_to_input, train_augmentation
from carvana.data.layout import NATIVE_INPUT, ORIG_SHAPE
from carvana.data.postprocess import crop_native, upsample_mask
from carvana.training.losses import competition_dice


def known_pair(tmp_path: Path, seed: int = 0) -> tuple[Path, Path, np.ndarray, np.ndarray]:
    """A lossless 'image' (PNG bytes under a .jpg name) whose pixels encode their position,
    and a mask with edges on odd columns, including the last two columns of the frame."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(ORIG_SHAPE, np.uint8)
    mask[101:877, 333:1917] = 1
    mask[rng.integers(0, 1280, 500), rng.integers(0, 1918, 500)] = 1  # isolated pixels: any shift shows
    rows, cols = np.indices(ORIG_SHAPE)
    image = np.stack([rows % 256, cols % 256, (rows // 256) * 40 + (cols // 256) * 4 + mask * 2], axis=-1).astype(np.uint8)
    image_path, mask_path = tmp_path / "car_01.jpg", tmp_path / "car_01_mask.gif"
    ok, png = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    image_path.write_bytes(png.tobytes())
    Image.fromarray(mask * 255).convert("1").save(mask_path)
    return image_path, mask_path, image, mask


def test_native_pad_then_crop_returns_the_mask_unchanged(tmp_path):
    image_path, mask_path, image, mask = known_pair(tmp_path)
    item = TrainImageDataset([image_path], [mask_path], NATIVE_INPUT, full_masks=True)[0]
    assert tuple(item["image"].shape) == (3, *NATIVE_INPUT) and tuple(item["mask"].shape) == (1, *NATIVE_INPUT)
    # No resampling: the first 1918 columns are the original pixels, the 2 extra ones reflect 1916, 1915.
    padded = item["image"].numpy().transpose(1, 2, 0)
    assert np.array_equal(padded[:, :1918], image)
    assert np.array_equal(padded[:, 1918], image[:, 1916]) and np.array_equal(padded[:, 1919], image[:, 1915])
    net_mask = item["mask"][0].numpy()
    assert np.array_equal(net_mask[:, :1918], mask)
    # A 'perfect prediction' at network resolution goes through crop + upsample_mask unchanged ...
    assert np.array_equal(upsample_mask(net_mask.astype(np.float32)), mask.astype(bool))
    assert competition_dice(net_mask[None].astype(np.float32), mask[None])[0] == 1.0
    # ... and the test loader pads the same way; crop_native undoes it on numpy and torch alike.
    test_item = TestImageDataset([image_path], NATIVE_INPUT)[0]
    assert torch.equal(test_item["image"], item["image"])
    t = torch.from_numpy(net_mask)[None].float()
    assert torch.equal(crop_native(t)[0], torch.from_numpy(mask).float())
    assert crop_native(np.zeros((2, 256, 384))).shape == (2, 256, 384)  # other sizes untouched


def test_random_crops_of_image_and_mask_stay_aligned(tmp_path):
    image_path, mask_path, image, mask = known_pair(tmp_path, seed=1)
    dataset = TrainImageDataset([image_path], [mask_path], NATIVE_INPUT, train_augmentation(7, (256, 320), augment=False))
    seen = set()
    for _ in range(5):
        item = dataset[0]
        crop, crop_mask = item["image"].numpy().transpose(1, 2, 0), item["mask"][0].numpy()
        assert crop.shape == (256, 320, 3) and crop_mask.shape == (256, 320)
        # The pixels say where they came from: recover the offset and compare with the frame.
        r0, c0 = int(crop[0, 0, 0]), int(crop[0, 0, 1])  # position mod 256
        full = fit_to_input(image, NATIVE_INPUT)
        full_mask = fit_to_input(mask, NATIVE_INPUT, mask=True)
        hits = [(r, c) for r in range(r0, 1280 - 255, 256) for c in range(c0, 1920 - 319, 256)
                if np.array_equal(full[r:r + 256, c:c + 320], crop)]
        assert len(hits) == 1
        r, c = hits[0]
        assert np.array_equal(full_mask[r:r + 256, c:c + 320], crop_mask)
        seen.add(hits[0])
    assert len(seen) > 1  # the crops are random


def test_other_sizes_still_resize(tmp_path):
    image_path, mask_path, _, _ = known_pair(tmp_path)
    item = TrainImageDataset([image_path], [mask_path], (128, 192))[0]
    assert tuple(item["image"].shape) == (3, 128, 192)
