"""Which epoch is the best so far (best.pt follows it), for CarvanaClassifier's training loop.

Functions of the trainer, as training/epoch.py's and training/evaluation.py's are: they read its
``monitor`` (the task's validation metric) and keep ``best_metric`` and ``best_loss_fn`` on it,
which its checkpoints store and a resume restores.
"""

from __future__ import annotations

import math
from typing import Any


def monitored(trainer: Any, metrics: dict[str, Any]) -> float:
    """The figure best.pt and a plateau schedule follow, higher is better: the task's validation
    metric; without validation (or when it is NaN: no class in the truth), minus a loss."""
    figure = metrics.get(trainer.monitor, -metrics["train_loss"])
    if figure != figure:
        figure = -metrics.get("valid_loss", metrics["train_loss"])
    return figure


def loss_changed(trainer: Any, metrics: dict[str, Any]) -> bool:
    """Whether the monitored figure is a training loss of another kind than the best so far
    was measured on (--lovasz switched losses; or unknown: a first epoch, or a checkpoint
    written before the loss was recorded): the two do not compare."""
    return trainer.monitor not in metrics and trainer.best_loss_fn != metrics["loss_fn"]


def record_best(trainer: Any, metrics: dict[str, Any]) -> bool:
    """Whether this epoch is the best so far, recording it on the trainer. After a change of
    training loss the best so far is forgotten: best.pt is taken among the new loss's epochs."""
    if loss_changed(trainer, metrics):
        trainer.best_metric = -math.inf
    if trainer.monitor not in metrics:
        trainer.best_loss_fn = metrics["loss_fn"]
    figure = monitored(trainer, metrics)
    is_best = figure > trainer.best_metric
    trainer.best_metric = max(trainer.best_metric, figure)
    return is_best
