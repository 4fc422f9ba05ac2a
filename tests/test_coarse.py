"""--coarse-size / --coarse-share: progressive resizing (the first share of training steps on
batches scaled down), when it applies, what a scaled batch holds, and what is refused."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from carvana.pipeline import decide
from carvana.pipeline.plans import PlanError
from carvana.pipeline.settings import parse_command
from carvana.training import classifier as classifier_module
from carvana.training import epoch as epoch_module
from carvana.training.classifier import CarvanaClassifier
from carvana.training.epoch import TrainingSettingError, scaled_batch, uses_coarse
from carvana.training.logging_callbacks import ConsoleLogger
from conftest import synthetic_batches
from test_students import defaults


def switch(share: float, epochs: int, budget: float = 0.0, used: float = 0.0) -> SimpleNamespace:
    return SimpleNamespace(coarse_size=(32, 32), coarse_share=share, epochs=epochs, time_budget=budget,
                           _budget_used=used)


def test_the_coarse_phase_is_the_first_share_of_the_epochs_or_of_the_clock():
    on = lambda t: [e for e in range(t.epochs) if uses_coarse(t, e)]  # noqa: E731
    assert on(switch(0.5, 4)) == [0, 1]
    assert on(switch(0.3, 10)) == [0, 1, 2]  # 0.3 * 10 must not round down to 2 epochs
    assert on(switch(0.1, 5)) == []  # floor: a share shorter than one epoch trains nothing coarse
    assert on(switch(0.0, 4)) == []
    assert on(SimpleNamespace(**{**vars(switch(0.5, 4)), "coarse_size": None})) == []
    # Under a budget the clock decides, whatever the epoch: steps until the share of it is used.
    assert uses_coarse(switch(0.4, 1000, budget=100.0, used=39.9), 999)
    assert not uses_coarse(switch(0.4, 1000, budget=100.0, used=40.0), 0)


@settings(max_examples=25, deadline=None)
@given(h=st.integers(4, 40), w=st.integers(4, 40), out_h=st.integers(2, 20), out_w=st.integers(2, 20),
       seed=st.integers(0, 2**16))
def test_a_scaled_binary_batch_keeps_the_share_of_car_and_soft_targets_in_0_1(h, w, out_h, out_w, seed):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(2, 3, h, w, generator=g)
    masks = (torch.rand(2, 1, h, w, generator=g) > 0.5).float()
    small_images, small_masks = scaled_batch(images, masks, (out_h, out_w))
    assert small_images.shape == (2, 3, out_h, out_w) and small_masks.shape == (2, 1, out_h, out_w)
    assert float(small_masks.min()) >= 0.0 and float(small_masks.max()) <= 1.0
    if h % out_h == 0 and w % out_w == 0:  # whole pixels per coarse pixel: area keeps the share of car exactly
        assert torch.allclose(small_masks.mean(dim=(1, 2, 3)), masks.mean(dim=(1, 2, 3)), atol=1e-5)


def test_a_scaled_class_id_batch_keeps_ids_and_a_batch_at_the_size_is_untouched():
    ids = torch.randint(0, 4, (2, 64, 96))
    images = torch.randn(2, 3, 64, 96)
    _, small = scaled_batch(images, ids, (32, 48))
    assert small.dtype == torch.int64 and small.shape == (2, 32, 48)
    assert set(small.unique().tolist()) <= set(ids.unique().tolist())
    assert torch.equal(small, ids[:, 1::2, 1::2])  # nearest-exact: the pixel at each coarse pixel's centre
    same_images, same_ids = scaled_batch(images, ids, (64, 96))
    assert same_images is images and same_ids is ids


class ShapeRecorder(nn.Module):
    """A 1x1 convolution that records the input size of each training forward."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.seen = nn.Conv2d(3, 1, 1), []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.seen.append(tuple(x.shape[-2:]))
        return self.conv(x)


def test_training_steps_on_scaled_batches_first_then_at_full_size_and_names_the_loss_apart(capsys):
    torch.manual_seed(0)
    model = ShapeRecorder()
    clf = CarvanaClassifier(model, epochs=4, lr=1e-2, device="cpu", progress=False, coarse_size=(8, 8),
                            coarse_share=0.5)
    history = clf.train(synthetic_batches(2, hw=(16, 16), full_masks=False), None, callbacks=[ConsoleLogger()])
    assert model.seen == [(8, 8)] * 4 + [(16, 16)] * 4  # 2 batches an epoch, epochs 0-1 coarse
    assert [h["loss_fn"] for h in history] == ["bce+dice@8x8"] * 2 + ["bce+dice"] * 2
    lines = capsys.readouterr().out.splitlines()  # the console names the coarse epochs, not the others
    assert [line.split("  ")[1].endswith(" (bce+dice@8x8)") for line in lines] == [True, True, False, False]
    # Without validation best.pt is chosen among the full-size epochs: coarse losses do not compare.
    assert clf.best_loss_fn == "bce+dice"
    assert clf.best_metric == -min(h["train_loss"] for h in history[2:])


def test_under_a_budget_the_clock_ends_the_coarse_phase_mid_epoch(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(epoch_module.time, "perf_counter", lambda: clock[0])

    class Ticking(ShapeRecorder):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.training:
                clock[0] += 1.0
            return super().forward(x)

    model = Ticking()
    monkeypatch.setattr(classifier_module.time, "perf_counter", lambda: clock[0])
    clf = CarvanaClassifier(model, epochs=100, lr=1e-2, device="cpu", progress=False, coarse_size=(8, 8),
                            coarse_share=0.3, time_budget=10.0)
    history = clf.train(synthetic_batches(4, hw=(16, 16), full_masks=False), None)
    # One second a step: steps 1-3 start before 3 of the 10 seconds are used, the other 7 do not.
    assert model.seen == [(8, 8)] * 3 + [(16, 16)] * 7
    assert [h["loss_fn"] for h in history] == ["bce+dice@8x8,bce+dice", "bce+dice", "bce+dice"]


def test_the_classifier_refuses_a_share_out_of_range():
    with pytest.raises(TrainingSettingError, match="--coarse-share 1: expected a fraction of training"):
        CarvanaClassifier(nn.Conv2d(3, 1, 1), epochs=2, device="cpu", coarse_size=(8, 8), coarse_share=1.0)


@pytest.mark.parametrize("args, phrase", [
    (["--coarse-size", "64x64"], "--coarse-size needs --coarse-share too"),
    (["--coarse-share", "0.4"], "--coarse-share needs --coarse-size too"),
    (["--coarse-size", "64x64", "--coarse-share", "1.2"], "--coarse-share 1.2: expected a fraction of training"),
    (["--coarse-size", "64x64", "--coarse-share", "-0.1"], "--coarse-share -0.1: expected a fraction"),
    (["--coarse-size", "256x256", "--coarse-share", "0.4"], "--coarse-size 256x256 is larger than --input-size 128x192"),
    (["--coarse-size", "96x128", "--coarse-share", "0.4"], "--coarse-size 96x128: input size 96x128 (HxW) is not supported"),
    (["--coarse-size", "small", "--coarse-share", "0.4"], "--coarse-size small: input size 'small': expected 'HxW'"),
    (["--coarse-size", "64x128", "--coarse-share", "0.4", "--crop", "64x64"],
     "--coarse-size 64x128 cannot be used with --crop 64x64"),
    (["--coarse-size", "196x196", "--coarse-share", "0.4", "--arch", "unet-original", "--input-size", "388x388"],
     "--coarse-size: not for --arch unet-original"),
])
def test_coarse_settings_that_cannot_run_are_refused_in_one_line(args, phrase):
    command = parse_command(defaults(), args)
    with pytest.raises(PlanError) as refusal:
        decide(command.hp, command.given)
    assert phrase in str(refusal.value) and "\n" not in str(refusal.value)
