"""`main.py --no-train`: resuming a killed prediction, and reusing a finished submission.

A randomly initialised UNet1024 (width 0.125) saved as a format-2 checkpoint stands in for a
trained one: prediction does not care how the weights were made, and no training is needed.
"""

from __future__ import annotations

import json
import runpy
import shutil
import signal
import subprocess
import sys
import zlib
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from carvana.data.demo.dataset import write_demo_dataset
from carvana.models.registry import ModelConfig, build_model
from carvana.training.checkpoint import save_checkpoint

import main_helpers

MAIN = Path(__file__).resolve().parents[1] / "main.py"
TINY = ["--input-size", "64x64", "--width", "0.125", "--workers", "0", "--predict-batch-size", "2",
        "--chunk-size", "3", "--postprocess-workers", "1"]

# main.py, with the writer killed (SIGKILL, no cleanup at all) right after its 2nd chunk is recorded.
KILLED_CHILD = """
import os, runpy, signal, sys
sys.path.insert(0, {src!r})
from carvana.submission.predictions import PredictionsSaverCallback as Saver
append = Saver._append_chunk  # the writer thread's job: one chunk, fsynced and recorded
def append_then_die(self, index, rows):
    written = append(self, index, rows)
    if self.chunks_done == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return written
Saver._append_chunk = append_then_die
sys.argv = [{main!r}] + sys.argv[1:]
runpy.run_path({main!r}, run_name="__main__")
"""


def run_main(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return main_helpers.run_main(cwd, *args)  # in this process: see main_helpers.py


def first_member_lines(path: Path) -> list[str]:
    """Rows as a decoder that reads only the first gzip member sees them; asserts nothing follows it."""
    inflater = zlib.decompressobj(wbits=31)
    text = inflater.decompress(path.read_bytes())
    assert inflater.eof and inflater.unused_data == b"", f"{path} is not exactly one gzip member"
    return text.decode().splitlines()


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> SimpleNamespace:
    """Demo data (16 test images), a checkpoint, and an uninterrupted reference prediction."""
    cwd = tmp_path_factory.mktemp("predict")
    data = write_demo_dataset(cwd / "tiny", seed=3, n_train_cars=1, n_test_cars=1)
    torch.manual_seed(0)
    config = ModelConfig(arch="unet1024", width=0.125, classes=1, input_size=(64, 64))
    ckpt = cwd / "weights.pt"
    save_checkpoint({"model": build_model(config).state_dict(), "model_config": config.to_dict(), "epoch": 0,
                     "hparams": {"width": 0.125, "input_size": "64x64"}}, ckpt)
    common = ["--data-dir", str(data), "--checkpoint", str(ckpt), "--no-train", *TINY]
    ref = run_main(cwd, *common, "--output", "output/reference.csv.gz", "--run-name", "reference")
    assert ref.returncode == 0, ref.stdout[-2000:] + ref.stderr[-3000:]
    return SimpleNamespace(cwd=cwd, data=data, ckpt=ckpt, common=common, reference=cwd / "output" / "reference.csv.gz")


def test_no_train_checkpoint_resume_after_kill_9_gives_the_uninterrupted_file(setup, tmp_path):
    # Fails on the old code: "--no-train --checkpoint X --resume" exited with "no run with a last.pt".
    out = setup.cwd / "output" / "killed.csv.gz"
    child = tmp_path / "killed_main.py"
    child.write_text(KILLED_CHILD.format(src=str(MAIN.parent / "src"), main=str(MAIN)))
    killed = subprocess.run([sys.executable, str(child), *setup.common, "--output", str(out)], cwd=setup.cwd,
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not out.exists() and json.loads(out.with_name(out.name + ".partial.json").read_text())["chunks_done"] == 2

    resumed = run_main(setup.cwd, *setup.common, "--resume", "--output", str(out))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "prediction: resuming, 6 rows already written" in resumed.stdout
    reference = first_member_lines(setup.reference)
    assert len(reference) == 17 and reference[0] == "img,rle_mask"
    assert first_member_lines(out) == reference  # every row, from a first-member-only decoder
    assert out.read_bytes() == setup.reference.read_bytes()
    assert not list(out.parent.glob("killed.csv.gz.partial*"))


class FakeApi:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def competition_submit(self, file_name, message, competition):
        self.calls.append((file_name, message, competition))
        return SimpleNamespace(message="Successfully submitted")


def run_in_process(cwd: Path, monkeypatch, *args: str) -> int:
    """main.py's run in this process (so the Kaggle API and the model can be faked)."""
    from carvana.pipeline.settings import parse_command, settings_from
    from carvana.pipeline import run_command

    monkeypatch.chdir(cwd)
    defaults = settings_from(runpy.run_path(str(MAIN), run_name="main"))
    return run_command(parse_command(defaults, list(args)))


def test_no_train_submit_uploads_the_finished_submission_without_predicting_again(setup, tmp_path, monkeypatch, capsys):
    # Fails on the old code: --no-train --submit predicted the whole test set again before uploading.
    from carvana.data.sources import kaggle_client
    from carvana.training.classifier import CarvanaClassifier

    cwd = tmp_path / "run"
    (cwd / "output").mkdir(parents=True)
    for name in ("reference.csv.gz", "reference.csv.gz.json"):  # the file and its record (if any)
        if (setup.cwd / "output" / name).exists():
            shutil.copy(setup.cwd / "output" / name, cwd / "output" / name)
    # Same weights in another file (other path and mtime): still recognised, by content.
    other = tmp_path / "copy_of_weights.pt"
    shutil.copy(setup.ckpt, other)
    api = FakeApi()
    monkeypatch.setattr(kaggle_client, "make_api", lambda: api)

    def no_predicting(*args, **kwargs):
        raise AssertionError("predicted again")

    monkeypatch.setattr(CarvanaClassifier, "predict", no_predicting)
    args = [a if a != str(setup.ckpt) else str(other) for a in setup.common]
    status = run_in_process(cwd, monkeypatch, *args, "--output", "output/reference.csv.gz", "--submit",
                            "--message", "again", "--run-name", "upload")
    assert status == 0
    assert "already complete for these images, settings and weights; not predicting again" in capsys.readouterr().out
    assert api.calls == [("output/reference.csv.gz", "again", "carvana-image-masking-challenge")]
    assert (cwd / "output" / "reference.csv.gz").read_bytes() == setup.reference.read_bytes()


def test_other_weights_at_the_same_path_predict_again_and_say_so(setup, tmp_path):
    # Fails on the old code's message: it restarted silently (path+mtime tag), never naming what changed.
    cwd = tmp_path / "run"
    shutil.copytree(setup.cwd / "output", cwd / "output")
    ckpt = tmp_path / "weights.pt"
    torch.manual_seed(1)  # other weights, same architecture, same path as the run below uses
    config = ModelConfig(arch="unet1024", width=0.125, classes=1, input_size=(64, 64))
    save_checkpoint({"model": build_model(config).state_dict(), "model_config": config.to_dict(), "epoch": 0,
                     "hparams": {"width": 0.125, "input_size": "64x64"}}, ckpt)
    args = [a if a != str(setup.ckpt) else str(ckpt) for a in setup.common]
    result = run_main(cwd, *args, "--output", "output/reference.csv.gz", "--threshold", "0.45")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "made with other settings:" in result.stderr
    assert "threshold changed (0.5 -> 0.45)" in result.stderr and "weights changed (sha256" in result.stderr
    assert (cwd / "output" / "reference.csv.gz").read_bytes() != setup.reference.read_bytes()
