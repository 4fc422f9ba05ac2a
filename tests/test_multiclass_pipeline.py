"""`python main.py --dataset folder --classes 3` end to end on generated data, and its checkpoints."""

import csv
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from carvana.training.checkpoint import load_model
import main_helpers

MAIN = Path(__file__).resolve().parents[1] / "main.py"
TINY = ["--input-size", "64x64", "--width", "0.125", "--batch-size", "4", "--workers", "0", "--validation-size", "0.25",
        "--predict-batch-size", "4", "--lr", "0.005"]


def run_main(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return main_helpers.run_main(cwd, *args)  # in this process: see main_helpers.py


def make_folder(root: Path, n: int = 12) -> Path:
    """Squares (class 1) and bars (class 2) on a background (class 0), each with its own colour."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):
        h, w = 48 + 4 * (i % 3), 64  # sizes vary
        mask = np.zeros((h, w), np.uint8)
        y, x = rng.integers(4, 20, 2)
        mask[y:y + 20, x:x + 20] = 1
        mask[:, 50:56] = 2
        image = np.choose(mask[..., None], [[40, 40, 40], [200, 60, 60], [60, 200, 60]]).astype(np.uint8)
        image = np.clip(image + rng.integers(-20, 20, image.shape), 0, 255).astype(np.uint8)
        Image.fromarray(image).save(root / "images" / f"s{i:02d}.jpg", quality=95)
        Image.fromarray(mask, mode="L").save(root / "masks" / f"s{i:02d}.png")
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("mc")
    data = make_folder(cwd / "shapes")
    result = run_main(cwd, "--dataset", "folder", "--classes", "3", "--class-names", "bg,square,bar",
                      "--data-dir", str(data), "--epochs", "2", "--run-name", "m1", *TINY)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return cwd, data, result


def test_two_epochs_lower_the_loss_and_log_iou_per_epoch_and_class(trained):
    cwd, _, result = trained
    logs = cwd / "logs" / "m1"
    rows = list(csv.DictReader(open(logs / "metrics.csv")))
    assert [r["epoch"] for r in rows] == ["0", "1"]
    assert float(rows[1]["train_loss"]) < float(rows[0]["train_loss"])
    assert all(r["loss_fn"] for r in rows)  # the loss each epoch stepped on, as binary runs log it
    assert 0 <= float(rows[1]["valid_miou"]) <= 1 and 0 <= float(rows[1]["valid_accuracy"]) <= 1
    per_class = list(csv.DictReader(open(logs / "per_class.csv")))
    assert [(r["epoch"], r["name"]) for r in per_class] == [(e, n) for e in "01" for n in ("bg", "square", "bar")]
    summary = json.loads((logs / "summary.json").read_text())
    assert summary["classes"] == 3 and summary["masks_written"] == 3 and summary["predicted_from"] == "the validation images"
    assert set(summary["best_valid_iou_per_class"]) == {"bg", "square", "bar"}
    assert (logs / "preview_epoch002.png").exists() and "valid_miou" in result.stdout


def test_masks_are_palette_pngs_at_each_images_size(trained):
    cwd, data, _ = trained
    masks = sorted((cwd / "output" / "m1" / "masks").glob("s*.png"))
    assert len(masks) == 3
    for path in masks:
        png = Image.open(path)
        assert png.mode == "P" and png.size == Image.open(data / "images" / f"{path.stem}.jpg").size
        assert np.asarray(png).max() <= 2
    assert (cwd / "output" / "m1" / "masks" / "legend.png").exists()


def test_checkpoint_rebuilds_the_three_class_model_and_predicts_the_same_masks(trained):
    cwd, data, _ = trained
    best = cwd / "output" / "models" / "m1" / "best.pt"
    model, config, state = load_model(best)
    assert config.classes == 3 and config.input_size == (64, 64)
    assert model.eval()(torch.zeros(1, 3, 64, 64)).shape == (1, 3, 64, 64)
    result = run_main(cwd, "--dataset", "folder", "--classes", "3", "--data-dir", str(data), "--no-train",
                      "--checkpoint", str(best), "--run-name", "m1-again", *TINY)
    assert result.returncode == 0, result.stderr[-3000:]
    for path in sorted((cwd / "output" / "m1" / "masks").glob("s*.png")):
        assert (cwd / "output" / "m1-again" / "masks" / path.name).read_bytes() == path.read_bytes()
    wrong = run_main(cwd, "--dataset", "folder", "--classes", "4", "--data-dir", str(data), "--no-train",
                     "--checkpoint", str(best), *TINY)
    assert wrong.returncode == 1 and "a 3-class model, which cannot predict this 4-class data set" in wrong.stderr


def test_dataset_flags_give_one_clear_line(tmp_path):
    result = run_main(tmp_path, "--dataset", "carla")
    assert result.returncode == 1 and "--dataset carla needs --data-dir" in result.stderr and "Traceback" not in result.stderr
    data = make_folder(tmp_path / "shapes", n=4)
    result = run_main(tmp_path, "--dataset", "folder", "--data-dir", str(data), *TINY)
    assert result.returncode == 1 and "needs --classes N" in result.stderr
    result = run_main(tmp_path, "--dataset", "folder", "--classes", "2", "--data-dir", str(data), "--epochs", "1", *TINY)
    assert result.returncode == 1 and "class id 2 in mask, but --classes is 2" in result.stderr


def test_time_budget_stops_a_multiclass_run_and_logs_have_no_progress_bars(tmp_path):
    data = make_folder(tmp_path / "shapes")
    # A budget far below one epoch: the first epoch stops early, is validated, and the run ends.
    result = run_main(tmp_path, "--dataset", "folder", "--classes", "3", "--data-dir", str(data), "--epochs", "50",
                      "--time-budget", "0.0001", "--run-name", "tb", *TINY)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "logs" / "tb" / "metrics.csv")))
    assert [r["epoch"] for r in rows] == ["0"]
    assert "\r" not in result.stdout + result.stderr  # not a terminal: no tqdm bars in the log
