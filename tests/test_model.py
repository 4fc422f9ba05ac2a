"""UNet1024: shapes, gradients, size checks, parameter count, memory formats."""

from __future__ import annotations

import pytest
import torch

from carvana.models.unet1024 import (
    UNet1024,
    check_input_size,
    parse_input_size,
    scale_channels,
    upsample_bilinear,
    without_concatenation,
)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.mark.parametrize(
    ("h", "w", "width"),
    [(64, 64, 0.125), (128, 192, 0.25), (256, 384, 0.125), (192, 128, 0.25)],
)
def test_forward_backward_shapes(h: int, w: int, width: float) -> None:
    model = UNet1024(width=width)
    x = torch.randn(2, 3, h, w)
    out = model(x)
    assert out.shape == (2, 1, h, w)
    out.mean().backward()
    first_conv = model.encoders[0].encode[0].conv.weight
    assert first_conv.grad is not None
    assert torch.isfinite(first_conv.grad).all()
    assert first_conv.grad.abs().sum() > 0


def test_single_channel_input() -> None:
    model = UNet1024(in_channels=1, width=0.125)
    assert model(torch.randn(1, 1, 64, 128)).shape == (1, 1, 64, 128)


def test_wrong_channel_count_is_rejected() -> None:
    model = UNet1024(width=0.125)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(torch.randn(1, 1, 64, 64))


def test_bad_input_size_names_size_and_neighbours() -> None:
    model = UNet1024(width=0.125)
    with pytest.raises(ValueError, match="100x100") as err:
        model(torch.randn(1, 3, 100, 100))
    assert "64 or 128" in str(err.value)


def test_check_input_size_non_square() -> None:
    check_input_size(1280, 1920)  # valid: no error
    with pytest.raises(ValueError) as err:
        check_input_size(1280, 1918)
    msg = str(err.value)
    assert "1280x1918" in msg
    assert "1856 or 1920" in msg  # 1918 lies between 29*64 and 30*64
    with pytest.raises(ValueError, match="nearest valid height: 64,"):
        check_input_size(10, 64)
    with pytest.raises(ValueError):
        check_input_size(0, 64)


def test_parse_input_size() -> None:
    assert parse_input_size("256x384") == (256, 384)
    assert parse_input_size(" 1024X1024 ") == (1024, 1024)
    assert parse_input_size("512") == (512, 512)
    for bad in ("abc", "256x", "1x2x3", "256 by 384", "2.5x64"):
        with pytest.raises(ValueError, match="input size"):
            parse_input_size(bad)
    with pytest.raises(ValueError, match="100x384"):
        parse_input_size("100x384")


def test_scale_channels_floor() -> None:
    assert scale_channels(768, 1.0) == 768
    assert scale_channels(768, 0.25) == 192
    assert scale_channels(24, 0.125) == 4  # round(3.0) = 3, lifted to the floor of 4
    with pytest.raises(ValueError, match="width"):
        UNet1024(width=0.0)


def _expected_parameter_count(in_channels: int) -> int:
    """Count the classic layout by hand: conv k*k*cin*cout (no bias) + BN 2*cout."""

    def cbr(cin: int, cout: int) -> int:
        return 9 * cin * cout + 2 * cout

    enc = [24, 64, 128, 256, 512, 768]
    total = 0
    cin = in_channels
    for c in enc:
        total += cbr(cin, c) + cbr(c, c)
        cin = c
    total += cbr(768, 768)  # centre
    dec = [512, 256, 128, 64, 24, 24]
    cin = 768
    for skip, c in zip(reversed(enc), dec):
        total += cbr(cin + skip, c) + 2 * cbr(c, c)
        cin = c
    return total + 24 * 1 + 1  # 1x1 head with bias


def test_full_width_parameter_count() -> None:
    with torch.device("meta"):
        model = UNet1024()
    n = sum(p.numel() for p in model.parameters())
    assert n == _expected_parameter_count(3)
    assert 34_000_000 < n < 37_000_000  # "about 35M", the figure usually quoted


def test_channels_last_matches_contiguous_in_eval() -> None:
    model = UNet1024(width=0.125).eval()
    x = torch.randn(2, 3, 64, 128)
    with torch.no_grad():
        ref = model(x)
        model_cl = model.to(memory_format=torch.channels_last)
        out = model_cl(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def with_trained_statistics(model: UNet1024) -> UNet1024:
    """Non-trivial BatchNorm affine parameters and running statistics, as a trained net has."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.2)
            m.running_mean.normal_(0, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.mark.parametrize(("h", "w", "width", "classes"), [(64, 64, 0.125, 1), (128, 192, 0.25, 1), (64, 128, 0.125, 3)])
def test_the_concatenation_free_copy_computes_the_same_logits(h: int, w: int, width: float, classes: int) -> None:
    model = with_trained_statistics(UNet1024(width=width, classes=classes))
    twin = without_concatenation(model)
    x = torch.randn(2, 3, h, w)
    with torch.no_grad():
        ref = model(x)
        out = twin(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert all(type(d).__name__ == "DecoderStack" for d in model.decoders)  # the trained model is left as it was
    assert all(p.data_ptr() != q.data_ptr() for p in twin.parameters() for q in model.parameters())  # a copy
    assert model.decoders[0].decode[0].conv.weight.shape[1] == (twin.decoders[0].up_conv.weight.shape[1]
                                                                + twin.decoders[0].skip_conv.weight.shape[1])


def test_eval_mode_is_deterministic() -> None:
    model = UNet1024(width=0.125).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


def test_cpu_autocast_bfloat16() -> None:
    model = UNet1024(width=0.125)
    # Batch 2: at 64x64 the centre is 1x1, and train-mode BatchNorm needs >1 value.
    x = torch.randn(2, 3, 64, 64)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.shape == (2, 1, 64, 64)
    assert out.dtype == torch.bfloat16
    out.float().mean().backward()
    assert torch.isfinite(model.encoders[0].encode[0].conv.weight.grad).all()


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("src, dst", [((8, 12), (16, 24)), ((5, 7), (10, 14)), ((16, 24), (16, 24))])
def test_bf16_upsample_through_fp32_equals_torchs_bf16_kernel(src, dst, channels_last) -> None:
    """upsample_bilinear's no-grad bf16 shortcut returns exactly what torch's bf16 kernel does."""
    x = torch.randn(2, 6, *src).to(torch.bfloat16)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    expected = torch.nn.functional.interpolate(x, size=dst, mode="bilinear", align_corners=False)
    with torch.no_grad():
        got = upsample_bilinear(x, dst)
    assert got.dtype == torch.bfloat16 and torch.equal(got, expected)
    assert got.is_contiguous(memory_format=torch.channels_last) == channels_last


def test_upsample_keeps_torchs_path_and_gradient_under_autograd() -> None:
    x = torch.randn(1, 2, 4, 4, dtype=torch.bfloat16, requires_grad=True)
    upsample_bilinear(x, (8, 8)).float().sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.bfloat16
