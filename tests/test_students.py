"""Students of --teacher runs (issue #28, part 5): what predicting again, refusing and labeling
may and may not do.

* ``--no-train --run-name R`` on a student run predicts with R's models: it never labels,
  never starts a round afresh, never removes or rewrites a file (whether or not the run's
  record hands it the teacher).
* Every pseudo-label setting is refused before anything is removed or fetched.
* Labels: an unreadable photo gets none and is left out; two photos sharing a stem or a name
  get a label each; native-size labels are padded like their image; under torchrun every rank
  labels rank 0's list; labels are written by the shared atomic writer.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import carvana.submission.pseudo_labels as labeling
from carvana.data.datasets import TestImageDataset
from carvana.data.demo.dataset import write_demo_dataset
from carvana.data.pseudo import keyed, label_path, select_confident, unreadable_path
from carvana.pipeline import decide
from carvana.pipeline.fit import TaskData
from carvana.pipeline.plans import FOLDS, PREDICT, PlanError
from carvana.pipeline.pseudo import round_session, unlabeled_images
from carvana.pipeline.session import Session
from carvana.pipeline.settings import parse_command
from carvana.submission.pseudo_labels import label_images
import main_helpers

ROOT = Path(__file__).resolve().parents[1]
MAIN = ROOT / "main.py"
TINY = ["--input-size", "64x128", "--width", "0.125", "--workers", "0", "--batch-size", "4", "--epochs", "1"]


def defaults(**changed) -> dict:
    from main_helpers import main_defaults

    return {**main_defaults(), **changed}


def jpeg(path: Path, value: int, hw=(40, 60)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((*hw, 3), value, np.uint8)).save(path, format="JPEG", quality=90)
    return path


class FakeTeacher:
    """A predictor whose probability for every pixel is its image's mean brightness: labels
    tell which image they were made from. Reads images as the real one does (ok=False when
    unreadable, and then an all-zero map, as batch_probabilities gives)."""

    def __init__(self, hw=(32, 48)) -> None:
        self.hw = hw

    def test_dataset(self, images, fast_decode=True):
        return TestImageDataset(images, self.hw, fast_decode)

    def predict(self, loader, callbacks, tta=False):
        for batch in loader:
            probs = batch["image"].float().mean(dim=(1, 2, 3)) / 255.0
            probs = probs[:, None, None].expand(-1, *self.hw).clone()
            probs[~batch["ok"]] = 0.0
            for cb in callbacks:
                cb.on_predict_batch_end(self, list(batch["name"]), probs)


def label(folder: Path, images) -> int:
    return label_images(FakeTeacher(), images, folder, (32, 48), {"t": 1}, False, 2, 0, True)


# --- plan checks: before anything is removed or fetched ---------------------------------

@pytest.fixture
def teacher_file(tmp_path, monkeypatch) -> str:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "t.pt").write_bytes(b"weights")  # only its existence is checked by the plan
    return "t.pt"


@pytest.mark.parametrize("args, phrase", [
    (["--batch-size", "1"], "--batch-size 1: --teacher mixes"),
    (["--pseudo-targets", "sotf"], "--pseudo-targets 'sotf'"),
    (["--pseudo-share", "1.5"], "--pseudo-share 1.5"),
    (["--unlabeled", "test,no-such-folder"], "--unlabeled 'no-such-folder'"),
    (["--folds", "2", "--no-train"], "--teacher: not used here"),  # explicit: nothing trains
])
def test_pseudo_settings_are_refused_by_the_plan(teacher_file, args, phrase):
    # Fails on the old code: these were accepted (batch size 1, --folds --no-train) or refused
    # only inside run_binary, after the fresh start had removed the run.
    command = parse_command(defaults(), ["--teacher", teacher_file, *args])
    with pytest.raises(PlanError, match=phrase.replace("-", r"\-")) as refusal:
        decide(command.hp, command.given)
    assert "\n" not in str(refusal.value)


def test_a_missing_teacher_is_refused_by_the_plan(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    command = parse_command(defaults(), ["--teacher", "gone.pt"])
    with pytest.raises(PlanError, match=r"\-\-teacher: gone.pt"):
        decide(command.hp, command.given)


def test_pseudo_rounds_without_a_teacher_are_refused_even_as_a_default():
    # Fails on the old code: only a given --pseudo-rounds was checked, so round 1 trained plainly.
    command = parse_command(defaults(PSEUDO_ROUNDS=2), [])
    with pytest.raises(PlanError, match=r"\-\-pseudo\-rounds 2: .*add \-\-teacher"):
        decide(command.hp, command.given)


@pytest.mark.parametrize("args, plan", [(["--no-train"], PREDICT), (["--folds", "2", "--no-train"], FOLDS)])
def test_a_teacher_from_the_record_does_not_stop_a_prediction(args, plan, tmp_path, monkeypatch):
    # Fails on the old code (PREDICT): a teacher read back from the run's record was refused,
    # naming a flag the user never typed. It need not even exist any more.
    monkeypatch.chdir(tmp_path)
    command = parse_command(defaults(TEACHER="deleted/teacher", PSEUDO_ROUNDS=3), args)
    assert decide(command.hp, command.given)[1] == plan


def test_a_refused_student_removes_nothing_and_fetches_nothing(tmp_path):
    # Fails on the old code: the fresh start removed output/models/base, then run_binary refused.
    (tmp_path / "output/models/base").mkdir(parents=True)
    (tmp_path / "output/models/base/best.pt").write_bytes(b"old")
    (tmp_path / "t.pt").write_bytes(b"weights")
    result = run(tmp_path, ["--run-name", "base", "--teacher", "t.pt", "--pseudo-targets", "sotf",
                            "--data-dir", str(tmp_path / "no-data")])
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors == ["error: --pseudo-targets 'sotf': expected soft or hard"]
    assert (tmp_path / "output/models/base/best.pt").read_bytes() == b"old"


def test_a_round_is_never_started_afresh_when_nothing_trains(tmp_path, monkeypatch):
    # Fails on the old code: --no-train on a --folds --pseudo-rounds 2 run deleted R-round1's models.
    monkeypatch.chdir(tmp_path)
    best = tmp_path / "output/models/R-round1/fold0/best.pt"
    best.parent.mkdir(parents=True)
    best.write_bytes(b"round 1")
    (tmp_path / "logs/R-round1").mkdir(parents=True)
    (tmp_path / "logs/R-round1/round.json").write_text("{}")
    hp = SimpleNamespace(train=False, resume=False)
    round_session(Session(hp, "R", "cpu", True, "binary", FOLDS), 1, [0, 1])
    assert best.read_bytes() == b"round 1" and (tmp_path / "logs/R-round1/round.json").exists()


# --- labels: identity, unreadable photos, native padding, ranks, atomic writes -----------

def test_an_unreadable_photo_gets_no_label_and_is_left_out(tmp_path):
    # Fails on the old code: the unreadable photo got an all-zero label, kept as "confident".
    good = [jpeg(tmp_path / "photos/a.jpg", 200), jpeg(tmp_path / "photos/b.jpg", 60)]
    bad = tmp_path / "photos/broken.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    images, store = keyed([*good, bad]), tmp_path / "store"
    with pytest.warns(UserWarning, match="broken.jpg"):
        assert label(store, images) == 3
    assert unreadable_path(store, images[2].key).exists() and not label_path(store, images[2].key).exists()
    kept, rows = select_confident(store, images, max_uncertain=1.0)
    assert kept == images[:2]
    assert [(r["image"], r["unreadable"], r["kept"]) for r in rows] == [
        (str(good[0]), False, True), (str(good[1]), False, True), (str(bad), True, False)]
    assert label(store, images) == 0  # resumed: the unreadable photo is not tried again


def test_photos_sharing_a_stem_or_a_name_get_a_label_each(tmp_path):
    # Fails on the old code: a.jpg and a.jpeg shared a.png, and so did two folders' IMG_0001.jpg.
    photos = [jpeg(tmp_path / "p/a.jpg", 30), jpeg(tmp_path / "p/a.jpeg", 120), jpeg(tmp_path / "q/a.jpg", 220)]
    train = [jpeg(tmp_path / "train/car_01.jpg", 90)]
    data = TaskData("x", train, [], [], [], [], make_set=None)
    images = unlabeled_images(f"{tmp_path / 'p'},{tmp_path / 'q'},{tmp_path / 'train'}", data)
    assert sorted(i.path for i in images) == sorted(photos)  # the labeled train image is left out
    store = tmp_path / "store"
    label(store, images)
    values = [int(np.asarray(Image.open(label_path(store, i.key)))[0, 0]) for i in images]
    assert len(set(values)) == 3 and len(list(store.glob("*.png"))) == 3
    # The labeled image through another spelling of its path is still the labeled image.
    other = TaskData("x", [tmp_path / "train/../train/car_01.jpg"], [], [], [], [], make_set=None)
    assert [i.path for i in unlabeled_images(f"{tmp_path / 'train'},{tmp_path / 'q'}", other)] == [photos[2]]
    # A photo replaced under the same name is another image: its old label is not reused.
    jpeg(tmp_path / "q/a.jpg", 10, hw=(50, 70))
    replaced = keyed([photos[2]])
    assert replaced[0].key != images[[i.path for i in images].index(photos[2])].key
    assert label(store, replaced) == 1


def test_under_torchrun_every_rank_labels_rank_0s_list(tmp_path, monkeypatch):
    # Fails on the old code: each rank listed the unlabeled images itself, after the barrier,
    # while faster ranks were already writing labels; the slices of different lists skip images.
    images = keyed([jpeg(tmp_path / f"p/{i}.jpg", 20 * i) for i in range(6)])
    store = tmp_path / "store"
    store.mkdir()
    label(store, images[:2])  # written by faster ranks since rank 0 listed: this rank's own list would differ
    rank0_list = images  # what rank 0 listed and broadcast
    monkeypatch.setattr(labeling.dist, "is_main_process", lambda: False)
    monkeypatch.setattr(labeling.dist, "rank", lambda: 1)
    monkeypatch.setattr(labeling.dist, "world_size", lambda: 2)
    monkeypatch.setattr(labeling.dist, "broadcast_object", lambda obj: rank0_list if obj is None else obj)
    written: list[str] = []
    monkeypatch.setattr(labeling, "write_label", lambda folder, key, probs, hw=None: written.append(key))
    label(store, images)
    assert written == [i.key for i in rank0_list[1::2]]


# --- end to end: train a student, then predict with it ---------------------------------

def run(cwd: Path, args: list[str]) -> subprocess.CompletedProcess:
    return main_helpers.run_main(cwd, *args, env={**os.environ, "OMP_NUM_THREADS": "1"})


def snapshot(cwd: Path) -> dict[str, tuple[int, int]]:
    """Every file under output/ and logs/: (mtime, size)."""
    return {str(p.relative_to(cwd)): (p.stat().st_mtime_ns, p.stat().st_size)
            for top in ("output", "logs") for p in sorted((cwd / top).rglob("*")) if p.is_file()}


def only_added(before: dict, after: dict, allowed) -> None:
    """Nothing of ``before`` was removed; only files ``allowed`` (the submission, predict_*
    records) appeared or were written again."""
    removed = [p for p in before if p not in after]
    rewritten = [p for p in before if p in after and after[p] != before[p] and not allowed(p)]
    assert not removed and not rewritten, f"removed: {removed}; rewritten: {rewritten}"
    added = [p for p in after if p not in before]
    assert all(allowed(p) for p in added), f"unexpected new files: {added}"


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    """A tiny teacher, then its --folds 2 --pseudo-rounds 2 student R on the test images and two
    photo folders (an unreadable photo; a.jpg and a.jpeg; another folder's a.jpg)."""
    cwd = tmp_path_factory.mktemp("students")
    demo = write_demo_dataset(cwd / "demo", seed=0, n_train_cars=4, n_test_cars=1)
    teacher = run(cwd, [*TINY, "--data-dir", str(demo), "--run-name", "teacher", "--no-predict"])
    assert teacher.returncode == 0, teacher.stderr[-3000:]
    for name, value in (("a.jpg", 40), ("a.jpeg", 140)):
        jpeg(cwd / "photos" / name, value, hw=(80, 120))
    jpeg(cwd / "more" / "a.jpg", 230, hw=(80, 120))
    (cwd / "photos" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    result = run(cwd, [*TINY, "--data-dir", str(demo), "--folds", "2", "--teacher", "output/models/teacher",
                       "--pseudo-rounds", "2", "--unlabeled", "test,photos,more", "--run-name", "R", "--no-predict"])
    assert result.returncode == 0, result.stderr[-3000:]
    return cwd, demo, result


def test_the_students_labels_leave_out_the_unreadable_photo_and_keep_namesakes_apart(student):
    cwd, demo, result = student
    assert (cwd / "logs/R-round1/round.json").exists() and (cwd / "output/models/R/fold1/best.pt").exists()
    stores = list((cwd / "output/pseudo").iterdir())
    assert len(stores) == 2  # the teacher's labels, then round 1's
    n_test = len(list((demo / "test").glob("*.jpg")))
    for store in stores:
        table = pd.read_csv(store / "labels.csv")
        broken = table[table["image"].str.endswith("broken.jpg")]
        assert broken["unreadable"].tolist() == [True] and broken["kept"].tolist() == [False]
        assert len(table) == n_test + 4 and table["key"].is_unique
        assert len(list(store.glob("*.png"))) == n_test + 3
    assert "1 unreadable, left out" in result.stdout


def test_predicting_with_a_student_run_labels_nothing_and_removes_nothing(student):
    # Fails on the old code: --no-train --run-name R refused (single split) or deleted
    # R-round1's fold models, labeled again and failed (--folds with --pseudo-rounds 2).
    cwd, _, _ = student
    before = snapshot(cwd)
    result = run(cwd, ["--no-train", "--run-name", "R"])
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "valid_submission: True" in result.stdout and "pseudo-labels" not in result.stdout
    assert (cwd / "output/submit.csv.gz").is_file()
    only_added(before, snapshot(cwd), lambda p: p.startswith("output/submit") or p.startswith("logs/R/predict_"))


def test_a_teacher_read_back_from_the_record_is_not_used_to_predict(student, monkeypatch):
    # Either way runs.py treats the record: here --no-train reads the teacher and the rounds back
    # (the old rule), and the prediction still labels, starts afresh and removes nothing.
    import carvana.pipeline.runs as runs
    from carvana.pipeline import main
    from main_helpers import main_defaults

    cwd, _, _ = student
    if hasattr(runs, "read_back"):
        read_back = runs.read_back
        monkeypatch.setattr(runs, "read_back", lambda name, training: read_back(name, True))
    monkeypatch.chdir(cwd)
    before = snapshot(cwd)
    argv = ["--no-train", "--run-name", "R", "--output", "output/again.csv.gz"]
    assert main(main_defaults(), MAIN.read_text(), "main.py", argv) == 0
    record = json.loads((cwd / "logs/R/predict_hparams.json").read_text())
    assert record["teacher"] == "output/models/teacher" and record["pseudo_rounds"] == 2
    only_added(before, snapshot(cwd), lambda p: p.startswith("output/again") or p.startswith("logs/R/predict_"))
