"""--lovasz: the Lovász hinge loss against a brute-force Lovász extension, and when training switches to it."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from carvana.training import classifier as classifier_module
from carvana.training import epoch as epoch_module
from carvana.training.classifier import CarvanaClassifier
from carvana.training.epoch import TrainingSettingError, uses_lovasz
from carvana.training.losses import LovaszHingeLoss, lovasz_hinge
from carvana.training.tasks import MultiClassTask
from conftest import synthetic_batches


def jaccard_loss(mistakes: set[int], positives: set[int]) -> float:
    """1 - IoU of the prediction that gets exactly the pixels ``mistakes`` wrong."""
    union = positives | mistakes
    return 0.0 if not union else 1.0 - len(positives - mistakes) / len(union)


def brute_force_lovasz_hinge(logits: np.ndarray, labels: np.ndarray) -> float:
    """The definition, one image at a time: the Lovász extension of the Jaccard loss (set
    functions evaluated on explicit sets) at the hinge errors relu(1 - logit * sign)."""
    losses = []
    for logit, label in zip(logits.reshape(len(logits), -1), labels.reshape(len(labels), -1)):
        errors = np.maximum(1.0 - logit * (2.0 * label - 1.0), 0.0)
        positives = {i for i in range(len(label)) if label[i] > 0.5}
        order = sorted(range(len(errors)), key=lambda i: -errors[i])
        total, previous, chosen = 0.0, 0.0, set()
        for i in order:
            chosen.add(i)
            current = jaccard_loss(chosen, positives)
            total += errors[i] * (current - previous)
            previous = current
        losses.append(total)
    return float(np.mean(losses))


def test_lovasz_hinge_matches_the_brute_force_definition_on_random_images():
    rng = np.random.default_rng(0)
    for case in range(6):
        logits = rng.normal(scale=2.0, size=(3, 1, 4, 5))
        labels = (rng.random((3, 1, 4, 5)) < 0.4).astype(np.float64)
        labels[0] = 0.0 if case % 2 else 1.0  # an empty and a full true mask among them
        ours = lovasz_hinge(torch.tensor(logits, dtype=torch.float32), torch.tensor(labels, dtype=torch.float32))
        assert ours.dtype == torch.float32 and ours.shape == ()
        assert ours.item() == pytest.approx(brute_force_lovasz_hinge(logits, labels), rel=1e-5, abs=1e-6)


def test_known_values():
    target = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]]])
    # Right with a margin of at least 1 everywhere: no hinge error, no loss.
    assert lovasz_hinge(torch.tensor([[[[3.0, 1.0], [-1.0, -2.0]]]]), target).item() == 0.0
    # All logits 0: every pixel has error 1, the extension at an indicator is the set function:
    # all 4 pixels wrong -> IoU 0 -> loss 1.
    assert lovasz_hinge(torch.zeros(1, 1, 2, 2), target).item() == pytest.approx(1.0)
    # One car pixel at logit 0 (error 1), the rest right with margin: 1 - |{0}| / |{0, 1}| = 0.5.
    assert lovasz_hinge(torch.tensor([[[[0.0, 2.0], [-2.0, -2.0]]]]), target).item() == pytest.approx(0.5)
    # An empty true mask, as the reference: the largest hinge error (here 1 + 0.5).
    empty = torch.zeros(1, 1, 2, 2)
    assert lovasz_hinge(torch.tensor([[[[0.5, -3.0], [-1.0, -2.0]]]]), empty).item() == pytest.approx(1.5)
    # Per image: the mean of the two images' losses, not one loss over pooled pixels.
    both = lovasz_hinge(torch.cat([torch.zeros(1, 1, 2, 2), torch.tensor([[[[3.0, 1.0], [-1.0, -2.0]]]])]),
                        torch.cat([target, target]))
    assert both.item() == pytest.approx(0.5)


def test_gradient_flows_and_a_descent_step_lowers_the_loss():
    torch.manual_seed(0)
    target = synthetic_batches(1, hw=(16, 16), full_masks=False)[0]["mask"]
    logits = torch.randn(target.shape, requires_grad=True)
    loss = LovaszHingeLoss()(logits, target)
    loss.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    with torch.no_grad():
        after = lovasz_hinge(logits - 0.5 * logits.grad / logits.grad.abs().max(), target)
    assert after < loss


def test_fp32_under_autocast_and_soft_targets_hardened():
    logits = torch.randn(2, 1, 8, 8)
    target = (torch.rand(2, 1, 8, 8) > 0.5).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = lovasz_hinge(logits.bfloat16(), target)
    assert out.dtype == torch.float32
    soft = target * 0.8 + 0.1  # 0.9 / 0.1: soft pseudo-labels mean the same masks
    assert lovasz_hinge(logits, soft).item() == pytest.approx(lovasz_hinge(logits, target).item())


def switch(lovasz: float, epochs: int, budget: float = 0.0, used: float = 0.0) -> SimpleNamespace:
    return SimpleNamespace(lovasz=lovasz, epochs=epochs, time_budget=budget, _budget_used=used)


def test_the_last_ceil_fraction_of_the_epochs_use_it():
    on = lambda t: [e for e in range(t.epochs) if uses_lovasz(t, e)]  # noqa: E731
    assert on(switch(0.5, 4)) == [2, 3]
    assert on(switch(0.3, 10)) == [7, 8, 9]  # 0.3 * 10 is 3.0000000000000004 in floats: still 3
    assert on(switch(0.01, 10)) == [9]  # ceil: any fraction > 0 fine-tunes at least one epoch
    assert on(switch(0.0, 10)) == []


def test_under_a_time_budget_the_clock_decides():
    assert not uses_lovasz(switch(0.25, 1000, budget=100.0, used=74.9), 0)
    assert uses_lovasz(switch(0.25, 1000, budget=100.0, used=75.0), 0)
    assert not uses_lovasz(switch(0.0, 1000, budget=100.0, used=99.0), 0)


class ClockModel(nn.Module):
    """A 1x1 convolution that moves a fake clock one second per training forward."""

    def __init__(self, clock: list[float]) -> None:
        super().__init__()
        self.conv, self.clock = nn.Conv2d(3, 1, 1), clock

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.clock[0] += 1.0
        return self.conv(x)


def test_training_switches_at_the_right_epoch_and_records_it():
    torch.manual_seed(0)
    clf = CarvanaClassifier(nn.Conv2d(3, 1, 3, padding=1), epochs=4, lr=1e-2, device="cpu", progress=False,
                            lovasz=0.5)
    history = clf.train(synthetic_batches(1, hw=(16, 16), full_masks=False), None)
    assert [h["loss_fn"] for h in history] == ["bce+dice", "bce+dice", "lovasz", "lovasz"]


def test_without_validation_best_pt_is_chosen_among_the_lovasz_epochs_and_resume_keeps_that():
    """Lovász-hinge losses (~1) and BCE + Dice losses are on other scales: with no validation set the
    best epoch is the lowest training loss of the loss trained last, not of the whole run."""
    torch.manual_seed(0)
    clf = CarvanaClassifier(nn.Conv2d(3, 1, 3, padding=1), epochs=6, lr=1e-2, device="cpu", progress=False,
                            lovasz=0.5)
    history = clf.train(synthetic_batches(1, hw=(16, 16), full_masks=False), None)
    lovasz = [h for h in history if h["loss_fn"] == "lovasz"]
    assert [h["loss_fn"] for h in history] == ["bce+dice"] * 3 + ["lovasz"] * 3
    assert lovasz[0]["is_best"] == 1.0  # the first epoch of the new loss starts the comparison afresh
    best = max(h["epoch"] for h in history if h["is_best"])
    assert best == min(lovasz, key=lambda h: h["train_loss"])["epoch"]
    assert clf.best_metric == -min(h["train_loss"] for h in lovasz)
    resumed = CarvanaClassifier(nn.Conv2d(3, 1, 3, padding=1), epochs=6, lr=1e-2, device="cpu", progress=False,
                                lovasz=0.5)
    resumed.load_state_dict(clf.state_dict())
    assert (resumed.best_metric, resumed.best_loss_fn) == (clf.best_metric, "lovasz")


def test_a_checkpoint_without_its_loss_recorded_starts_the_comparison_afresh_on_resume():
    """A checkpoint written before best_loss_fn existed does not say which loss its best was measured
    on: without validation, the resumed run's first epoch starts the comparison again."""
    torch.manual_seed(0)
    clf = CarvanaClassifier(nn.Conv2d(3, 1, 3, padding=1), epochs=2, lr=1e-2, device="cpu", progress=False)
    clf.train(synthetic_batches(1, hw=(16, 16), full_masks=False), None)
    old = clf.state_dict()
    del old["best_loss_fn"]
    old["best_metric"] = 1e9  # a figure no training loss beats, if it were compared
    resumed = CarvanaClassifier(nn.Conv2d(3, 1, 3, padding=1), epochs=3, lr=1e-2, device="cpu", progress=False)
    resumed.load_state_dict(old)
    history = resumed.train(synthetic_batches(1, hw=(16, 16), full_masks=False), None)
    assert [h["epoch"] for h in history] == [2] and history[-1]["is_best"] == 1.0
    assert (resumed.best_metric, resumed.best_loss_fn) == (-history[-1]["train_loss"], "bce+dice")


def test_a_plateau_schedule_without_validation_forgets_its_best_when_the_loss_changes():
    """ReduceLROnPlateau follows minus the training loss without validation: after the switch to
    the Lovász hinge (losses near 1, far above the scaled-down BCE + Dice's) it would see only "bad" epochs
    and halve the LR for a change of scale, not a plateau. It starts its comparison afresh."""
    torch.manual_seed(0)
    clf = CarvanaClassifier(nn.Conv2d(3, 1, 3, padding=1), epochs=8, lr=1e-2, device="cpu", progress=False,
                            lovasz=0.5, scheduler="plateau", bce_weight=0.1, dice_weight=0.1)
    seen = []
    step = clf.scheduler.step
    clf.scheduler.step = lambda figure: (seen.append((figure, clf.scheduler.best)), step(figure))[1]
    history = clf.train(synthetic_batches(1, hw=(16, 16), full_masks=False), None)
    assert [h["loss_fn"] for h in history] == ["bce+dice"] * 4 + ["lovasz"] * 4
    assert [figure for figure, _ in seen] == [-h["train_loss"] for h in history]
    assert seen[4][1] == -math.inf  # the first Lovász epoch compares with nothing
    assert max(-h["train_loss"] for h in history[:4]) > max(-h["train_loss"] for h in history[4:])  # other scales
    assert clf.scheduler.best == max(-h["train_loss"] for h in history[4:])
    assert clf.optimizer.param_groups[0]["lr"] == pytest.approx(1e-2)  # 4 improving epochs each: no plateau


def test_training_switches_at_the_right_point_of_the_budget_clock(monkeypatch):
    clock = [0.0]
    fake_time = SimpleNamespace(perf_counter=lambda: clock[0])
    monkeypatch.setattr(classifier_module, "time", fake_time)  # where the budget starts
    monkeypatch.setattr(epoch_module, "time", fake_time)  # where each step reads it
    torch.manual_seed(0)
    # 10 s of budget, one second per step, the last 30%: steps 8, 9 and 10 (the budget check after
    # step 7 measures 7 s = 70%); 3 steps an epoch, so epoch 3 switches mid-way.
    clf = CarvanaClassifier(ClockModel(clock), epochs=100, lr=1e-2, device="cpu", progress=False, lovasz=0.3,
                            time_budget=10.0)
    history = clf.train(synthetic_batches(3, hw=(16, 16), full_masks=False), None)
    assert [h["loss_fn"] for h in history] == ["bce+dice", "bce+dice", "bce+dice,lovasz", "lovasz"]
    assert clock[0] == 10.0


@pytest.mark.parametrize("value", [1.0, 1.5, -0.1, math.nan])
def test_out_of_range_is_refused_naming_the_flag(value):
    with pytest.raises(TrainingSettingError, match=r"^--lovasz [-\w.]+: expected a fraction of training in \[0, 1\)"):
        CarvanaClassifier(nn.Conv2d(3, 1, 1), epochs=1, device="cpu", lovasz=value)


def test_a_multiclass_task_is_refused():
    with pytest.raises(TrainingSettingError, match="^--lovasz 0.5: .*binary task only"):
        CarvanaClassifier(nn.Conv2d(3, 3, 1), epochs=1, device="cpu", lovasz=0.5, task=MultiClassTask(3))
