"""Kaggle Notebook: the working folder (/kaggle/working or CARVANA_WORKING) and a whole main.py run
that trains on the mounted files and writes its outputs (and the unpacked zips) into the working
folder, nothing into the mount or the current folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from carvana.data.sources import notebook
from carvana.data.layout import COMPETITION
from fetcher_helpers import zip_bytes
from notebook_helpers import OUTPUT, snapshot
from notebook_helpers import fixture_isolated, fixture_make_mount  # noqa: F401 (fixtures; isolated is autouse)


# ----------------------------------------------------------------------------- working folder


def test_kaggle_working_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(notebook, "KAGGLE_WORKING_DIR", tmp_path / "kaggle" / "working")
    assert notebook.kaggle_working_dir() is None and not notebook.in_kaggle_notebook()
    (tmp_path / "kaggle" / "working").mkdir(parents=True)
    assert notebook.kaggle_working_dir() == tmp_path / "kaggle" / "working" and notebook.in_kaggle_notebook()
    monkeypatch.setenv(notebook.WORKING_ENV, str(tmp_path / "elsewhere"))
    assert notebook.kaggle_working_dir() is None  # named but missing
    (tmp_path / "elsewhere").mkdir()
    assert notebook.kaggle_working_dir() == tmp_path / "elsewhere"
    monkeypatch.setenv(notebook.WORKING_ENV, "")
    assert notebook.kaggle_working_dir() is None  # empty: "not in a notebook"
    if os.geteuid() != 0:  # root may write anywhere a chmod forbids
        monkeypatch.setenv(notebook.WORKING_ENV, str(tmp_path / "elsewhere"))
        os.chmod(tmp_path / "elsewhere", 0o555)
        try:
            assert notebook.kaggle_working_dir() is None
        finally:
            os.chmod(tmp_path / "elsewhere", 0o755)


# ----------------------------------------------------------------------------- end to end

MAIN = Path(__file__).resolve().parents[1] / "main.py"
TINY = ["--input-size", "64x64", "--width", "0.125", "--epochs", "1", "--batch-size", "2", "--workers", "0",
        "--no-amp", "--validation-size", "0.5", "--predict-batch-size", "4", "--chunk-size", "5"]


def zip_folder(folder: Path, top: str) -> bytes:
    return zip_bytes({f"{top}/{p.name}": p.read_bytes() for p in sorted((folder / top).iterdir())})


def test_main_trains_on_the_mounted_files(tmp_path, make_mount):
    from carvana.data.demo.dataset import write_demo_dataset

    source = write_demo_dataset(tmp_path / "made", seed=5, n_train_cars=2, n_test_cars=1)
    zips = {f"{top}.zip": zip_folder(source, top) for top in ("train", "train_masks", "test")}
    csvs = {f"{p.name}.zip": zip_bytes({p.name: p.read_bytes()}) for p in source.glob("*.csv")
            if p.name in OUTPUT.values()}  # not test_solution.csv
    mount = make_mount({**dict.fromkeys(zips, "zip"), **dict.fromkeys(csvs, "dir")}, {**zips, **csvs})
    assert (mount / "sample_submission.csv").is_file() and (mount / "train.zip").is_file()
    mount_files = snapshot(mount)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KAGGLE_", "CARVANA_"))}
    working = tmp_path / "working"  # the notebook's /kaggle/working, outside the current folder
    working.mkdir()
    env.update(HOME=str(tmp_path / "home"), CARVANA_INPUT=str(mount), CARVANA_WORKING=str(working))
    result = subprocess.run([sys.executable, str(MAIN), "--run-name", "m1", "--no-keep-last", *TINY], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"data: mounted competition files at {mount} (CARVANA_INPUT)" in result.stdout
    assert "DEMO DATA" not in result.stdout and not (cwd / "data" / "demo").exists()
    # Outputs land in the working folder (the notebook's Output tab), only best.pt kept.
    assert f"outputs and data: under {working}" in result.stdout
    assert (working / "output" / "submit.csv.gz").is_file() and not (cwd / "output").exists()
    assert (working / "output/models/m1/best.pt").is_file() and not (working / "output/models/m1/last.pt").exists()
    summary = json.loads((working / "logs" / "m1" / "summary.json").read_text())
    n_train = len(list((source / "train").glob("*.jpg")))
    assert summary["data"] == "mount" and summary["train_images"] + summary["valid_images"] == n_train == 32
    assert summary["test_images"] == len(list((source / "test").glob("*.jpg"))) == 16
    # The zips went under the data root, which (relative) follows the outputs into the working
    # folder: the current folder may be a read-only code dataset. Nothing went into the mount.
    unpacked = working / "data" / COMPETITION
    assert (unpacked / "_downloads" / "train.zip.done").is_file() and len(list((unpacked / "train").iterdir())) == 32
    assert not (cwd / "data").exists()
    assert snapshot(mount) == mount_files
