"""Shared by the orchestration tests: running `python main.py` (in the test's process, see
main_helpers.py), checking that it succeeded or was refused in one line, and the tiny demo
dataset the runs use (4 train cars, 1 test car; runs at 64x64, width 0.125 take seconds).

``data`` is module-scoped: built once in each test module that imports ``fixture_data`` (by its
function name, so that a test's argument does not shadow the import)."""

import subprocess
from pathlib import Path

import pytest

from carvana.data.demo.dataset import write_demo_dataset

from main_helpers import run_main  # noqa: F401 (the orchestration tests import it from here)

TINY = ["--input-size", "64x64", "--width", "0.125", "--batch-size", "4", "--workers", "0",
        "--predict-batch-size", "4", "--epochs", "1", "--no-tta"]


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


@pytest.fixture(scope="module", name="data")
def fixture_data(tmp_path_factory) -> Path:
    return write_demo_dataset(tmp_path_factory.mktemp("data") / "tiny", seed=5, n_train_cars=4, n_test_cars=1)
