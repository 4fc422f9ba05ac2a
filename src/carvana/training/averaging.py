"""--ema DECAY: an exponential moving average of a network's weights and BatchNorm statistics.

After every optimiser step each floating-point entry of the model's ``state_dict`` (parameters,
BatchNorm ``running_mean`` / ``running_var``) moves towards the live value::

    average = d * average + (1 - d) * live,    d = min(decay, (1 + n) / (10 + n))

where ``n`` is the number of updates so far: the warm-up (as timm's ModelEmaV2's and
TensorFlow's ``num_updates``) keeps a short run of a few hundred steps from being dominated
by the random initialisation. Integer entries (``num_batches_tracked``) are copied. The
average is kept in fp32 on the model's device. Under DDP each rank keeps its own average: the
parameters are identical on every rank after the all-reduced step; the BatchNorm statistics
are not (each rank's last batch), so rank 0's averaged buffers are broadcast once per epoch,
as the live ones are (training/epoch.py).

Checkpoints (:func:`checkpoint_entries`, :func:`restore`): with averaging on, ``"model"``
holds the *averaged* weights, so everything that loads a checkpoint for prediction
(``best.pt``: prediction, ``--no-train``, ensembles, fold OOF scoring, ``carvana.segment``,
``carvana.export``, the inference engines) uses the average without knowing about it;
``"ema"`` holds what ``--resume`` needs besides: ``{"decay", "updates", "raw_model"}`` with
the training weights. A checkpoint without ``"ema"`` (averaging off, or written before it
existed) resumes with its ``"model"`` as the training weights and, when averaging is on
now, an average that starts there.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from carvana.training import distributed as dist
from carvana.training.checkpoint import CheckpointError, load_model_weights


class WeightAverage:
    """An exponential moving average of ``model``'s ``state_dict`` (see the module docstring)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.updates = 0
        self.weights: dict[str, torch.Tensor] = {}
        self._float: list[str] = []  # averaged entries
        self._buffers: list[str] = []  # averaged BatchNorm statistics (broadcast under DDP)
        self.reset(model)

    def reset(self, model: nn.Module) -> None:
        """Start the average at ``model``'s current weights, with no updates counted."""
        state = model.state_dict()
        self.weights = {name: (t.detach().float() if t.is_floating_point() else t.detach()).clone()
                        for name, t in state.items()}
        self._float = [name for name, t in state.items() if t.is_floating_point()]
        buffers = {name for name, _ in model.named_buffers()}
        self._buffers = [name for name in self._float if name in buffers]
        self.updates = 0

    def current_decay(self) -> float:
        """The decay the next update uses: the warm-up's (1 + n) / (10 + n) until it reaches ``decay``."""
        return min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average towards ``model``'s weights (call after each optimiser step)."""
        weight = 1.0 - self.current_decay()
        live = model.state_dict()
        averaged = [self.weights[name] for name in self._float]
        if averaged:  # one fused kernel per dtype/device group, not a launch per tensor (as timm's ModelEmaV3)
            torch._foreach_lerp_(averaged, [live[name].float() for name in self._float], weight)
        for name, t in live.items():
            if not t.is_floating_point():
                self.weights[name].copy_(t)
        self.updates += 1

    @contextmanager
    def swapped_into(self, model: nn.Module) -> Iterator[None]:
        """Inside, ``model`` holds the averaged weights; on exit (also on an exception) its own
        weights are back, bit for bit. The copies are in place (``copy_``), so the tensors' version
        counters move and the CPU inference copy (training/inference.py) refreshes its folded
        weights on the next eval loop instead of running stale ones."""
        live = model.state_dict()
        raw = {name: t.detach().clone() for name, t in live.items()}
        with torch.no_grad():
            for name, t in live.items():
                t.copy_(self.weights[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, t in live.items():
                    t.copy_(raw[name])

    def broadcast_buffers(self) -> None:
        """Under DDP: every rank takes rank 0's averaged BatchNorm statistics (a no-op otherwise)."""
        if not dist.is_distributed():
            return
        import torch.distributed as td

        for name in self._buffers:
            td.broadcast(self.weights[name], src=0)

    def load(self, weights: dict[str, torch.Tensor], updates: int) -> None:
        """Take a stored average (``model``'s layout) and its update count."""
        missing = set(self.weights) - set(weights)
        if missing:
            raise KeyError(f"the stored average lacks {sorted(missing)[:3]}")
        with torch.no_grad():
            for name, t in self.weights.items():
                t.copy_(weights[name])
        self.updates = int(updates)


def checkpoint_entries(model: nn.Module, average: WeightAverage | None) -> dict[str, Any]:
    """A checkpoint's weight entries: ``{"model": weights}`` without averaging; with it
    ``"model"`` = the average and ``"ema"`` = its decay, update count and the training weights."""
    if average is None:
        return {"model": model.state_dict()}
    return {"model": dict(average.weights),
            "ema": {"decay": average.decay, "updates": average.updates, "raw_model": model.state_dict()}}


def restore(model: nn.Module, average: WeightAverage | None, state: dict[str, Any], path: Path | str,
            config: Any = None) -> None:
    """``--resume``: the training weights into ``model`` and, with averaging on, the average.

    A checkpoint with an ``"ema"`` entry gives both (its ``"model"`` is the average); one without
    gives the training weights, and the average restarts from them (updates 0, warm-up again).
    """
    ema = state.get("ema")
    if ema is None:
        load_model_weights(model, state, path, config)
        if average is not None:
            average.reset(model)
        return
    load_model_weights(model, {**state, "model": ema["raw_model"]}, path, config)
    if average is not None:
        try:
            average.load(state["model"], ema["updates"])
        except (KeyError, RuntimeError) as exc:
            raise CheckpointError(f"{path}: its weight average does not fit this model ({exc})") from None
