"""Loaders on files the tests write themselves (JPEG + palette GIF, Carvana naming)."""

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from carvana.data.datasets import (
    MEAN,
    STD,
    ImageReadError,
    TestImageDataset,
    TrainImageDataset,
    image_to_tensor,
    normalize_images,
    tensor_to_image,
    read_image,
    read_mask,
    resize_interpolation,
    resize_mask,
    seed_worker,
    train_augmentation,
)
from carvana.data.jpeg import decode_scale

H, W = 1280, 1918


def write_pair(folder: Path, name: str, size=(H, W), colour=(200, 30, 30)):
    """A red box 'car' on grey, as <name>.jpg and <name>_mask.gif (palette, 0/1)."""
    (folder / "train").mkdir(parents=True, exist_ok=True)
    (folder / "train_masks").mkdir(parents=True, exist_ok=True)
    mask = np.zeros(size, np.uint8)
    mask[size[0] // 4 : 3 * size[0] // 4, size[1] // 5 : 4 * size[1] // 5] = 1
    rgb = np.full(size + (3,), 180, np.uint8)
    rgb[mask == 1] = colour
    image_path, mask_path = folder / "train" / f"{name}.jpg", folder / "train_masks" / f"{name}_mask.gif"
    cv2.imwrite(str(image_path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    gif = Image.fromarray(mask, mode="P")
    gif.putpalette([0, 0, 0, 255, 255, 255])
    gif.save(mask_path)
    return image_path, mask_path, mask


def test_read_image_is_rgb_and_reduced_decoding_matches_size(tmp_path):
    image_path, _, _ = write_pair(tmp_path, "abc_01")
    full = read_image(image_path)
    assert full.shape == (H, W, 3)
    r, g, b = full[H // 2, W // 2]
    assert r > 150 and g < 80 and b < 80  # BGR was converted to RGB
    quarter = read_image(image_path, reduction=4)
    assert quarter.shape == (H // 4, -(-W // 4), 3)
    assert decode_scale((H, W), (256, 384)) == 4
    assert decode_scale((H, W), (1024, 1024)) == 1


def test_gif_mask_reads_as_zero_one(tmp_path):
    _, mask_path, mask = write_pair(tmp_path, "abc_01")
    read = read_mask(mask_path)
    assert read.dtype == np.uint8 and set(np.unique(read)) == {0, 1}
    np.testing.assert_array_equal(read, mask)


def test_train_item_shapes_and_values(tmp_path):
    image_path, mask_path, _ = write_pair(tmp_path, "abc_01")
    ds = TrainImageDataset([image_path], [mask_path], (256, 384), full_masks=True)
    item = ds[0]
    assert item["image"].shape == (3, 256, 384) and item["image"].dtype == torch.uint8
    assert item["mask"].shape == (1, 256, 384) and item["mask"].dtype == torch.uint8
    assert set(item["mask"].unique().tolist()) == {0, 1}
    assert item["full_mask"].shape == (H, W) and item["full_mask"].dtype == torch.uint8
    assert item["name"] == "abc_01.jpg"
    # the resized mask covers the same fraction of the frame as the original
    assert abs(item["mask"].float().mean().item() - 0.5 * 0.6) < 0.01


def test_truncated_jpeg_is_an_error_naming_the_file(tmp_path):
    image_path, mask_path, _ = write_pair(tmp_path, "abc_01")
    data = image_path.read_bytes()
    image_path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match="abc_01.jpg.*truncated"):
        TrainImageDataset([image_path], [mask_path], (256, 384))[0]


def test_garbage_file_is_an_error_naming_the_file(tmp_path):
    image_path, mask_path, _ = write_pair(tmp_path, "abc_01")
    image_path.write_bytes(b"not a jpeg at all")
    with pytest.raises(ImageReadError, match="abc_01.jpg"):
        TrainImageDataset([image_path], [mask_path], (256, 384))[0]


def test_missing_mask_is_an_error_naming_the_image(tmp_path):
    image_path, mask_path, _ = write_pair(tmp_path, "abc_01")
    mask_path.unlink()
    with pytest.raises(ImageReadError, match="abc_01.jpg.*mask.*missing"):
        TrainImageDataset([image_path], [mask_path], (256, 384))[0]


def test_mask_of_another_size_is_an_error_naming_both(tmp_path):
    image_path, _, _ = write_pair(tmp_path, "abc_01")
    _, small_mask, _ = write_pair(tmp_path / "small", "abc_01", size=(640, 959))
    with pytest.raises(ImageReadError, match="959x640.*1918x1280"):
        TrainImageDataset([image_path], [small_mask], (256, 384))[0]


def test_unreadable_test_image_gives_a_flagged_zero_image_and_a_warning(tmp_path):
    good, _, _ = write_pair(tmp_path, "abc_01")
    bad = tmp_path / "train" / "abc_02.jpg"
    bad.write_bytes(b"\xff\xd8 broken")
    ds = TestImageDataset([good, bad], (256, 384))
    assert ds[0]["ok"] is True
    with pytest.warns(UserWarning, match="abc_02.jpg"):
        item = ds[1]
    assert item["ok"] is False and item["name"] == "abc_02.jpg" and item["image"].shape == (3, 256, 384)


def test_augmentation_is_joint_reproducible_and_keeps_masks_binary(tmp_path):
    image_path, mask_path, _ = write_pair(tmp_path, "abc_01")
    a = TrainImageDataset([image_path] * 6, [mask_path] * 6, (128, 192), train_augmentation(seed=7))
    b = TrainImageDataset([image_path] * 6, [mask_path] * 6, (128, 192), train_augmentation(seed=7))
    items_a, items_b = [a[i] for i in range(6)], [b[i] for i in range(6)]
    for x, y in zip(items_a, items_b):
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["mask"], y["mask"])
        assert set(x["mask"].unique().tolist()) <= {0.0, 1.0}
        # jointly transformed: the red car pixels are exactly where the mask is (away from edges)
        red = x["image"][0].int() - x["image"][1].int()
        inner = cv2.erode(x["mask"][0].numpy(), np.ones((5, 5), np.uint8)).astype(bool)
        outer = ~cv2.dilate(x["mask"][0].numpy(), np.ones((5, 5), np.uint8)).astype(bool)
        assert red[torch.from_numpy(inner)].min() > red[torch.from_numpy(outer)].max()
    assert len({x["mask"].sum().item() for x in items_a}) > 1  # it does augment


def test_worker_seeding_differs_per_worker(tmp_path):
    image_path, mask_path, _ = write_pair(tmp_path, "abc_01")
    ds = TrainImageDataset([image_path] * 4, [mask_path] * 4, (64, 64), train_augmentation(seed=1))

    def masks(seed):
        loader = DataLoader(ds, batch_size=1, num_workers=2, worker_init_fn=seed_worker,
                            generator=torch.Generator().manual_seed(seed))
        return [b["image"].sum().item() for b in loader]

    first, again = masks(0), masks(0)
    assert first == again  # reproducible for a seeded generator
    # workers 0 and 1 both start with item 0/1 of the same image: their streams differ
    assert first[0] != first[1] or first[2] != first[3]


def test_items_stay_uint8_and_normalise_exactly_on_the_device():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    for image in (rgb, rgb[:, ::-1]):  # a flipped (negative-stride) view works too
        chw = image_to_tensor(image)
        assert chw.dtype == torch.uint8 and chw.shape == (3, 37, 53) and chw.is_contiguous()
        assert torch.equal(chw, torch.from_numpy(image.transpose(2, 0, 1).copy()))
        got = normalize_images(chw[None])
        expected = (image.astype(np.float32) - MEAN) / STD
        assert got.dtype == torch.float32
        torch.testing.assert_close(got[0], torch.from_numpy(expected.transpose(2, 0, 1).copy()))
        np.testing.assert_array_equal(tensor_to_image(chw), image)
        assert np.abs(tensor_to_image(got[0]).astype(int) - image).max() <= 1  # float previews too
    already = torch.randn(1, 3, 4, 4)
    assert normalize_images(already) is already


def test_resize_uses_bilinear_below_2x_and_area_beyond():
    assert resize_interpolation((1280, 1918), (1024, 1024)) == cv2.INTER_LINEAR
    assert resize_interpolation((320, 480), (256, 384)) == cv2.INTER_LINEAR  # after the /4 JPEG reduction
    assert resize_interpolation((1280, 1918), (256, 384)) == cv2.INTER_AREA  # full-resolution mask
    assert resize_interpolation((1280, 1918), (640, 1024)) == cv2.INTER_AREA


def test_resized_masks_stay_binary_and_match_a_thresholded_float_resize(tmp_path):
    _, mask_path, _ = write_pair(tmp_path, "abc_01")
    mask = read_mask(mask_path)
    rng = np.random.default_rng(1)
    mask[rng.random(mask.shape) < 0.02] ^= 1  # speckles: many partial pixels
    for hw in ((256, 384), (1024, 1024)):
        got = resize_mask(mask, hw)
        assert got.dtype == np.uint8 and got.shape == hw and set(np.unique(got)) <= {0, 1}
        interpolation = resize_interpolation(mask.shape, hw)
        smooth = cv2.resize(mask.astype(np.float32), hw[::-1], interpolation=interpolation)
        differ = got != (smooth > 0.5)
        # uint8 resizing uses fixed-point weights: only values within their rounding of 0.5 may flip
        assert np.abs(smooth[differ] - 0.5).max(initial=0) < 0.002 and differ.mean() < 0.002
