"""The demo dataset: exact Carvana layout, masks that agree everywhere, deterministic, crash-safe."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from carvana.data.demo import dataset as demo_data
from carvana.data.demo.car import demo_cars, draw_background, draw_car, random_car
from carvana.data.demo.dataset import write_demo_dataset
from carvana.data.layout import ORIG_HEIGHT, ORIG_SHAPE, ORIG_WIDTH
from carvana.data.rle import rle_decode

SMALL = {"seed": 3, "n_train_cars": 1, "n_test_cars": 1}  # 32 images: about 2 s to write
ANGLES = [f"{a:02d}" for a in range(1, 17)]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_demo_dataset(tmp_path_factory.mktemp("demo") / "carvana", **SMALL)


def read_csv(path: Path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_is_exactly_carvanas(dataset):
    cars = {re.fullmatch(r"([0-9a-f]{12})_(\d\d)\.jpg", p.name).group(1) for p in (dataset / "train").iterdir()}
    test_cars = {p.name[:12] for p in (dataset / "test").iterdir()}
    assert len(cars) == 1 and len(test_cars) == 1 and not cars & test_cars
    (car,), (test_car,) = cars, test_cars
    assert sorted(p.name for p in (dataset / "train").iterdir()) == [f"{car}_{a}.jpg" for a in ANGLES]
    assert sorted(p.name for p in (dataset / "test").iterdir()) == [f"{test_car}_{a}.jpg" for a in ANGLES]
    assert sorted(p.name for p in (dataset / "train_masks").iterdir()) == [f"{car}_{a}_mask.gif" for a in ANGLES]
    for jpg in [*(dataset / "train").iterdir(), *(dataset / "test").iterdir()]:
        with Image.open(jpg) as im:
            assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (ORIG_WIDTH, ORIG_HEIGHT))
    for gif in (dataset / "train_masks").iterdir():
        with Image.open(gif) as im:  # encoded like the competition's: GIF87a, palette, 0 black / 1 white
            assert (im.format, im.mode, im.size, im.info["version"]) == ("GIF", "P", (ORIG_WIDTH, ORIG_HEIGHT), b"GIF87a")
            assert im.getpalette()[:6] == [0, 0, 0, 255, 255, 255]
            assert set(np.unique(np.array(im)).tolist()) == {0, 1}


def test_train_masks_csv_agrees_with_gifs(dataset):
    rows = read_csv(dataset / "train_masks.csv")
    assert rows[0] == ["img", "rle_mask"]
    assert [name for name, _ in rows[1:]] == sorted(p.name for p in (dataset / "train").iterdir())
    for name, rle in rows[1:]:
        with Image.open(dataset / "train_masks" / f"{Path(name).stem}_mask.gif") as im:
            np.testing.assert_array_equal(rle_decode(rle, ORIG_SHAPE), np.array(im))


def test_test_solution_is_the_drawn_masks(dataset):
    rows = read_csv(dataset / "test_solution.csv")
    assert rows[0] == ["img", "rle_mask"]
    assert [name for name, _ in rows[1:]] == sorted(p.name for p in (dataset / "test").iterdir())
    spec = demo_cars(SMALL["seed"], 2)[1]  # train cars first, then the test car
    for a in (0, 6):
        _, mask = draw_car(spec, a)
        assert rows[1 + a][0] == f"{spec.car_id}_{a + 1:02d}.jpg"
        np.testing.assert_array_equal(rle_decode(rows[1 + a][1], ORIG_SHAPE), mask)


def test_sample_submission_and_metadata(dataset):
    sub = read_csv(dataset / "sample_submission.csv")
    assert sub[0] == ["img", "rle_mask"]
    assert sub[1:] == [[p.name, "1 1"] for p in sorted((dataset / "test").iterdir())]
    meta = read_csv(dataset / "metadata.csv")
    assert meta[0] == ["id", "year", "make", "model", "trim1", "trim2"]
    all_cars = {p.name[:12] for d in ("train", "test") for p in (dataset / d).iterdir()}
    assert {row[0] for row in meta[1:]} == all_cars and len(meta) == 1 + len(all_cars)
    assert all(2000 < int(row[1]) < 2030 and all(row) for row in meta[1:])


def test_same_seed_is_byte_identical_other_seed_differs(dataset, tmp_path):
    again = write_demo_dataset(tmp_path / "again", **SMALL)
    assert files(again) == files(dataset)
    other = files(write_demo_dataset(tmp_path / "other", **{**SMALL, "seed": 4}))
    assert set(other) != set(files(dataset))  # other car ids
    assert not set(other.values()) & set(files(dataset).values())  # no file in common


def test_second_call_does_not_rewrite(dataset):
    before = {p: p.stat().st_mtime_ns for p in dataset.rglob("*")}
    assert write_demo_dataset(dataset, **SMALL) == dataset
    assert {p: p.stat().st_mtime_ns for p in dataset.rglob("*")} == before


def test_interrupted_or_other_parameters_are_rebuilt(dataset, tmp_path):
    root = write_demo_dataset(tmp_path / "d", **SMALL)
    reference = files(dataset)
    (root / ".complete").unlink()  # what an interrupted write (or an older layout) leaves
    next((root / "train").iterdir()).write_bytes(b"truncated")
    write_demo_dataset(root, **SMALL)
    assert files(root) == reference
    write_demo_dataset(root, **{**SMALL, "n_test_cars": 2})
    assert len(list((root / "test").iterdir())) == 32
    assert json.loads((root / ".complete").read_text())["n_test_cars"] == 2


def test_failure_mid_write_leaves_nothing(tmp_path, monkeypatch):
    calls = []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) > 3:
            raise RuntimeError("disk full")
        return draw_car(*args, **kwargs)

    monkeypatch.setattr(demo_data, "draw_car", flaky)
    with pytest.raises(RuntimeError, match="disk full"):
        write_demo_dataset(tmp_path / "d", **SMALL)
    assert list(tmp_path.iterdir()) == []  # neither the folder nor its temp sibling


def test_refuses_to_delete_a_foreign_folder(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        write_demo_dataset(tmp_path / "d", **SMALL)
    assert (tmp_path / "d" / "notes.txt").read_text() == "mine"


def test_masks_are_plausible_cars(dataset):
    rows = read_csv(dataset / "train_masks.csv")[1:] + read_csv(dataset / "test_solution.csv")[1:]
    cover = {name: rle_decode(rle, ORIG_SHAPE).mean() for name, rle in rows}
    assert all(0.08 < c < 0.6 for c in cover.values())
    assert 0.10 < np.mean(list(cover.values())) < 0.6
    # Side views are long, front/back views narrow: the silhouette depends on the angle.
    spec = demo_cars(SMALL["seed"], 1)[0]
    aspect = {}
    for a in (0, 4, 8, 12):
        _, mask = draw_car(spec, a, size=(320, 480))
        _, _, w, h = cv2.boundingRect(mask)
        aspect[a] = w / h
    assert min(aspect[4], aspect[12]) > 1.6 * max(aspect[0], aspect[8])


def test_shadow_is_background_and_glass_and_tyres_are_car():
    for i in range(4):
        spec = random_car(np.random.default_rng([11, i]))
        background = draw_background(spec, (320, 480))
        for a in (2, 4):
            img, mask = draw_car(spec, a, size=(320, 480), background=background)
            darker = background.mean(2) - img.mean(2) > 20
            outside = darker & (cv2.dilate(mask, np.ones((5, 5), np.uint8)) == 0)
            rows = np.nonzero(outside)[0]
            assert outside.mean() > 0.003, "no visible shadow outside the car"
            assert rows.mean() > np.nonzero(mask)[0].mean()  # on the floor, under the car
            assert (img.mean(2)[mask > 0] < 70).mean() > 0.05  # dark tyres / glass inside the mask


def test_small_drawing_matches_full_resolution():
    spec = random_car(np.random.default_rng(5))
    _, full = draw_car(spec, 3)
    img, small = draw_car(spec, 3, size=(256, 384))
    assert img.shape == (256, 384, 3) and small.shape == (256, 384) and set(np.unique(small)) <= {0, 1}
    down = cv2.resize(full, (384, 256), interpolation=cv2.INTER_AREA)
    iou = (small & down).sum() / (small | down).sum()
    assert iou > 0.95
    generated, _ = draw_car(np.random.default_rng(5), 3, size=(256, 384))  # a generator works too
    np.testing.assert_array_equal(generated, img)


def test_colours_include_hard_cases():
    paints = [np.mean(random_car(np.random.default_rng([0, i])).colours[0]) for i in range(40)]
    assert min(paints) < 50 and max(paints) > 200  # black and white/silver cars both occur
