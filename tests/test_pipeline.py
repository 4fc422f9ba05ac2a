"""`python main.py` end to end on a tiny demo dataset, in a fresh working directory."""

import csv
import gzip
import json
import math
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from carvana.training.checkpoint import load_checkpoint
from carvana.training.precision import choose_precision
from carvana.data.demo.dataset import write_demo_dataset
from carvana.submission.validate import expected_names, read_submission, validate_submission
import main_helpers

MAIN = Path(__file__).resolve().parents[1] / "main.py"
TINY = ["--input-size", "64x64", "--width", "0.125", "--batch-size", "4", "--workers", "0",
        "--validation-size", "0.5", "--predict-batch-size", "4", "--chunk-size", "5"]


def run_main(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return main_helpers.run_main(cwd, *args)  # in this process: see main_helpers.py


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One 2-epoch run on 2 train cars + 1 test car; later tests reuse its folder."""
    cwd = tmp_path_factory.mktemp("run")
    data = write_demo_dataset(cwd / "tiny", seed=3, n_train_cars=2, n_test_cars=1)
    result = run_main(cwd, "--data-dir", str(data), "--epochs", "2", "--run-name", "r1", *TINY)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return cwd, data, result


def test_run_writes_a_valid_submission_checkpoints_and_logs(trained):
    cwd, data, result = trained
    names = expected_names(data / "sample_submission.csv")
    report = validate_submission(cwd / "output" / "submit.csv.gz", names)
    assert report.ok and report.n_rows == len(names) == 16, str(report)
    assert "=== summary ===" in result.stdout and "Upload with" in result.stdout
    for ckpt in ("last.pt", "best.pt"):
        state = load_checkpoint(cwd / "output" / "models" / "r1" / ckpt)
        assert state["hparams"]["input_size"] == "64x64"
    logs = cwd / "logs" / "r1"
    rows = list(csv.DictReader(open(logs / "metrics.csv")))
    assert [r["epoch"] for r in rows] == ["0", "1"]
    summary = json.loads((logs / "summary.json").read_text())
    assert summary["rows"] == 16 and summary["valid_submission"] is True and summary["epochs_trained"] == 2
    assert set(summary["seconds_per_stage"]) == {"data", "train", "predict", "validate"}
    hparams = json.loads((logs / "hparams.json").read_text())
    assert hparams["epochs"] == 2
    # The precision decided at start-up is said once and recorded; masks come from train_masks.csv.
    expected = choose_precision(torch.device("cpu"), amp=True)
    assert hparams["precision"] == expected.name and result.stdout.count(expected.describe()) == 1
    assert f"masks: RLE rows of {data / 'train_masks.csv'}" in result.stdout
    assert (logs / "preview_epoch002.png").exists()
    assert not list((cwd / "output").glob("*.partial*"))  # no leftovers of the streaming writer


def test_predicting_from_the_checkpoint_reproduces_the_submission(trained):
    cwd, data, _ = trained
    best = cwd / "output" / "models" / "r1" / "best.pt"
    result = run_main(cwd, "--data-dir", str(data), "--no-train", "--checkpoint", str(best),
                      "--output", "output/again.csv.gz", "--run-name", "r1-predict", *TINY)
    assert result.returncode == 0, result.stderr[-3000:]
    first = gzip.decompress((cwd / "output" / "submit.csv.gz").read_bytes())
    assert gzip.decompress((cwd / "output" / "again.csv.gz").read_bytes()) == first


def test_resume_continues_at_the_next_epoch(trained):
    cwd, data, _ = trained
    result = run_main(cwd, "--data-dir", str(data), "--epochs", "3", "--resume", "--run-name", "r1", *TINY)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming run r1" in result.stdout and "epoch 3/3" in result.stdout and "epoch 1/3" not in result.stdout
    assert "--epochs changed from 2 to 3" in result.stdout
    rows = list(csv.DictReader(open(cwd / "logs" / "r1" / "metrics.csv")))
    assert [r["epoch"] for r in rows] == ["0", "1", "2"]
    # The third epoch's LR is that of a 3-epoch cosine (2e-3 down to 2e-5), not the 2-epoch one's floor.
    lr0 = float(rows[0]["lr"])
    assert float(rows[2]["lr"]) == pytest.approx(0.01 * lr0 + 0.99 * lr0 * (1 + math.cos(math.pi * 2 / 3)) / 2, rel=1e-3)
    assert load_checkpoint(cwd / "output" / "models" / "r1" / "last.pt")["epoch"] == 2


def test_no_train_without_weights_is_a_clear_error(tmp_path):
    data = write_demo_dataset(tmp_path / "tiny", seed=3, n_train_cars=2, n_test_cars=1)
    result = run_main(tmp_path, "--data-dir", str(data), "--no-train", "--run-name", "nothing", *TINY)
    assert result.returncode != 0 and "--no-train needs weights" in result.stderr


def test_unknown_flag_and_wrong_type_are_errors(tmp_path):
    assert "unrecognized arguments: --epoch" in run_main(tmp_path, "--epoch", "3").stderr
    assert "expected int" in run_main(tmp_path, "--epochs", "three").stderr


def test_a_corrupt_test_image_still_gets_an_empty_row_and_a_named_warning(trained, tmp_path):
    cwd, data, _ = trained
    broken = tmp_path / "broken"
    shutil.copytree(data, broken)
    victim = sorted((broken / "test").glob("*.jpg"))[3]
    victim.write_bytes(victim.read_bytes()[:5000])  # truncated mid-scan
    best = cwd / "output" / "models" / "r1" / "best.pt"
    result = run_main(cwd, "--data-dir", str(broken), "--no-train", "--checkpoint", str(best),
                      "--output", "output/broken.csv.gz", "--run-name", "r1-broken", *TINY)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{victim.name}: truncated JPEG" in result.stderr
    rows = read_submission(cwd / "output" / "broken.csv.gz")
    assert len(rows) == 16 and rows[victim.name] == ""
    assert validate_submission(cwd / "output" / "broken.csv.gz", expected_names(broken / "sample_submission.csv")).ok


def test_bad_input_gives_one_clear_line_not_a_traceback(tmp_path):
    result = run_main(tmp_path, "--data-dir", str(tmp_path / "nowhere"))
    assert result.returncode == 1
    assert "nowhere: data folder does not exist" in result.stderr and "Traceback" not in result.stderr
    data = write_demo_dataset(tmp_path / "tiny", seed=3, n_train_cars=2, n_test_cars=1)
    result = run_main(tmp_path, "--data-dir", str(data), "--no-train", "--checkpoint", "missing.pt", *TINY)
    assert result.returncode == 1 and "missing.pt: checkpoint not found" in result.stderr


# Settings of TINY that are not part of the model: with them alone, a --no-train run must
# take the model (width 0.125, input 64x64) from the checkpoint, not main.py's defaults.
NOT_MODEL = [a for a in TINY if a not in ("--input-size", "64x64", "--width", "0.125")]


def test_no_train_rebuilds_the_checkpoints_model_and_keeps_the_runs_hparams(trained):
    cwd, data, _ = trained
    logs = cwd / "logs" / "r1"
    before = (logs / "hparams.json").read_text(), (logs / "summary.json").read_text()
    result = run_main(cwd, "--data-dir", str(data), "--no-train", "--run-name", "r1", "--output", "output/rebuilt.csv.gz",
                      *NOT_MODEL)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "unet1024 width 0.125, 1 class(es), input 64x64" in result.stdout
    first = gzip.decompress((cwd / "output" / "submit.csv.gz").read_bytes())
    assert gzip.decompress((cwd / "output" / "rebuilt.csv.gz").read_bytes()) == first
    # The training run's settings and summary survive; the prediction has its own files.
    assert ((logs / "hparams.json").read_text(), (logs / "summary.json").read_text()) == before
    assert json.loads((logs / "predict_hparams.json").read_text())["train"] is False
    assert json.loads((logs / "predict_summary.json").read_text())["rows"] == 16


def test_a_format_1_checkpoint_still_predicts(trained, tmp_path):
    cwd, data, _ = trained
    state = load_checkpoint(cwd / "output" / "models" / "r1" / "best.pt")
    del state["model_config"]
    state["format_version"] = 1  # what the first release wrote: the model only in hparams
    old = tmp_path / "format1.pt"
    torch.save(state, old)
    result = run_main(cwd, "--data-dir", str(data), "--no-train", "--checkpoint", str(old), "--run-name", "r1-old",
                      "--output", "output/format1.csv.gz", *NOT_MODEL)
    assert result.returncode == 0, result.stderr[-3000:]
    first = gzip.decompress((cwd / "output" / "submit.csv.gz").read_bytes())
    assert gzip.decompress((cwd / "output" / "format1.csv.gz").read_bytes()) == first


def test_a_flag_contradicting_the_checkpoint_is_a_clear_error(trained):
    cwd, data, _ = trained
    best = cwd / "output" / "models" / "r1" / "best.pt"
    result = run_main(cwd, "--data-dir", str(data), "--no-train", "--checkpoint", str(best), "--width", "0.5",
                      "--run-name", "r1-bad", *NOT_MODEL)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"--width 0.5 contradicts the checkpoint {best}" in result.stderr and "--width 0.125" in result.stderr


def test_resume_errors_name_the_problem(trained):
    cwd, data, _ = trained
    result = run_main(cwd, "--data-dir", str(data), "--resume", "--run-name", "r9", *TINY)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "run 'r9' has no output/models/r9/last.pt" in result.stderr and "r1" in result.stderr
    assert not (cwd / "output" / "models" / "r9").exists()  # no silent fresh start
    # Resuming with another width: the weights do not fit, said in one line (no key dump).
    wide = [a if a != "0.125" else "0.25" for a in TINY]
    result = run_main(cwd, "--data-dir", str(data), "--resume", "--run-name", "r1", "--epochs", "3", *wide)
    assert result.returncode == 1 and "Traceback" not in result.stderr and "Missing key" not in result.stderr
    # A resumed run takes its recorded settings: the contradicting flag is named with both values.
    assert "--width 0.25 (command line) contradicts run 'r1', which was started with --width 0.125" in result.stderr


def test_a_log_off_a_terminal_gets_lines_not_progress_bars(trained):
    """stdout/stderr were pipes: no bar refreshes (carriage returns), one line per epoch."""
    _, _, result = trained
    log = result.stdout + result.stderr
    assert "\r" not in log and "it/s" not in log
    assert [line.split("  ")[0] for line in result.stdout.splitlines() if line.startswith("epoch ")] == ["epoch 1/2", "epoch 2/2"]
    assert len(log.encode()) < 10_000, log
