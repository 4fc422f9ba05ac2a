"""Optimiser and learning-rate schedule factories, by name (the OPTIMIZER / SCHEDULER settings)."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn


def make_optimizer(name: str, params: Iterable[nn.Parameter], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """'adamw' | 'adam' | 'sgd' (momentum 0.9, Nesterov)."""
    name = name.lower()
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}: choose adamw, adam or sgd")


def make_scheduler(name: str, optimizer: torch.optim.Optimizer, epochs: int):
    """'cosine' (per epoch, to 1% of the initial LR) | 'plateau' (on valid Dice) | 'none'."""
    name = name.lower()
    if name == "cosine":
        base = optimizer.param_groups[0]["lr"]
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, epochs), eta_min=base * 0.01)
    if name == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=0.5, patience=2)
    if name == "none":
        return None
    raise ValueError(f"unknown scheduler {name!r}: choose cosine, plateau or none")
