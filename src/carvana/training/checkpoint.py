"""Checkpoints: atomic `last.pt` / `best.pt` with a format version (timm-style saver).

A checkpoint is a plain dict of tensors and primitives, so it loads with
``torch.load(..., weights_only=True)``: nothing in it can execute code.

Format 2 stores the model's construction config (``model_config``, see
``carvana.models.registry.ModelConfig``), so a checkpoint rebuilds its own network.
Format 1 (no config) still loads: its config is derived from its hyperparameters
(those checkpoints were all UNet1024, one class).

With ``--ema`` a checkpoint's ``"model"`` holds the averaged weights (what validation scored,
so what ``best.pt`` is best by and what every prediction path loads) and an ``"ema"`` entry
holds what ``--resume`` needs besides (training/averaging.py); checkpoints without it load as before.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from carvana.data.files import atomic_path, fsync_dir, temp_name
from carvana.models.registry import ModelConfig, ModelConfigError, build_model
from carvana.training.callbacks import Callback, Preview
from carvana.training import distributed as dist

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used, with the file named in the message."""


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Write ``state`` to ``path`` atomically and durably (data/files.atomic_path): a crash
    mid-write leaves the old file intact."""
    with atomic_path(Path(path)) as tmp:
        torch.save({"format_version": FORMAT_VERSION, **state}, tmp)


def publish_copy(src: Path, dst: Path) -> None:
    """Make ``dst`` a copy of the (already durable) ``src`` atomically, as timm's checkpoint saver:
    hard-link ``src`` to a temp name and rename that over ``dst``; where the filesystem has no hard
    links, copy the bytes to the temp name and fsync them instead. The temp name is this process
    and thread's own (data/files.temp_name), as every atomic write's."""
    tmp = temp_name(dst)
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.link(src, tmp)  # no bytes copied; src is only ever replaced by rename, never rewritten in place
        except OSError:
            shutil.copyfile(src, tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)  # e.g. a full disk during the copy: no temp file left behind
        raise
    fsync_dir(dst.parent)


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint safely (weights_only) and check its format version."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt/unsafe files
        raise CheckpointError(f"{path}: not a loadable checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{path}: not a carvana checkpoint (no 'model' entry)")
    version = state.get("format_version")
    if version not in READABLE_VERSIONS:
        raise CheckpointError(f"{path}: checkpoint format version {version}, this code reads versions "
                              f"{', '.join(map(str, READABLE_VERSIONS))}")
    return state


def model_config_of(state: dict[str, Any], path: Path | str = "checkpoint") -> ModelConfig:
    """The construction config a loaded checkpoint describes (derived from hparams for format 1)."""
    try:
        if state.get("model_config") is not None:
            return ModelConfig.from_dict(state["model_config"])
        hp = state.get("hparams") or {}
        from carvana.models.unet1024 import parse_input_size  # format 1: UNet1024 only

        return ModelConfig(arch="unet1024", width=float(hp.get("width", 1.0)), classes=1,
                           input_size=parse_input_size(str(hp.get("input_size", "1024x1024"))))
    except (ModelConfigError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: cannot read the model config: {exc}") from exc


def load_model_weights(model: nn.Module, state: dict[str, Any], path: Path | str, config: ModelConfig | None = None) -> None:
    """``model.load_state_dict`` with a clear error (naming both configs) instead of a key dump."""
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        theirs = model_config_of(state, path)
        ours = f"this run's model ({config.describe()})" if config is not None else "this run's model"
        first = str(exc).splitlines()[0][:200]
        raise CheckpointError(f"{path}: holds {theirs.describe()} weights, which do not fit {ours} ({first})") from None


def load_model(path: Path | str, map_location: str | torch.device = "cpu") -> tuple[nn.Module, ModelConfig, dict[str, Any]]:
    """Rebuild the network a checkpoint describes and load its weights: (model, config, state)."""
    state = load_checkpoint(Path(path), map_location)
    config = model_config_of(state, path)
    try:
        model = build_model(config, pretrained=False)  # the checkpoint's weights replace the encoder's
    except (ModelConfigError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot build its model: {exc}") from exc
    load_model_weights(model, state, path, config)
    return model.to(map_location), config, state


def check_settings_match(config: ModelConfig, given: dict[str, Any], path: Path | str) -> None:
    """Raise CheckpointError when a setting in ``given`` (e.g. ``{"width": 0.5}`` from the command
    line) contradicts the model a checkpoint describes, naming both values."""
    from carvana.models.registry import output_size, parse_size

    for name, value in given.items():
        if name == "width":
            ok, theirs = float(value) == config.width, f"{config.width:g}"
        elif name == "input_size":  # --input-size is the output size (unet-original's input is larger)
            out = output_size(config)
            ok, theirs = tuple(parse_size(str(value))) == tuple(out), "x".join(map(str, out))
        elif name == "arch":
            ok, theirs = value == config.arch, config.arch
        elif name == "encoder" and config.encoder:
            ok, theirs = value == config.encoder, config.encoder
        else:  # not part of the model
            continue
        if not ok:
            flag = "--" + name.replace("_", "-")
            raise CheckpointError(f"{flag} {value} contradicts the checkpoint {path}, which holds a "
                                  f"{config.describe()} model ({flag} {theirs}); drop {flag} to predict with "
                                  "the checkpoint's own model")


def threshold_of(state: dict) -> float:
    """The threshold the checkpoint's run used; 0.5 when it does not say or stores no number in [0, 1]."""
    try:
        value = float((state.get("hparams") or {}).get("threshold", 0.5))
    except (TypeError, ValueError):  # e.g. a setting such as "auto" rather than a number
        return 0.5
    return value if 0.0 <= value <= 1.0 else 0.5


class ModelSaverCallback(Callback):
    """Saves ``last.pt`` after every epoch and ``best.pt`` when the monitored metric improves.

    Each file holds model, optimiser, scheduler and scaler state, the epoch, the best
    metric, the hyperparameters (``hparams``: a dict of primitives) and the format version.
    On Ctrl-C the current weights are saved as ``last.pt`` with the last *completed*
    epoch, so ``--resume`` restarts the interrupted epoch. Other exceptions (a NaN loss)
    write nothing: the last good checkpoint stays as it was. Only rank 0 writes.
    """

    def __init__(self, directory: Path, hparams: dict[str, Any], resume_hint: str = "python main.py --resume") -> None:
        self.directory = Path(directory)
        self.hparams = dict(hparams)
        self.resume_hint = resume_hint

    @property
    def last_path(self) -> Path:
        return self.directory / "last.pt"

    @property
    def best_path(self) -> Path:
        return self.directory / "best.pt"

    def _state(self, trainer: Any, **extra: Any) -> dict[str, Any]:
        return {**trainer.state_dict(), "hparams": self.hparams, **extra}

    def on_epoch_end(self, trainer: Any, epoch: int, metrics: dict[str, float], preview: Preview | None) -> None:
        if not dist.is_main_process():
            return
        save_checkpoint(self._state(trainer, metrics=dict(metrics)), self.last_path)
        if metrics.get("is_best"):
            publish_copy(self.last_path, self.best_path)  # never a half-written best.pt either

    def on_exception(self, trainer: Any, exc: BaseException) -> None:
        if isinstance(exc, KeyboardInterrupt) and dist.is_main_process():
            save_checkpoint(self._state(trainer, interrupted=True), self.last_path)
            print(
                f"\nInterrupted during epoch {trainer.epoch + 2}: state saved to {self.last_path}.\n"
                f"Resume with: {self.resume_hint}"
            )
