"""The combinations matrix on real competition cars (../shared/carvana-sample): each either
runs end to end or is refused with one line; none prints a traceback.

Tiny on purpose (4 of the 24 cars, a quarter of the test images, 64x64, width 0.125, one
epoch): the point is that every plan and architecture meets the real file layout, sizes and
masks, not the Dice. CI trains each architecture on one plan (a single split, or --folds 2 for
the 2015 U-Net, the one the fold path used to break); CARVANA_FULL_MATRIX=1 trains every
architecture on both plans (docs/runs.md records such a run).
"""

import os
import subprocess
from pathlib import Path

import pytest

from carvana.models.registry import ModelConfig, build_model
from carvana.training.checkpoint import save_checkpoint
from conftest import CARVANA_SAMPLE
import main_helpers

MAIN = Path(__file__).resolve().parents[1] / "main.py"
SMALL = ["--sample-size", "0.16", "--test-sample-size", "0.25", "--epochs", "1", "--workers", "0", "--batch-size", "4",
         "--predict-batch-size", "4", "--no-tta"]
ARCHS = {
    "unet1024": ["--input-size", "64x64", "--width", "0.125"],
    "unet-original": ["--arch", "unet-original", "--input-size", "68x68", "--width", "0.125"],
    "linknet34": ["--arch", "linknet", "--encoder", "resnet34", "--encoder-weights", "none", "--input-size", "64x64"],
}


def main_py(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    result = main_helpers.run_main(cwd, *args)
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return result


def runs(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "valid_submission: True" in result.stdout


def refuses(result: subprocess.CompletedProcess, phrase: str) -> None:
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode == 1 and len(errors) == 1 and phrase in errors[0], result.stderr[-2000:]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Each architecture trained on a single split and on --folds 2 (an off-grid threshold)."""
    if not (CARVANA_SAMPLE / "train_masks.csv").exists():
        pytest.skip(f"real data slice not present at {CARVANA_SAMPLE}")
    sample = CARVANA_SAMPLE
    cwd = tmp_path_factory.mktemp("matrix")
    data = ["--data-dir", str(sample)]
    full = os.environ.get("CARVANA_FULL_MATRIX") == "1"
    for name, arch in ARCHS.items():
        if full or name != "unet-original":
            runs(main_py(cwd, *data, *SMALL, *arch, "--run-name", name))
        if full or name == "unet-original":
            runs(main_py(cwd, *data, *SMALL, *arch, "--folds", "2", "--threshold", "0.42", "--run-name", f"{name}-folds",
                         "--output", f"output/{name}-folds.csv.gz"))
    return cwd, data


def checkpoint_of(cwd: Path, name: str) -> str:
    """The arch's single-split best.pt, else its first fold's."""
    single = cwd / f"output/models/{name}/best.pt"
    return str(single if single.is_file() else cwd / f"output/models/{name}-folds/fold0/best.pt")


@pytest.mark.parametrize("name", list(ARCHS))
def test_no_train_from_each_checkpoint_needs_no_model_flags(trained, name):
    cwd, data = trained
    result = main_py(cwd, *data, *SMALL, "--no-train", "--checkpoint", checkpoint_of(cwd, name),
                     "--output", f"output/{name}-again.csv.gz", "--run-name", f"{name}-predict")
    runs(result)


def test_a_mixed_ensemble_of_unet2015_and_unet1024_folds(trained):
    cwd, data = trained
    members = "output/models/unet-original-folds,output/models/unet1024/best.pt"
    result = main_py(cwd, *data, *SMALL, "--ensemble", members, "--ensemble-weights", "1,1,1",
                     "--output", "output/mixed.csv.gz", "--run-name", "mixed")
    runs(result)
    assert "ensemble of 3" in result.stdout
    summary = (cwd / "logs/unet-original-folds/oof_summary.json").read_text()
    assert '"threshold": 0.42' in summary  # the off-grid threshold scored out of fold


def test_resume_without_repeating_the_model_flags(trained):
    cwd, data = trained
    result = main_py(cwd, "--resume", "--run-name", "linknet34", "--epochs", "2", "--output", "output/resumed.csv.gz")
    runs(result)
    assert "epoch 2/2" in result.stdout and "linknet" in result.stdout


def test_a_multiclass_checkpoint_given_to_the_binary_path(trained, tmp_path):
    cwd, data = trained
    config = ModelConfig(arch="unet1024", width=0.125, classes=3, input_size=(64, 64))
    save_checkpoint({"model": build_model(config).state_dict(), "model_config": config.to_dict(), "epoch": 0},
                    tmp_path / "pets.pt")
    refuses(main_py(cwd, *data, *SMALL, "--no-train", "--checkpoint", str(tmp_path / "pets.pt")), "3-class model")


def test_folds_on_a_multiclass_dataset_is_refused(trained):
    cwd, _ = trained
    refuses(main_py(cwd, "--dataset", "folder", "--folds", "2", "--epochs", "1"), "--folds: not used here")


def test_a_corrupt_training_image_with_two_loader_workers(trained, tmp_path):
    cwd, data = trained
    sample = Path(data[1])
    broken = tmp_path / "broken"  # the real files linked, every training image replaced by garbage
    for path in sample.rglob("*"):
        if path.is_file():
            (broken / path.relative_to(sample)).parent.mkdir(parents=True, exist_ok=True)
            (broken / path.relative_to(sample)).symlink_to(path)
    victims = sorted((broken / "train").glob("*.jpg"))
    for victim in victims:
        victim.unlink()
        victim.write_bytes(b"\xff\xd8 not really a jpeg")
    result = main_py(cwd, "--data-dir", str(broken), *SMALL, *ARCHS["unet1024"], "--workers", "2")
    refuses(result, f"{broken / 'train'}/")  # one line naming the file, from a loader worker process
    assert "DataLoader worker" not in result.stderr
