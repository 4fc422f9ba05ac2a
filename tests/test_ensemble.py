"""Streaming ensembles: one member = that model's submission, two = a direct weighted average."""

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from carvana.data.datasets import TestImageDataset
from carvana.models.registry import ModelConfig, build_model
from carvana.submission.ensemble import EnsemblePredictor, load_members, member_paths, parse_weights
from carvana.submission.predictions import PredictionsSaverCallback
from carvana.submission.sharded import predict_to_submission
from carvana.training.callbacks import Callback
from carvana.training.checkpoint import CheckpointError, save_checkpoint
from carvana.training.classifier import CarvanaClassifier


def make_checkpoint(path: Path, input_size: tuple[int, int], seed: int) -> Path:
    torch.manual_seed(seed)
    config = ModelConfig(arch="unet1024", width=0.125, input_size=input_size)
    model = build_model(config)
    with torch.no_grad():  # non-trivial BatchNorm statistics, so eval mode gives varied outputs
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 2.0)
    save_checkpoint({"model": model.state_dict(), "model_config": config.to_dict(), "epoch": 0}, path)
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("test")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(3):
        img = cv2.GaussianBlur(rng.integers(0, 255, (1280, 1918, 3), dtype=np.uint8), (31, 31), 0)
        p = folder / f"car{i // 3}_{i % 3 + 1:02d}.jpg"
        cv2.imwrite(str(p), img)
        paths.append(p)
    return paths


class Keep(Callback):
    def __init__(self):
        self.probs = []

    def on_predict_batch_end(self, trainer, names, probs):
        self.probs.append(probs.clone())


def test_an_ensemble_of_one_is_that_models_submission_byte_for_byte(tmp_path, images):
    ckpt = make_checkpoint(tmp_path / "a.pt", (64, 128), seed=1)
    (member,) = load_members([ckpt], [1.0])
    single = CarvanaClassifier(member.classifier.model, epochs=1, progress=False)
    predict_to_submission(single, images, tmp_path / "single.csv.gz", (64, 128), chunk_size=2, batch_size=2,
                          loader_workers=0, tta=True)
    predict_to_submission(EnsemblePredictor([member]), images, tmp_path / "ens.csv.gz", (64, 128), chunk_size=2,
                          batch_size=2, loader_workers=0, tta=True)
    assert (tmp_path / "ens.csv.gz").read_bytes() == (tmp_path / "single.csv.gz").read_bytes()


def test_two_members_of_different_sizes_equal_a_direct_weighted_average(tmp_path, images):
    paths = [make_checkpoint(tmp_path / "a.pt", (64, 128), 1), make_checkpoint(tmp_path / "b.pt", (128, 256), 2)]
    members = load_members(paths, parse_weights("1, 3", 2))
    ensemble = EnsemblePredictor(members)
    assert ensemble.output_hw == (128, 256)  # the largest member's resolution
    # Direct: each model through its own single-model loader, upsampled bilinearly, weighted.
    direct = 0
    for m, w in zip(members, (0.25, 0.75)):
        keep = Keep()
        m.classifier.predict(DataLoader(TestImageDataset(images, m.config.input_size), batch_size=3), [keep], tta=True)
        p = keep.probs[0]
        if p.shape[-2:] != (128, 256):
            p = F.interpolate(p[:, None], size=(128, 256), mode="bilinear", align_corners=False)[:, 0]
        direct = direct + w * p
    keep = Keep()
    ensemble.predict(DataLoader(ensemble.test_dataset(images), batch_size=3), [keep], tta=True)
    assert torch.allclose(keep.probs[0], direct, atol=1e-6)
    assert (keep.probs[0] - members[1].weight * 0).std() > 0  # not a constant map
    # ... and the streamed submission is the one the direct average gives.
    names = [p.name for p in images]
    saver = PredictionsSaverCallback(tmp_path / "direct.csv.gz", names, chunk_size=2)
    saver.on_predict_batch_end(None, names, direct)
    saver.on_predict_end(None)
    predict_to_submission(ensemble, images, tmp_path / "ens.csv.gz", (64, 128), chunk_size=2, batch_size=2,
                          loader_workers=0, tta=True)
    assert (tmp_path / "ens.csv.gz").read_bytes() == (tmp_path / "direct.csv.gz").read_bytes()
    # The resume fingerprint covers every member's weights and weight.
    other = EnsemblePredictor(load_members(paths, parse_weights("1 1", 2)))
    assert other.tag() != ensemble.tag() and EnsemblePredictor(load_members(paths, [0.25, 0.75])).tag() == ensemble.tag()


def test_member_paths_and_weights(tmp_path):
    run = tmp_path / "run"
    for f in (1, 0, 10):
        make_checkpoint(run / f"fold{f}" / "best.pt", (64, 64), f)
    single = make_checkpoint(tmp_path / "x.pt", (64, 64), 5)
    assert member_paths(f"{run}, {single}") == [run / "fold0/best.pt", run / "fold1/best.pt", run / "fold10/best.pt", single]
    with pytest.raises(CheckpointError, match="nowhere: ensemble member not found"):
        member_paths(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no fold\\*/best.pt nor best.pt"):
        member_paths(str(tmp_path / "empty"))
    assert parse_weights("", 4) == [0.25] * 4
    with pytest.raises(ValueError, match="need 2 non-negative weights"):
        parse_weights("1", 2)
