"""Two runs writing the same submission (or masks folder): the second stops at once, the first's progress stays.

The "other run" is a child process holding the output's lock (``exclusive_lock``), as a running
prediction does; the stand-in model is a 1x1 convolution on small JPEGs.
"""

import os
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from carvana.submission.gzip_stream import OutputLockedError, SubmissionWriteError, exclusive_lock
from carvana.training import distributed as dist

SRC = str(Path(__file__).resolve().parents[1] / "src")
HOLDER = """
import sys
sys.path.insert(0, {src!r})
from pathlib import Path
from carvana.submission.gzip_stream import exclusive_lock
with exclusive_lock(Path(sys.argv[1])):
    print("locked", flush=True)
    sys.stdin.read()  # hold it until the test closes our stdin (or kills us)
"""


@contextmanager
def held_by_another_process(target: Path):
    proc = subprocess.Popen([sys.executable, "-c", HOLDER.format(src=SRC), str(target)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        yield proc
    finally:
        if proc.poll() is None:
            proc.stdin.close()
            proc.wait(timeout=60)
        proc.stdout.close()


def write_images(folder: Path, n: int = 4) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        paths.append(folder / f"car{i}_01.jpg")
        cv2.imwrite(str(paths[-1]), np.full((32, 48, 3), 40 * i, np.uint8))
    return paths


def classifier(classes: int = 1):
    from carvana.training.classifier import CarvanaClassifier
    from carvana.training.tasks import MultiClassTask

    torch.manual_seed(0)
    return CarvanaClassifier(torch.nn.Conv2d(3, classes, 1), epochs=1, device="cpu", progress=False,
                             task=MultiClassTask(classes) if classes > 1 else None)


def test_a_second_lock_is_refused_with_one_line_naming_the_file(tmp_path):
    target = tmp_path / "submit.csv.gz"
    with exclusive_lock(target) as lock:
        assert lock == tmp_path / "submit.csv.gz.lock" and lock.read_text() == f"{os.getpid()}\n"
        with pytest.raises(OutputLockedError) as info:
            with exclusive_lock(target):
                pass
    message = str(info.value)
    assert message.startswith(f"{target}: another run is writing it") and "\n" not in message
    assert isinstance(info.value, SubmissionWriteError)  # one of the pipeline's USER_ERRORS
    assert not lock.exists()
    with exclusive_lock(target):  # released: free again
        pass


def test_a_second_submission_run_stops_at_once_and_the_first_runs_progress_stays(tmp_path):
    # Fails on the old code: the second run found a progress file it did not recognise and started over,
    # truncating the running prediction's .partial and deleting its .partial.json.
    from carvana.submission.sharded import predict_to_submission

    images = write_images(tmp_path / "test")
    out = tmp_path / "output" / "submit.csv.gz"
    out.parent.mkdir()
    progress = {out.with_name(out.name + s): b"progress of the running prediction " + s.encode()
                for s in (".partial", ".partial.json")}
    for path, data in progress.items():
        path.write_bytes(data)
    with held_by_another_process(out):
        with pytest.raises(OutputLockedError, match=f"{out}: another run is writing it"):
            predict_to_submission(classifier(), images, out, (32, 48), chunk_size=2, loader_workers=0)
        assert {p: p.read_bytes() for p in progress} == progress and not out.exists()
    assert predict_to_submission(classifier(), images, out, (32, 48), chunk_size=2, loader_workers=0) == 4
    assert out.is_file() and not out.with_name(out.name + ".lock").exists()


def test_a_lock_left_by_a_killed_run_blocks_nothing(tmp_path):
    target = tmp_path / "submit.csv.gz"
    with held_by_another_process(target) as proc:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    assert target.with_name("submit.csv.gz.lock").exists()  # kill -9: no cleanup ran
    with exclusive_lock(target):
        pass
    assert not target.with_name("submit.csv.gz.lock").exists()


@pytest.mark.parametrize("rank", [0, 1])
def test_under_torchrun_each_rank_locks_its_shard(tmp_path, monkeypatch, rank):
    from carvana.submission.sharded import predict_to_submission, shard_path

    images = write_images(tmp_path / "test")
    out = tmp_path / "submit.csv.gz"
    monkeypatch.setattr(dist, "rank", lambda: rank)
    monkeypatch.setattr(dist, "world_size", lambda: 2)
    shard = shard_path(out, rank, 2)
    with held_by_another_process(shard):
        with pytest.raises(OutputLockedError, match=f"{shard}: another run"):
            predict_to_submission(classifier(), images, out, (32, 48), chunk_size=2, loader_workers=0)
    if rank == 0:  # rank 0 also assembles the output: it locks that too
        with held_by_another_process(out):
            with pytest.raises(OutputLockedError, match=f"{out}: another run"):
                predict_to_submission(classifier(), images, out, (32, 48), chunk_size=2, loader_workers=0)
    assert not shard.exists()


def test_a_second_masks_run_stops_before_touching_the_folder(tmp_path):
    # Fails on the old code: the second run (other weights) deleted the first run's masks.
    from carvana.submission.masks import predict_to_masks

    images = write_images(tmp_path / "imgs", n=2)
    out = tmp_path / "masks"
    assert predict_to_masks(classifier(3), images, out, (16, 16), ["a", "b", "c"], loader_workers=0, tag="w1") == 2
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with held_by_another_process(out):
        with pytest.raises(OutputLockedError, match=f"{out}: another run"):
            predict_to_masks(classifier(3), images, out, (16, 16), ["a", "b", "c"], loader_workers=0, tag="w2")
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert predict_to_masks(classifier(3), images, out, (16, 16), ["a", "b", "c"], loader_workers=0, tag="w2") == 2
    assert not (tmp_path / "masks.lock").exists()
