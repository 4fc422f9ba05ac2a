"""--teacher: pseudo-labels and distillation.

Units: labels stream from disk (memory does not grow with their number), confidence selection
counts, the batch mixing ratio, and no labeled image (so no validation image, in any fold) is
ever pseudo-labeled. End to end on demo data made here: a teacher labels the test images, a
student of another architecture trains on them with 2 folds, and its checkpoint works in
carvana.segment and carvana.export; a labeling killed with -9 resumes to identical files.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import carvana.data.pseudo as pseudo_data
from carvana.data.datasets import fit_to_input
from carvana.data.demo.dataset import write_demo_dataset
from carvana.data.pseudo import (MixedBatchSampler, PseudoLabeledDataset, image_key, keyed, label_path,
                                 remove_stale_temporaries, select_confident, write_label)
from carvana.pipeline.fit import TaskData
from carvana.pipeline.plans import PlanError
from carvana.pipeline.pseudo import unlabeled_images
from carvana.submission.pseudo_labels import LabelWriter
import main_helpers

ROOT = Path(__file__).resolve().parents[1]
MAIN = ROOT / "main.py"
TINY = ["--input-size", "64x128", "--width", "0.125", "--workers", "0", "--batch-size", "4", "--epochs", "1"]


def make_jpegs(folder: Path, n: int, hw=(80, 120)) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        path = folder / f"img{i:03d}.jpg"
        Image.fromarray(rng.integers(0, 255, (*hw, 3), dtype=np.uint8)).save(path, quality=80)
        paths.append(path)
    return paths


def test_labels_stream_from_disk_in_bounded_memory(tmp_path):
    images = make_jpegs(tmp_path / "img", 60)
    store = tmp_path / "store"
    store.mkdir()
    for i, image in enumerate(images):
        write_label(store, image_key(image), np.full((64, 128), i / 60, np.float32))
    dataset = PseudoLabeledDataset(images, store, (64, 128))
    assert not any(isinstance(v, np.ndarray) for v in vars(dataset).values())  # paths only, no label arrays
    tracemalloc.start()
    first = dataset[0]
    _, peak_one = tracemalloc.get_traced_memory()
    for i in range(len(dataset)):
        item = dataset[i]
    _, peak_all = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak_all < peak_one + 256 * 1024  # reading 60 labels costs what reading one does
    assert first["mask"].dtype.is_floating_point and float(item["mask"].max()) == pytest.approx(59 / 60, abs=1 / 255)
    hard = PseudoLabeledDataset(images, store, (64, 128), hard=True)
    assert set(np.unique(hard[59]["mask"].numpy())) == {1.0} and set(np.unique(hard[1]["mask"].numpy())) == {0.0}


def test_confidence_selection_counts(tmp_path):
    images = make_jpegs(tmp_path / "img", 5)
    for k, image in enumerate(images):  # k tenths of the pixels uncertain (p = 0.5), the rest sure (p = 1)
        label = np.ones((10, 10), np.float32)
        label.reshape(-1)[:k * 10] = 0.5
        write_label(tmp_path, image_key(image), label)
    kept, rows = select_confident(tmp_path, keyed(images), max_uncertain=0.2)
    assert [r["uncertain"] for r in rows] == [0.0, 0.1, 0.2, 0.3, 0.4]
    assert [k.path for k in kept] == images[:3] and [r["kept"] for r in rows] == [True, True, True, False, False]


def test_each_batch_mixes_the_set_share_and_an_epoch_is_one_pass_over_the_labeled_images():
    sampler = MixedBatchSampler(n_labeled=12, n_pseudo=100, batch_size=4, share=0.25, seed=0)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 4  # 12 labeled images, 3 per batch
    for batch in batches:
        assert sum(i < 12 for _, i in batch) == 3 and sum(i >= 12 for _, i in batch) == 1
    assert sorted(i for b in batches for _, i in b if i < 12) == list(range(12))
    sampler.set_epoch(1)
    assert [b for b in sampler] != batches and all(e == 1 for b in sampler for e, _ in b)
    half = MixedBatchSampler(n_labeled=10, n_pseudo=3, batch_size=4, share=0.5, seed=0)
    assert all(sum(i >= 10 for _, i in b) == 2 for b in half)  # 3 pseudo images are reused, not run out


def test_a_pseudo_labeled_batch_needs_a_labeled_item_beside_it():
    with pytest.raises(ValueError, match="batch size 1"):
        MixedBatchSampler(n_labeled=8, n_pseudo=8, batch_size=1, share=0.5, seed=0)


def test_native_labels_are_padded_like_their_image_not_stretched(tmp_path):
    # Fails on the old code: the 1918-wide map was interpolated to 1920 columns.
    rng = np.random.default_rng(0)
    probs = torch.from_numpy(rng.random((1, 1280, 1918), dtype=np.float32))
    writer = LabelWriter(tmp_path, keyed(make_jpegs(tmp_path / "img", 1)), (1280, 1920))
    key = next(iter(writer.paths))
    writer.on_predict_batch_end(None, [key], probs)
    stored = np.asarray(Image.open(label_path(tmp_path, key)))
    quantized = np.clip(np.rint(probs[0].numpy() * 255.0), 0, 255).astype(np.uint8)
    assert stored.shape == (1280, 1920)
    assert np.array_equal(stored, fit_to_input(quantized, (1280, 1920)))  # the image's own padding
    assert np.array_equal(stored[:, :1918], quantized)


def test_labels_use_the_shared_atomic_writer(tmp_path, monkeypatch):
    # Fails on the old code: write_label had its own temp-then-rename (and temp names), so the
    # shared writer's ".<name>.<pid>-<thread>.tmp" leftovers were never cleaned up.
    used = []
    real = pseudo_data.atomic_path
    monkeypatch.setattr(pseudo_data, "atomic_path", lambda path, *a, **k: used.append(path) or real(path, *a, **k))
    image = keyed(make_jpegs(tmp_path / "img", 1))[0]
    pseudo_data.write_label(tmp_path / "store", image.key, np.full((8, 8), 0.5, np.float32))
    assert used == [label_path(tmp_path / "store", image.key)]
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / "store" / f".{image.key}.png.{int(dead.stdout)}-140000.tmp"
    live = tmp_path / "store" / f".{image.key}.png.{os.getpid()}-140000.tmp"
    stale.write_bytes(b"half")
    live.write_bytes(b"being written")
    remove_stale_temporaries(tmp_path / "store")
    assert not stale.exists() and live.exists()


def test_no_labeled_image_is_ever_pseudo_labeled(tmp_path):
    train = make_jpegs(tmp_path / "train", 6)
    test = make_jpegs(tmp_path / "test", 2)
    test = [p.rename(p.with_name(f"t{p.name}")) for p in test]
    data = TaskData("x", train[:4], [], train[4:], [], test, make_set=None)
    # The train folder itself as "unlabeled" photos: none of its labeled images come back.
    assert [i.path for i in unlabeled_images(f"test,{tmp_path / 'train'}", data)] == sorted(test)
    with pytest.raises(PlanError, match="no unlabeled images"):
        unlabeled_images(str(tmp_path / "train"), data)
    with pytest.raises(PlanError, match="folder of JPEG photos"):
        unlabeled_images("nope", data)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """Demo data and a tiny trained teacher (width 0.25), in one working folder."""
    cwd = tmp_path_factory.mktemp("pseudo")
    demo = write_demo_dataset(cwd / "demo", seed=0, n_train_cars=4, n_test_cars=2)
    result = run(cwd, [*TINY, "--width", "0.25", "--data-dir", str(demo), "--run-name", "teacher", "--no-predict"])
    assert result.returncode == 0, result.stderr[-2000:]
    return cwd, demo


def run(cwd: Path, args: list[str]) -> subprocess.CompletedProcess:
    return main_helpers.run_main(cwd, *args, env={**os.environ, "OMP_NUM_THREADS": "1"})


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.png"))}


def test_a_distilled_student_trains_on_folds_and_loads_in_segment_and_export(teacher, tmp_path):
    cwd, demo = teacher
    args = [*TINY, "--data-dir", str(demo), "--teacher", "output/models/teacher", "--run-name", "student",
            "--folds", "2", "--unlabeled", f"test,{demo / 'train'}", "--pseudo-max-uncertain", "1.0", "--no-predict"]
    result = run(cwd, args)
    assert result.returncode == 0, result.stderr[-3000:]
    (store,) = (cwd / "output" / "pseudo").iterdir()
    labels = pd.read_csv(store / "labels.csv")
    labeled = {p.stem for p in (demo / "train").glob("*.jpg")}
    assert {Path(i).stem for i in labels["image"]} == {p.stem for p in (demo / "test").glob("*.jpg")}
    assert {p.stem for p in store.glob("*.png")} == set(labels["key"])
    assert not labeled & {Path(i).stem for i in labels["image"]}  # no train (so no validation) image, any fold
    assert f"kept {len(list(store.glob('*.png')))} of" in result.stdout
    student = cwd / "output" / "models" / "student" / "fold0" / "best.pt"
    seg = subprocess.run([sys.executable, "-m", "carvana.segment", "--checkpoint", str(student),
                          str(demo / "test"), "-o", str(tmp_path / "cut")], capture_output=True, text=True, cwd=cwd)
    assert seg.returncode == 0, seg.stderr[-2000:]
    assert len(list((tmp_path / "cut").rglob("*.png"))) >= len(list((demo / "test").glob("*.jpg")))
    onnx = subprocess.run([sys.executable, "-m", "carvana.export", "--checkpoint", str(student), "-o",
                           str(tmp_path / "s.onnx")], capture_output=True, text=True, cwd=cwd)
    assert onnx.returncode == 0 and (tmp_path / "s.onnx").stat().st_size > 0, onnx.stderr[-2000:]


def test_labeling_killed_with_minus_9_resumes_to_identical_files(teacher, tmp_path):
    cwd, demo = teacher
    args = [*TINY, "--data-dir", str(demo), "--teacher", str(cwd / "output" / "models" / "teacher"),
            "--predict-batch-size", "1", "--no-predict", "--pseudo-max-uncertain", "1.0"]
    whole = run(cwd, [*args, "--run-name", "whole", "--output", "whole/submit.csv.gz"])
    assert whole.returncode == 0, whole.stderr[-2000:]
    expected = digests(next((cwd / "whole" / "pseudo").iterdir()))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed = subprocess.Popen([sys.executable, str(MAIN), *args, "--run-name", "k", "--output", "k/submit.csv.gz"],
                              cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    store_root = cwd / "k" / "pseudo"
    deadline = time.time() + 120
    while time.time() < deadline and sum(1 for _ in store_root.rglob("*.png")) < 3:
        time.sleep(0.05)
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    partial = len(list(store_root.rglob("*.png")))
    assert 3 <= partial < len(expected), partial
    again = run(cwd, [*args, "--run-name", "k", "--output", "k/submit.csv.gz"])
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"{len(expected) - partial} labeled now, {partial} reused" in again.stdout
    assert digests(next(store_root.iterdir())) == expected
    assert not list(store_root.rglob(".*.tmp"))


@pytest.mark.parametrize("args, phrase", [
    (["--teacher", "t.pt", "--no-train"], "--teacher: not used here"),
    (["--teacher", "t.pt", "--ensemble", "a.pt"], "--teacher: not used here"),
    (["--pseudo-share", "0.3"], "--pseudo-share: not used here"),
    (["--unlabeled", "photos"], "add --teacher"),
    (["--teacher", "t.pt", "--dataset", "oxford-pet"], "--teacher: not used here"),
    (["--no-predict", "--no-train"], "--no-predict: nothing to do"),
    (["--no-predict", "--submit"], "--submit: not used here"),
])
def test_settings_a_run_cannot_honour_are_refused(args, phrase):
    from carvana.pipeline import decide
    from carvana.pipeline.settings import parse_command
    from main_helpers import main_defaults

    command = parse_command(main_defaults(), args)
    with pytest.raises(PlanError, match=phrase.replace("-", r"\-")):
        decide(command.hp, command.given)


def test_rounds_teach_each_next_student_and_resume_skips_finished_rounds(teacher):
    cwd, demo = teacher
    args = [*TINY, "--data-dir", str(demo), "--teacher", "output/models/teacher", "--pseudo-rounds", "2",
            "--pseudo-max-uncertain", "1.0", "--run-name", "r", "--no-predict", "--output", "rounds/submit.csv.gz"]
    first = run(cwd, args)
    assert first.returncode == 0, first.stderr[-3000:]
    assert (cwd / "logs" / "r-round1" / "round.json").exists() and (cwd / "output/models/r/best.pt").exists()
    stores = list((cwd / "rounds" / "pseudo").iterdir())
    assert len(stores) == 2  # labels of the teacher, then of round 1's student (another key)
    metrics = (cwd / "logs" / "r-round1" / "metrics.csv").read_text()
    again = run(cwd, [*args, "--resume", "--epochs", "2"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert (cwd / "logs" / "r-round1" / "metrics.csv").read_text() == metrics  # round 1 was not trained again
    assert "pseudo-labels: 0 labeled now" in again.stdout  # the final round's labels are reused too
