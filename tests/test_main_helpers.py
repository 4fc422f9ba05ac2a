"""tests/main_helpers.py: main.py run in the test process reports what its own process reports.

Most tests run main.py in the test process (docs/testing.md); these compare the two ways on
the outcomes tests read: the exit code, stdout's lines and stderr's one-line errors, a
warning printed to stderr, and the working directory and environment given back afterwards.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from carvana.data.demo.dataset import write_demo_dataset

import main_helpers


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return write_demo_dataset(tmp_path_factory.mktemp("helpers") / "demo", seed=3, n_train_cars=2, n_test_cars=1)


@pytest.mark.parametrize("args", [
    ["--epochs", "many"],  # argparse: exit 2, usage and the error on stderr
    ["--no-such-flag"],
    ["--data-dir", "{demo}", "--folds", "1"],  # a plan refused in one line: exit 1
    ["--data-dir", "{demo}", "--no-train", "--run-name", "nothing-here"],
])
def test_a_refused_command_reports_the_same_in_this_process_as_in_its_own(args, demo, tmp_path):
    args = [str(demo) if a == "{demo}" else a for a in args]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    here, env = os.getcwd(), dict(os.environ)
    inside = main_helpers.run_main(tmp_path / "a", *args)
    assert os.getcwd() == here and dict(os.environ) == env
    alone = main_helpers.run_main_process(tmp_path / "b", *args)
    assert inside.returncode == alone.returncode != 0
    assert inside.stderr.replace(str(tmp_path / "a"), "") == alone.stderr.replace(str(tmp_path / "b"), "")
    assert "Traceback" not in inside.stderr


def test_a_run_reports_the_same_lines_and_its_warning(demo, tmp_path):
    # One test photo unreadable: the run warns on stderr, names the file, and still succeeds.
    broken = tmp_path / "data"
    for path in demo.rglob("*"):
        if path.is_file():
            (broken / path.relative_to(demo)).parent.mkdir(parents=True, exist_ok=True)
            (broken / path.relative_to(demo)).symlink_to(path)
    victim = sorted((broken / "test").glob("*.jpg"))[0]
    victim.unlink()
    victim.write_bytes(b"not a jpeg")
    args = ["--data-dir", str(broken), "--input-size", "64x64", "--width", "0.125", "--epochs", "1", "--workers", "0",
            "--no-tta", "--validation-size", "0.5"]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    inside = main_helpers.run_main(tmp_path / "a", *args, env={**os.environ, "OMP_NUM_THREADS": "1"})
    alone = main_helpers.run_main_process(tmp_path / "b", *args, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert inside.returncode == alone.returncode == 0, inside.stderr[-2000:] + alone.stderr[-2000:]
    for result in (inside, alone):
        assert victim.name in result.stderr and "valid_submission: True" in result.stdout
    # The same lines apart from timings and the run's name (a timestamp): the epochs, the summary keys.
    def shape(text: str) -> list[str]:
        return [line.split()[0] for line in text.splitlines() if line.strip() and not line.startswith("prediction:")]
    assert shape(inside.stdout) == shape(alone.stdout)
