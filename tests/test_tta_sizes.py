"""--tta-sizes: multi-scale TTA. Each checkpoint also predicts at other data sizes, one ensemble
member per size sharing its weights; the average is the direct one; OOF scoring predicts the
same way; settings that cannot honour it are refused in one line."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from carvana.data.datasets import TestImageDataset
from carvana.data.demo.dataset import write_demo_dataset
from carvana.pipeline import decide
from carvana.pipeline.fit import parse_tta_sizes
from carvana.pipeline.plans import PlanError
from carvana.pipeline.settings import parse_command
from carvana.submission.ensemble import EnsemblePredictor, load_members
from carvana.submission.validate import expected_names, validate_submission
from carvana.training.checkpoint import CheckpointError
from carvana.training.oof import score_fold
from test_ensemble import Keep, images, make_checkpoint  # noqa: F401  (images: the module's fixture)
from test_pipeline import TINY, run_main
from test_students import defaults


def test_each_checkpoint_predicts_at_its_own_size_and_each_other_one_sharing_its_weights(tmp_path):
    paths = [make_checkpoint(tmp_path / "a.pt", (64, 128), 1), make_checkpoint(tmp_path / "b.pt", (64, 128), 2)]
    members = load_members(paths, [0.25, 0.75], tta_sizes=[(128, 192), (64, 128), (64, 64)])
    assert [(m.path.name, m.config.input_size) for m in members] == [
        (name, size) for name in ("a.pt", "b.pt") for size in ((64, 128), (128, 192), (64, 64))]  # own size first, once
    assert [round(m.weight, 6) for m in members] == [round(w / 3, 6) for w in (0.25, 0.75) for _ in range(3)]
    assert members[0].classifier.model is members[1].classifier.model is members[2].classifier.model
    assert members[0].classifier.model is not members[3].classifier.model
    assert len({m.digest for m in members[:3]}) == 1
    assert EnsemblePredictor(members).tag() != EnsemblePredictor(load_members(paths, [0.25, 0.75])).tag()


def test_a_size_the_network_cannot_take_and_int8_are_refused_in_one_line(tmp_path):
    path = make_checkpoint(tmp_path / "a.pt", (64, 128), 1)
    with pytest.raises(CheckpointError, match=r"--tta-sizes 100x128: .*a\.pt cannot predict at it .*multiples of 64"):
        load_members([path], [1.0], tta_sizes=[(100, 128)])
    with pytest.raises(CheckpointError, match="--int8 cannot be used with --tta-sizes"):
        load_members([path], [1.0], int8=[object()], tta_sizes=[(128, 192)])


def test_the_average_is_each_size_predicted_alone_resized_to_the_largest_and_averaged(tmp_path, images):  # noqa: F811
    path = make_checkpoint(tmp_path / "a.pt", (64, 128), 3)
    members = load_members([path], [1.0], tta_sizes=[(128, 256)])
    predictor = EnsemblePredictor(members)
    assert predictor.output_hw == (128, 256)
    direct = 0
    for m in members:
        keep = Keep()
        m.classifier.predict(DataLoader(TestImageDataset(images, m.config.input_size), batch_size=3), [keep], tta=True)
        p = keep.probs[0]
        if p.shape[-2:] != (128, 256):
            p = F.interpolate(p[:, None], size=(128, 256), mode="bilinear", align_corners=False)[:, 0]
        direct = direct + 0.5 * p
    keep = Keep()
    predictor.predict(DataLoader(predictor.test_dataset(images), batch_size=3), [keep], tta=True)
    assert torch.allclose(keep.probs[0], direct, atol=1e-6)
    alone = Keep()
    members[0].classifier.predict(DataLoader(TestImageDataset(images, (64, 128)), batch_size=3), [alone], tta=True)
    assert float((F.interpolate(alone.probs[0][:, None], size=(128, 256), mode="bilinear")[:, 0]
                  - keep.probs[0]).abs().max()) > 1e-4  # the other size changed the maps


def test_oof_scoring_predicts_through_the_same_members(tmp_path, images):  # noqa: F811
    import cv2
    import numpy as np

    masks = []
    for p in images:
        m = np.zeros((1280, 1918), np.uint8)
        m[300:900, 400:1500] = 255
        masks.append(tmp_path / f"{p.stem}_mask.png")
        cv2.imwrite(str(masks[-1]), m)
    path = make_checkpoint(tmp_path / "a.pt", (64, 128), 4)
    one = load_members([path], [1.0])
    alone = score_fold(one[0].classifier, images, masks, (64, 128), [0.4, 0.5], True)
    same = score_fold(EnsemblePredictor(one, progress=False), images, masks, (64, 128), [0.4, 0.5], True)
    pd.testing.assert_frame_equal(alone, same)  # an ensemble of one scores as the model itself
    multi = score_fold(EnsemblePredictor(load_members([path], [1.0], tta_sizes=[(128, 256)]), progress=False),
                       images, masks, (64, 128), [0.4, 0.5], True)
    assert list(multi.columns) == list(alone.columns) and not np.allclose(multi.iloc[:, 1:], alone.iloc[:, 1:])


def test_parse_tta_sizes():
    assert parse_tta_sizes("") == []
    assert parse_tta_sizes("384x576, 256x384") == [(384, 576), (256, 384)]
    assert parse_tta_sizes("128") == [(128, 128)]


@pytest.mark.parametrize("args, phrase", [
    (["--tta-sizes", "big"], "--tta-sizes big: input size 'big': expected 'HxW'"),
    (["--tta-sizes", "0x64"], "--tta-sizes 0x64: 0x64 is not a size"),
    (["--tta-sizes", "128x192", "--int8"], "--tta-sizes 128x192: not with this run: --int8"),
    (["--tta-sizes", "128x128", "--dataset", "oxford-pet", "--classes", "3"],
     "--tta-sizes 128x128: not with this run: multi-class"),
])
def test_tta_sizes_that_cannot_run_are_refused_in_one_line(args, phrase, tmp_path):
    command = parse_command(defaults(), args)
    with pytest.raises(PlanError) as refusal:
        decide(command.hp, command.given)
    assert phrase in str(refusal.value) and "\n" not in str(refusal.value)


def test_main_scores_folds_and_predicts_at_every_size_and_records_them(tmp_path):
    data = write_demo_dataset(tmp_path / "tiny", seed=7, n_train_cars=4, n_test_cars=1)
    result = run_main(tmp_path, "--data-dir", str(data), "--folds", "2", "--run-name", "ms", "--epochs", "1",
                      "--threshold", "auto", "--tta-sizes", "128x128", *TINY)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "prediction: ensemble of 4:" in result.stdout and "averaged at 128x128" in result.stdout
    assert validate_submission(tmp_path / "output/submit.csv.gz", expected_names(data / "sample_submission.csv")).ok
    oof = pd.read_csv(tmp_path / "logs/ms/oof.csv")
    summary = json.loads((tmp_path / "logs/ms/oof_summary.json").read_text())
    assert summary["mean_oof_dice"] == pytest.approx(oof["dice"].mean(), abs=1e-6)
    assert json.loads((tmp_path / "logs/ms/hparams.json").read_text())["tta_sizes"] == "128x128"
    # --no-train of the run predicts the same way (the recorded setting) and finds the file complete.
    again = run_main(tmp_path, "--data-dir", str(data), "--folds", "2", "--run-name", "ms", "--no-train",
                     "--threshold", "auto", *TINY)
    assert again.returncode == 0 and "already complete" in again.stdout, again.stdout[-3000:] + again.stderr[-3000:]


def test_a_student_predicts_at_every_size_from_labels_its_teacher_made_at_its_own_size(tmp_path):
    data = write_demo_dataset(tmp_path / "tiny", seed=7, n_train_cars=4, n_test_cars=1)
    common = ["--data-dir", str(data), "--epochs", "1", *TINY]
    teacher = run_main(tmp_path, *common, "--run-name", "t", "--no-predict")
    assert teacher.returncode == 0, teacher.stdout[-3000:] + teacher.stderr[-3000:]
    student = run_main(tmp_path, *common, "--run-name", "s", "--teacher", "output/models/t", "--tta-sizes", "128x128",
                       "--output", "output/s.csv.gz")
    assert student.returncode == 0, student.stdout[-3000:] + student.stderr[-3000:]
    assert "prediction: ensemble of 2:" in student.stdout and "averaged at 128x128" in student.stdout
    assert validate_submission(tmp_path / "output/s.csv.gz", expected_names(data / "sample_submission.csv")).ok
    stores = sorted((tmp_path / "output/pseudo").iterdir())
    assert len(stores) == 1 and (stores[0] / "labels.csv").exists()
    # The same teacher without --tta-sizes: the same store, every label reused, none made again.
    plain = run_main(tmp_path, *common, "--run-name", "p", "--teacher", "output/models/t", "--no-predict")
    assert plain.returncode == 0, plain.stdout[-3000:] + plain.stderr[-3000:]
    assert "pseudo-labels: 0 labeled now" in plain.stdout and sorted((tmp_path / "output/pseudo").iterdir()) == stores
