"""Off a terminal (no tqdm bar), prediction prints a progress line now and then, on rank 0 only.

capsys replaces stderr with a stream that is not a terminal, as nohup, CI or a notebook's log do.
"""

import re
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from carvana.submission.progress import ProgressLine, format_duration
from carvana.training import distributed as dist

PROGRESS = re.compile(r"^prediction: (\d+)/(\d+) images \(\d+\.\d%\), \d+\.\d images/s, about \d+ s left$")
FINAL = re.compile(r"^prediction: (\d+)/(\d+) images in \d+ s \(\d+\.\d images/s\)$")


def write_images(folder: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        cv2.imwrite(str(folder / f"car{i}_01.jpg"), np.full((24, 36, 3), 30 * i, np.uint8))
    return sorted(folder.glob("*.jpg"))


def classifier(classes: int = 1):
    from carvana.training.classifier import CarvanaClassifier
    from carvana.training.tasks import MultiClassTask

    torch.manual_seed(0)
    return CarvanaClassifier(torch.nn.Conv2d(3, classes, 1), epochs=1, device="cpu", progress=False,
                             task=MultiClassTask(classes) if classes > 1 else None)


def lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("prediction: ")]


def test_submission_prediction_prints_images_done_rate_and_time_left(tmp_path, capsys):
    # Fails on the old code: nothing was printed until the end (and no progress_interval_s existed).
    from carvana.submission.sharded import predict_to_submission

    images = write_images(tmp_path / "test", 5)
    out = tmp_path / "submit.csv.gz"
    predict_to_submission(classifier(), images, out, (16, 24), chunk_size=2, batch_size=2, loader_workers=0,
                          progress_interval_s=0)
    printed = lines(capsys.readouterr().out)
    assert [PROGRESS.match(line).groups() for line in printed[:-1]] == [("2", "5"), ("4", "5")], printed
    assert FINAL.match(printed[-1]).groups() == ("5", "5"), printed


def test_at_most_one_line_per_interval_plus_the_last(tmp_path, capsys):
    from carvana.submission.sharded import predict_to_submission

    images = write_images(tmp_path / "test", 5)
    predict_to_submission(classifier(), images, tmp_path / "s.csv.gz", (16, 24), chunk_size=2, batch_size=1,
                          loader_workers=0)  # the default: a line a minute, so only the last one here
    printed = lines(capsys.readouterr().out)
    assert len(printed) == 1 and FINAL.match(printed[0]).groups() == ("5", "5")


def test_masks_prediction_prints_progress_too(tmp_path, capsys):
    from carvana.submission.masks import predict_to_masks

    images = write_images(tmp_path / "imgs", 3)
    predict_to_masks(classifier(2), images, tmp_path / "masks", (16, 16), ["a", "b"], batch_size=2,
                     loader_workers=0, progress_interval_s=0)
    printed = lines(capsys.readouterr().out)
    assert PROGRESS.match(printed[0]).groups() == ("2", "3") and FINAL.match(printed[1]).groups() == ("3", "3")
    assert len(printed) == 2


def test_only_rank_0_prints_and_nothing_on_a_terminal(monkeypatch, capsys):
    monkeypatch.setattr(dist, "rank", lambda: 1)
    quiet = ProgressLine(4, interval_s=0)
    quiet.advance(2)
    quiet.finish()
    monkeypatch.undo()
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    on_terminal = ProgressLine(4, interval_s=0)  # tqdm's bar shows progress there
    on_terminal.advance(2)
    on_terminal.finish()
    assert capsys.readouterr().out == ""
    monkeypatch.undo()
    shown = ProgressLine(4, interval_s=0)
    shown.advance(2)
    assert PROGRESS.match(capsys.readouterr().out.strip()).groups() == ("2", "4")


@pytest.mark.parametrize("seconds, text", [(12.4, "12 s"), (250, "4 min 10 s"), (3900, "1 h 05 min")])
def test_durations_read_naturally(seconds, text):
    assert format_duration(seconds) == text
