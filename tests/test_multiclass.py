"""Multi-class loss and metrics against hand-computed values; the task through the classifier."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from carvana.training.classifier import CarvanaClassifier
from carvana.training.tasks import (CEDiceLoss, MultiClassTask, confusion_matrix, metrics_from_confusion,
                                         multiclass_soft_dice)


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_ce_plus_dice_matches_a_hand_computation_with_an_ignored_pixel():
    # Pixel 0: logits (2, 0), class 0. Pixel 1: logits (0, 0), class 1. Pixel 2: ignored (255).
    logits = torch.tensor([[[[2.0, 0.0, 9.0]], [[0.0, 0.0, -9.0]]]])
    target = torch.tensor([[[0, 1, 255]]])
    s = sigmoid(2.0)  # softmax of (2, 0) for class 0
    ce = (-math.log(s) + math.log(2)) / 2  # the ignored pixel counts nowhere
    dice0 = 2 * s / ((s + 0.5) + 1)  # class 0: p = (s, .5), t = (1, 0)
    dice1 = 2 * 0.5 / ((1 - s + 0.5) + 1)  # class 1: p = (1-s, .5), t = (0, 1)
    loss = CEDiceLoss(ce_weight=0.5, dice_weight=2.0, eps=0.0)(logits, target)
    assert loss.item() == pytest.approx(0.5 * ce + 2.0 * (1 - (dice0 + dice1) / 2), rel=1e-6)


def test_dice_averages_only_the_classes_present_in_each_image():
    logits = torch.tensor([[[[2.0, 0.0]], [[0.0, 0.0]], [[0.0, 1.0]]]])  # 3 classes, class 2 absent from the target
    target = torch.tensor([[[0, 1]]])
    z0, z1 = math.exp(2) + 2, 2 + math.e
    p = np.array([[math.exp(2) / z0, 1 / z1], [1 / z0, 1 / z1], [1 / z0, math.e / z1]])  # [class, pixel]
    t = np.array([[1, 0], [0, 1], [0, 0]])
    dice_hand = 2 * (p * t).sum(1) / (p.sum(1) + t.sum(1))
    dice, present = multiclass_soft_dice(logits, target, eps=0.0)
    assert present.tolist() == [[True, True, False]]
    np.testing.assert_allclose(dice[0].numpy(), dice_hand, rtol=1e-6)
    ce = -(math.log(p[0, 0]) + math.log(p[1, 1])) / 2
    loss = CEDiceLoss(eps=0.0)(logits, target)
    assert loss.item() == pytest.approx(ce + 1 - (dice_hand[0] + dice_hand[1]) / 2, rel=1e-6)


def test_class_weights_weight_the_cross_entropy_and_an_all_ignored_batch_is_zero():
    logits = torch.tensor([[[[1.0, 0.0]], [[0.0, 0.0]]]])
    target = torch.tensor([[[0, 1]]])
    nll0, nll1 = -math.log(sigmoid(1.0)), math.log(2)
    loss = CEDiceLoss(dice_weight=0.0, class_weights=[1.0, 3.0])(logits, target)
    assert loss.item() == pytest.approx((1 * nll0 + 3 * nll1) / 4, rel=1e-6)
    ignored = torch.full((1, 1, 2), 255)
    assert CEDiceLoss()(logits.requires_grad_(), ignored).item() == 0.0
    with pytest.raises(ValueError, match="3 class weights for 2 classes"):
        CEDiceLoss(class_weights=[1, 2, 3])(logits, target)


def test_iou_dice_accuracy_from_a_hand_counted_confusion_matrix():
    truth = np.array([[0, 0, 1], [1, 255, 2]])
    pred = np.array([[0, 1, 1], [1, 0, 0]])
    cm = confusion_matrix(pred, truth, classes=4)
    expected = np.zeros((4, 4), int)
    expected[0, 0], expected[0, 1], expected[1, 1], expected[2, 0] = 1, 1, 2, 1
    np.testing.assert_array_equal(cm, expected)
    summary, table = metrics_from_confusion(cm, ["a", "b", "c", "d"])
    assert summary["valid_accuracy"] == pytest.approx(3 / 5)
    np.testing.assert_allclose(table["iou"].to_numpy()[:3], [1 / 3, 2 / 3, 0.0])
    np.testing.assert_allclose(table["dice"].to_numpy()[:3], [0.5, 0.8, 0.0])
    assert math.isnan(table["iou"][3]) and math.isnan(table["dice"][3])  # absent from truth and prediction
    assert summary["valid_miou"] == pytest.approx(1 / 3)  # NaN classes left out of the mean
    assert table["name"].tolist() == ["a", "b", "c", "d"] and table["truth_pixels"].tolist() == [2, 2, 1, 0]


def test_validation_scores_at_each_images_own_size():
    """A model that says 'class 1' everywhere: accuracy = the class-1 share of the full-size truths."""
    model = nn.Conv2d(3, 3, 1)
    nn.init.zeros_(model.weight)
    with torch.no_grad():
        model.bias.copy_(torch.tensor([0.0, 5.0, 0.0]))
    task = MultiClassTask(3, ["x", "y", "z"])
    clf = CarvanaClassifier(model, epochs=1, device="cpu", progress=False, task=task, preview_count=1)
    full_a = torch.zeros(10, 12, dtype=torch.uint8)
    full_a[:5] = 1  # 60 of 120 pixels are class 1
    full_b = torch.full((7, 9), 1, dtype=torch.uint8)
    full_b[0, :] = 255  # 54 valid pixels, all class 1
    batch = {"image": torch.zeros(2, 3, 8, 8, dtype=torch.uint8), "mask": torch.zeros(2, 8, 8, dtype=torch.uint8),
             "full_mask": [full_a, full_b], "name": ["a", "b"]}
    metrics, preview = task.validate(clf, [batch])
    assert metrics["valid_accuracy"] == pytest.approx((60 + 54) / (120 + 54))
    iou = task.last_table.set_index("name")["iou"]
    assert iou["x"] == 0.0 and iou["y"] == pytest.approx(114 / 174) and math.isnan(iou["z"])
    assert metrics["valid_miou"] == pytest.approx((0 + 114 / 174) / 2)
    assert preview.probs.shape == (1, 8, 8) and (preview.probs == 1).all()


def test_a_few_steps_lower_the_multiclass_loss():
    torch.manual_seed(0)
    images = torch.randn(4, 3, 16, 16)
    target = (images[:, 0] > 0).long() + (images[:, 1] > 1).long()  # 3 classes read off the pixels
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 3, 1))
    clf = CarvanaClassifier(model, epochs=5, lr=0.05, device="cpu", progress=False, task=MultiClassTask(3))
    batches = [{"image": images, "mask": target.to(torch.uint8), "name": list("abcd")}]
    history = clf.train(batches, None, 5)
    assert history[-1]["train_loss"] < 0.9 * history[0]["train_loss"]


def test_validation_gives_the_same_figures_on_several_streams():
    # Fails on the old code: multi-class validation was a plain loop, --eval-streams unused.
    import itertools
    import threading

    g = torch.Generator().manual_seed(3)
    batches = []
    for b in range(5):  # full-size truths of differing sizes, as at each image's own resolution
        hw = (9 + b, 13 - b)
        batches.append({"image": torch.randint(0, 255, (2, 3, 8, 8), generator=g, dtype=torch.uint8),
                        "mask": torch.randint(0, 3, (2, 8, 8), generator=g, dtype=torch.uint8),
                        "full_mask": [torch.randint(0, 3, hw, generator=g, dtype=torch.uint8) for _ in range(2)],
                        "name": [f"b{b}_{i}" for i in range(2)]})
    runs = {}
    for streams in (1, 2):
        torch.manual_seed(0)
        task = MultiClassTask(3, ["x", "y", "z"])
        clf = CarvanaClassifier(nn.Conv2d(3, 3, 1), epochs=1, device="cpu", progress=False, task=task,
                                preview_count=1, eval_streams=streams)
        threads: set[str] = set()
        # With two streams the first two batches meet at a barrier: the pool's first thread is
        # then busy when the second batch arrives, so a second thread must score it. Without
        # it a fast first batch frees its thread, the pool reuses it, and one thread does all.
        meet = threading.Barrier(2, timeout=30) if streams > 1 else None

        calls = itertools.count()

        def counted(x, forward=clf.eval_forward, threads=threads, meet=meet, calls=calls):
            threads.add(threading.current_thread().name)
            if meet is not None and next(calls) < 2:
                meet.wait()
            return forward(x)

        clf.eval_forward = counted
        metrics, preview = task.validate(clf, batches)
        runs[streams] = (metrics, task.last_table, preview, threads)
    (m1, t1, p1, th1), (m2, t2, p2, th2) = runs[1], runs[2]
    assert len(th1) == 1 and len(th2) == 2  # really scored on two streams
    assert m2 == pytest.approx(m1, abs=1e-6) and 0 < m1["valid_accuracy"] < 1
    assert t2[["truth_pixels", "pred_pixels"]].equals(t1[["truth_pixels", "pred_pixels"]])
    assert t1["truth_pixels"].sum() == sum(f.numel() for b in batches for f in b["full_mask"])
    assert (p2.probs == p1.probs).all() and (p2.truths == p1.truths).all()  # the first batch's preview
