"""Exact resume: the LR schedule after a changed --epochs, and per-(seed, epoch, rank) randomness."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from carvana.data.datasets import TrainImageDataset, train_augmentation
from carvana.data.demo.dataset import write_demo_dataset
from carvana.data.sources.fetcher import DatasetFetcher
from carvana.data.sampling import EpochSampler
from carvana.pipeline.fit import make_train_loader
from carvana.training import distributed as dist
from carvana.training.checkpoint import CheckpointError, check_settings_match
from carvana.training.classifier import CarvanaClassifier
from carvana.models.registry import ModelConfig
from conftest import synthetic_batches


def tiny_classifier(epochs: int) -> CarvanaClassifier:
    torch.manual_seed(0)
    return CarvanaClassifier(nn.Conv2d(3, 1, 3, padding=1), epochs=epochs, lr=1e-2, device="cpu", progress=False)


def test_resume_with_more_epochs_continues_the_longer_cosine_schedule():
    batches = synthetic_batches(1, hw=(16, 16), full_masks=False)
    straight = tiny_classifier(epochs=4)
    straight_lrs = [h["lr"] for h in straight.train(batches, None)]

    first = tiny_classifier(epochs=2)
    first_lrs = [h["lr"] for h in first.train(batches, None)]
    resumed = tiny_classifier(epochs=4)
    resumed.load_state_dict(first.state_dict())
    assert resumed.resumed_from_epochs == 2
    resumed_lrs = [h["lr"] for h in resumed.train(batches, None)]

    # Epochs 1-2 ran under the 2-epoch schedule (that cannot change afterwards); from the
    # resume on, the LRs are those of a run started with --epochs 4.
    assert first_lrs == pytest.approx([1e-2, 1e-4 + (1e-2 - 1e-4) / 2])
    assert resumed_lrs == pytest.approx(straight_lrs[2:], rel=1e-12)
    # The 4-epoch cosine from 1e-2 to 1e-4: LR of epoch 3 (index 2) is halfway down.
    assert resumed_lrs[0] == pytest.approx(1e-4 + (1e-2 - 1e-4) * (1 + math.cos(math.pi * 2 / 4)) / 2)
    # ...and training after the resume is the same as the uninterrupted run's LR-wise to the end.
    assert resumed.scheduler.get_last_lr()[0] == pytest.approx(straight.scheduler.get_last_lr()[0], rel=1e-12)


def test_resume_with_the_same_epochs_changes_nothing():
    batches = synthetic_batches(1, hw=(16, 16), full_masks=False)
    first = tiny_classifier(epochs=3)
    first.train(batches, None, epochs=1)
    resumed = tiny_classifier(epochs=3)
    resumed.load_state_dict(first.state_dict())
    assert resumed.resumed_from_epochs is None
    assert resumed.optimizer.param_groups[0]["lr"] == first.optimizer.param_groups[0]["lr"]


@pytest.fixture(scope="module")
def one_car(tmp_path_factory):
    data = write_demo_dataset(tmp_path_factory.mktemp("demo") / "d", seed=1, n_train_cars=1, n_test_cars=1)
    fetcher = DatasetFetcher()
    fetcher.use_folder(data)
    images, masks, _, _ = fetcher.get_train_files(0.0, 1.0, 0)
    return images[:8], masks[:8]


def epoch_batches(loader, epoch: int) -> list[dict]:
    dist.set_epoch(loader, epoch)  # what CarvanaClassifier.train does before each epoch
    return [{"name": list(b["name"]), "image": b["image"].clone(), "mask": b["mask"].clone()} for b in loader]


def test_a_resumed_epoch_sees_the_uninterrupted_runs_order_and_augmentation(one_car):
    """The real train loader, 2 worker processes: epoch 2 of an uninterrupted run == epoch 2 after a resume."""
    images, masks = one_car
    hp = SimpleNamespace(batch_size=2, workers=2, seed=5)

    def loader():  # a fresh process's loader: new dataset, new augmentation pipeline, new workers
        dataset = TrainImageDataset(images, masks, (64, 64), train_augmentation(hp.seed), seed=hp.seed)
        return make_train_loader(dataset, hp, pin=False)

    straight = loader()
    epoch0, epoch1 = epoch_batches(straight, 0), epoch_batches(straight, 1)
    resumed1 = epoch_batches(loader(), 1)

    assert [b["name"] for b in resumed1] == [b["name"] for b in epoch1]
    for ours, theirs in zip(resumed1, epoch1):
        assert torch.equal(ours["image"], theirs["image"]) and torch.equal(ours["mask"], theirs["mask"])
    # ...and the epochs do differ from each other (order and augmentation).
    assert [b["name"] for b in epoch0] != [b["name"] for b in epoch1]
    assert not all(torch.equal(a["image"], b["image"]) for a, b in zip(epoch0, epoch1))


def test_epoch_sampler_depends_on_seed_epoch_and_rank_only():
    data = list(range(10))
    a, b = EpochSampler(data, seed=3), EpochSampler(data, seed=3)
    a.set_epoch(0)
    list(a)  # an earlier epoch drawn from `a` must not change what epoch 4 gives
    a.set_epoch(4)
    b.set_epoch(4)
    assert list(a) == list(b) and all(epoch == 4 for epoch, _ in a)
    shards = [EpochSampler(data, seed=3, rank=r, world=2) for r in (0, 1)]
    for s in shards:
        s.set_epoch(4)
    indices = [i for s in shards for _, i in s]
    assert sorted(indices) == data  # the two ranks split the epoch


def test_a_flag_that_contradicts_the_checkpoint_is_named_with_both_values():
    config = ModelConfig(width=0.25, input_size=(128, 192))
    check_settings_match(config, {"width": 0.25, "input_size": "128x192", "lr": 1.0}, "ckpt.pt")  # agrees
    with pytest.raises(CheckpointError, match=r"--width 0.5 contradicts the checkpoint ckpt.pt.*--width 0.25"):
        check_settings_match(config, {"width": 0.5}, "ckpt.pt")
    with pytest.raises(CheckpointError, match=r"--input-size 256x256 contradicts .*--input-size 128x192"):
        check_settings_match(config, {"input_size": "256x256"}, "ckpt.pt")
