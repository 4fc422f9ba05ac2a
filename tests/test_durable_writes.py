"""best.pt and the masks folder's .fingerprint: atomic (temp name, fsync, rename), then the directory fsynced."""

import json
import os
import stat
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch

from carvana.training.checkpoint import ModelSaverCallback, load_checkpoint


@pytest.fixture
def io_log(monkeypatch) -> list[tuple]:
    """Every os.replace (destination) and os.fsync (path, is a directory), in order; both still happen."""
    events: list[tuple] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"), stat.S_ISDIR(os.fstat(fd).st_mode)))
        real_fsync(fd)

    def replace(src, dst) -> None:
        real_replace(src, dst)
        events.append(("replace", str(dst)))

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


def dir_fsynced_after(events: list[tuple], path: Path) -> bool:
    """True when ``path``'s directory is fsynced after the last rename onto ``path``."""
    last = max(i for i, e in enumerate(events) if e == ("replace", str(path)))
    return ("fsync", str(path.parent), True) in events[last + 1:]


def trainer(weight: float) -> SimpleNamespace:
    return SimpleNamespace(state_dict=lambda: {"model": {"w": torch.full((3,), weight)}, "epoch": int(weight)})


def test_best_pt_is_a_hard_link_renamed_into_place_then_the_directory_is_fsynced(tmp_path, io_log):
    # Fails on the old code: best.pt was a byte copy, renamed without an fsync of the directory.
    saver = ModelSaverCallback(tmp_path / "models", {"lr": 0.1})
    saver.on_epoch_end(trainer(1.0), 0, {"dice": 0.5, "is_best": True}, None)
    best, last = saver.best_path, saver.last_path
    assert os.path.samestat(best.stat(), last.stat())  # linked, no bytes copied
    assert dir_fsynced_after(io_log, best) and dir_fsynced_after(io_log, last)
    saver.on_epoch_end(trainer(2.0), 1, {"dice": 0.4, "is_best": False}, None)
    assert load_checkpoint(last)["model"]["w"].tolist() == [2.0] * 3
    assert load_checkpoint(best)["model"]["w"].tolist() == [1.0] * 3  # a new last.pt left best.pt alone
    assert load_checkpoint(best)["metrics"]["dice"] == 0.5 and best.stat().st_nlink == 1
    assert sorted(p.name for p in best.parent.iterdir()) == ["best.pt", "last.pt"]  # no temp file left


def test_without_hard_links_best_pt_is_a_synced_copy(tmp_path, io_log, monkeypatch):
    def no_links(src, dst):
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    saver = ModelSaverCallback(tmp_path, {})
    saver.on_epoch_end(trainer(3.0), 0, {"is_best": True}, None)
    assert saver.best_path.read_bytes() == saver.last_path.read_bytes()
    assert not os.path.samestat(saver.best_path.stat(), saver.last_path.stat())
    assert ("fsync", str(tmp_path / "best.pt.tmp"), False) in io_log  # the copy's bytes, before the rename
    assert dir_fsynced_after(io_log, saver.best_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "last.pt"]


def predict_masks(out: Path, images: list[Path], tag: str) -> int:
    from carvana.submission.masks import predict_to_masks
    from carvana.training.classifier import CarvanaClassifier
    from carvana.training.tasks import MultiClassTask

    clf = CarvanaClassifier(torch.nn.Conv2d(3, 2, 1), epochs=1, device="cpu", progress=False, task=MultiClassTask(2))
    return predict_to_masks(clf, images, out, (16, 16), ["a", "b"], batch_size=2, loader_workers=0, tag=tag)


def write_images(folder: Path) -> list[Path]:
    folder.mkdir(parents=True)
    for i in range(2):
        cv2.imwrite(str(folder / f"p{i}.jpg"), np.full((12, 20, 3), 90 * i, np.uint8))
    return sorted(folder.glob("*.jpg"))


def test_the_masks_fingerprint_is_written_atomically_then_the_folder_fsynced(tmp_path, io_log):
    # Fails on the old code: .fingerprint was written in place (write_text), nothing fsynced.
    images, out = write_images(tmp_path / "imgs"), tmp_path / "masks"
    assert predict_masks(out, images, "w1") == 2
    marker = out / ".fingerprint"
    assert json.loads(marker.read_text()) == {"tag": "w1", "classes": ["a", "b"], "input_size": [16, 16], "tta": False,
                                                "fast_decode": True}
    assert dir_fsynced_after(io_log, marker)
    assert not [p.name for p in out.iterdir() if "tmp" in p.name]


def test_a_half_written_fingerprint_from_an_older_version_means_start_over(tmp_path):
    # Fails on the old code: json.loads of the torn marker raised JSONDecodeError.
    images, out = write_images(tmp_path / "imgs"), tmp_path / "masks"
    assert predict_masks(out, images, "w1") == 2
    (out / ".fingerprint").write_text('{"tag": "w1", "cla')
    (out / "p0.png").write_bytes(b"stale")
    assert predict_masks(out, images, "w1") == 2
    assert (out / "p0.png").read_bytes() != b"stale" and json.loads((out / ".fingerprint").read_text())["tag"] == "w1"
