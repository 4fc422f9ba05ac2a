"""Car-grouped folds, out-of-fold scores, threshold choice and the error gallery."""


import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from carvana.training.folds import assign_folds, fold_files, load_or_assign_folds
from carvana.training.gallery import GalleryEntry, render_gallery, FN_COLOUR, FP_COLOUR, TP_COLOUR, error_overlay
from carvana.training.oof import THRESHOLD_GRID, car_thresholds, choose_threshold, dice_column, summarize


def names(n_cars: int = 10) -> list[str]:
    return [f"car{c:03d}abc_{a:02d}.jpg" for c in range(n_cars) for a in range(1, 17)]


def test_folds_are_car_disjoint_cover_every_car_once_and_are_seeded():
    table = assign_folds(names(10), k=4, seed=42)
    assert len(table) == 160 and set(table["fold"]) == {0, 1, 2, 3}
    per_car = table.groupby("car")["fold"].nunique()
    assert (per_car == 1).all() and len(per_car) == 10  # all 16 views of a car in one fold
    sizes = table.groupby("fold")["car"].nunique().tolist()
    assert sorted(sizes) == [2, 2, 3, 3]  # balanced
    assert table.equals(assign_folds(list(reversed(names(10))), 4, 42))  # order of input does not matter
    others = [assign_folds(names(10), 4, s)["fold"].tolist() for s in (1, 2, 3)]
    assert any(o != table["fold"].tolist() for o in others)  # the seed shuffles the cars
    assert table.loc[table["image"] == "car003abc_07.jpg", "angle"].item() == 7
    with pytest.raises(ValueError, match="needs at least 4 cars"):
        assign_folds(names(3), 4, 0)


def test_fold_files_and_the_saved_split(tmp_path):
    images = [tmp_path / n for n in names(6)]
    masks = [tmp_path / n.replace(".jpg", "_mask.gif") for n in names(6)]
    table = load_or_assign_folds(tmp_path / "folds.csv", images, 3, 0)
    seen = []
    for f in range(3):
        ti, tm, vi, vm = fold_files(table, f, images, masks)
        assert len(ti) + len(vi) == 96 and not {p.name for p in ti} & {p.name for p in vi}
        assert [m.name for m in vm] == [p.name.replace(".jpg", "_mask.gif") for p in vi]
        seen += [p.name for p in vi]
    assert sorted(seen) == sorted(names(6))  # every image validated exactly once
    assert load_or_assign_folds(tmp_path / "folds.csv", images, 3, 0).equals(table)  # resume reads it back
    with pytest.raises(ValueError, match="folds.csv: this run was split into 3 folds"):
        load_or_assign_folds(tmp_path / "folds.csv", images, 2, 0)


def test_threshold_choice_and_summary():
    rng = np.random.default_rng(0)
    n = 32
    oof = pd.DataFrame({"image": [f"c{i // 16}_{i % 16 + 1:02d}.jpg" for i in range(n)], "car": [f"c{i // 16}" for i in range(n)],
                        "angle": [i % 16 + 1 for i in range(n)], "fold": [i // 16 for i in range(n)]})
    for t in THRESHOLD_GRID:
        oof[dice_column(t)] = 0.99 - abs(t - 0.45) * 0.1 + rng.normal(0, 1e-4, n)
    best, means, _ = choose_threshold(oof)
    assert best == 0.45 and max(means, key=means.get) == "0.45"
    s = summarize(oof, best, worst=5)
    assert s["mean_oof_dice"] == pytest.approx(oof[dice_column(0.45)].mean())
    assert set(s["per_angle"]) == set(range(1, 17)) and set(s["per_fold"]) == {0, 1}
    assert [w["dice"] for w in s["worst"]] == sorted(oof[dice_column(0.45)])[:5]


def car_curves(peaks: list[float], depths: list[float]) -> pd.DataFrame:
    """An OOF table of 16 images per car: car i's Dice peaks at threshold peaks[i], and falls by
    depths[i] per unit of threshold away from it (a hard car: a low, steep curve)."""
    rows = []
    for i, (peak, depth) in enumerate(zip(peaks, depths)):
        for a in range(1, 17):
            row = {"image": f"car{i:03d}abc_{a:02d}.jpg", "car": f"car{i:03d}abc"}
            row.update({dice_column(t): 0.99 - depth * abs(t - peak) for t in THRESHOLD_GRID})
            rows.append(row)
    return pd.DataFrame(rows)


def test_one_hard_car_cannot_drag_the_threshold():
    # four cars want 0.5 (shallow curves), one hard car wants 0.7 and loses 0.3 a unit away from it:
    # the best mean is 0.7, where the four typical cars lose; the median of the cars' votes stays 0.5
    oof = car_curves([0.5, 0.5, 0.5, 0.5, 0.7], [0.02, 0.02, 0.02, 0.02, 0.3])
    means = {t: oof[dice_column(t)].mean() for t in THRESHOLD_GRID}
    assert max(means, key=means.get) == 0.7
    assert car_thresholds(oof) == {"car000abc": 0.5, "car001abc": 0.5, "car002abc": 0.5, "car003abc": 0.5, "car004abc": 0.7}
    best, grid_means, votes = choose_threshold(oof)
    assert best == 0.5 and grid_means["0.70"] == pytest.approx(means[0.7]) and votes == car_thresholds(oof)
    # an even number of cars: the middle of the two middle votes, snapped to the grid (lower on a tie)
    assert choose_threshold(car_curves([0.4, 0.45, 0.5, 0.6], [0.02] * 4))[0] == 0.45  # 0.475
    assert choose_threshold(car_curves([0.4, 0.4, 0.6, 0.6], [0.02] * 4))[0] == 0.5
    # the car comes from the image name: a table without a car column (score_fold's) votes the same
    assert choose_threshold(oof.drop(columns="car"))[0] == 0.5


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(THRESHOLD_GRID), st.floats(0.001, 1.0)), min_size=1, max_size=9))
def test_the_threshold_lies_among_the_cars_votes(cars):
    """Any cars, any curve depths: the choice is a grid value between the lowest and highest vote,
    and at least half of the cars vote for it or beyond it on each side."""
    peaks, depths = [p for p, _ in cars], [d for _, d in cars]
    best, _, _ = choose_threshold(car_curves(peaks, depths))
    assert best in THRESHOLD_GRID and min(peaks) <= best <= max(peaks)
    assert 2 * sum(p <= best for p in peaks) >= len(peaks) - 1 and 2 * sum(p >= best for p in peaks) >= len(peaks) - 1


def test_error_overlay_colours_each_outcome():
    image = np.full((4, 4, 3), 100, np.uint8)
    truth = np.zeros((4, 4), bool)
    truth[:2] = True
    pred = np.zeros((4, 4), bool)
    pred[1:3] = True
    out = error_overlay(image, pred, truth)
    colour = lambda rgb: (0.3 * 100 + 0.7 * np.array(rgb)).astype(np.uint8)  # noqa: E731
    assert (out[1, 0] == colour(TP_COLOUR)).all() and (out[2, 0] == colour(FP_COLOUR)).all()
    assert (out[0, 0] == colour(FN_COLOUR)).all() and (out[3, 0] == 50).all()
    entry = GalleryEntry("x_01.jpg", np.zeros((1280, 1918, 3), np.uint8), pred.repeat(320, 0).repeat(480, 1)[:, :1918],
                         truth.repeat(320, 0).repeat(480, 1)[:, :1918], 0.5)
    png = render_gallery([entry, entry])
    assert png.shape[1] == 2 * 639 + 4 and png.shape[0] > 2 * 427


def test_the_error_gallery_predicts_with_the_sessions_device_precision_and_streams(tmp_path, monkeypatch):
    # Fails on the old code: load_members(..., [1.0]) left --device, --amp, --channels-last and
    # --eval-streams at their defaults (the CPU, autocast, channels_last, automatic streams).
    from types import SimpleNamespace

    import torch

    from carvana.data.demo.dataset import write_demo_dataset
    from carvana.data.layout import mask_path_for
    from carvana.models.registry import ModelConfig, build_model
    from carvana.pipeline import folds as pipeline_folds
    from carvana.training.checkpoint import save_checkpoint

    data = write_demo_dataset(tmp_path / "data", seed=1, n_train_cars=1, n_test_cars=1)
    images = sorted((data / "train").glob("*.jpg"))[:3]
    paths = {p.name: (p, mask_path_for(p, data / "train_masks")) for p in images}
    config = ModelConfig(arch="unet1024", width=0.125, input_size=(64, 128))
    best = tmp_path / "models" / "fold1" / "best.pt"
    save_checkpoint({"model": build_model(config).state_dict(), "model_config": config.to_dict()}, best)
    hp = SimpleNamespace(amp=False, channels_last=False, eval_streams=3, tta=True, fast_decode=False, tta_sizes="",
                         engine="onnxruntime")
    session = SimpleNamespace(hp=hp, device="cpu", models_dir=tmp_path / "models")
    calls, loaded = [], []

    def recording(*args, **kwargs):
        calls.append(args)
        loaded.extend(real(*args, **kwargs))
        return loaded[-1:]

    real = pipeline_folds.load_members
    monkeypatch.setattr(pipeline_folds, "load_members", recording)
    worst = [{"image": p.name, "fold": 1, "dice": 0.5} for p in images]
    entries = pipeline_folds.gallery_entries(worst, paths, session, 0.5)
    assert calls == [([best], [1.0], "cpu", False, False, 3, "onnxruntime")]
    (member,) = loaded
    clf = member.classifier
    assert clf.device == torch.device("cpu") and clf.streams == 3 and clf.amp_dtype is None
    assert clf.engine is not None and clf.engine.name == "onnxruntime"  # --engine
    assert clf.inference.memory_format == torch.contiguous_format  # --no-channels-last
    assert [e.name for e in entries] == [p.name for p in images]
    assert all(e.pred.shape == e.truth.shape == (1280, 1918) for e in entries)
