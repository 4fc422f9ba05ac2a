"""The eval loops of CarvanaClassifier: binary validation (loss and the competition's Dice)
and prediction to callbacks. Functions of the trainer, as the multi-class task's validation
(training/tasks.py) is; both run inside ``trainer.fixed_weights()``, so the CPU inference
copy checks the weights once per call rather than once per batch.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from tqdm import tqdm

from carvana.data.datasets import TestImageDataset, tensor_to_image
from carvana.data.postprocess import crop_native
from carvana.training import distributed as dist
from carvana.training.callbacks import Callback, CallbackList, Preview
from carvana.training.losses import competition_dice
from carvana.training.streams import ordered_map


def prediction_dataset(predictor: Any, images: Sequence[Path], input_hw: tuple[int, int],
                       fast_decode: bool = True) -> torch.utils.data.Dataset:
    """``images`` as ``predictor`` reads them for prediction or OOF scoring: an ensemble predictor
    (several members or --tta-sizes) brings its own dataset, each image at every member's size;
    one model reads them at ``input_hw``."""
    own = getattr(predictor, "test_dataset", None)
    return own(list(images), fast_decode) if own else TestImageDataset(list(images), input_hw, fast_decode=fast_decode)


@torch.no_grad()
def _validation_batch(trainer: Any, batch: dict) -> tuple[float, np.ndarray, np.ndarray]:
    """One validation batch: (summed loss, per-image Dice, probabilities), on any stream."""
    images, masks = trainer._images_to_device(batch["image"]), trainer._masks_to_device(batch["mask"])
    logits = trainer.eval_forward(images)
    loss = trainer.loss_fn(logits, masks).item() * images.shape[0]
    probs = torch.sigmoid(logits)[:, 0].cpu().numpy()
    return loss, competition_dice(probs, batch["full_mask"].numpy(), trainer.threshold), probs


@torch.no_grad()
def validate_binary(trainer: Any, loader: Iterable[dict]) -> tuple[float, float, Preview | None]:
    """Mean loss and the competition's mean Dice (thresholded, upsampled to 1918x1280,
    per image, averaged). Under DDP each rank scores its shard and sums are reduced.
    On a CPU, ``trainer.streams`` batches are scored at once (training/streams.py)."""
    with trainer.fixed_weights():  # an eval loop: the weights are checked once, here
        loss_sum, dice_sum, count = 0.0, 0.0, 0
        preview: Preview | None = None
        bar = tqdm(loader, desc="valid", leave=False, disable=trainer._bar_off, dynamic_ncols=True)
        for batch, (loss, dice, probs) in ordered_map(partial(_validation_batch, trainer), bar, trainer.streams):
            loss_sum += loss
            dice_sum += float(dice.sum())
            count += len(dice)
            if trainer.progress:
                bar.set_postfix(dice=f"{dice_sum / count:.4f}")
            if preview is None and trainer.preview_count > 0:
                k = trainer.preview_count
                preview = Preview(
                    images=np.stack([tensor_to_image(x) for x in batch["image"][:k]]),
                    truths=batch["mask"][:k, 0].numpy() > 0.5,
                    probs=probs[:k],
                )
        loss_sum, dice_sum, count = dist.all_reduce_sums(loss_sum, dice_sum, count)
        if count == 0:
            raise ValueError("the validation loader yielded no images")
        return loss_sum / count, dice_sum / count, preview


@torch.no_grad()
def batch_probabilities(trainer: Any, batch: dict, tta: bool = False) -> torch.Tensor:
    """The probabilities of one loader batch: binary (B, h, w), multi-class (B, C, h, w).

    ``tta`` averages them with those of the horizontal mirror. A native-resolution map is
    cropped to 1918 columns, never resampled; images the loader could not read (ok=False)
    get all-zero maps. Call inside ``trainer.fixed_weights()``; safe on several threads.
    """
    slot = getattr(trainer, "engine", None)  # a compiled graph (training/engines.py), or the torch path
    compiled = slot.compiled(tta) if slot is not None else None
    if compiled is not None:
        probs = compiled.probabilities(batch["image"])
        probs = probs[:, 0] if probs.shape[1] == 1 else probs  # binary maps are (B, h, w), as task.activate gives
    else:
        images = trainer._images_to_device(batch["image"])
        probs = trainer.task.activate(trainer.eval_forward(images))
        if tta:
            probs = (probs + trainer.task.activate(trainer.eval_forward(images.flip(-1))).flip(-1)) / 2
    probs = crop_native(probs)
    if "ok" in batch:
        probs[~batch["ok"].to(trainer.device)] = 0.0
    return probs


@torch.no_grad()
def predict(trainer: Any, loader: Iterable[dict], callbacks: Iterable[Callback] = (), tta: bool = False) -> None:
    """Run the model over ``loader``; each batch's probabilities go to the callbacks, in order.

    ``tta`` averages the probabilities of the image and its horizontal mirror.
    Images the loader could not read (ok=False) get an all-zero probability map.
    On a CPU, ``trainer.streams`` batches are predicted at once (training/streams.py).
    """
    with trainer.fixed_weights():  # an eval loop: the weights are checked once, here
        cbs = CallbackList(callbacks)
        cbs.on_predict_start(trainer)
        try:
            bar = tqdm(loader, desc="predict", disable=trainer._bar_off, dynamic_ncols=True)
            for batch, probs in ordered_map(partial(batch_probabilities, trainer, tta=tta), bar, trainer.streams):
                cbs.on_predict_batch_end(trainer, list(batch["name"]), probs)
        except BaseException as exc:
            cbs.on_exception(trainer, exc)
            raise
        cbs.on_predict_end(trainer)
