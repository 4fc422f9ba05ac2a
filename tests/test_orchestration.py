"""How runs combine (pipeline/) with one trained --folds run (the module fixture ``folds_run``,
built once here): off-grid thresholds rescored without retraining, resuming by name, fresh
reruns under its name, one fold trained afresh, ensembles and weights over its folds, a
folds.csv that does not fit, --no-fast-decode, refused reruns that remove nothing. Each test
names the defect of the orchestration issue it covers; each failed on the code before the
redesign. Runs on their own are in test_orchestration_fresh.py.

Runs are `python main.py` subprocesses on a tiny demo dataset (4 train cars, 1 test car) at
64x64, width 0.125, so each takes seconds.
"""

import hashlib
import json
from pathlib import Path

import pandas as pd
import pytest

from carvana.training.checkpoint import load_checkpoint
from orchestration_helpers import TINY, ok, refused, run_main
from orchestration_helpers import fixture_data  # noqa: F401 (the module-scoped data fixture)


@pytest.fixture(scope="module")
def folds_run(tmp_path_factory, data):
    """One --folds 2 run with an off-grid threshold (defect 8)."""
    cwd = tmp_path_factory.mktemp("folds")
    result = ok(run_main(cwd, "--data-dir", str(data), "--folds", "2", "--threshold", "0.42", "--run-name", "k", *TINY))
    return cwd, result


def test_off_grid_threshold_scores_the_folds_at_it(folds_run):
    # Defect 8: --folds with a threshold off the 0.30-0.70 grid.
    cwd, _ = folds_run
    summary = json.loads((cwd / "logs/k/oof_summary.json").read_text())
    assert summary["threshold"] == 0.42 and summary["mean_oof_dice"] == summary["mean_oof_dice"]  # not NaN
    assert "dice@0.42" in pd.read_csv(cwd / "logs/k/oof.csv").columns


def trained_state(models: Path) -> dict[str, tuple]:
    """Per fold, what training changes: last.pt itself (inode, mtime, bytes: training replaces it,
    and a seeded retraining gives the same weights but other timings), and best.pt's weights,
    epoch and metrics (best.pt itself is rewritten when the recorded threshold changes)."""
    state = {}
    for fold in sorted(models.glob("fold*")):
        best = load_checkpoint(fold / "best.pt")
        weights = hashlib.sha256(b"".join(t.numpy().tobytes() for t in best["model"].values())).hexdigest()
        last = fold / "last.pt"
        st = last.stat()
        state[fold.name] = ((st.st_ino, st.st_mtime_ns, hashlib.sha256(last.read_bytes()).hexdigest()),
                            weights, best["epoch"], best["metrics"])
    return state


def test_a_later_off_grid_threshold_rescores_finished_folds_without_retraining(folds_run, data):
    # Defect 8, after a resume: the finished folds' scores lacked the new threshold (NaN / KeyError).
    cwd, _ = folds_run
    models = cwd / "output/models/k"
    before = trained_state(models)
    hparams = {f: load_checkpoint(models / f / "best.pt")["hparams"] for f in before}
    result = ok(run_main(cwd, "--resume", "--run-name", "k", "--threshold", "0.47", "--output", "output/k47.csv.gz"))
    assert "train_loss" not in result.stdout and "resuming" not in result.stdout  # nothing trained again
    summary = json.loads((cwd / "logs/k/oof_summary.json").read_text())
    assert summary["threshold"] == 0.47 and summary["mean_oof_dice"] == summary["mean_oof_dice"]
    assert sorted(before) == ["fold0", "fold1"] and trained_state(models) == before  # neither fold retrained
    for fold, old in hparams.items():  # best.pt's only change: the threshold prediction now uses
        assert load_checkpoint(models / fold / "best.pt")["hparams"] == {**old, "threshold": 0.47}


def test_resuming_a_folds_run_needs_only_its_name(folds_run):
    # Defect 5 (the hint left out --folds K) and defect 2 (a resumed run takes its own settings).
    cwd, result = folds_run
    again = ok(run_main(cwd, "--resume", "--run-name", "k", "--output", "output/k2.csv.gz"))
    assert again.stdout.count("finished earlier, skipped") == 2
    record = json.loads((cwd / "logs/k/hparams.json").read_text())
    assert record["folds"] == 2 and record["input_size"] == "64x64" and record["width"] == 0.125


def test_a_fresh_run_under_an_old_name_removes_its_stale_fold_scores(folds_run, data, tmp_path):
    # Defect 3: a rerun without --resume left fold<k>/oof.csv, so when the rerun was interrupted,
    # --resume skipped the fold as finished and ensembled a half-trained best.pt.
    import shutil

    cwd = tmp_path / "rerun"
    shutil.copytree(folds_run[0], cwd)
    broken = tmp_path / "broken"  # the same data, one of fold 1's training images unreadable
    shutil.copytree(data, broken)
    table = pd.read_csv(cwd / "logs/k/folds.csv")
    victim = broken / "train" / table[table["fold"] == 1]["image"].iloc[0]
    victim.write_bytes(b"not a jpeg")
    result = run_main(cwd, "--data-dir", str(broken), "--folds", "2", "--run-name", "k", *TINY)
    assert "starting afresh" in result.stdout
    refused(result, victim.name)  # the rerun dies while training fold 0 (fold 1's cars train it)
    assert not (cwd / "logs/k/fold0/oof.csv").exists() and not (cwd / "logs/k/fold1/oof.csv").exists()
    shutil.copy(data / "train" / victim.name, victim)
    resumed = ok(run_main(cwd, "--resume", "--run-name", "k", "--data-dir", str(broken)))
    assert "finished earlier" not in resumed.stdout  # nothing stale passes for finished
    assert "=== fold 0 of 2" in resumed.stdout and "=== fold 1 of 2" in resumed.stdout


def test_training_one_fold_afresh_keeps_the_other_folds(folds_run, data, tmp_path):
    import shutil

    cwd = tmp_path / "onefold"
    shutil.copytree(folds_run[0], cwd)
    result = ok(run_main(cwd, "--data-dir", str(data), "--folds", "2", "--fold", "1", "--run-name", "k", *TINY))
    assert "starting afresh" in result.stdout and "=== fold 1 of 2" in result.stdout
    assert (cwd / "logs/k/fold0/oof.csv").exists() and (cwd / "output/models/k/fold0/best.pt").exists()


def test_unet_original_with_folds_and_in_a_mixed_ensemble(tmp_path, data, folds_run):
    # Defect 1: unet-original resized images to its padded input size, then padded again.
    args = ["--arch", "unet-original", "--input-size", "68x68", "--width", "0.125", "--batch-size", "4",
            "--workers", "0", "--predict-batch-size", "4", "--epochs", "1", "--no-tta"]
    ok(run_main(tmp_path, "--data-dir", str(data), "--folds", "2", "--run-name", "u", *args))
    assert (tmp_path / "logs/u/oof_worst.png").is_file()  # the error gallery re-predicts with it too
    mixed = f"{tmp_path / 'output/models/u/fold0/best.pt'},{folds_run[0] / 'output/models/k'}"
    result = ok(run_main(tmp_path, "--data-dir", str(data), "--ensemble", mixed, "--output", "output/mixed.csv.gz",
                         "--run-name", "mix", "--workers", "0"))
    assert "ensemble of 3" in result.stdout and "valid_submission: True" in result.stdout


def test_ensemble_weights_that_do_not_match_the_members(tmp_path, data, folds_run):
    # Defect 9: a plain ValueError traceback.
    members = str(folds_run[0] / "output/models/k")
    refused(run_main(tmp_path, "--data-dir", str(data), "--ensemble", members, "--ensemble-weights", "1,2,3"),
            "need 2 non-negative weights")


def test_a_folds_csv_that_does_not_fit_is_a_one_line_error(folds_run, tmp_path):
    import shutil

    cwd = tmp_path / "bad"
    shutil.copytree(folds_run[0], cwd)
    table = pd.read_csv(cwd / "logs/k/folds.csv")
    table.iloc[1:].to_csv(cwd / "logs/k/folds.csv", index=False)  # one image lost
    for p in (cwd / "logs/k").glob("fold*/oof.csv"):
        p.unlink()
    refused(run_main(cwd, "--resume", "--run-name", "k"), "folds.csv")


def test_no_fast_decode_reaches_prediction_and_the_record(folds_run):
    # Issue 23: the setting goes into the prediction fingerprint and the run's record.
    cwd, _ = folds_run
    first = ok(run_main(cwd, "--no-train", "--run-name", "k", "--output", "output/decode.csv.gz"))
    again = ok(run_main(cwd, "--no-train", "--run-name", "k", "--output", "output/decode.csv.gz", "--no-fast-decode"))
    assert "fast_decode changed (true -> false)" in again.stderr, again.stderr[-2000:]
    assert json.loads((cwd / "logs/k/predict_hparams.json").read_text())["fast_decode"] is False
    assert "valid_submission: True" in first.stdout


def test_a_refused_rerun_removes_nothing(folds_run, data, tmp_path):
    # Refusals (here the network's size rule for --crop) come before a fresh start removes anything.
    import shutil

    cwd = tmp_path / "kept"
    shutil.copytree(folds_run[0], cwd)
    refused(run_main(cwd, "--data-dir", str(data), "--folds", "2", "--run-name", "k", "--crop", "40x40", *TINY),
            "--crop 40x40")
    assert (cwd / "logs/k/fold1/oof.csv").exists() and (cwd / "output/models/k/fold0/best.pt").exists()
