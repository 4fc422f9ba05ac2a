"""How runs combine (pipeline/) when each test makes its own runs: the threshold a fold checkpoint
records, refusals before any training (mistyped resumes, unsupported combinations, a multi-class
checkpoint on the binary path, a bad training image, an empty test folder), and the settings a
run takes (a checkpoint's architecture, a resumed run's own, recipe files under flags). Each test
names the defect of the orchestration issue it covers; each failed on the code before the
redesign. Tests that reuse one trained --folds run are in test_orchestration.py.

Runs are `python main.py` subprocesses on a tiny demo dataset (4 train cars, 1 test car) at
64x64, width 0.125, so each takes seconds.
"""

import json

import pytest

from carvana.models.registry import ModelConfig, build_model
from carvana.training.checkpoint import load_checkpoint, save_checkpoint, threshold_of
from orchestration_helpers import TINY, ok, refused, run_main
from orchestration_helpers import fixture_data  # noqa: F401 (the module-scoped data fixture)


def test_fold_checkpoints_record_the_threshold_prediction_used(tmp_path, data):
    # Defect 13: --threshold auto's choice was not stored, so segment/export used 0.5.
    ok(run_main(tmp_path, "--data-dir", str(data), "--folds", "2", "--threshold", "auto", "--run-name", "a", *TINY))
    chosen = json.loads((tmp_path / "logs/a/oof_summary.json").read_text())["threshold"]
    for fold in (0, 1):
        assert threshold_of(load_checkpoint(tmp_path / f"output/models/a/fold{fold}/best.pt")) == chosen


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
