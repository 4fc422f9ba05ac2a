"""DatasetFetcher on a folder of its own (use_folder): missing pieces named, and the train/validation
split grouped by car (deterministic, seeded, sampled, range-checked), test files in
sample_submission.csv order, and the real data slice where present."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from carvana.data.sources.fetcher import DatasetFetcher, DatasetLayoutError
from carvana.data.layout import car_id
from fetcher_helpers import fixture_no_mount, make_folder  # noqa: F401 (no_mount: an autouse fixture)

SAMPLE_DIR = Path(__file__).resolve().parents[2] / "shared" / "carvana-sample"


# ----------------------------------------------------------------------------- folders and splits


def test_use_folder_names_missing_pieces(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(DatasetLayoutError) as info:
        DatasetFetcher().use_folder(tmp_path)
    for piece in ("train_masks/", "test/", "sample_submission.csv"):
        assert piece in str(info.value)
    listed = re.search(r"missing (.*) \(expected", str(info.value)).group(1).split(", ")
    assert listed == ["train_masks/", "test/", "sample_submission.csv"]  # train/ is there
    with pytest.raises(DatasetLayoutError, match="does not exist"):
        DatasetFetcher().use_folder(tmp_path / "nope")


def test_lists_need_a_dataset_first():
    with pytest.raises(RuntimeError, match="fetch"):
        DatasetFetcher().get_train_files()


CARS = [f"{i:012x}" for i in range(10)]


def split_cars(result) -> tuple[set[str], set[str]]:
    train, train_masks, valid, valid_masks = result
    for images, masks in ((train, train_masks), (valid, valid_masks)):
        assert [m.name for m in masks] == [f"{p.stem}_mask.gif" for p in images]
        assert all(m.is_file() for m in masks)
        assert images == sorted(images, key=lambda p: p.name)
    return {car_id(p) for p in train}, {car_id(p) for p in valid}


def test_split_by_car_deterministic_and_seeded(tmp_path):
    f = DatasetFetcher()
    f.use_folder(make_folder(tmp_path, CARS))
    results = {seed: f.get_train_files(validation_size=0.3, seed=seed) for seed in range(5)}
    for seed, result in results.items():
        train_cars, valid_cars = split_cars(result)
        assert not train_cars & valid_cars
        assert train_cars | valid_cars == set(CARS)
        assert len(valid_cars) == round(0.3 * len(CARS))
        assert len(result[0]) + len(result[2]) == 16 * len(CARS)
        assert f.get_train_files(validation_size=0.3, seed=seed) == result
    assert len({tuple(r[2]) for r in results.values()}) > 1  # seeds give different splits


def test_sample_size_keeps_a_fraction_of_cars(tmp_path):
    f = DatasetFetcher()
    f.use_folder(make_folder(tmp_path, CARS, angles=3))
    for fraction in (0.1, 0.25, 0.5, 1.0):
        train_cars, valid_cars = split_cars(f.get_train_files(validation_size=0.5, sample_size=fraction, seed=3))
        assert not train_cars & valid_cars
        assert len(train_cars | valid_cars) == math.ceil(len(CARS) * fraction)
    # One car only: nothing can be held out, and the single car stays whole.
    train_cars, valid_cars = split_cars(f.get_train_files(validation_size=0.5, sample_size=0.1))
    assert len(train_cars) == 1 and not valid_cars
    # Validation at least one car whenever there are two.
    _, valid_cars = split_cars(f.get_train_files(validation_size=0.01, sample_size=0.2))
    assert len(valid_cars) == 1


@pytest.mark.parametrize("kw", [{"validation_size": 1.0}, {"validation_size": -0.1},
                                {"sample_size": 0.0}, {"sample_size": 1.5}, {"validation_size": float("nan")}])
def test_split_rejects_out_of_range(tmp_path, kw):
    f = DatasetFetcher()
    f.use_folder(make_folder(tmp_path, CARS[:2], angles=1))
    with pytest.raises(ValueError, match=next(iter(kw))):
        f.get_train_files(**kw)


def test_train_image_without_mask_is_named(tmp_path):
    folder = make_folder(tmp_path, CARS[:2], angles=2)
    (folder / "train_masks" / f"{CARS[1]}_02_mask.gif").unlink()
    f = DatasetFetcher()
    f.use_folder(folder)
    with pytest.raises(FileNotFoundError, match=f"{CARS[1]}_02.jpg.*no mask"):
        f.get_train_files()


def test_test_files_follow_sample_submission_order(tmp_path):
    names = [f"{c}_{a:02d}.jpg" for c in ("ffffffffffff", "000000000000", "888888888888") for a in (2, 1)]
    f = DatasetFetcher()
    f.use_folder(make_folder(tmp_path, CARS[:1], angles=1, test_names=names))
    assert [p.name for p in f.get_test_files()] == names
    assert all(p.parent == tmp_path / "test" for p in f.get_test_files())
    assert [p.name for p in f.get_test_files(sample_size=0.5)] == names[:3]
    assert [p.name for p in f.get_test_files(sample_size=0.01)] == names[:1]
    for name in names[1:4]:
        (tmp_path / "test" / name).unlink()
    with pytest.raises(FileNotFoundError, match=rf"3 image\(s\).*{names[1]}"):
        f.get_test_files()


def test_real_sample_folder_split():
    if not SAMPLE_DIR.is_dir():
        pytest.skip(f"real sample data not present at {SAMPLE_DIR}")
    f = DatasetFetcher()
    assert f.use_folder(SAMPLE_DIR) == SAMPLE_DIR and f.source == "folder"
    result = f.get_train_files(validation_size=0.2, seed=0)
    train_cars, valid_cars = split_cars(result)
    assert len(result[0]) + len(result[2]) == 384
    assert len(train_cars | valid_cars) == 24 and not train_cars & valid_cars
    assert len(valid_cars) == round(0.2 * 24)
    assert len(f.get_test_files()) == len(list((SAMPLE_DIR / "test").glob("*.jpg")))
