"""How runs combine (pipeline/): plans, resume, fresh starts, refusals. Each test names the
defect of the orchestration issue it covers; each failed on the code before the redesign.

Runs are `python main.py` subprocesses on a tiny demo dataset (4 train cars, 1 test car) at
64x64, width 0.125, so each takes seconds.
"""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from carvana.data.demo.dataset import write_demo_dataset
from carvana.models.registry import ModelConfig, build_model
from carvana.training.checkpoint import load_checkpoint, save_checkpoint, threshold_of

MAIN = Path(__file__).resolve().parents[1] / "main.py"
TINY = ["--input-size", "64x64", "--width", "0.125", "--batch-size", "4", "--workers", "0",
        "--predict-batch-size", "4", "--epochs", "1", "--no-tta"]


def run_main(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(MAIN), *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    return result


def refused(result: subprocess.CompletedProcess, *phrases: str) -> str:
    """The run failed with one 'error: ...' line, no traceback, saying ``phrases``."""
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-3000:]
    for phrase in phrases:
        assert phrase in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_demo_dataset(tmp_path_factory.mktemp("data") / "tiny", seed=5, n_train_cars=4, n_test_cars=1)


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


def test_fold_checkpoints_record_the_threshold_prediction_used(tmp_path, data):
    # Defect 13: --threshold auto's choice was not stored, so segment/export used 0.5.
    ok(run_main(tmp_path, "--data-dir", str(data), "--folds", "2", "--threshold", "auto", "--run-name", "a", *TINY))
    chosen = json.loads((tmp_path / "logs/a/oof_summary.json").read_text())["threshold"]
    for fold in (0, 1):
        assert threshold_of(load_checkpoint(tmp_path / f"output/models/a/fold{fold}/best.pt")) == chosen


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


def test_a_multiclass_checkpoint_is_refused_by_the_binary_path(tmp_path, data):
    # Defect 4: it wrote a binary submission from class 0's logit (and --submit would upload it).
    config = ModelConfig(arch="unet1024", width=0.125, classes=3, input_size=(64, 64))
    save_checkpoint({"model": build_model(config).state_dict(), "model_config": config.to_dict(), "epoch": 0}, tmp_path / "m.pt")
    refused(run_main(tmp_path, "--data-dir", str(data), "--no-train", "--checkpoint", str(tmp_path / "m.pt")),
            "m.pt: a 3-class model, which cannot predict the binary Carvana car masks")
    assert not (tmp_path / "output/submit.csv.gz").exists()


@pytest.mark.parametrize("plan", [["--folds", "2"], ["--dataset", "folder"]])
def test_resume_of_a_mistyped_run_is_refused_on_every_path(tmp_path, data, plan):
    # Defect 5: the folds and multi-class paths started fresh without a word.
    refused(run_main(tmp_path, "--data-dir", str(data), "--resume", "--run-name", "typo", *plan, *TINY),
            "--resume: run 'typo' has no")
    assert not (tmp_path / "output/models/typo").exists()


def test_training_with_checkpoint_is_refused(tmp_path, data):
    # Defect 12: it trained, then predicted with --checkpoint's weights instead of its own.
    refused(run_main(tmp_path, "--data-dir", str(data), "--checkpoint", "x.pt", *TINY), "--checkpoint", "--no-train")


@pytest.mark.parametrize("args,phrase", [
    (["--folds", "1"], "--folds 1: use --folds K with K >= 2"),
    (["--folds", "9"], "--folds 9 needs at least 9 cars"),
    (["--ensemble", "a.pt,b.pt"], "ensemble member not found"),
    (["--fold", "1"], "--fold: not used here"),
    (["--folds", "2", "--ensemble", "x.pt"], "--folds: not used here: with --ensemble"),
    (["--dataset", "folder", "--folds", "2"], "--folds: not used here"),
    (["--submit", "--test-sample-size", "0.5"], "--submit: not used here"),
    (["--threshold", "auto"], "--threshold auto chooses on out-of-fold predictions"),
    (["--crop", "40x40"], "--crop 40x40: input size 40x40 (HxW) is not supported"),
])
def test_unsupported_combinations_are_one_line_errors(tmp_path, data, args, phrase):
    # Defects 7 and 9: raw ValueErrors and tracebacks; every refusal comes before any training.
    result = refused(run_main(tmp_path, "--data-dir", str(data), *args, *TINY), phrase)
    assert "epoch 1" not in result


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


def test_no_train_checks_sizes_by_the_checkpoints_architecture(tmp_path, data):
    # Defect 7: --no-train checked --input-size by UNet1024's multiple-of-64 rule for every net.
    config = ModelConfig(arch="linknet", width=1.0, classes=1, input_size=(96, 96), encoder="resnet18",
                         encoder_weights="imagenet")  # as trained with ImageNet weights ...
    save_checkpoint({"model": build_model(config, pretrained=False).state_dict(), "model_config": config.to_dict(),
                     "epoch": 0}, tmp_path / "l.pt")
    # ... predicting needs no download (defect 6): offline, a download would fail loudly.
    result = ok(run_main(tmp_path, "--data-dir", str(data), "--no-train", "--checkpoint", str(tmp_path / "l.pt"),
                         "--input-size", "96x96", "--workers", "0", "--no-tta"))
    assert "linknet" in result.stdout and "valid_submission: True" in result.stdout


def test_resume_takes_the_runs_own_settings(tmp_path, data):
    # Defect 2: --resume --run-name R continued with main.py's current --input-size.
    ok(run_main(tmp_path, "--data-dir", str(data), "--run-name", "r", *TINY))
    result = ok(run_main(tmp_path, "--resume", "--run-name", "r", "--epochs", "2", "--workers", "0"))
    assert "epoch 2/2" in result.stdout
    state = load_checkpoint(tmp_path / "output/models/r/last.pt")
    assert tuple(state["model_config"]["input_size"]) == (64, 64) and state["epoch"] == 1
    assert json.loads((tmp_path / "logs/r/hparams.json").read_text())["input_size"] == "64x64"


def test_multiclass_no_train_predicts_with_the_runs_own_model(tmp_path):
    # Defect 6: multi-class --no-train without --checkpoint rebuilt the model from main.py's flags.
    ok(run_main(tmp_path, "--dataset", "folder", "--run-name", "m", "--data-root", "d", *TINY, "--epochs", "1"))
    result = ok(run_main(tmp_path, "--dataset", "folder", "--run-name", "m", "--no-train", "--data-root", "d",
                         "--workers", "0"))
    assert "width 0.125" in result.stdout and "input 64x64" in result.stdout
    assert list((tmp_path / "output/m/masks").glob("*.png"))


def test_a_bad_training_image_in_a_loader_worker_is_one_line(tmp_path, data):
    # Defect 10: torch's re-raised worker traceback reached the user.
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(data, broken)
    victim = sorted((broken / "train").glob("*.jpg"))[2]
    victim.write_bytes(b"not a jpeg at all")
    args = [a if a != "0" else "2" for a in TINY]  # --workers 2
    line = refused(run_main(tmp_path, "--data-dir", str(broken), *args), victim.name)
    assert "DataLoader worker" not in line and "Original Traceback" not in line


def test_an_empty_test_folder_is_found_before_training(tmp_path, data):
    # Defect 15: found only after training had finished.
    import shutil

    empty = tmp_path / "empty"
    shutil.copytree(data, empty)
    for p in (empty / "test").glob("*.jpg"):
        p.unlink()
    result = run_main(tmp_path, "--data-dir", str(empty), *TINY)  # the listed images are missing
    refused(result, "image(s) listed in sample_submission.csv are missing")
    assert "epoch 1" not in result.stdout
    (empty / "sample_submission.csv").write_text("img,rle_mask\n")  # nothing listed, nothing there
    result = run_main(tmp_path, "--data-dir", str(empty), *TINY)
    refused(result, "no test images to predict")
    assert "epoch 1" not in result.stdout


def test_folds_read_masks_from_the_csv_rows(tmp_path, data):
    # Defect 18: fold training (and OOF scoring) decoded the GIFs although train_masks.csv had the rows.
    import shutil

    rows_only = tmp_path / "rows"
    shutil.copytree(data, rows_only)
    for gif in (rows_only / "train_masks").glob("*.gif"):
        gif.write_bytes(b"GIF89a broken")  # any GIF decode now fails
    ok(run_main(tmp_path, "--data-dir", str(rows_only), "--folds", "2", "--run-name", "rows", *TINY))


def test_recipe_files_set_defaults_that_flags_override(tmp_path, data):
    recipe = tmp_path / "r.toml"
    recipe.write_text('input_size = "64x64"\nwidth = 0.125\nepochs = 3\nworkers = 0\nbatch_size = 4\ntta = false\n')
    result = ok(run_main(tmp_path, "--config", str(recipe), "--epochs", "1", "--data-dir", str(data), "--run-name", "c"))
    assert "epoch 1/1" in result.stdout
    record = json.loads((tmp_path / "logs/c/hparams.json").read_text())
    assert record["epochs"] == 1 and record["input_size"] == "64x64"
    assert record["recipe"] == {"file": str(recipe), "contents": recipe.read_text()}
    recipe.write_text("epoch = 3\n")
    assert f"{recipe}: unknown setting 'epoch'" in run_main(tmp_path, "--config", str(recipe)).stderr
    recipe.write_text('epochs = "3"\n')
    assert f"{recipe}: 'epochs' must be an int" in run_main(tmp_path, "--config", str(recipe)).stderr


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
