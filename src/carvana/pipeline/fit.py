"""The decisions every training and prediction plan shares, each made once: which network
(the settings' for training, the checkpoint's for prediction), the task, the classifier,
the augmentation, the loaders, and one training function for a split or a fold.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from carvana.data.datasets import seed_worker, train_augmentation
from carvana.data.palette import label_grid
from carvana.data.pseudo import MixedBatchSampler, MixedDataset, PseudoLabeledDataset
from carvana.data.sampling import EpochSampler
from carvana.models.registry import ModelConfig, ModelConfigError, arch_spec, build_model, make_config, output_size, \
    parse_size
from carvana.models.smp_nets import resolve_encoder_weights
from carvana.pipeline.plans import PlanError, parse_threshold
from carvana.pipeline.roles import recorded
from carvana.pipeline.runs import is_trial, resume_hint
from carvana.training import distributed as dist
from carvana.training.callbacks import Callback
from carvana.training.checkpoint import CheckpointError, ModelSaverCallback, check_settings_match, load_checkpoint, \
    load_model, load_model_weights
from carvana.training.classifier import CarvanaClassifier
from carvana.training.epoch import TrainingSettingError
from carvana.training.logging_callbacks import ConsoleLogger, CSVLogger, PreviewLogger
from carvana.training.losses import BCEDiceLoss
from carvana.training.tasks import MULTICLASS_COLUMNS, BinaryTask, MultiClassTask

# Makes a dataset: (images, masks, data size HxW, augmentation or None, full_masks) -> Dataset.
MakeSet = Callable[[Sequence[Path], Sequence[Path], tuple[int, int], Any, bool], Dataset]


@dataclass
class TaskData:
    """A task's listed and split files and how to read them, whatever the data set."""

    source: str
    train_images: list[Path]
    train_masks: list[Path]
    valid_images: list[Path]
    valid_masks: list[Path]
    test_images: list[Path]
    make_set: MakeSet
    collate: Callable | None = None
    class_names: list[str] = field(default_factory=list)
    classes: int = 1
    folder: Path | None = None  # the data set's folder, where it has one
    mask_rles: Any = None  # Carvana: train_masks.csv rows, decoded instead of GIFs where present
    test_source: str = ""  # where test_images came from, where the data set says


def training_config(hp: SimpleNamespace, classes: int, fresh: bool) -> ModelConfig:
    """The network --arch/--encoder/--width/--input-size describe. Only a fresh build needs the
    encoder's pretrained weights: they are resolved (cached, downloaded once, or one clear
    error offline) then, never when a checkpoint is about to replace them."""
    config = make_config(hp.arch, hp.width, classes, parse_size(hp.input_size), hp.encoder, hp.encoder_weights)
    if fresh:
        resolve_encoder_weights(config.encoder, config.encoder_weights)
    return config


def prediction_model(weights: Path, classes: int, given: dict[str, Any]) -> tuple[torch.nn.Module, ModelConfig]:
    """The network a checkpoint describes, with its weights, for a run of ``classes`` classes.
    A model setting given explicitly must agree with it; another task's model is refused."""
    model, config, _ = load_model(weights)
    if config.classes != classes:
        kind = "binary (car mask)" if config.classes == 1 else f"{config.classes}-class"
        task = "the binary Carvana task" if classes == 1 else f"this {classes}-class data set"
        raise CheckpointError(f"{weights}: a {kind} model, which cannot predict {task}")
    check_settings_match(config, given, weights)
    return model, config


def parse_crop(text: str, config: ModelConfig) -> tuple[int, int] | None:
    """--crop HxW (None when empty): inside the data size and a size the network can take."""
    return training_size("--crop", text, config)


def parse_coarse(hp: SimpleNamespace, config: ModelConfig) -> tuple[int, int] | None:
    """--coarse-size HxW with --coarse-share F (None when off): both or neither, a size inside the
    data size that the network can take, and not with --crop or a network whose input carries a
    mirrored margin (unet-original), since a scaled batch would lose that geometry."""
    size = training_size("--coarse-size", hp.coarse_size, config)
    if (size is None) != (hp.coarse_share == 0):
        given, missing = ("--coarse-size", "--coarse-share") if size else ("--coarse-share", "--coarse-size")
        raise PlanError(f"{given} needs {missing} too (progressive resizing: the first share of training "
                        "steps on batches scaled down to that size)")
    if size is not None and hp.crop:
        raise PlanError(f"--coarse-size {hp.coarse_size} cannot be used with --crop {hp.crop}: choose one way "
                        "to make training steps cheaper")
    if size is not None and arch_spec(config.arch).output_margin:
        raise PlanError(f"--coarse-size: not for --arch {config.arch}, whose input carries a mirrored margin")
    return size


def parse_tta_sizes(text: str) -> list[tuple[int, int]]:
    """--tta-sizes 'HxW[,HxW...]' (multi-scale TTA; '' = none): the data sizes each model also
    predicts at. Whether a network can take one is checked when its checkpoint is loaded."""
    sizes = []
    for item in (t for t in text.replace(" ", ",").split(",") if t):
        try:
            sizes.append(parse_size(item))
        except ModelConfigError as exc:
            raise PlanError(f"--tta-sizes {text}: {exc}") from None
        if min(sizes[-1]) < 1:
            raise PlanError(f"--tta-sizes {text}: {item} is not a size (both sides must be positive)")
    return sizes


def training_size(flag: str, text: str, config: ModelConfig) -> tuple[int, int] | None:
    """A training-time HxW given by ``flag`` (None when empty): at most the data size, and a size
    the network's size rule accepts; a PlanError naming the flag otherwise."""
    if not text:
        return None
    try:
        size = parse_size(text)
    except ModelConfigError as exc:
        raise PlanError(f"{flag} {text}: {exc}") from None
    data_hw = output_size(config)
    if size[0] > data_hw[0] or size[1] > data_hw[1]:
        raise PlanError(f"{flag} {text} is larger than --input-size {data_hw[0]}x{data_hw[1]}")
    try:
        make_config(config.arch, config.width, config.classes, size, config.encoder or "resnet34", "none")
    except ModelConfigError as exc:
        raise PlanError(f"{flag} {text}: {exc}") from None
    return size


def task_for(hp: SimpleNamespace, data: TaskData) -> BinaryTask | MultiClassTask:
    """The task object: binary BCE + Dice (boundary-weighted as set) or multi-class CE + Dice."""
    if data.classes == 1:
        return BinaryTask(BCEDiceLoss(hp.bce_weight, hp.dice_weight, boundary_weight=hp.boundary_weight,
                                      boundary_band=hp.boundary_band, boundary_dice=hp.boundary_dice))
    weights = [float(x) for x in hp.class_weights.split(",")] if hp.class_weights.strip() else None
    return MultiClassTask(data.classes, data.class_names, hp.ce_weight, hp.dice_weight, weights)


def classifier_for(hp: SimpleNamespace, model: torch.nn.Module, config: ModelConfig, device: str,
                   task: Any) -> CarvanaClassifier:
    """A CarvanaClassifier with every training setting, the same for every plan and task; a setting
    out of its range (--ema, --lovasz) is a PlanError naming the flag."""
    try:
        return CarvanaClassifier(
            model, model_config=config, task=task, freeze_encoder_epochs=hp.freeze_encoder_epochs,
            time_budget=hp.time_budget * 60, epochs=hp.epochs, lr=hp.lr, optimizer=hp.optimizer,
            weight_decay=hp.weight_decay, scheduler=hp.scheduler, grad_clip=hp.grad_clip, device=device, amp=hp.amp,
            channels_last=hp.channels_last, compile=hp.compile, sync_batchnorm=hp.sync_batchnorm,
            eval_streams=hp.eval_streams, ema=hp.ema, lovasz=hp.lovasz,
            coarse_size=parse_coarse(hp, config), coarse_share=hp.coarse_share, validate_from=hp.validate_from,
            # training-time validation and previews use 0.5 until OOF chooses one (--threshold auto)
            threshold=parse_threshold(str(hp.threshold), hp.folds)[1],
        )
    except TrainingSettingError as exc:
        raise PlanError(str(exc)) from None


def make_train_loader(dataset: Dataset, hp: SimpleNamespace, pin: bool, collate: Callable | None = None) -> DataLoader:
    """Shuffled batches (sharded by rank under torchrun) whose order and augmentation depend
    only on (seed, epoch, rank): a resumed run sees what an uninterrupted one would."""
    sampler = EpochSampler(dataset, seed=hp.seed, rank=dist.rank(), world=dist.world_size())
    return DataLoader(
        dataset, batch_size=hp.batch_size, sampler=sampler, num_workers=hp.workers, pin_memory=pin,
        drop_last=len(sampler) > hp.batch_size,  # no BatchNorm on a 1-image tail batch
        persistent_workers=hp.workers > 0, worker_init_fn=seed_worker, collate_fn=collate,
        generator=torch.Generator().manual_seed(hp.seed + dist.rank()),  # own augmentation stream per rank
    )


def make_mixed_loader(train_set: Dataset, pseudo: Any, hp: SimpleNamespace, pin: bool, data_hw: tuple[int, int],
                      augment: Any) -> DataLoader:
    """Batches whose --pseudo-share is pseudo-labeled (same augmentation, labels streamed from
    disk); an epoch is one pass over the labeled images. Order and augmentation depend only on
    (seed, epoch, rank), as make_train_loader's."""
    pseudo_set = PseudoLabeledDataset(pseudo.images, pseudo.folder, data_hw, augment, hard=pseudo.hard,
                                      seed=hp.seed + dist.rank(), fast_decode=hp.fast_decode)
    sampler = MixedBatchSampler(len(train_set), len(pseudo_set), hp.batch_size, pseudo.share, hp.seed,
                                dist.rank(), dist.world_size())
    return DataLoader(MixedDataset(train_set, pseudo_set), batch_sampler=sampler, num_workers=hp.workers,
                      pin_memory=pin, persistent_workers=hp.workers > 0, worker_init_fn=seed_worker)


def make_valid_loader(dataset: Dataset, hp: SimpleNamespace, pin: bool, collate: Callable | None = None) -> DataLoader:
    """In order; under torchrun rank r scores images r, r+W, ...: each image once over all
    ranks (no padding), so the all-reduced figures are the single-process ones."""
    return DataLoader(dataset, batch_size=hp.batch_size, sampler=dist.ShardSampler(len(dataset)),
                      num_workers=hp.workers, pin_memory=pin, persistent_workers=hp.workers > 0, collate_fn=collate)


def train_model(hp: SimpleNamespace, device: str, data: TaskData, split: tuple[list, list, list, list],
                models_dir: Path, log_dir: Path, run: str, extra: Sequence[Callback] = (),
                pseudo: Any = None, start: Path | None = None) -> CarvanaClassifier:
    """Build (or resume from ``models_dir/last.pt``) and train one model on ``split`` = (train
    images, train masks, valid images, valid masks): a single split's model or one fold's;
    with ``pseudo`` (a pipeline.pseudo.PseudoSet) its batches mix in pseudo-labeled images;
    with ``start`` (a checkpoint of the same network: --refit-warm) a fresh model starts from its weights."""
    last = models_dir / "last.pt"
    resuming = hp.resume and last.exists()
    fresh = not resuming and start is None
    config = training_config(hp, data.classes, fresh=fresh)
    model = build_model(config, pretrained=fresh)
    if start is not None and not resuming:
        load_model_weights(model, load_checkpoint(start), start, config)
    classifier = classifier_for(hp, model, config, device, task_for(hp, data))
    if resuming:
        classifier.load_state_dict(load_checkpoint(last, classifier.device), path=str(last))
        if dist.is_main_process():
            print(f"resuming run {run} from {last} after epoch {classifier.epoch + 1}")
            if classifier.resumed_from_epochs is not None:
                print(f"--epochs changed from {classifier.resumed_from_epochs} to {hp.epochs}: the cosine LR schedule "
                      f"continues as if the run had been started with {hp.epochs} epochs")
    if classifier.epoch + 1 >= hp.epochs:
        return classifier
    data_hw, pin = output_size(config), classifier.device.type == "cuda"
    augment = train_augmentation(hp.seed, parse_crop(hp.crop, config), hp.augment)
    train_images, train_masks, valid_images, valid_masks = split
    train_set = data.make_set(train_images, train_masks, data_hw, augment, False)
    valid_loader = make_valid_loader(data.make_set(valid_images, valid_masks, data_hw, None, True), hp, pin,
                                     data.collate) if valid_images else None
    hint = resume_hint(run, trial_of=hp.study if is_trial(run) else "")
    callbacks = [ModelSaverCallback(models_dir, recorded(vars(hp)), resume_hint=hint), ConsoleLogger(),
                 CSVLogger(log_dir, *([] if data.classes == 1 else [MULTICLASS_COLUMNS])),
                 PreviewLogger(log_dir, classifier.threshold, grid_fn=preview_grid(data)), *extra]
    loader = (make_train_loader(train_set, hp, pin, data.collate) if pseudo is None
              else make_mixed_loader(train_set, pseudo, hp, pin, data_hw, augment))
    classifier.train(loader, valid_loader, hp.epochs, callbacks)
    if not hp.keep_last and dist.is_main_process():  # smaller run folders; the run cannot resume after this
        last.unlink(missing_ok=True)
    return classifier


def preview_grid(data: TaskData) -> Callable | None:
    """The preview picture: the binary overlay (None), or the class-label grid."""
    if data.classes == 1:
        return None
    return lambda p: label_grid(p.images, p.truths, p.probs, data.class_names)
