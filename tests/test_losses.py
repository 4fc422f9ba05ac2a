"""BCE + soft Dice loss and the competition Dice metric, against hand arithmetic."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis.extra.numpy import arrays

from carvana.data.layout import ORIG_HEIGHT, ORIG_WIDTH
from carvana.training.losses import BCEDiceLoss, competition_dice, dice_per_image, soft_dice_per_image

LN3 = math.log(3.0)


def _two_by_two() -> tuple[torch.Tensor, torch.Tensor]:
    """Logits whose sigmoids are [[0.5, 0.75], [0.25, 0.5]] and target [[1, 1], [0, 0]].

    sigmoid(0) = 1/2, sigmoid(ln 3) = 3/(3+1) = 3/4, sigmoid(-ln 3) = 1/4.
    """
    logits = torch.tensor([[[[0.0, LN3], [-LN3, 0.0]]]])
    target = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]]])
    return logits, target


# --- soft Dice -------------------------------------------------------------------


def test_soft_dice_hand_computed() -> None:
    logits, target = _two_by_two()
    # intersection = 0.5 + 0.75 = 1.25; sum(p) = 0.5+0.75+0.25+0.5 = 2; sum(t) = 2
    # eps=1: (2*1.25 + 1) / (2 + 2 + 1) = 3.5 / 5 = 0.7
    torch.testing.assert_close(soft_dice_per_image(logits, target), torch.tensor([0.7]))
    # eps=0: 2.5 / 4 = 0.625
    torch.testing.assert_close(soft_dice_per_image(logits, target, eps=0.0), torch.tensor([0.625]))


def test_soft_dice_both_empty_is_one() -> None:
    logits = torch.full((1, 1, 2, 2), -30.0)  # sigmoid ~ 9.4e-14 per pixel
    target = torch.zeros_like(logits)
    # (0 + 1) / (4 * 9.4e-14 + 0 + 1) = 1 to float precision
    torch.testing.assert_close(soft_dice_per_image(logits, target), torch.tensor([1.0]))


def test_soft_dice_is_per_image() -> None:
    logits_a, target_a = _two_by_two()  # dice 0.7 (above)
    # Image b: sigmoids all 0.5, target all 1 -> (2*2 + 1) / (2 + 4 + 1) = 5/7
    logits_b = torch.zeros(1, 1, 2, 2)
    target_b = torch.ones(1, 1, 2, 2)
    dice = soft_dice_per_image(torch.cat([logits_a, logits_b]), torch.cat([target_a, target_b]))
    torch.testing.assert_close(dice, torch.tensor([0.7, 5 / 7]))


def test_soft_dice_shape_mismatch() -> None:
    with pytest.raises(ValueError, match="differ"):
        soft_dice_per_image(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 3))


# --- BCEDiceLoss -----------------------------------------------------------------


def test_bce_dice_loss_hand_computed_with_weights() -> None:
    logits, target = _two_by_two()
    # BCE per pixel: -ln 0.5, -ln 0.75, -ln(1-0.25), -ln(1-0.5); mean of the four:
    bce = -(2 * math.log(0.5) + 2 * math.log(0.75)) / 4
    dice = 0.7
    for bce_w, dice_w in [(1.0, 1.0), (2.0, 3.0), (0.0, 1.0), (1.0, 0.0)]:
        loss = BCEDiceLoss(bce_weight=bce_w, dice_weight=dice_w)(logits, target)
        assert loss.ndim == 0
        assert loss.item() == pytest.approx(bce_w * bce + dice_w * (1 - dice), rel=1e-6)


def test_bce_dice_loss_averages_dice_over_images() -> None:
    logits_a, target_a = _two_by_two()
    logits_b, target_b = torch.zeros(1, 1, 2, 2), torch.ones(1, 1, 2, 2)
    logits = torch.cat([logits_a, logits_b])
    loss = BCEDiceLoss(bce_weight=0.0)(logits, torch.cat([target_a, target_b]))
    per_image = 1 - (0.7 + 5 / 7) / 2
    # Pooled over both images: intersection 1.25 + 2, sums 2 + 2 + 2 + 4 -> (6.5+1)/(10+1)
    pooled = 1 - 7.5 / 11
    assert loss.item() == pytest.approx(per_image, rel=1e-6)
    assert loss.item() != pytest.approx(pooled, rel=1e-3)


def test_bce_dice_loss_float32_under_autocast() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 1, 8, 8)
    target = (torch.rand(2, 1, 8, 8) > 0.5).float()
    low = logits.to(torch.bfloat16)
    loss_fn = BCEDiceLoss()
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        loss = loss_fn(low, target)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, loss_fn(low.float(), target))


def test_loss_decreases_with_sgd_on_toy_problem() -> None:
    # Toy task: the mask is "input > 0"; a 3x3 conv can learn it exactly.
    torch.manual_seed(0)
    x = torch.randn(4, 1, 16, 16)
    target = (x > 0).float()
    net = torch.nn.Conv2d(1, 1, 3, padding=1)
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    loss_fn = BCEDiceLoss()
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = loss_fn(net(x), target)
        assert torch.isfinite(loss)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


# --- competition metric ----------------------------------------------------------


def test_dice_per_image_hand_computed() -> None:
    pred = np.array([[1, 1], [0, 0]], dtype=bool)
    truth = np.array([[1, 0], [0, 0]], dtype=bool)
    # |A and B| = 1, |A| = 2, |B| = 1 -> 2/3
    assert float(dice_per_image(pred, truth)) == pytest.approx(2 / 3)
    assert dice_per_image(pred, truth).shape == ()


def test_dice_per_image_empty_masks() -> None:
    empty = np.zeros((3, 4), dtype=bool)
    some = empty.copy()
    some[1, 2] = True
    assert float(dice_per_image(empty, empty)) == 1.0  # both empty: Kaggle scores 1
    assert float(dice_per_image(some, empty)) == 0.0  # prediction on an empty truth
    assert float(dice_per_image(empty, some)) == 0.0  # missed object


def test_dice_per_image_mean_is_not_pooled() -> None:
    pred = np.zeros((2, 4, 4), dtype=bool)
    truth = np.zeros((2, 4, 4), dtype=bool)
    # Image 0: a one-pixel object, found exactly -> 1.0
    pred[0, 0, 0] = truth[0, 0, 0] = True
    # Image 1: truth is 4 pixels (row 0), prediction 8 pixels (rows 0-1) -> 2*4/(8+4) = 2/3
    truth[1, 0, :] = True
    pred[1, :2, :] = True
    scores = dice_per_image(pred, truth)
    np.testing.assert_allclose(scores, [1.0, 2 / 3])
    assert scores.mean() == pytest.approx(5 / 6)
    # Pooled Dice would be 2*(1+4)/((1+8)+(1+4)) = 10/14, which Kaggle does not use.
    assert scores.mean() != pytest.approx(10 / 14)


def test_dice_per_image_accepts_uint8_and_float_masks() -> None:
    pred = np.array([[255, 255], [0, 0]], dtype=np.uint8)  # PNG-style 0/255
    truth = np.array([[1.0, 0.0], [0.0, 0.0]], dtype=np.float32)
    assert float(dice_per_image(pred, truth)) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="threshold"):
        dice_per_image(pred, truth * 0.3)
    with pytest.raises(ValueError, match="differ"):
        dice_per_image(pred, truth[:1])


@settings(max_examples=40, deadline=None)
@given(
    pred=arrays(np.bool_, (3, 5, 6)),
    truth=arrays(np.bool_, (3, 5, 6)),
)
def test_dice_per_image_matches_float_formula(pred: np.ndarray, truth: np.ndarray) -> None:
    scores = dice_per_image(pred, truth)
    for p, t, s in zip(pred.astype(float), truth.astype(float), scores):
        denom = p.sum() + t.sum()
        assert s == pytest.approx(1.0 if denom == 0 else 2 * (p * t).sum() / denom)
    assert np.all((scores >= 0) & (scores <= 1))
    np.testing.assert_array_equal(scores, dice_per_image(truth, pred))  # symmetric


def _smooth_field(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A smooth random field in (0, 1): coarse noise, bicubic-upsampled, squashed."""
    coarse = rng.normal(size=(5, 7)).astype(np.float32) * 4
    field = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)
    return 1 / (1 + np.exp(-field))


def test_competition_dice_matches_direct_numpy() -> None:
    rng = np.random.default_rng(0)
    n, h, w = 3, 64, 96
    truths = np.stack([_smooth_field(rng, ORIG_HEIGHT, ORIG_WIDTH) > 0.5 for _ in range(n)])
    # Predictions: noisy versions of the truth's field at network resolution.
    probs = np.stack(
        [
            np.clip(
                cv2.resize(t.astype(np.float32), (w, h), interpolation=cv2.INTER_AREA)
                + rng.normal(scale=0.2, size=(h, w)),
                0,
                1,
            ).astype(np.float32)
            for t in truths
        ]
    )
    for threshold in (0.5, 0.3):
        expected = []
        for prob, truth in zip(probs, truths):
            up = cv2.resize(prob, (ORIG_WIDTH, ORIG_HEIGHT), interpolation=cv2.INTER_LINEAR)
            pred = (up > threshold).astype(np.float64)
            t = truth.astype(np.float64)
            expected.append(2 * (pred * t).sum() / (pred.sum() + t.sum()))
        got = competition_dice(probs, truths.astype(np.uint8), threshold=threshold)
        np.testing.assert_allclose(got, expected, rtol=1e-12)
        assert 0.5 < got.min() <= got.max() < 1.0  # a real, imperfect overlap
    # A channel axis of size 1 on either input is accepted.
    np.testing.assert_array_equal(
        competition_dice(probs[:, None], truths[:, None]), competition_dice(probs, truths)
    )


def test_competition_dice_validates_shapes() -> None:
    probs = np.zeros((2, 64, 96), dtype=np.float32)
    with pytest.raises(ValueError, match="1280"):
        competition_dice(probs, np.zeros((2, 64, 96), dtype=bool))
    with pytest.raises(ValueError, match="2 probability maps but 1"):
        competition_dice(probs, np.zeros((1, ORIG_HEIGHT, ORIG_WIDTH), dtype=bool))


# --- boundary weights -------------------------------------------------------------


def test_boundary_weights_on_a_hand_made_mask():
    from carvana.training.losses import boundary_weights

    mask = torch.zeros(1, 1, 8, 10)
    mask[0, 0, 2:6, 3:7] = 1  # a 4x4 square: rows 2-5, cols 3-6
    w = boundary_weights(mask, band=1, weight=5.0)[0, 0]
    # band=1: a pixel is weighted when its 3x3 neighbourhood holds both car and background:
    # the square's outer ring of car pixels and the one-pixel ring of background around it.
    expected = torch.ones(8, 10)
    expected[1:7, 2:8] = 5.0  # the square grown by one pixel ...
    expected[3:5, 4:6] = 1.0  # ... minus its interior (car pixels whose 3x3 is all car)
    assert torch.equal(w, expected)
    # Two-pixel band: a pixel two columns from the edge is weighted, three columns away is not.
    w2 = boundary_weights(mask, band=2, weight=3.0)[0, 0]
    assert w2[3, 1] == 3.0 and w2[3, 0] == 1.0
    # An all-car or all-background image has no edge; the image border is not an edge.
    assert torch.equal(boundary_weights(torch.ones(1, 1, 6, 6), 2, 9.0), torch.ones(1, 1, 6, 6))
    assert torch.equal(boundary_weights(torch.zeros(1, 1, 6, 6), 2, 9.0), torch.ones(1, 1, 6, 6))


def test_boundary_weighted_loss_equals_a_direct_weighted_mean():
    from carvana.training.losses import boundary_weights

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 1, 12, 16, generator=g)
    target = torch.zeros(2, 1, 12, 16)
    target[0, 0, 3:9, 4:12] = 1
    target[1, 0, 5:, :7] = 1
    w = boundary_weights(target, 2, 4.0)
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    direct_bce = (bce * w).sum() / w.sum()
    loss = BCEDiceLoss(bce_weight=1.0, dice_weight=0.0, boundary_weight=4.0, boundary_band=2)(logits, target)
    assert torch.allclose(loss, direct_bce)
    # weight 1 is exactly the plain loss
    assert torch.equal(BCEDiceLoss(boundary_weight=1.0)(logits, target), BCEDiceLoss()(logits, target))
    # Dice term weighted too: the edge pixels count 4x in the sums
    p = torch.sigmoid(logits)
    d = (2 * (w * p * target).sum((1, 2, 3)) + 1) / ((w * p).sum((1, 2, 3)) + (w * target).sum((1, 2, 3)) + 1)
    loss_d = BCEDiceLoss(bce_weight=0.0, dice_weight=1.0, boundary_weight=4.0, boundary_band=2, boundary_dice=True)
    assert torch.allclose(loss_d(logits, target), 1 - d.mean())
    with pytest.raises(ValueError, match="boundary_weight must be >= 1"):
        BCEDiceLoss(boundary_weight=0.5)
