"""Every file replaced by a temp-then-rename write goes through data/files.atomic_path: a temp
name of the writer's own (process and thread), the data fsynced before the rename, the
directory fsynced after it. best.pt, the masks folder's .fingerprint, the training logs
(metrics.csv, preview PNGs, per_class.csv), folds.csv, oof.csv, the error gallery, segment's
outputs, the ONNX export and the mounted data's links."""

import json
import os
import stat
import threading
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch

from carvana.data.files import temp_name
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
        events.append(("renamed", str(src), str(dst)))

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


def dir_fsynced_after(events: list[tuple], path: Path) -> bool:
    """True when ``path``'s directory is fsynced after the last rename onto ``path``."""
    last = max(i for i, e in enumerate(events) if e == ("replace", str(path)))
    return ("fsync", str(path.parent), True) in events[last + 1:]


def durably_replaced(events: list[tuple], path: Path) -> bool:
    """True when ``path`` was last replaced by renaming this thread's temp name (data/files.temp_name)
    whose bytes were fsynced before the rename, and its directory was fsynced after it."""
    tmp = str(temp_name(path))
    renames = [i for i, e in enumerate(events) if e == ("renamed", tmp, str(path))]
    if not renames:
        return False
    last = renames[-1]
    return ("fsync", tmp, False) in events[:last] and dir_fsynced_after(events, path)


def trainer(weight: float) -> SimpleNamespace:
    return SimpleNamespace(state_dict=lambda: {"model": {"w": torch.full((3,), weight)}, "epoch": int(weight)})


def test_best_pt_is_a_hard_link_renamed_into_place_then_the_directory_is_fsynced(tmp_path, io_log):
    # Fails on the old code: best.pt was a byte copy, renamed without an fsync of the directory.
    saver = ModelSaverCallback(tmp_path / "models", {"lr": 0.1})
    saver.on_epoch_end(trainer(1.0), 0, {"dice": 0.5, "is_best": True}, None)
    best, last = saver.best_path, saver.last_path
    assert os.path.samestat(best.stat(), last.stat())  # linked, no bytes copied
    assert durably_replaced(io_log, last)  # torch.save's bytes fsynced before the rename
    assert ("renamed", str(temp_name(best)), str(best)) in io_log and dir_fsynced_after(io_log, best)
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
    assert durably_replaced(io_log, saver.best_path)  # the copy's bytes fsynced, before the rename
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


def test_training_logs_and_fold_records_are_replaced_durably(tmp_path, io_log):
    # Fails on the old code: each had its own fixed "<name>.tmp", renamed without any fsync.
    import pandas as pd

    from carvana.training.callbacks import Preview
    from carvana.training.folds import load_or_assign_folds
    from carvana.training.gallery import GalleryEntry, write_gallery
    from carvana.training.logging_callbacks import CSVLogger, PreviewLogger
    from carvana.training.oof import write_csv
    from carvana.training.tasks import PerClassTableLogger

    logs = tmp_path / "logs"
    trainer = SimpleNamespace(task=SimpleNamespace(last_table=pd.DataFrame({"class_id": [0, 1], "iou": [0.5, 0.25]})))
    preview = Preview(np.zeros((1, 8, 8, 3), np.uint8), np.zeros((1, 8, 8), bool), np.zeros((1, 8, 8), np.float32))
    for epoch in (0, 1):
        CSVLogger(logs).on_epoch_end(trainer, epoch, {"epoch": epoch, "train_loss": 0.5}, None)
        PerClassTableLogger(logs).on_epoch_end(trainer, epoch, {}, None)
    PreviewLogger(logs, tensorboard=False).on_epoch_end(trainer, 0, {}, preview)
    images = [f"car{c}_{a:02d}.jpg" for c in range(3) for a in (1, 2)]
    load_or_assign_folds(logs / "folds.csv", images, 3, seed=0)
    write_csv(pd.DataFrame({"image": images, "dice": 0.9}), logs / "oof.csv")
    pixels = np.zeros((12, 18), bool)
    write_gallery([GalleryEntry("a.jpg", np.zeros((12, 18, 3), np.uint8), pixels, pixels, 1.0)], logs / "worst.png")
    written = ["metrics.csv", "per_class.csv", "preview_epoch001.png", "folds.csv", "oof.csv", "worst.png"]
    for name in written:
        assert durably_replaced(io_log, logs / name), name
    assert sorted(p.name for p in logs.iterdir()) == sorted(written)  # no temp file left
    assert pd.read_csv(logs / "metrics.csv")["epoch"].tolist() == [0, 1]
    assert pd.read_csv(logs / "per_class.csv")["epoch"].tolist() == [0, 0, 1, 1]
    assert cv2.imread(str(logs / "preview_epoch001.png")).shape == (8, 24, 3)


def test_writers_on_several_threads_never_share_a_temp_name(tmp_path):
    # Fails on the old code: all used "oof.csv.tmp", so one thread's rename took another's temp
    # file away (FileNotFoundError) or published a file another thread was still writing.
    import pandas as pd

    from carvana.training.oof import write_csv

    frames = [pd.DataFrame({"image": [f"t{t}"] * 2000, "dice": float(t)}) for t in range(4)]
    errors: list[BaseException] = []

    def write(frame):
        try:
            for _ in range(15):
                write_csv(frame, tmp_path / "oof.csv")
        except BaseException as exc:  # noqa: BLE001 -- reported below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(f,)) for f in frames]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    final = pd.read_csv(tmp_path / "oof.csv")
    assert len(final) == 2000 and final["image"].nunique() == 1  # one writer's whole file
    assert [p.name for p in tmp_path.iterdir()] == ["oof.csv"]


def test_segment_outputs_an_onnx_export_and_mounted_links_are_replaced_durably(tmp_path, io_log):
    from carvana.data.sources import mounted
    from carvana.data.photos import output_paths, write_outputs
    from carvana.export import export_onnx
    from carvana.models.registry import ModelConfig, build_model

    paths = output_paths(tmp_path / "out", Path("car"), overlay=True, background=False)
    write_outputs(np.full((10, 14, 3), 80, np.uint8), np.eye(10, 14, dtype=bool), paths)
    for path in paths.values():
        assert durably_replaced(io_log, path), path
    config = ModelConfig(arch="unet1024", width=0.125, input_size=(64, 64))
    model = export_onnx(build_model(config), config, tmp_path / "model.onnx")
    assert durably_replaced(io_log, model) and model.stat().st_size > 0
    target = tmp_path / "mount" / "train"
    target.mkdir(parents=True)
    link = tmp_path / "data" / "train"
    link.mkdir(parents=True)  # an earlier unpack of this part: replaced by the link
    mounted._link(target, link)
    assert link.is_symlink() and link.resolve() == target
    assert ("renamed", str(temp_name(link)), str(link)) in io_log and dir_fsynced_after(io_log, link)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(p.name for p in paths.values())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "model.onnx", "mount", "out"]
