"""One training epoch of a CarvanaClassifier: its steps, and agreeing on a bad loss across ranks.

A function of the trainer, as its eval loops (training/evaluation.py) are. Each step: images and
masks to the device, forward under autocast, the loss in fp32, a check that the loss is finite
on every rank (before backward, so no rank waits alone in DDP's all-reduce), backward through
the gradient scaler, optional gradient clipping, the optimiser step. Under ``--freeze-encoder-epochs``
the encoder keeps its weights and BatchNorm statistics; under ``--time-budget`` the epoch stops
at the step that spends the budget. With ``--ema`` the weight average (training/averaging.py)
follows each step; with ``--lovasz`` the last part of training steps on the Lovász hinge loss
instead of the task's loss (:func:`uses_lovasz` says when); with ``--coarse-size`` the first part
steps on batches scaled down (progressive resizing, :func:`uses_coarse`). Validation always scores
the task's loss at the full size, so ``valid_loss`` stays comparable across either switch.
"""

from __future__ import annotations

import math
import time
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from carvana.training import distributed as dist
from carvana.training.optim import follow_clock


class TrainingSettingError(ValueError):
    """A training setting out of its range, with the flag named (pipeline/fit.py makes it a PlanError)."""


def check_fraction(flag: str, value: float, what: str) -> None:
    """TrainingSettingError unless 0 <= ``value`` < 1 (NaN is refused too): --ema, --lovasz."""
    if not 0.0 <= value < 1.0:
        raise TrainingSettingError(f"{flag} {value:g}: expected {what} in [0, 1); 0 = off")


def check_training_shares(ema: float, lovasz: float, coarse_share: float, validate_from: float,
                          scheduler: str) -> None:
    """TrainingSettingError naming the flag unless --ema, --lovasz, --coarse-share and
    --validate-from are in [0, 1), and --validate-from is 0 with a plateau schedule, which needs
    every epoch's validation figure. The plan check and the classifier both call this."""
    check_fraction("--ema", ema, "a decay (e.g. 0.998)")
    check_fraction("--lovasz", lovasz, "a fraction of training")
    check_fraction("--coarse-share", coarse_share, "a fraction of training")
    check_fraction("--validate-from", validate_from, "a fraction of training")
    if validate_from > 0 and scheduler.lower() == "plateau":
        raise TrainingSettingError(f"--validate-from {validate_from:g} cannot be used with --scheduler plateau, "
                                   "which follows the validation figure of every epoch")


def uses_lovasz(trainer: Any, epoch: int) -> bool:
    """Whether a step of ``epoch`` fine-tunes with the Lovász hinge (``trainer.lovasz`` = F > 0).

    The last ceil(F * epochs) of the run's ``trainer.epochs``; under --time-budget also every step
    once F of the budget's clock is left (``trainer._budget_used`` is the training time the previous
    step's budget check measured), so a budget that ends the run early still gets its fine-tune.
    """
    if trainer.lovasz <= 0:
        return False
    # -1e-9: 0.3 * 10 is 3.0000000000000004 in floats, which must not round up to 4 epochs.
    if epoch >= trainer.epochs - math.ceil(trainer.lovasz * trainer.epochs - 1e-9):
        return True
    return trainer.time_budget > 0 and trainer._budget_used >= (1.0 - trainer.lovasz) * trainer.time_budget


def uses_coarse(trainer: Any, epoch: int) -> bool:
    """Whether a step of ``epoch`` trains on batches scaled down to ``trainer.coarse_size``
    (progressive resizing, --coarse-size with --coarse-share F): the first floor(F * epochs) of the
    run's ``trainer.epochs``; under --time-budget instead every step until F of the budget's clock
    is used (``trainer._budget_used``, as for :func:`uses_lovasz`), so a slower machine spends the
    same share of its minutes there."""
    if trainer.coarse_size is None or trainer.coarse_share <= 0:
        return False
    if trainer.time_budget > 0:
        return trainer._budget_used < trainer.coarse_share * trainer.time_budget
    return epoch < math.floor(trainer.coarse_share * trainer.epochs + 1e-9)


def validates(trainer: Any, epoch: int) -> bool:
    """Whether ``epoch`` is validated (``trainer.validate_from`` = F, --validate-from): every epoch
    when F is 0; else those from floor(F * epochs) of the run's ``trainer.epochs`` on (so always
    the last), and under --time-budget also those that end once F of the budget's clock is used
    and the one that spends it: best.pt is always chosen among validated epochs."""
    if trainer.validate_from <= 0:
        return True
    if trainer.time_budget > 0 and (trainer._budget_spent or trainer._budget_used >= trainer.validate_from
                                    * trainer.time_budget):
        return True
    return epoch >= min(trainer.epochs - 1, math.floor(trainer.validate_from * trainer.epochs + 1e-9))


def scaled_batch(images: torch.Tensor, masks: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """A training batch scaled down to ``size`` (H, W): images antialiased bilinear; float masks
    (binary 0/1, or soft pseudo-labels) by area, so an edge pixel's target is the share of car it
    covers; class-id masks (multi-class, (B, H, W) int64) by nearest, since ids cannot be averaged."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images, masks
    small = F.interpolate(images, size=size, mode="bilinear", antialias=True, align_corners=False)
    if masks.is_floating_point():
        return small, F.interpolate(masks, size=size, mode="area")
    return small, F.interpolate(masks[:, None].float(), size=size, mode="nearest-exact")[:, 0].to(masks.dtype)


def loss_name(loss_fn: Any) -> str:
    """What a metrics row calls a loss: its ``name`` attribute, else its class name."""
    return str(getattr(loss_fn, "name", type(loss_fn).__name__))


def train_one_epoch(trainer: Any, loader: Iterable[dict], epoch: int, epochs: int) -> tuple[float, int, str]:
    """One pass over ``loader`` (or, under --time-budget, what the budget leaves of it): (mean loss,
    images seen by this process, the loss(es) it stepped on: e.g. "bce+dice", "lovasz" or, for an
    epoch the budget's clock switched mid-way, "bce+dice,lovasz")."""
    trainer.net.train()
    frozen = trainer.encoder is not None and epoch < trainer.freeze_encoder_epochs
    if frozen:  # fine-tuning: the encoder keeps its weights and its BatchNorm statistics
        trainer.encoder.eval()
    total, count = torch.zeros((), device=trainer.device), 0
    used: list[str] = []  # the losses stepped on, in order
    bar = tqdm(loader, desc=f"train {epoch + 1}/{epochs}", leave=False, disable=trainer._bar_off, dynamic_ncols=True)
    for step, batch in enumerate(bar):
        images, masks = trainer._images_to_device(batch["image"]), trainer._masks_to_device(batch["mask"])
        coarse = uses_coarse(trainer, epoch)
        if coarse:
            images, masks = scaled_batch(images, masks, trainer.coarse_size)
        with trainer._autocast():
            logits = trainer.net(images)
        loss_fn = trainer.lovasz_loss if uses_lovasz(trainer, epoch) else trainer.loss_fn
        # A loss at the coarse size is another figure than at full size: named apart, so the best
        # epoch without validation is compared within one kind (as across the Lovasz switch).
        name = loss_name(loss_fn) + ("@{}x{}".format(*trainer.coarse_size) if coarse else "")
        if not used or used[-1] != name:
            used.append(name)
        loss = loss_fn(logits.float(), masks)  # fp32 loss whatever the autocast dtype
        check_finite_everywhere(loss, epoch, step)
        trainer.optimizer.zero_grad(set_to_none=True)
        trainer.scaler.scale(loss).backward()
        if frozen:  # no update, no weight decay: AdamW skips parameters without a gradient
            for p in trainer.encoder.parameters():
                p.grad = None
        if trainer.grad_clip > 0:
            trainer.scaler.unscale_(trainer.optimizer)
            nn.utils.clip_grad_norm_(trainer.model.parameters(), trainer.grad_clip)
        trainer.scaler.step(trainer.optimizer)
        trainer.scaler.update()
        if trainer.average is not None:  # after the step; frozen weights simply stay equal in the average
            trainer.average.update(trainer.model)
        total += loss.detach() * images.shape[0]
        count += images.shape[0]
        if trainer.progress:
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if trainer.time_budget > 0 and budget_spent(trainer):  # validate what we have, then stop
            break
    # Under DDP: validate, checkpoint and predict with rank 0's BatchNorm stats on every rank.
    dist.broadcast_buffers(trainer.model)
    if trainer.average is not None:
        trainer.average.broadcast_buffers()
    return dist.all_reduce_mean(total, count), count, ",".join(used)


def budget_spent(trainer: Any) -> bool:
    """--time-budget: True once the training steps have used it up (rank 0's clock decides, so
    all ranks stop at the same step); until then the cosine LR follows the clock, per step."""
    used = trainer._budget_used = dist.broadcast_object(time.perf_counter() - trainer._budget_start)
    if used >= trainer.time_budget:
        trainer._budget_spent = True
    elif trainer.scheduler is None and trainer.scheduler_name.lower() == "cosine":
        follow_clock(trainer.optimizer, used, trainer.time_budget)
    return trainer._budget_spent


def check_finite_everywhere(loss: torch.Tensor, epoch: int, step: int) -> None:
    """A FloatingPointError on every rank when the loss is not finite on any of them.

    Agreed over all ranks before backward: a rank that stopped alone would leave the others
    waiting forever in DDP's gradient all-reduce.
    """
    bad_ranks = dist.ranks_where(~torch.isfinite(loss.detach()))
    if bad_ranks:
        where = "" if not dist.is_distributed() else f" on rank(s) {', '.join(map(str, bad_ranks))}"
        raise FloatingPointError(
            f"loss is not finite{where} at epoch {epoch + 1}, step {step + 1}: training stopped on every "
            "rank, the last good checkpoint is left intact. Lower the learning rate, turn AMP off or "
            "enable --grad-clip."
        )
