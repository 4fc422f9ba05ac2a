"""At the native input size (1280x1920) a test image that is not 1918x1280 gets an empty row, not an abort."""

import gzip
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from carvana.data.datasets import TestImageDataset
from carvana.data.layout import NATIVE_INPUT, ORIG_HEIGHT, ORIG_WIDTH


def write_jpeg(path: Path, hw: tuple[int, int]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full(hw + (3,), 120, np.uint8))
    return path


def test_an_odd_sized_image_is_flagged_with_a_warning_naming_it_and_its_size(tmp_path):
    # Fails on the old code: fit_to_input raised ValueError, which aborted the whole prediction.
    good = write_jpeg(tmp_path / "test" / "good_01.jpg", (ORIG_HEIGHT, ORIG_WIDTH))
    odd = write_jpeg(tmp_path / "test" / "odd_01.jpg", (600, 800))
    ds = TestImageDataset([good, odd], NATIVE_INPUT)
    item = ds[0]
    assert item["ok"] is True and tuple(item["image"].shape) == (3, *NATIVE_INPUT)
    with pytest.warns(UserWarning, match=r"odd_01\.jpg: image is 800x600.*1918x1280.*empty mask"):
        item = ds[1]
    assert item["ok"] is False and item["name"] == "odd_01.jpg"
    assert tuple(item["image"].shape) == (3, *NATIVE_INPUT) and not item["image"].any()


def test_native_prediction_writes_an_empty_row_for_it_and_full_rows_for_the_others(tmp_path):
    from carvana.submission.sharded import predict_to_submission
    from carvana.training.classifier import CarvanaClassifier

    images = [write_jpeg(tmp_path / "test" / "a_01.jpg", (ORIG_HEIGHT, ORIG_WIDTH)),
              write_jpeg(tmp_path / "test" / "b_01.jpg", (1280, 1920)),  # 2 columns too wide
              write_jpeg(tmp_path / "test" / "c_01.jpg", (ORIG_HEIGHT, ORIG_WIDTH))]
    model = torch.nn.Conv2d(3, 1, 1)  # logit 5 everywhere: every pixel is car
    with torch.no_grad():
        model.weight.zero_()
        model.bias.fill_(5.0)
    clf = CarvanaClassifier(model, epochs=1, device="cpu", progress=False)
    out = tmp_path / "submit.csv.gz"
    with pytest.warns(UserWarning, match=r"b_01\.jpg: image is 1920x1280"):
        rows = predict_to_submission(clf, images, out, NATIVE_INPUT, chunk_size=2, batch_size=2, loader_workers=0)
    assert rows == 3
    with gzip.open(out, "rt") as f:
        table = dict(line.rstrip("\n").split(",") for line in f.readlines()[1:])
    full = f"1 {ORIG_HEIGHT * ORIG_WIDTH}"
    assert table == {"a_01.jpg": full, "b_01.jpg": "", "c_01.jpg": full}


def test_an_ensembles_dataset_flags_it_too(tmp_path):
    from carvana.submission.ensemble import MultiSizeTestDataset, size_key

    odd = write_jpeg(tmp_path / "test" / "odd_01.jpg", (1280, 1900))
    ds = MultiSizeTestDataset([odd], [(64, 96), NATIVE_INPUT])
    with pytest.warns(UserWarning, match=r"odd_01\.jpg: image is 1900x1280"):
        item = ds[0]
    assert item["ok"] is False
    assert not item[size_key((64, 96))].any() and tuple(item[size_key(NATIVE_INPUT)].shape) == (3, *NATIVE_INPUT)
