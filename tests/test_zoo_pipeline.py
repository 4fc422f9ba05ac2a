"""main.py with each named network: 1-epoch train + predict, then --no-train --checkpoint
rebuilds the checkpoint's own network (no --arch given) and reproduces the submission."""

from __future__ import annotations

import gzip
import os
import subprocess
from pathlib import Path

import pytest

from carvana.data.demo.dataset import write_demo_dataset
from carvana.models.registry import output_size
from carvana.training.checkpoint import load_checkpoint, model_config_of
import main_helpers

MAIN = Path(__file__).resolve().parents[1] / "main.py"
TINY = ["--batch-size", "4", "--workers", "0", "--validation-size", "0.5", "--predict-batch-size", "4",
        "--chunk-size", "2", "--test-sample-size", "0.25", "--no-tta"]
NETS = {
    "linknet34": ["--arch", "linknet", "--encoder", "resnet34", "--input-size", "32x32"],
    "ternausnet": ["--arch", "unet", "--encoder", "vgg11", "--input-size", "32x32"],
    "mobilenetv2-unet": ["--arch", "unet", "--encoder", "mobilenet_v2", "--input-size", "32x32"],
    "unet-original": ["--arch", "unet-original", "--width", "0.0625", "--input-size", "52x52"],
}


def run_main(cwd: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    if env:  # variables that libraries read when imported: a process of its own
        return main_helpers.run_main_process(cwd, *args, env={**os.environ, **env})
    return main_helpers.run_main(cwd, *args)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_demo_dataset(tmp_path_factory.mktemp("zoo") / "tiny", seed=5, n_train_cars=2, n_test_cars=1)


@pytest.mark.parametrize("net", sorted(NETS))
def test_train_predict_and_rebuild_from_the_checkpoint(net, data, tmp_path):
    result = run_main(tmp_path, "--data-dir", str(data), "--epochs", "1", "--run-name", net,
                      "--encoder-weights", "none", *NETS[net], *TINY)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    best = tmp_path / "output" / "models" / net / "best.pt"
    config = model_config_of(load_checkpoint(best))
    assert config.arch == NETS[net][1] and output_size(config) == tuple(int(v) for v in NETS[net][-1].split("x"))
    # no --arch/--encoder/--input-size: the checkpoint says what to build
    again = run_main(tmp_path, "--data-dir", str(data), "--no-train", "--checkpoint", str(best), "--run-name", "p",
                     "--output", "output/again.csv.gz", *TINY)
    assert again.returncode == 0, again.stderr[-3000:]
    first = gzip.decompress((tmp_path / "output" / "submit.csv.gz").read_bytes())
    assert gzip.decompress((tmp_path / "output" / "again.csv.gz").read_bytes()) == first
    assert first.count(b"\n") == 1 + 4  # header + 4 test images


def test_imagenet_offline_fails_at_start_up_with_one_clear_line(tmp_path):
    """HF_HUB_OFFLINE and an empty cache: refused before any data work (the data folder does
    not even exist), one line naming both ways out, and nothing downloaded."""
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "TORCH_HOME": str(tmp_path / "torch")}
    result = run_main(tmp_path, "--data-dir", str(tmp_path / "nowhere"), "--arch", "linknet", "--encoder", "resnet34",
                      "--encoder-weights", "imagenet", env=env)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --encoder-weights imagenet: cannot download"), result.stderr
    assert "--encoder-weights PATH" in lines[0] and "--encoder-weights none" in lines[0]
    assert not (tmp_path / "hf").exists() or not any((tmp_path / "hf").rglob("*.safetensors"))


def test_zoo_flag_errors_are_one_line(tmp_path):
    result = run_main(tmp_path, "--arch", "unet-original", "--input-size", "64x64")
    assert result.returncode != 0 and "nearest valid height: 52 or 68" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    result = run_main(tmp_path, "--arch", "unet9000")
    assert result.returncode != 0 and "unknown architecture 'unet9000'; known:" in result.stderr
    result = run_main(tmp_path, "--arch", "linknet", "--encoder-weights", str(tmp_path / "none.pt"))
    assert result.returncode != 0 and "none.pt: no such file" in result.stderr
