"""Pruning: each epoch's validation figure goes to the study's pruner, which may stop the trial.

Under torchrun only rank 0 holds the trial: it reports and decides, and every rank gets the
same decision, so all stop together at the same epoch.
"""

from __future__ import annotations

from typing import Any

import optuna

from carvana.training import distributed as dist
from carvana.training.callbacks import Callback

PRUNERS = ("median", "hyperband", "none")


def make_pruner(name: str, max_steps: int) -> optuna.pruners.BasePruner:
    """--tune-pruner: MedianPruner (after 3 trials and 2 epochs), Hyperband over ``max_steps``
    epochs, or none."""
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=2)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=2, max_resource=max(max_steps, 3), reduction_factor=3)
    if name == "none":
        return optuna.pruners.NopPruner()
    raise ValueError(f"--tune-pruner {name!r}: expected one of {', '.join(PRUNERS)}")


class TrialReporter(Callback):
    """Reports the monitored figure (valid Dice, or mIoU) after every epoch; with --folds the
    steps run on through the folds (fold 2's first epoch follows fold 1's last)."""

    def __init__(self, trial: optuna.Trial | None) -> None:
        self.trial = trial  # None on the ranks that only follow rank 0's decision
        self.step = 0
        self.pruned_at: int | None = None

    def on_epoch_end(self, trainer: Any, epoch: int, metrics: dict[str, float], preview: Any) -> None:
        value = metrics.get(trainer.monitor)
        prune = False
        if self.trial is not None and value is not None and value == value:
            self.trial.report(float(value), self.step)
            prune = self.trial.should_prune()
        self.step += 1
        if dist.broadcast_object(prune):
            self.pruned_at = epoch
            raise optuna.TrialPruned(f"pruned after epoch {epoch + 1} ({trainer.monitor} {value:.5f})")
