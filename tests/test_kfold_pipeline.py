"""`python main.py --folds K` end to end on a tiny demo dataset: folds, OOF, resume, ensemble."""

import json

import pandas as pd
import pytest

from carvana.data.demo.dataset import write_demo_dataset
from carvana.submission.validate import expected_names, validate_submission
from test_pipeline import TINY, run_main


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    """Fold 0 trained; fold 1 stopped after epoch 1 of 2; then `--resume` over all folds."""
    cwd = tmp_path_factory.mktemp("folds")
    data = write_demo_dataset(cwd / "tiny", seed=5, n_train_cars=4, n_test_cars=1)
    common = ["--data-dir", str(data), "--folds", "2", "--run-name", "k", *TINY]
    first = run_main(cwd, *common, "--fold", "0", "--epochs", "2")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    second = run_main(cwd, *common, "--fold", "1", "--epochs", "2")
    assert second.returncode == 0, second.stderr[-3000:]
    # Make fold 1 look interrupted after its first epoch: last.pt at epoch 0, not scored yet.
    import torch

    last = cwd / "output/models/k/fold1/last.pt"
    state = torch.load(last, weights_only=True)
    state["epoch"] = 0
    torch.save(state, last)
    (cwd / "logs/k/fold1/oof.csv").unlink()
    third = run_main(cwd, *common, "--epochs", "2", "--resume", "--threshold", "auto")
    assert third.returncode == 0, third.stdout[-3000:] + third.stderr[-3000:]
    return cwd, data, first, third


def test_resume_skips_finished_folds_and_continues_the_unfinished_one(resumed):
    cwd, data, first, third = resumed
    assert "fold 0/2: finished earlier, skipped" in third.stdout
    assert "resuming run k from output/models/k/fold1/last.pt after epoch 1" in third.stdout
    assert "epoch 2/2" in third.stdout and "epoch 1/2" not in third.stdout
    assert "=== fold 0 of 2" not in third.stdout and "=== fold 1 of 2" in third.stdout


def test_oof_covers_every_train_image_once_with_summary_and_gallery(resumed):
    cwd, data, first, third = resumed
    oof = pd.read_csv(cwd / "logs/k/oof.csv")
    train = sorted(p.name for p in (data / "train").glob("*.jpg"))
    assert sorted(oof["image"]) == train and oof["image"].is_unique
    assert list(oof.columns[:5]) == ["image", "car", "angle", "fold", "dice"]
    assert (oof.groupby("car")["fold"].nunique() == 1).all() and set(oof["fold"]) == {0, 1}
    assert oof["dice"].between(0, 1).all()
    summary = json.loads((cwd / "logs/k/oof_summary.json").read_text())
    assert summary["threshold_auto"] and summary["threshold"] in [float(t) for t in summary["threshold_means"]]
    votes = sorted(summary["threshold_votes"].values())  # every train car votes; the median wins
    assert sorted(summary["threshold_votes"]) == sorted(oof["car"].unique())
    assert votes[(len(votes) - 1) // 2] <= summary["threshold"] <= votes[len(votes) // 2]
    assert summary["mean_oof_dice"] == pytest.approx(oof["dice"].mean(), abs=1e-6)
    assert len(summary["worst"]) == 12 and (cwd / "logs/k/oof_worst.png").stat().st_size > 10_000
    run = json.loads((cwd / "logs/k/summary.json").read_text())
    assert run["threshold"] == summary["threshold"]  # prediction used the chosen threshold
    assert run["models"] == ["output/models/k/fold0/best.pt", "output/models/k/fold1/best.pt"]
    assert validate_submission(cwd / "output/submit.csv.gz", expected_names(data / "sample_submission.csv")).ok
    # --fold 0 alone predicted with fold 0's model and scored only its own cars
    assert "prediction: output/models/k/fold0/best.pt (unet1024" in first.stdout


def test_threshold_auto_without_folds_is_a_clear_error(tmp_path):
    result = run_main(tmp_path, "--threshold", "auto", "--data-dir", str(tmp_path))
    assert result.returncode == 1 and "--threshold auto chooses on out-of-fold predictions" in result.stderr
