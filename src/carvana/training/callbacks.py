"""The callback protocol of CarvanaClassifier.

Every hook is a documented no-op on ``Callback``; subclasses override the ones
they need. Two guards make mistakes loud instead of silent:

* a subclass that defines an ``on_*`` method that is not a hook (a typo such as
  ``on_epoch_ends``) raises ``TypeError`` when the class is created;
* ``CallbackList.<unknown hook>`` raises ``AttributeError``.

Order of calls during ``train``::

    on_train_start -> (on_epoch_end per epoch) -> on_train_end
    on_exception   (instead of on_train_end, when training raises)

and during ``predict``::

    on_predict_start -> (on_predict_batch_end per batch) -> on_predict_end
    on_exception   (instead of on_predict_end, when prediction raises)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np

HOOKS = (
    "on_train_start",
    "on_epoch_end",
    "on_train_end",
    "on_predict_start",
    "on_predict_batch_end",
    "on_predict_end",
    "on_exception",
)


@dataclass
class Preview:
    """A few validation samples at network resolution, for visual checks.

    images: (N, H, W, 3) uint8 RGB; truths: (N, H, W) bool; probs: (N, H, W) float32.
    """

    images: np.ndarray
    truths: np.ndarray
    probs: np.ndarray


class Callback:
    """Base class: every hook does nothing. ``trainer`` is the CarvanaClassifier."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        unknown = [n for n in vars(cls) if n.startswith("on_") and n not in HOOKS]
        if unknown:
            raise TypeError(f"{cls.__name__} defines unknown hook(s) {unknown}; known hooks: {HOOKS}")

    def on_train_start(self, trainer: Any, start_epoch: int, epochs: int) -> None:
        """Before the first epoch. ``start_epoch`` > 0 when resuming; ``epochs`` is the total."""

    def on_epoch_end(self, trainer: Any, epoch: int, metrics: dict[str, float], preview: Preview | None) -> None:
        """After training and validating epoch ``epoch`` (0-based).

        ``metrics`` holds at least train_loss, valid_loss, valid_dice, lr, seconds.
        """

    def on_train_end(self, trainer: Any) -> None:
        """After the last epoch, when training ended normally."""

    def on_predict_start(self, trainer: Any) -> None:
        """Before the first test batch."""

    def on_predict_batch_end(self, trainer: Any, names: list[str], probs: Any) -> None:
        """After each test batch: ``probs`` is a (B, h, w) float tensor in [0, 1] at network
        resolution, on the model's device; ``names`` the B image file names."""

    def on_predict_end(self, trainer: Any) -> None:
        """After the last test batch, when prediction ended normally."""

    def on_exception(self, trainer: Any, exc: BaseException) -> None:
        """When train or predict raises (KeyboardInterrupt included), before it propagates."""


class CallbackList:
    """Calls a hook on every callback in order; unknown hook names fail loudly."""

    def __init__(self, callbacks: Iterable[Callback] = ()) -> None:
        self.callbacks = list(callbacks)
        for cb in self.callbacks:
            if not isinstance(cb, Callback):
                raise TypeError(f"{cb!r} is not a carvana.callbacks.Callback")

    def __getattr__(self, name: str) -> Any:
        if name not in HOOKS:
            raise AttributeError(f"unknown callback hook {name!r}; known hooks: {HOOKS}")

        def dispatch(*args: Any, **kwargs: Any) -> None:
            for cb in self.callbacks:
                getattr(cb, name)(*args, **kwargs)

        return dispatch
