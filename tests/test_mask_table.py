"""Training masks decoded from train_masks.csv rows: identical to the GIFs, GIF fallback, clear errors."""

import numpy as np
import pandas as pd
import pytest

from carvana.data.datasets import TrainImageDataset, read_mask
from carvana.data.demo.dataset import write_demo_dataset
from carvana.data.mask_table import MaskTableError, load_mask_table, mask_from_rle, mask_table_for


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return write_demo_dataset(tmp_path_factory.mktemp("demo") / "d", seed=5, n_train_cars=1, n_test_cars=1)


def pairs(folder):
    images = sorted((folder / "train").glob("*.jpg"))
    return images, [folder / "train_masks" / f"{p.stem}_mask.gif" for p in images]


def assert_every_row_equals_its_gif(folder):
    table = mask_table_for(folder)
    images, masks = pairs(folder)
    assert table is not None and set(table) == {p.name for p in images}
    for image, gif in zip(images, masks):
        from_gif = read_mask(gif)
        from_csv = mask_from_rle(table[image.name], from_gif.shape, "test")
        assert from_csv.dtype == np.uint8 and np.array_equal(from_csv, from_gif), image.name


def test_every_demo_mask_row_equals_its_gif(demo):
    assert_every_row_equals_its_gif(demo)


def test_every_real_sample_mask_row_equals_its_gif(carvana_sample):
    assert_every_row_equals_its_gif(carvana_sample)  # all 384 masks


def test_dataset_items_are_identical_from_the_table_and_from_the_gifs(demo):
    images, masks = pairs(demo)
    table = load_mask_table(demo / "train_masks.csv")
    for full in (False, True):
        with_gif = TrainImageDataset(images, masks, (64, 96), full_masks=full)
        with_csv = TrainImageDataset(images, masks, (64, 96), full_masks=full, mask_rles=table)
        for i in range(4):
            a, b = with_gif[i], with_csv[i]
            assert a.keys() == b.keys()
            for key in a:
                assert np.array_equal(np.asarray(a[key]), np.asarray(b[key])), (i, key)


def test_table_is_used_and_gifs_are_the_fallback_for_missing_rows(demo, tmp_path):
    images, masks = pairs(demo)
    table = load_mask_table(demo / "train_masks.csv")
    # A row is used even where the GIF is gone (proof the GIF is not read) ...
    moved = [tmp_path / "gone.gif"] + masks[1:]
    assert TrainImageDataset(images, moved, (64, 96), mask_rles=table)[0]["mask"].sum() > 0
    # ... and an image without a row reads its GIF.
    del table[images[0].name]
    item = TrainImageDataset(images, masks, (64, 96), mask_rles=table)[0]
    assert np.array_equal(item["mask"].numpy(), TrainImageDataset(images, masks, (64, 96))[0]["mask"].numpy())
    with pytest.raises(Exception, match="gone.gif"):
        TrainImageDataset(images, moved, (64, 96), mask_rles=table)[0]


def test_no_table_means_gifs(tmp_path):
    assert mask_table_for(tmp_path) is None


def test_an_empty_rle_row_is_an_empty_mask(tmp_path):
    path = tmp_path / "train_masks.csv"
    path.write_text("img,rle_mask\na_01.jpg,\nb_01.jpg,1 3\n")
    table = load_mask_table(path)
    assert table == {"a_01.jpg": "", "b_01.jpg": "1 3"} and table.path == path
    assert mask_from_rle(table["a_01.jpg"], (2, 3), "x").sum() == 0
    assert mask_from_rle(table["b_01.jpg"], (2, 3), "x").tolist() == [[1, 1, 1], [0, 0, 0]]


@pytest.mark.parametrize("text, message", [
    ("name,mask\na.jpg,1 2\n", "expected the header 'img,rle_mask'"),
    ("img,rle_mask\na.jpg,1 2\na.jpg,3 4\n", "'a.jpg' is listed more than once"),
    ("", "not a readable CSV"),
])
def test_bad_tables_are_errors_naming_the_file(tmp_path, text, message):
    path = tmp_path / "train_masks.csv"
    path.write_text(text)
    with pytest.raises(MaskTableError, match=message) as info:
        load_mask_table(path)
    assert str(path) in str(info.value)


def test_a_malformed_row_is_an_error_naming_the_table_and_the_image(demo, tmp_path):
    images, masks = pairs(demo)
    rows = pd.read_csv(demo / "train_masks.csv", dtype=str, keep_default_na=False)
    rows.loc[rows["img"] == images[0].name, "rle_mask"] = "5 x"
    path = tmp_path / "train_masks.csv"
    rows.to_csv(path, index=False)
    ds = TrainImageDataset(images, masks, (64, 96), mask_rles=load_mask_table(path))
    with pytest.raises(MaskTableError, match=rf"{path}, row {images[0].name}: bad RLE"):
        ds[0]
    rows.loc[rows["img"] == images[0].name, "rle_mask"] = f"1 {10**8}"  # past the image's last pixel
    rows.to_csv(path, index=False)
    with pytest.raises(MaskTableError, match="past pixel"):
        TrainImageDataset(images, masks, (64, 96), mask_rles=load_mask_table(path))[0]
