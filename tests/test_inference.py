"""CPU inference copies (training/inference.py): folded BatchNorm is exact, only provably
adjacent conv -> bn pairs fold, the copy follows the live weights, and the classifier's
validation and prediction go through it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from carvana.models.registry import ModelConfig, build_model
from carvana.models.unet1024 import UNet1024
from carvana.training.classifier import CarvanaClassifier
from carvana.training.callbacks import Callback
from carvana.training.inference import InferenceCopy, MaxPool2x2, fold_batchnorm, replace_max_pools


def randomise_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial running statistics and affine terms, so a wrong fold would show."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) * 0.4 - 0.2)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=g) * 0.2 - 0.1)
    return model.eval()


CONFIGS = {
    "unet1024": ModelConfig(arch="unet1024", width=0.125, input_size=(64, 64)),
    "unet-original": ModelConfig(arch="unet-original", width=0.0625, input_size=(36 + 184, 36 + 184)),
    "linknet-resnet34": ModelConfig(arch="linknet", encoder="resnet34", encoder_weights="none", input_size=(64, 64)),
    "unet-mobilenet_v2": ModelConfig(arch="unet", encoder="mobilenet_v2", encoder_weights="none", input_size=(64, 64)),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_folded_copy_computes_the_same_logits_in_fp32(name):
    torch.manual_seed(0)
    config = CONFIGS[name]
    model = randomise_batchnorm(build_model(config))
    folded, count = fold_batchnorm(model)
    assert count > 0
    x = torch.randn(2, 3, *config.input_size)
    with torch.no_grad():
        expected, got = model(x), folded(x)
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
    # The original keeps its BatchNorms (checkpoints are written from it).
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) > sum(
        isinstance(m, nn.BatchNorm2d) for m in folded.modules())


def test_every_batchnorm_of_unet1024_folds():
    model = UNet1024(width=0.125)
    folded, count = fold_batchnorm(model)
    assert count == sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())


class BnBeforeConv(nn.Module):
    """Defines conv before bn but applies bn first: folding by definition order would be wrong."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.bn(x))


class ReversedSequential(nn.Sequential):
    """A Sequential subclass with its own forward: its child order proves nothing."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for module in reversed(self):
            x = module(x)
        return x


@pytest.mark.parametrize("make", [BnBeforeConv, lambda: ReversedSequential(nn.BatchNorm2d(3), nn.Conv2d(3, 3, 1))],
                         ids=["declared-order", "sequential-subclass"])
def test_pairs_that_are_not_provably_adjacent_are_left_alone(make):
    model = randomise_batchnorm(make())
    folded, count = fold_batchnorm(model)
    assert count == 0
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(folded(x), model(x))


def train_step(model: nn.Module, x: torch.Tensor) -> None:
    """One SGD step in train mode: weights and BatchNorm running statistics move in place."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    model(x).float().mean().backward()
    optimizer.step()
    model.eval()


def test_the_copy_is_reused_until_the_weights_change_then_refreshed():
    torch.manual_seed(0)
    model = UNet1024(width=0.125)
    cache = InferenceCopy(None, torch.contiguous_format)
    first = cache.get(model)
    assert cache.get(model) is first  # unchanged weights: nothing redone
    x = torch.randn(2, 3, 128, 128)  # train-mode BatchNorm needs > 1 value per channel at 1/64
    before = cache.forward(model, x)
    train_step(model, x)  # in place: the version counters move
    with torch.no_grad():
        assert torch.allclose(cache.forward(model, x), model(x), atol=1e-4)
    assert not torch.allclose(cache.forward(model, x), before)
    assert cache.get(model) is first  # same layout: refreshed in place, not rebuilt
    other = UNet1024(width=0.125)
    model.load_state_dict(other.state_dict())  # resume / checkpoint load: refreshed too
    with torch.no_grad():
        assert torch.allclose(cache.forward(model, x), other.eval()(x), atol=1e-4)


@pytest.mark.parametrize("dtype, memory_format", [(None, torch.contiguous_format), (torch.bfloat16, torch.channels_last)],
                         ids=["fp32", "bf16-channels_last"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_a_refreshed_copy_is_bit_identical_to_a_new_one(name, dtype, memory_format):
    """Folded and unfolded BatchNorms (running statistics too), casts and layouts all follow."""
    torch.manual_seed(0)
    config = CONFIGS[name]
    model = randomise_batchnorm(build_model(config))
    cache = InferenceCopy(dtype, memory_format)
    cache.get(model)
    x = torch.randn(2, 3, *config.input_size)
    train_step(model, x)
    with torch.no_grad():
        refreshed = cache.forward(model, x)
        fresh = InferenceCopy(dtype, memory_format).forward(model, x)
    assert torch.equal(refreshed, fresh)


def test_a_new_layout_rebuilds_the_copy():
    torch.manual_seed(0)
    model = UNet1024(width=0.125)
    cache = InferenceCopy(None, torch.contiguous_format)
    first = cache.get(model)
    model.head = nn.Conv2d(model.head.in_channels, 2, 1)  # e.g. a new head for another task
    assert cache.get(model) is not first
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert cache.forward(model, x).shape[1] == 2
        assert torch.allclose(cache.forward(model, x), model.eval()(x), atol=1e-4)


def test_bf16_copy_keeps_the_model_fp32_and_returns_fp32_close_to_it():
    torch.manual_seed(0)
    model = randomise_batchnorm(UNet1024(width=0.125))
    cache = InferenceCopy(torch.bfloat16, torch.channels_last)
    x = torch.randn(2, 3, 64, 128)
    with torch.no_grad():
        expected = torch.sigmoid(model(x))
        got = torch.sigmoid(cache.forward(model, x))
    assert got.dtype == torch.float32 and all(p.dtype == torch.float32 for p in model.parameters())
    assert next(cache.get(model).parameters()).dtype == torch.bfloat16
    assert (got - expected).abs().max() < 0.05  # bf16 rounding, as under autocast


class Collect(Callback):
    def __init__(self) -> None:
        self.probs: list[torch.Tensor] = []

    def on_predict_batch_end(self, trainer, names, probs) -> None:
        self.probs.append(probs)


def test_classifier_predicts_on_the_cpu_through_the_folded_copy():
    torch.manual_seed(0)
    model = randomise_batchnorm(UNet1024(width=0.125))
    clf = CarvanaClassifier(model, epochs=1, device="cpu", amp=False, progress=False)
    assert clf.inference is not None
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    collect = Collect()
    clf.predict([{"image": images, "name": ["a", "b"]}], [collect])
    built = clf.inference.get(clf.model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in built.modules())  # the folded copy ran
    with torch.no_grad():
        expected = torch.sigmoid(clf.model.eval()(clf._images_to_device(images)))[:, 0]
    assert torch.allclose(collect.probs[0], expected, atol=1e-5)


def test_fixed_weights_checks_once_on_entry_and_again_after_exit():
    torch.manual_seed(0)
    model = UNet1024(width=0.125)
    cache = InferenceCopy(None, torch.contiguous_format)
    x = torch.randn(2, 3, 128, 128)
    train_step(model, x)
    with cache.fixed_weights(model):  # entry: the copy is brought up to date
        with torch.no_grad():
            assert torch.allclose(cache.forward(model, x), model(x), atol=1e-4)
        stale = cache.forward(model, x)
        train_step(model, x)  # breaks the promise on purpose: inside, nothing is re-checked
        assert torch.equal(cache.forward(model, x), stale)
    with torch.no_grad():  # outside again: every call checks
        assert torch.allclose(cache.forward(model, x), model(x), atol=1e-4)


@pytest.mark.parametrize("dtype, channels_last", [(torch.float32, False), (torch.bfloat16, True)], ids=["fp32", "bf16-cl"])
@pytest.mark.parametrize("hw", [(8, 12), (7, 9), (3, 2)])
def test_maxpool2x2_equals_max_pool2d_bit_for_bit(hw, dtype, channels_last):
    x = torch.randn(2, 3, *hw).to(dtype)
    x[0, 0, 0, 0] = float("nan")  # NaN propagates through both
    x[1, 1, 0, :2] = float("-inf")
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    expected = torch.nn.functional.max_pool2d(x, 2, 2)
    got = MaxPool2x2()(x)
    assert got.shape == expected.shape and torch.equal(got.isnan(), expected.isnan())
    assert torch.equal(got.nan_to_num(), expected.nan_to_num())


def test_maxpool2x2_on_a_map_too_small_raises_as_max_pool2d_does():
    with pytest.raises(RuntimeError, match="too small"):
        MaxPool2x2()(torch.randn(1, 3, 1, 5))


def test_only_plain_2x2_pools_are_replaced():
    model = nn.Sequential(nn.MaxPool2d(2), nn.MaxPool2d((2, 2), stride=(2, 2)), nn.MaxPool2d(3, 2, 1),
                          nn.MaxPool2d(2, 2, ceil_mode=True), nn.MaxPool2d(2, 1))
    assert replace_max_pools(model) == 2
    assert [type(m).__name__ for m in model] == ["MaxPool2x2", "MaxPool2x2", "MaxPool2d", "MaxPool2d", "MaxPool2d"]


@pytest.mark.parametrize("name", ["unet1024", "unet-original"])
def test_the_inference_copy_with_its_pools_replaced_matches_the_model(name):
    torch.manual_seed(0)
    config = CONFIGS[name]
    model = randomise_batchnorm(build_model(config))
    cache = InferenceCopy(None, torch.contiguous_format)
    net = cache.get(model)
    assert any(isinstance(m, MaxPool2x2) for m in net.modules())
    assert not any(isinstance(m, MaxPool2x2) for m in model.modules())  # the live model keeps its pools
    x = torch.randn(2, 3, *config.input_size)
    with torch.no_grad():
        expected = model(x)
        assert torch.allclose(cache.forward(model, x), expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
