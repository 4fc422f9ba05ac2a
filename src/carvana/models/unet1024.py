"""UNet1024: the classic Carvana U-Net for 1024x1024 inputs.

This is the layout popularised by Heng CherKeng on the Kaggle forum (and used in
EKami's Carvana pipeline): six encoder stacks (24, 64, 128, 256, 512, 768
channels), a 768-channel centre block, six decoder stacks (512, 256, 128, 64,
24, 24 channels) and a 1x1 convolution to one logit map.

Each encoder stack pools once, so an input must be a multiple of 2**6 = 64 in
both height and width; anything else would make a decoder's upsampled map and
its skip connection disagree by a pixel, which is reported up front instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

DEPTH = 6  # number of 2x2 poolings
SIZE_MULTIPLE = 2**DEPTH  # 64
ENCODER_CHANNELS = (24, 64, 128, 256, 512, 768)
CENTER_CHANNELS = 768
DECODER_CHANNELS = (512, 256, 128, 64, 24, 24)  # deepest decoder first
MIN_CHANNELS = 4  # floor for width-scaled channel counts, so tiny widths stay usable


def scale_channels(channels: int, width: float) -> int:
    """``max(4, round(channels * width))``: the channel count at a width multiplier.

    The floor of 4 keeps every layer non-degenerate at very small widths (24
    channels at width 0.125 would otherwise be 3).
    """
    return max(MIN_CHANNELS, round(channels * width))


def _nearest_multiples(n: int) -> str:
    """The valid sizes on either side of ``n`` (only one if ``n`` is below 64)."""
    lower = (n // SIZE_MULTIPLE) * SIZE_MULTIPLE
    upper = lower + SIZE_MULTIPLE
    return f"{lower} or {upper}" if lower > 0 else f"{upper}"


def check_input_size(h: int, w: int) -> None:
    """Raise ``ValueError`` unless ``h`` and ``w`` are positive multiples of 64.

    The message names the size and the nearest valid height and width.
    """
    if h > 0 and w > 0 and h % SIZE_MULTIPLE == 0 and w % SIZE_MULTIPLE == 0:
        return
    raise ValueError(
        f"input size {h}x{w} (HxW) is not supported: UNet1024 pools {DEPTH} times, so "
        f"height and width must be positive multiples of {SIZE_MULTIPLE}; "
        f"nearest valid height: {_nearest_multiples(h)}, "
        f"nearest valid width: {_nearest_multiples(w)}"
    )


def parse_input_size(text: str) -> tuple[int, int]:
    """Parse ``"256x384"`` (height x width) into ``(256, 384)`` and check it.

    A single number (``"1024"``) means a square input. Raises ``ValueError``
    for malformed text or sizes the network cannot take.
    """
    parts = text.strip().lower().split("x")
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2:
        raise ValueError(f"input size {text!r}: expected 'HxW' such as '1024x1024' or '256x384'")
    try:
        h, w = (int(p.strip()) for p in parts)
    except ValueError:
        raise ValueError(
            f"input size {text!r}: height and width must be integers, as in '256x384'"
        ) from None
    check_input_size(h, w)
    return h, w


class ConvBnRelu(nn.Module):
    """3x3 convolution (no bias: BatchNorm supplies it) + BatchNorm + ReLU."""

    FOLDABLE_CONV_BN = (("conv", "bn"),)  # bn(conv(x)): inference may fold bn into conv

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False
        )
        self.bn = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(x)))


class EncoderStack(nn.Module):
    """Two ConvBnRelu blocks, then 2x2 max-pooling.

    Returns ``(features, pooled)``: the full-resolution features feed the
    matching decoder as its skip connection, the pooled ones the next stack.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.encode = nn.Sequential(
            ConvBnRelu(in_channels, out_channels),
            ConvBnRelu(out_channels, out_channels),
        )
        self.pool = nn.MaxPool2d(kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.encode(x)
        return features, self.pool(features)


def upsample_bilinear(x: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """``F.interpolate(x, size, mode="bilinear", align_corners=False)``.

    A bf16 CPU tensor outside autograd (validation, prediction) is interpolated in fp32 and
    rounded back to bf16: the same values (torch's bf16 kernel computes in fp32 and rounds
    once too; tests/test_model.py checks), up to 1.6x faster on the 2-core Xeon (the
    full-resolution decoder; little at the smaller ones).
    Training keeps torch's own bf16 path and its gradient.
    """
    if x.dtype == torch.bfloat16 and x.device.type == "cpu" and not torch.is_grad_enabled():
        return F.interpolate(x.float(), size=size, mode="bilinear", align_corners=False).to(torch.bfloat16)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class DecoderStack(nn.Module):
    """Bilinear upsampling to the skip's size, concatenation, three ConvBnRelu blocks."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int) -> None:
        super().__init__()
        self.in_channels = in_channels  # where the first convolution's input splits (SkipSumDecoderStack)
        self.decode = nn.Sequential(
            ConvBnRelu(in_channels + skip_channels, out_channels),
            ConvBnRelu(out_channels, out_channels),
            ConvBnRelu(out_channels, out_channels),
        )

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.decode(torch.cat([upsample_bilinear(x, skip.shape[-2:]), skip], dim=1))


class SkipSumDecoderStack(nn.Module):
    """A :class:`DecoderStack` for fixed-weights inference graphs: the first convolution over
    ``cat([upsampled, skip])`` as two convolutions, one over each part, summed (its BatchNorm
    folded in first). The same function, without the concatenation: an inference engine then
    copies no map, and fuses the sum into the second convolution (OpenVINO ran these channel
    concatenations with reference kernels, about 5% of the int8 graph's time; bench/README.md).
    Eval only: the copy shares no parameters with the trained stack."""

    def __init__(self, stack: DecoderStack) -> None:
        super().__init__()
        from torch.nn.utils.fusion import fuse_conv_bn_eval

        first = stack.decode[0]
        fused = fuse_conv_bn_eval(first.conv.eval(), first.bn.eval())
        split = stack.in_channels
        self.up_conv, self.skip_conv = (
            nn.Conv2d(c, fused.out_channels, fused.kernel_size, padding=fused.padding, bias=bias)
            for c, bias in ((split, True), (fused.in_channels - split, False)))
        with torch.no_grad():
            self.up_conv.weight.copy_(fused.weight[:, :split])
            self.up_conv.bias.copy_(fused.bias)
            self.skip_conv.weight.copy_(fused.weight[:, split:])
        self.rest = stack.decode[1:]

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        y = self.up_conv(upsample_bilinear(x, skip.shape[-2:])) + self.skip_conv(skip)
        return self.rest(F.relu(y))


def without_concatenation(model: "UNet1024") -> "UNet1024":
    """An eval-mode copy of ``model`` whose decoders are :class:`SkipSumDecoderStack`: the
    same probabilities to float rounding, for graphs that inference engines compile."""
    import copy

    twin = copy.deepcopy(model).eval()
    twin.decoders = nn.ModuleList(SkipSumDecoderStack(d) for d in twin.decoders)
    return twin.eval()


class UNet1024(nn.Module):
    """The Carvana U-Net: (B, in_channels, H, W) -> logits (B, classes, H, W).

    ``width`` multiplies every channel count (see :func:`scale_channels`);
    1.0 is the classic network. H and W must be multiples of 64.
    """

    def __init__(self, in_channels: int = 3, width: float = 1.0, classes: int = 1) -> None:
        super().__init__()
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}")
        if not width > 0:
            raise ValueError(f"width must be > 0, got {width}")
        if classes < 1:
            raise ValueError(f"classes must be >= 1, got {classes}")
        self.in_channels = in_channels
        self.width = width

        enc = [scale_channels(c, width) for c in ENCODER_CHANNELS]
        center = scale_channels(CENTER_CHANNELS, width)
        dec = [scale_channels(c, width) for c in DECODER_CHANNELS]

        encoder_inputs = [in_channels, *enc[:-1]]
        self.encoders = nn.ModuleList(
            EncoderStack(c_in, c_out) for c_in, c_out in zip(encoder_inputs, enc)
        )
        self.center = ConvBnRelu(enc[-1], center)
        # Decoder i takes the previous decoder's output (or the centre) and the
        # skip from the encoder at the same resolution, deepest first.
        decoder_inputs = [center, *dec[:-1]]
        skips = enc[::-1]
        self.decoders = nn.ModuleList(
            DecoderStack(c_in, c_skip, c_out)
            for c_in, c_skip, c_out in zip(decoder_inputs, skips, dec)
        )
        self.head = nn.Conv2d(dec[-1], classes, kernel_size=1)
        self._init_weights()

    def _init_weights(self) -> None:
        """Kaiming-normal convolutions (they all feed ReLUs), unit BatchNorm, zero biases."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"expected input of shape (B, {self.in_channels}, H, W), got {tuple(x.shape)}"
            )
        check_input_size(x.shape[-2], x.shape[-1])
        skips = []
        for encoder in self.encoders:
            features, x = encoder(x)
            skips.append(features)
        x = self.center(x)
        for decoder, skip in zip(self.decoders, reversed(skips)):
            x = decoder(x, skip)
        return self.head(x)
