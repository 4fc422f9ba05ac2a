"""CarvanaClassifier: the train / validate / predict loops around a segmentation model.

Device handling is in one place here: mixed precision and channels_last where they pay
(bf16 or fp16 on CUDA, bf16 on CPUs with native bf16, channels_last on both; chosen in
training/precision.py), on CUDA non-blocking copies, and optionally torch.compile (on a CPU the
training step only). Loss, metric and thresholded masks are always computed in fp32 from the
logits. The steps of one training epoch are training/epoch.py, the choice of the best epoch
training/best_epoch.py, validation and prediction training/evaluation.py. With ``--ema``
validation (and so the best checkpoint) uses the weight average, which checkpoints store as their
"model" (training/averaging.py); with ``--lovasz`` the end of training steps on the Lovász hinge loss.
"""

from __future__ import annotations

import math
import time
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Iterable

import torch
from torch import nn

from carvana.models.registry import ModelConfig, ModelConfigError, arch_spec, encoder_of
from carvana.data.image_tensors import mirror_pad, normalize_images
from carvana.training.callbacks import Callback, CallbackList, Preview
from carvana.training import best_epoch
from carvana.training import epoch as epoch_steps
from carvana.training.epoch import TrainingSettingError, check_training_shares
from carvana.training import evaluation
from carvana.training.averaging import WeightAverage, checkpoint_entries, restore
from carvana.training.losses import BCEDiceLoss, LovaszHingeLoss
from carvana.training import distributed as dist
from carvana.training.checkpoint import load_model_weights
from carvana.training.optim import continue_schedule, make_optimizer, make_scheduler, step_scheduler
from carvana.training.inference import cpu_inference_copy, eval_logits
from carvana.training.precision import autocast_context, choose_precision, use_channels_last
from carvana.training.streams import choose_eval_streams
from carvana.training.tasks import BinaryTask


class CarvanaClassifier:
    """Trains and runs a (B,3,H,W) -> (B,1,H,W) logit model with BCE + Dice loss.

    ``epochs`` is needed up front because the cosine schedule spans the whole run and
    must exist before a checkpoint's scheduler state can be loaded into it.
    """

    def __init__(
        self,
        model: nn.Module,
        epochs: int,
        lr: float = 1e-3,
        optimizer: str = "adamw",
        weight_decay: float = 1e-4,
        scheduler: str = "cosine",
        bce_weight: float = 1.0,
        dice_weight: float = 1.0,
        threshold: float = 0.5,
        grad_clip: float = 0.0,
        device: str = "auto",
        amp: bool = True,
        channels_last: bool = True,
        compile: bool = False,
        sync_batchnorm: bool = False,
        preview_count: int = 4,
        progress: bool = True,
        model_config: ModelConfig | None = None,
        task: Any = None,
        loss_fn: nn.Module | None = None,
        freeze_encoder_epochs: int = 0,
        time_budget: float = 0.0,
        eval_streams: int = 0,
        ema: float = 0.0,
        lovasz: float = 0.0,
        coarse_size: tuple[int, int] | None = None,
        coarse_share: float = 0.0,
        validate_from: float = 0.0,
    ) -> None:
        check_training_shares(ema, lovasz, coarse_share, validate_from, scheduler)
        self._place_model(model, device, amp, channels_last, compile, sync_batchnorm, eval_streams)
        # The task (training/tasks.py) decides targets, loss, activation and validation metrics:
        # binary car masks unless a multi-class task is given. A given loss_fn (e.g. the
        # boundary-weighted BCEDiceLoss) replaces bce_weight/dice_weight for the binary task.
        self.task = task if task is not None else BinaryTask(loss_fn if loss_fn is not None
                                                              else BCEDiceLoss(bce_weight, dice_weight))
        self.loss_fn = self.task.loss_fn
        self.monitor = self.task.monitor
        if lovasz > 0 and not isinstance(self.task, BinaryTask):
            raise TrainingSettingError(f"--lovasz {lovasz:g}: the Lovasz hinge loss is for the binary task only")
        self.lovasz, self.lovasz_loss = lovasz, LovaszHingeLoss()  # the last `lovasz` of training steps on it
        # Progressive resizing: the first `coarse_share` of training steps on batches scaled to coarse_size.
        self.coarse_size, self.coarse_share = coarse_size, coarse_share
        # Epochs before this share of training only train (epoch.validates says which validate).
        self.validate_from = validate_from
        # --ema: validation, best.pt and prediction use this average of the weights (training/averaging.py).
        self.average = WeightAverage(self.model, ema) if ema > 0 else None
        self._set_schedule(epochs, lr, optimizer, weight_decay, scheduler, time_budget)
        # How to rebuild `model`: stored in every checkpoint (see carvana.models.registry).
        self.model_config = model_config
        # The data path takes normalisation and the mirror margin from the model, not constants.
        config = model_config or ModelConfig()
        self.mean, self.std = config.mean, config.std
        self.input_margin = arch_spec(config.arch).output_margin  # unet-original: 92, others 0
        self.encoder = encoder_of(self.model, config) if model_config is not None else None
        if freeze_encoder_epochs > 0 and self.encoder is None:
            raise ModelConfigError(f"--freeze-encoder-epochs needs a network with a pretrained encoder (--arch unet, "
                             f"linknet, ...), not {config.arch}")
        self.freeze_encoder_epochs = freeze_encoder_epochs
        self.threshold = threshold
        self.grad_clip = grad_clip
        self.preview_count = preview_count
        self.progress = progress and dist.is_main_process()
        self.epoch = -1  # last completed epoch
        self.resumed_from_epochs: int | None = None  # set by load_state_dict when --epochs changed
        self.best_metric = -math.inf
        self.best_loss_fn: str | None = None  # without validation: the loss best_metric was measured on
        self.history: list[dict[str, Any]] = []

    def _place_model(self, model: nn.Module, device: str, amp: bool, channels_last: bool, compile: bool,
                     sync_batchnorm: bool, eval_streams: int) -> None:
        """Device, precision and memory format; the modules that train, validate and predict."""
        self.device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
        cuda = self.device.type == "cuda"
        # bf16/fp16 autocast on CUDA, bf16 on CPUs with native bf16, else fp32 (training/precision.py).
        self.precision = choose_precision(self.device, amp)
        self.amp_dtype = self.precision.dtype
        self.channels_last = use_channels_last(self.device, channels_last)
        self.memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        self.model = model.to(self.device, memory_format=self.memory_format)
        if sync_batchnorm:
            self.model = dist.maybe_sync_batchnorm(self.model, self.device)
        # `net` is what runs forward passes: possibly DDP-wrapped and/or compiled;
        # `model` stays the plain module whose state_dict goes into checkpoints.
        self.net: nn.Module = dist.wrap_model(self.model, self.device)
        # Validation and prediction run the plain (or compiled) module: ranks may see
        # different numbers of batches there, and DDP's forward could wait on a peer.
        self.eval_net: nn.Module = self.model
        if compile:  # CPU: only the training step (evaluation runs the folded inference copy below)
            self.net = torch.compile(self.net)
            self.eval_net = torch.compile(self.model) if cuda else self.model
        # CPU validation and prediction run a copy with BatchNorm folded into the convolutions
        # and weights cast once to the run's precision (training/inference.py), channels_last
        # unless --no-channels-last (faster for CPU inference, slower for CPU training).
        self.inference = cpu_inference_copy(self.device, self.amp_dtype, channels_last)
        # Batches validated and predicted at once (CPU: one per core, each single-threaded;
        # CUDA: 1), see training/streams.py.
        self.streams = choose_eval_streams(self.device, eval_streams)
        # An inference engine for fixed-weights prediction (training/engines.attach_engine); None: torch.
        self.engine = None

    def _set_schedule(self, epochs: int, lr: float, optimizer: str, weight_decay: float, scheduler: str,
                      time_budget: float) -> None:
        """Optimiser, LR schedule and gradient scaler; with a time budget the clock drives a cosine LR."""
        self.optimizer = make_optimizer(optimizer, self.model.parameters(), lr, weight_decay)
        self.scheduler_name = scheduler
        self.scheduler = make_scheduler(scheduler, self.optimizer, epochs)
        # A GradScaler is only needed for fp16; bf16 has fp32's exponent range.
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.epochs = epochs
        # Seconds of training (train + validation) per session; the cosine LR follows the clock.
        self.time_budget = time_budget
        self._budget_start, self._budget_spent, self._budget_used = time.perf_counter(), False, 0.0
        if time_budget > 0 and scheduler.lower() == "cosine":
            self.scheduler = None

    # ------------------------------------------------------------------ helpers
    @property
    def _bar_off(self) -> bool | None:
        # None lets tqdm decide: bars on a terminal, none when stderr is a file or pipe (CI,
        # nohup), where every refresh would be a new line; the epoch line says enough there.
        return None if self.progress else True

    def _autocast(self) -> AbstractContextManager:
        return autocast_context(self.device.type, self.amp_dtype)

    def eval_forward(self, images: torch.Tensor) -> torch.Tensor:
        """fp32 logits of the network in eval mode: what validation and prediction run."""
        return eval_logits(self.eval_net, self.model, images, self.inference, self.device.type, self.amp_dtype)

    def averaged_weights(self) -> AbstractContextManager:
        """Context in which ``model`` holds the --ema average (its training weights are back on exit);
        a no-op without averaging."""
        return self.average.swapped_into(self.model) if self.average is not None else nullcontext()

    def fixed_weights(self):
        """Context for an eval loop: puts the network in eval mode; the weights don't change
        inside, so the CPU inference copy checks them once on entry, not on every batch."""
        self.eval_net.eval()
        return self.inference.fixed_weights(self.model) if self.inference is not None else nullcontext()

    def _images_to_device(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (or already normalised float) images -> normalised float32 on the device."""
        x = normalize_images(x.to(self.device, non_blocking=True), self.mean, self.std)
        if self.input_margin:  # valid-convolution nets see the image mirrored outwards by the margin
            x = mirror_pad(x, self.input_margin)
        return x.contiguous(memory_format=self.memory_format)

    def _masks_to_device(self, m: torch.Tensor) -> torch.Tensor:
        return self.task.target_to_device(m, self.device)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: model, optimiser, scheduler, scaler, progress. With --ema,
        "model" is the average and "ema" holds the training weights (training/averaging.py)."""
        return {
            **checkpoint_entries(self.model, self.average),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "best_metric": self.best_metric,
            "best_loss_fn": self.best_loss_fn,
            "model_config": self.model_config.to_dict() if self.model_config is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any], weights_only: bool = False, path: str = "checkpoint") -> None:
        """Restore a state_dict(); ``weights_only`` restores just the model (for prediction: the
        average, where the checkpoint has one), else the training weights and the average too.

        Weights of another architecture or width raise CheckpointError naming ``path`` and
        both models. A cosine schedule written by a run with another epoch count continues
        as if this run had been started with ``self.epochs`` (``self.resumed_from_epochs``
        then holds the old count).
        """
        if weights_only:
            load_model_weights(self.model, state, path, self.model_config)
            return
        restore(self.model, self.average, state, path, self.model_config)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
            self.resumed_from_epochs = continue_schedule(self.scheduler, self.epochs)
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.epoch = int(state["epoch"])
        self.best_metric = float(state["best_metric"])
        self.best_loss_fn = state.get("best_loss_fn")  # absent before --lovasz existed

    # ------------------------------------------------------------------ training
    def train(
        self,
        train_loader: Iterable[dict],
        valid_loader: Iterable[dict] | None,
        epochs: int | None = None,
        callbacks: Iterable[Callback] = (),
    ) -> list[dict[str, float]]:
        """Train from epoch ``self.epoch + 1`` (0, or the next one after a resume) to ``epochs``."""
        epochs = self.epochs if epochs is None else epochs
        cbs = CallbackList(callbacks)
        cbs.on_train_start(self, self.epoch + 1, epochs)
        self._budget_start, self._budget_spent, self._budget_used = time.perf_counter(), False, 0.0
        try:
            for epoch in range(self.epoch + 1, epochs):
                start = time.perf_counter()
                dist.set_epoch(train_loader, epoch)
                lr = self.optimizer.param_groups[0]["lr"]
                train_loss, train_images, loss_fn = self._train_one_epoch(train_loader, epoch, epochs)
                # Throughput of the training steps alone (loader waits included, validation not).
                metrics: dict[str, Any] = {"epoch": epoch, "train_loss": train_loss, "lr": lr, "loss_fn": loss_fn,
                                           "train_images": train_images, "train_seconds": time.perf_counter() - start}
                preview = None
                skipped = valid_loader is not None and not epoch_steps.validates(self, epoch)
                if valid_loader is not None and not skipped:
                    with self.averaged_weights():
                        valid_metrics, preview = self.task.validate(self, valid_loader)
                    metrics.update(valid_metrics)
                step_scheduler(self.scheduler, best_epoch.monitored(self, metrics), new_kind=best_epoch.loss_changed(self, metrics))
                self.epoch = epoch
                # An epoch --validate-from left unvalidated has no figure to compete with: not best.
                metrics["is_best"] = 0.0 if skipped else float(best_epoch.record_best(self, metrics))
                metrics["seconds"] = time.perf_counter() - start
                self.history.append(metrics)
                cbs.on_epoch_end(self, epoch, metrics, preview)
                if self._budget_spent:
                    break
        except BaseException as exc:
            cbs.on_exception(self, exc)
            raise
        cbs.on_train_end(self)
        return self.history

    def _train_one_epoch(self, loader: Iterable[dict], epoch: int, epochs: int) -> tuple[float, int, str]:
        """One pass (or, under --time-budget, what the budget leaves of it): (mean loss, images seen
        by this process, the loss it stepped on). The steps are training/epoch.py's."""
        return epoch_steps.train_one_epoch(self, loader, epoch, epochs)

    def validate(self, loader: Iterable[dict]) -> tuple[float, float, Preview | None]:
        """Mean loss and the competition's mean Dice (thresholded, upsampled to 1918x1280,
        per image, averaged). Under DDP each rank scores its shard and sums are reduced."""
        return evaluation.validate_binary(self, loader)

    # ------------------------------------------------------------------ prediction
    def predict(self, loader: Iterable[dict], callbacks: Iterable[Callback] = (), tta: bool = False) -> None:
        """Run the model over ``loader``; each batch's probabilities go to the callbacks.

        ``tta`` averages the probabilities of the image and its horizontal mirror.
        Images the loader could not read (ok=False) get an all-zero probability map.
        """
        evaluation.predict(self, loader, callbacks, tta)
