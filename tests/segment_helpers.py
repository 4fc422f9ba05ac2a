"""Checkpoints for the segment/export tests: a tiny UNet1024, and 'bright' nets whose masks are known.

A 'bright' net marks bright pixels as car (logit = 10 x the mean normalised channel), so a
white shape on a black photo must come back as exactly that shape: a check of the letterbox
geometry that a randomly initialised UNet cannot give.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from carvana.models import registry
from carvana.models.registry import ArchSpec, ModelConfig, arch_spec, build_model
from carvana.training.checkpoint import save_checkpoint


class Bright(nn.Module):
    """logits = scale * mean over channels, cropped by ``margin`` per side (a valid-convolution net)."""

    def __init__(self, margin: int = 0) -> None:
        super().__init__()
        self.margin = margin
        self.scale = nn.Parameter(torch.tensor(10.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.scale * x.mean(1, keepdim=True)
        m = self.margin
        return y[..., m:y.shape[-2] - m, m:y.shape[-1] - m] if m else y


BRIGHT_ARCHS = {
    "test_bright": ArchSpec(build=lambda cfg: Bright(), size_multiple=1),
    "test_bright_margin": ArchSpec(build=lambda cfg: Bright(4), size_multiple=1, output_margin=4),
}


def use_bright_archs(monkeypatch) -> None:
    """Register the bright nets for one test only (other tests may list the registry's names)."""
    arch_spec("unet1024")  # registers the built-in archs first
    for name, spec in BRIGHT_ARCHS.items():
        monkeypatch.setitem(registry._ARCHS, name, spec)


def save_model(path: Path, config: ModelConfig, hparams: dict | None = None) -> Path:
    """Build ``config``'s network (seeded) and save it as a checkpoint at ``path``."""
    torch.manual_seed(0)
    model = build_model(config)
    save_checkpoint({"model": model.state_dict(), "model_config": config.to_dict(), "hparams": hparams or {}}, path)
    return path


def tiny_unet(path: Path, classes: int = 1, input_size=(64, 64)) -> Path:
    return save_model(path, ModelConfig(arch="unet1024", width=0.125, classes=classes, input_size=input_size))


def bright(path: Path, margin: bool = False, input_size=(64, 96)) -> Path:
    return save_model(path, ModelConfig(arch="test_bright_margin" if margin else "test_bright", input_size=input_size))
