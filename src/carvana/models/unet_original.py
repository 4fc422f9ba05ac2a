"""UNetOriginal: the 2015 U-Net (Ronneberger et al.), valid convolutions, with BatchNorm.

Four 2x2 poolings, two *unpadded* 3x3 convolutions per level (64, 128, 256, 512 channels,
1024 at the bottom, times ``width``), 2x2 transposed convolutions up, skip connections
centre-cropped to the decoder's size, a 1x1 head. Every valid convolution eats a pixel on
each side, so the output is smaller than the input by ``2 * MARGIN`` = 184 pixels: the
paper's 572x572 tile gives a 388x388 output.

Trained the way the paper tiles: the image is resized to the *output* size and mirrored
outwards by ``MARGIN`` pixels on each side (:func:`mirror_pad`), so output pixel (i, j)
sits exactly over the resized mask's pixel (i, j). (Resizing the image to 572 and the mask
to 388 instead, as some tutorials do, shifts and scales the mask against the image.)
"""

from __future__ import annotations

import torch
from torch import nn

from carvana.data.image_tensors import mirror_pad as _mirror_pad

DEPTH = 4  # number of 2x2 poolings
CHANNELS = (64, 128, 256, 512, 1024)  # per level, the last one is the bottom
MARGIN = 92  # pixels lost on each side: input = output + 2 * MARGIN (572 -> 388)
SIZE_STEP = 2**DEPTH  # valid output sizes are 4 + a multiple of 16: 4, 20, ..., 388, ...
MIN_CHANNELS = 4


def input_size_for(output: int) -> int:
    """The input side that gives an output of ``output`` pixels (388 -> 572)."""
    return output + 2 * MARGIN


def _valid_output(n: int) -> bool:
    # Going up from the bottom feature map of side b >= 1: out = 16 b - 60, i.e. 4 mod 16.
    return n >= 4 and (n + 60) % SIZE_STEP == 0


def _nearest_outputs(n: int) -> str:
    lower = n - (n + 60) % SIZE_STEP
    upper = lower + SIZE_STEP
    return f"{lower} or {upper}" if lower >= 4 else f"{max(upper, 4)}"


def check_output_size(h: int, w: int) -> None:
    """Raise ``ValueError`` unless (h, w) is an output size the net produces, naming the nearest."""
    if _valid_output(h) and _valid_output(w):
        return
    raise ValueError(
        f"output size {h}x{w} (HxW) is not supported by unet-original: with {DEPTH} poolings and valid "
        f"convolutions the output height and width must be 4 + a multiple of {SIZE_STEP} (e.g. 388, input "
        f"388 + {2 * MARGIN} = 572); nearest valid height: {_nearest_outputs(h)}, nearest valid width: "
        f"{_nearest_outputs(w)} (--input-size is the OUTPUT size for unet-original)"
    )


def center_crop(x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """The central ``hw`` (H, W) window of a (..., H, W) tensor."""
    top, left = (x.shape[-2] - hw[0]) // 2, (x.shape[-1] - hw[1]) // 2
    return x[..., top : top + hw[0], left : left + hw[1]]


def _double_conv(c_in: int, c_out: int) -> nn.Sequential:
    """Two unpadded 3x3 convolutions, each with BatchNorm and ReLU."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
    )


class UNetOriginal(nn.Module):
    """(B, in_channels, H + 184, W + 184) -> logits (B, classes, H, W), H and W valid outputs."""

    def __init__(self, in_channels: int = 3, width: float = 1.0, classes: int = 1) -> None:
        super().__init__()
        if not width > 0:
            raise ValueError(f"width must be > 0, got {width}")
        ch = [max(MIN_CHANNELS, round(c * width)) for c in CHANNELS]
        self.in_channels = in_channels
        self.down = nn.ModuleList(_double_conv(c_in, c_out) for c_in, c_out in zip([in_channels, *ch[:3]], ch[:4]))
        self.pool = nn.MaxPool2d(2)
        self.bottom = _double_conv(ch[3], ch[4])
        self.up = nn.ModuleList(nn.ConvTranspose2d(ch[i + 1], ch[i], 2, stride=2) for i in reversed(range(DEPTH)))
        self.decode = nn.ModuleList(_double_conv(2 * ch[i], ch[i]) for i in reversed(range(DEPTH)))
        self.head = nn.Conv2d(ch[0], classes, 1)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected input of shape (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        check_output_size(x.shape[-2] - 2 * MARGIN, x.shape[-1] - 2 * MARGIN)
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bottom(x)
        for up, decode, skip in zip(self.up, self.decode, reversed(skips)):
            x = up(x)
            x = decode(torch.cat([center_crop(skip, x.shape[-2:]), x], dim=1))
        return self.head(x)


def mirror_pad(x: torch.Tensor, margin: int = MARGIN) -> torch.Tensor:
    """``carvana.data.image_tensors.mirror_pad`` with this network's margin as the default."""
    return _mirror_pad(x, margin)
