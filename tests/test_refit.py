"""`--refit`: once K folds have chosen the threshold out of fold, one more model trains on every
car and alone predicts the test set, at that threshold (docs/folds.md, "Refit on every car").

End to end on 4 tiny demo cars (64 train images): ``--folds 2 --fold 0 --threshold auto --refit``
with a refit budget so short that the refit stops after its first epoch while the fold trains
two; then ``--no-train`` on the run, and (on a copy) an interrupted refit resumed, then skipped.
"""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from carvana.data.demo.dataset import write_demo_dataset
from carvana.pipeline import decide
from carvana.pipeline.plans import PlanError
from carvana.pipeline.fit import train_model
from carvana.pipeline.refit import discard_stale_refit, run_refit, warm_start
from carvana.pipeline.session import Session
from carvana.pipeline.settings import parse_command
from carvana.submission.ensemble import member_paths
from carvana.submission.validate import expected_names, validate_submission
from carvana.training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, threshold_of
from test_pipeline import TINY, run_main
from test_students import defaults, only_added, snapshot

BUDGET = "0.0005"  # minutes: the refit's clock runs out during its first step
COMMON = ["--folds", "2", "--fold", "0", "--run-name", "k", "--epochs", "2", *TINY]
REFIT = "output/models/k/refit"


@pytest.fixture(scope="module")
def refit(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("refit")
    data = write_demo_dataset(cwd / "tiny", seed=5, n_train_cars=4, n_test_cars=1)
    result = run_main(cwd, "--data-dir", str(data), *COMMON, "--threshold", "auto", "--refit",
                      "--refit-budget", BUDGET, "--refit-warm", "--refit-lr", "0.0003", "--refit-pseudo",
                      "--pseudo-max-uncertain", "1")  # a 2-epoch fold is unsure of many pixels: keep every label
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return cwd, data, result


def weights_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def metrics_rows(cwd: Path, folder: str) -> int:
    return len(pd.read_csv(cwd / "logs/k" / folder / "metrics.csv"))


def test_the_refit_trains_on_every_car_and_predicts_alone_at_the_oof_threshold(refit):
    cwd, data, result = refit
    train = sorted((data / "train").glob("*.jpg"))
    summary = json.loads((cwd / "logs/k/summary.json").read_text())
    oof = json.loads((cwd / "logs/k/oof_summary.json").read_text())
    assert len(train) == 64 and summary["refit"]["images"] == 64  # fold 0 trained on 32 of them
    assert "=== fold 0 of 2: 32 train / 32 valid images" in result.stdout
    assert "=== refit on every car: 64 images (4 cars)" in result.stdout
    # --refit-warm: the only fold is the best one; the refit fine-tunes it at --refit-lr
    assert "from output/models/k/fold0/best.pt, lr 0.0003 ===" in result.stdout
    assert summary["refit"]["started_from"] == "output/models/k/fold0/best.pt" and summary["refit"]["lr"] == 0.0003
    # --refit-pseudo: the fold labels the 16 test images, and the refit's batches mix them in
    assert "labels 16 unlabeled images" in result.stdout and summary["refit"]["pseudo_labeled_images"] == 16
    assert summary["pseudo_labeled_images"]["kept"] == 16
    assert summary["refit"]["folder"] == REFIT and summary["mean_oof_dice"] == oof["mean_oof_dice"]
    assert summary["models"] == [f"{REFIT}/best.pt"] and f"prediction: {REFIT}/best.pt (" in result.stdout
    assert oof["threshold_auto"] and summary["threshold"] == oof["threshold"]
    assert threshold_of(load_checkpoint(cwd / REFIT / "best.pt")) == oof["threshold"]  # segment/export apply it
    assert validate_submission(cwd / "output/submit.csv.gz", expected_names(data / "sample_submission.csv")).ok


def test_the_refit_keeps_its_final_weights_and_trains_within_its_own_budget(refit):
    cwd, _, _ = refit
    best, last = load_checkpoint(cwd / REFIT / "best.pt"), load_checkpoint(cwd / REFIT / "last.pt")
    assert best["epoch"] == last["epoch"] == 0 and weights_equal(best["model"], last["model"])
    record = json.loads((cwd / "logs/k/summary.json").read_text())["refit"]
    assert record["epochs_trained"] == 1 and record["budget_minutes"] == float(BUDGET) and record["minutes"] > 0
    assert metrics_rows(cwd, "refit") == 1 and metrics_rows(cwd, "fold0") == 2  # the fold had no budget
    assert best["hparams"]["time_budget"] == float(BUDGET) and best["hparams"]["lr"] == 0.0003
    assert load_checkpoint(cwd / "output/models/k/fold0/best.pt")["hparams"]["time_budget"] == 0


def test_no_train_predicts_with_the_refit_and_writes_nothing_to_the_run(refit):
    cwd, _, first = refit
    before = snapshot(cwd)
    result = run_main(cwd, "--no-train", "--run-name", "k", "--output", "output/again.csv.gz")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"prediction: {REFIT}/best.pt (" in result.stdout
    only_added(before, snapshot(cwd), lambda p: p.startswith("output/again") or p.startswith("logs/k/predict_"))
    record = json.loads((cwd / "logs/k/predict_summary.json").read_text())
    assert record["models"] == [f"{REFIT}/best.pt"]
    assert record["threshold"] == json.loads((cwd / "logs/k/summary.json").read_text())["threshold"]
    assert gzip.decompress((cwd / "output/again.csv.gz").read_bytes()) == \
        gzip.decompress((cwd / "output/submit.csv.gz").read_bytes())  # the same model at the same threshold


def test_an_interrupted_refit_resumes_from_last_pt_and_a_finished_one_is_skipped(refit, tmp_path):
    cwd = tmp_path / "run"
    shutil.copytree(refit[0], cwd, symlinks=True)
    folder = cwd / REFIT
    # Interrupted after its first epoch: no refit.json yet. The saver's own best.pt could never be
    # replaced (best_metric is unbeatable) and is stale: only the final weights may end up there.
    (folder / "refit.json").unlink()
    state = load_checkpoint(folder / "last.pt")
    save_checkpoint({**state, "best_metric": 1e9}, folder / "last.pt")
    save_checkpoint({**state, "model": {k: torch.zeros_like(v) for k, v in state["model"].items()}},
                    folder / "best.pt")
    resumed = run_main(cwd, *COMMON, "--resume")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "fold 0/2: finished earlier, skipped" in resumed.stdout and "=== fold 0 of 2" not in resumed.stdout
    assert f"resuming run k from {REFIT}/last.pt after epoch 1" in resumed.stdout
    assert "epoch 2/2" in resumed.stdout and "epoch 1/2" not in resumed.stdout
    assert "pseudo-labels: 0 labeled now" in resumed.stdout  # the unfinished refit reuses the folds' labels
    best, last = load_checkpoint(folder / "best.pt"), load_checkpoint(folder / "last.pt")
    assert best["epoch"] == last["epoch"] == 1 and weights_equal(best["model"], last["model"])
    assert json.loads((cwd / "logs/k/summary.json").read_text())["refit"]["epochs_trained"] == 2

    refit_files = {p: v for p, v in snapshot(cwd).items() if "/refit/" in p}
    skipped = run_main(cwd, *COMMON, "--resume")
    assert skipped.returncode == 0, skipped.stdout[-3000:] + skipped.stderr[-3000:]
    assert "refit: finished earlier, skipped" in skipped.stdout and "=== refit" not in skipped.stdout
    assert "pseudo-labels:" not in skipped.stdout  # a finished refit needs no labels: the folds are not loaded
    assert {p: v for p, v in snapshot(cwd).items() if "/refit/" in p} == refit_files


def test_a_bare_resume_finds_a_run_whose_only_last_pt_is_its_refits(tmp_path, monkeypatch):
    """--no-keep-last removes the folds' last.pt: the unfinished refit's is what marks the run."""
    import os

    from carvana.pipeline import runs

    monkeypatch.chdir(tmp_path)
    for age, (run, path) in enumerate((("k", "refit/last.pt"), ("older", "last.pt"), ("done", "fold0/best.pt"))):
        file = tmp_path / "output" / "models" / run / path
        file.parent.mkdir(parents=True)
        file.write_bytes(b"x")
        os.utime(file, (1_000_000 - age, 1_000_000 - age))
    assert runs.resumable_runs() == ["older", "k"]


def test_a_refit_run_folder_in_an_ensemble_means_its_refit(tmp_path):
    run = tmp_path / "R"
    for name in ("fold0/best.pt", "fold1/best.pt", "refit/best.pt"):
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_bytes(b"weights")
    with pytest.raises(CheckpointError, match="the refit did not finish"):  # never the folds in its place
        member_paths(str(run))
    (run / "refit/refit.json").write_text("{}")
    assert member_paths(str(run)) == [run / "refit/best.pt"]
    shutil.rmtree(run / "refit")
    assert member_paths(str(run)) == [run / "fold0/best.pt", run / "fold1/best.pt"]


@pytest.mark.parametrize("refit_budget, time_budget, minutes", [(0.0, 0.0, 0.0), (0.0, 3.0, 3.0), (2.0, 3.0, 2.0)])
def test_the_refit_trains_every_image_with_the_folds_pseudo_labels_and_its_budget(tmp_path, monkeypatch, refit_budget,
                                                                                    time_budget, minutes):
    monkeypatch.chdir(tmp_path)
    calls = []

    def fake_train_model(hp, device, data, split, models_dir, log_dir, run, extra, pseudo, start):
        assert start is None and hp.lr == 0.001  # no --refit-warm, no --refit-lr: from scratch at --lr
        calls.append((hp.time_budget, split, pseudo))
        models_dir.mkdir(parents=True, exist_ok=True)
        save_checkpoint({"model": {}, "epoch": hp.epochs - 1, "hparams": {}}, models_dir / "last.pt")
        return SimpleNamespace(epoch=hp.epochs - 1)  # as after a resume past the last epoch: no on_train_end

    monkeypatch.setattr("carvana.pipeline.refit.train_model", fake_train_model)
    hp = SimpleNamespace(refit_budget=refit_budget, time_budget=time_budget, epochs=3, lr=0.001, refit_lr=0.0)
    session = Session(hp, "r", "cpu", True, "binary", "folds")
    data = SimpleNamespace(train_images=[Path("a_01.jpg"), Path("a_02.jpg")], train_masks=[Path("a_01.gif"),
                           Path("a_02.gif")], valid_images=[Path("b_01.jpg")], valid_masks=[Path("b_01.gif")])
    pseudo = SimpleNamespace(images=[1, 2, 3])
    record = run_refit(session, data, 0.45, pseudo)
    assert calls == [(minutes, ([Path("a_01.jpg"), Path("a_02.jpg"), Path("b_01.jpg")],
                                [Path("a_01.gif"), Path("a_02.gif"), Path("b_01.gif")], [], []), pseudo)]
    assert record["images"] == 3 and record["pseudo_labeled_images"] == 3 and record["epochs_trained"] == 3
    assert threshold_of(load_checkpoint(tmp_path / "output/models/r/refit/best.pt")) == 0.45
    assert run_refit(session, data, 0.4, pseudo) == record and len(calls) == 1  # finished: skipped
    assert threshold_of(load_checkpoint(tmp_path / "output/models/r/refit/best.pt")) == 0.4  # re-recorded


@pytest.mark.parametrize("train, resume, kept", [(True, False, False), (True, True, True), (False, False, True)])
def test_only_a_fresh_training_run_discards_an_earlier_refit(tmp_path, monkeypatch, train, resume, kept):
    # A finished refit left by an earlier run of this name would be skipped, and submitted, by --resume.
    monkeypatch.chdir(tmp_path)
    for folder in ("output/models/r/refit", "logs/r/refit"):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "refit.json").write_text("{}")
    session = Session(SimpleNamespace(train=train, resume=resume), "r", "cpu", True, "binary", "folds")
    discard_stale_refit(session)
    assert (tmp_path / "output/models/r/refit").exists() is kept and (tmp_path / "logs/r/refit").exists() is kept


@pytest.mark.parametrize("args, phrase", [
    (["--refit"], "--refit: not used here: it trains on every car once K folds"),
    (["--refit-budget", "5"], "--refit-budget: not used here: it is the training time of --refit; add --refit"),
    (["--folds", "2", "--refit", "--refit-budget", "-1"], "--refit-budget -1: expected minutes >= 0"),
    (["--refit-warm"], "--refit-warm: not used here: it is the starting weights of --refit; add --refit"),
    (["--folds", "2", "--refit-lr", "0.001"], "--refit-lr: not used here: it is the learning rate of --refit"),
    (["--folds", "2", "--refit", "--refit-lr", "-0.1"], "--refit-lr -0.1: expected a learning rate >= 0"),
    (["--folds", "2", "--refit-pseudo"], "--refit-pseudo: not used here: it is the pseudo-labels of --refit"),
    (["--folds", "2", "--refit", "--refit-pseudo", "--teacher", "output"],
     "--refit-pseudo: not used here: with --teacher the refit already trains on the teacher's pseudo-labels"),
    (["--folds", "2", "--refit", "--refit-pseudo", "--pseudo-rounds", "2"], "--pseudo-rounds: not used here"),
    (["--folds", "2", "--refit", "--refit-pseudo", "--batch-size", "1"],
     "--batch-size 1: --refit-pseudo mixes pseudo-labeled images into every batch"),
    (["--folds", "2", "--refit", "--refit-pseudo", "--pseudo-share", "1.5"], "--pseudo-share 1.5: expected a share"),
    (["--folds", "2", "--refit", "--tune", "3"], "--refit: not used here: --tune's trials"),
])
def test_refit_settings_that_make_no_run_are_refused_in_one_line(args, phrase):
    command = parse_command(defaults(), args)
    with pytest.raises(PlanError) as refusal:
        decide(command.hp, command.given)
    assert phrase in str(refusal.value) and "\n" not in str(refusal.value)


def test_tune_refuses_refit_before_any_trial():
    from carvana.pipeline.tune import check_tune

    command = parse_command(defaults(), ["--tune", "3", "--folds", "2", "--refit"])
    with pytest.raises(PlanError, match="--refit: not used here: --tune's trials"):
        check_tune(command.hp, command.given, "binary", "folds")


def fold_members(*folds: int) -> list[Path]:
    return [Path(f"output/models/r/fold{f}/best.pt") for f in folds]


@pytest.mark.parametrize("summary, chosen", [
    ({"per_fold": {0: 0.98, 1: 0.99, 2: 0.97}}, 1),
    ({"per_fold": {"0": 0.98, "1": 0.97, "2": 0.99}}, 2),  # as read back from oof_summary.json
    ({"per_fold": {0: 0.99, 1: 0.99, 2: 0.99}}, 0),  # a tie: the first
    ({"per_fold": {5: 0.99}}, 0),  # no member scored: the first
    (None, 0),
])
def test_a_warm_refit_starts_from_the_fold_with_the_best_oof_dice(summary, chosen):
    hp = SimpleNamespace(refit_warm=True)
    assert warm_start(hp, fold_members(0, 1, 2), summary) == fold_members(chosen)[0]
    assert warm_start(SimpleNamespace(refit_warm=False), fold_members(0, 1, 2), summary) is None
    assert warm_start(hp, [], summary) is None


@pytest.mark.parametrize("refit_lr, lr", [(0.0, 0.001), (0.0002, 0.0002)])
def test_a_warm_refit_hands_its_start_and_learning_rate_to_training_and_records_them(tmp_path, monkeypatch, refit_lr,
                                                                                      lr):
    monkeypatch.chdir(tmp_path)
    calls = []

    def fake_train_model(hp, device, data, split, models_dir, log_dir, run, extra, pseudo, start):
        calls.append((hp.lr, start))
        models_dir.mkdir(parents=True, exist_ok=True)
        save_checkpoint({"model": {}, "epoch": 0, "hparams": {}}, models_dir / "last.pt")
        return SimpleNamespace(epoch=0)

    monkeypatch.setattr("carvana.pipeline.refit.train_model", fake_train_model)
    hp = SimpleNamespace(refit_budget=1.0, time_budget=0.0, epochs=1, lr=0.001, refit_lr=refit_lr)
    data = SimpleNamespace(train_images=[Path("a_01.jpg")], train_masks=[Path("a_01.gif")], valid_images=[],
                           valid_masks=[])
    start = fold_members(1)[0]
    record = run_refit(Session(hp, "r", "cpu", True, "binary", "folds"), data, 0.5, None, start)
    assert calls == [(lr, start)] and record["lr"] == lr and record["started_from"] == str(start)


def test_training_from_a_start_checkpoint_begins_with_its_weights_and_refuses_another_network(refit, tmp_path):
    cwd, _, _ = refit
    start = cwd / "output/models/k/fold0/best.pt"
    split = ([], [], [], [])
    settings = {name.lower(): value for name, value in defaults().items()}
    hp = SimpleNamespace(**{**settings, "input_size": "64x64", "width": 0.125, "epochs": 0, "resume": False})
    trained = train_model(hp, "cpu", SimpleNamespace(classes=1), split, tmp_path / "m", tmp_path / "l", "w", (), None,
                          start)  # 0 epochs: the model as it starts
    assert weights_equal(trained.model.state_dict(), load_checkpoint(start)["model"])
    wider = SimpleNamespace(**{**vars(hp), "width": 0.25})
    with pytest.raises(CheckpointError, match="weights, which do not fit this run's model") as refusal:
        train_model(wider, "cpu", SimpleNamespace(classes=1), split, tmp_path / "m", tmp_path / "l", "w", (), None,
                    start)
    assert str(start) in str(refusal.value) and "\n" not in str(refusal.value)
