"""Optimiser and learning-rate schedule factories, by name (the OPTIMIZER / SCHEDULER settings)."""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from torch import nn


def fused_supported(params: list[nn.Parameter]) -> bool:
    """Whether torch's fused (single-kernel) optimiser step can take these parameters:
    floating point, all on a CPU or all on one CUDA device."""
    devices = {p.device for p in params}
    return (bool(params) and len(devices) == 1 and next(iter(devices)).type in ("cpu", "cuda")
            and all(p.dtype.is_floating_point for p in params))


def make_optimizer(name: str, params: Iterable[nn.Parameter], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """'adamw' | 'adam' | 'sgd' (momentum 0.9, Nesterov).

    The fused implementation where it applies: the same update in one pass over the
    parameters instead of a chain of per-tensor ops. On the 2-core CPU it took AdamW's step
    for UNet1024 width 0.25 from ~7.7 to ~2.6 ms (bench/README.md, cpu_amp.py).
    """
    name = name.lower()
    params = list(params)
    fused = fused_supported(params)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, fused=fused)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay, fused=fused)
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


def cosine_lr(base: float, floor: float, progress: float) -> float:
    """The cosine schedule's LR at ``progress`` (0 to 1) of training: ``base`` down to ``floor``,
    the closed form of CosineAnnealingLR; continue_schedule and follow_clock both use it."""
    return floor + (base - floor) * (1 + math.cos(math.pi * progress)) / 2


def continue_schedule(scheduler: Any, epochs: int) -> int | None:
    """Stretch or shrink a resumed cosine schedule to ``epochs``; returns the old length if it changed.

    A checkpoint's CosineAnnealingLR state carries the T_max of the run that wrote it, so
    resuming with a different --epochs would keep the old length: the LR would reach its
    floor and climb back. Here T_max becomes the new epoch count and the current LR is set
    to the closed-form value at the resumed step, so the rest of the run follows the
    schedule of a run started with ``epochs`` (to float rounding). Other schedules do not
    depend on the epoch count and are left alone.
    """
    if not isinstance(scheduler, torch.optim.lr_scheduler.CosineAnnealingLR):
        return None
    old, new = int(scheduler.T_max), max(1, int(epochs))
    if old == new:
        return None
    scheduler.T_max = new
    step = scheduler.last_epoch
    for group, base_lr in zip(scheduler.optimizer.param_groups, scheduler.base_lrs):
        group["lr"] = cosine_lr(base_lr, scheduler.eta_min, step / new)
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]
    return old


def follow_clock(optimizer: torch.optim.Optimizer, used: float, budget: float) -> None:
    """--time-budget's cosine: the LR after ``used`` of ``budget`` seconds, to 1% of the initial
    LR at the end (the same shape as make_scheduler's 'cosine', on the clock, per step)."""
    for group in optimizer.param_groups:
        base = group.setdefault("initial_lr", group["lr"])
        group["lr"] = cosine_lr(base, 0.01 * base, used / budget)


def step_scheduler(scheduler: Any, figure: float, new_kind: bool = False) -> None:
    """One epoch's step. ReduceLROnPlateau follows ``figure`` (higher is better); ``new_kind``
    says the figure changed scale (a training loss after --lovasz switched losses), so the
    plateau's best so far is forgotten rather than compared with values of another loss."""
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        if new_kind:  # what ReduceLROnPlateau does on construction, through public attributes
            scheduler.best, scheduler.num_bad_epochs, scheduler.cooldown_counter = scheduler.mode_worse, 0, 0
        scheduler.step(figure)
    elif scheduler is not None:
        scheduler.step()
