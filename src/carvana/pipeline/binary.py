"""The end-to-end run behind ``python main.py``, as one straight line of stages.

fetch -> split -> loaders -> model -> train -> predict (streaming) -> validate -> [upload]
"""

from __future__ import annotations

import json
import os
import random
import time
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from carvana.training import distributed as dist
from carvana.pipeline.settings import changed_settings
from carvana.training.checkpoint import (CheckpointError, ModelSaverCallback, check_settings_match, load_checkpoint,
                                         load_model)
from carvana.training.classifier import CarvanaClassifier
from carvana.training.losses import BCEDiceLoss
from carvana.data.datasets import ImageReadError, TrainImageDataset, seed_worker, train_augmentation
from carvana.data.sampling import EpochSampler
from carvana.data.fetcher import CorruptArchiveError, DatasetFetcher, DatasetLayoutError, UnsafeArchiveError
from carvana.data.kaggle_client import KaggleError
from carvana.data.mask_table import MaskTableError, mask_table_for
from carvana.training.logging_callbacks import ConsoleLogger, CSVLogger, PreviewLogger
from carvana.models.registry import ModelConfig, ModelConfigError, build_model, make_config, output_size, parse_size
from carvana.models.smp_nets import EncoderWeightsError, resolve_encoder_weights
from carvana.models.unet1024 import parse_input_size
from carvana.submission.gzip_stream import SubmissionWriteError
from carvana.pipeline.folds import run_folds
from carvana.submission.ensemble import EnsemblePredictor, load_members, member_paths, parse_weights
from carvana.submission.sharded import predict_to_submission
from carvana.submission.validate import SubmissionError, upload_submission, validate_submission

# Errors whose message already says what is wrong and what to do: main.py prints them
# without a traceback. Anything else is a bug and keeps its traceback.
USER_ERRORS = (CheckpointError, ImageReadError, DatasetLayoutError, UnsafeArchiveError, CorruptArchiveError,
               KaggleError, SubmissionError, FloatingPointError, SubmissionWriteError, dist.PeerFailure,
               MaskTableError, ModelConfigError, EncoderWeightsError)

MODELS_DIR = Path("output/models")
LOGS_DIR = Path("logs")


class StageTimer:
    """Seconds per stage, in order: call it with a stage's name when that stage ends."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._clock = time.perf_counter()

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = round(now - self._clock, 1)
        self._clock = now


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_run(hp: SimpleNamespace) -> str:
    """The run name: --run-name, else (with --resume) the latest run that has last.pt, else a timestamp."""
    if hp.run_name:
        return hp.run_name
    if hp.resume and (hp.train or not hp.checkpoint):  # predicting from --checkpoint needs no training run
        # A --folds run keeps its checkpoints one level down: <run>/fold<k>/last.pt.
        runs = sorted([*MODELS_DIR.glob("*/last.pt"), *MODELS_DIR.glob("*/fold*/last.pt")], key=lambda p: p.stat().st_mtime)
        if not runs:
            raise SystemExit(f"--resume: no run with a last.pt under {MODELS_DIR}; start one without --resume")
        return runs[-1].relative_to(MODELS_DIR).parts[0]
    return datetime.now().strftime("%Y%m%d-%H%M%S")


def make_train_loader(dataset, hp: SimpleNamespace, pin: bool) -> DataLoader:
    """Shuffled batches (sharded by rank under torchrun) whose order and augmentation depend
    only on (seed, epoch, rank): a resumed run sees what an uninterrupted one would."""
    sampler = EpochSampler(dataset, seed=hp.seed, rank=dist.rank(), world=dist.world_size())
    per_rank = len(sampler)
    return DataLoader(
        dataset,
        batch_size=hp.batch_size,
        sampler=sampler,
        num_workers=hp.workers,
        pin_memory=pin,
        drop_last=per_rank > hp.batch_size,  # no BatchNorm on a 1-image tail batch
        persistent_workers=hp.workers > 0,
        worker_init_fn=seed_worker,
        generator=torch.Generator().manual_seed(hp.seed + dist.rank()),  # own augmentation stream per rank
    )


def run_pipeline(hp: SimpleNamespace, defaults: dict[str, Any] | None = None) -> int:
    """Run every stage; returns the process exit code.

    ``defaults`` are main.py's settings: a value that differs from them was given on the
    command line, and with --no-train it must agree with the checkpoint's model.
    """
    if getattr(hp, "classes", 1) > 1 or getattr(hp, "dataset", "carvana") != "carvana":
        from carvana.pipeline.multiclass import run_multiclass_pipeline  # imports this module: import late

        return run_multiclass_pipeline(hp)
    stage_done = StageTimer()
    times = stage_done.seconds

    device = dist.init(hp.device, timeout_s=hp.dist_timeout)
    main_process = dist.is_main_process()
    seed_everything(hp.seed)
    # Training: the model the settings describe, checked (ImageNet encoder weights fetched, or
    # refused offline) before any data work. Images and masks are resized to its OUTPUT size.
    model_config = train_model_config(hp) if hp.train else None
    input_hw = output_size(model_config) if model_config else parse_input_size(hp.input_size)
    run = dist.broadcast_object(resolve_run(hp) if main_process else None)
    models_dir, log_dir = MODELS_DIR / run, LOGS_DIR / run
    if main_process:
        log_dir.mkdir(parents=True, exist_ok=True)
        # A --no-train run (often under the training run's name) keeps that run's hparams.json.
        write_json(log_dir / ("hparams.json" if hp.train else "predict_hparams.json"), vars(hp))
    auto_threshold, threshold = parse_threshold(str(hp.threshold), hp.folds)
    hp.threshold = threshold  # training-time validation and previews use 0.5 until OOF picks one

    # 1. data: rank 0 downloads / writes the demo data, the others wait and reuse it.
    fetcher = DatasetFetcher(root=Path(hp.data_root), hq=hp.hq, seed=hp.seed)
    if hp.data_dir:
        fetcher.use_folder(Path(hp.data_dir))
    else:
        if main_process:
            fetcher.fetch()
        where = dist.broadcast_object((str(fetcher.dataset_dir), fetcher.source) if main_process else None)
        if not main_process:
            fetcher.use_folder(Path(where[0]))
            fetcher.source = where[1]
    # With --folds the folds hold out every car once: no separate validation split.
    validation_size = 0.0 if hp.folds else hp.validation_size
    train_images, train_masks, valid_images, valid_masks = fetcher.get_train_files(validation_size, hp.sample_size, hp.seed)
    test_images = fetcher.get_test_files(hp.test_sample_size)
    if main_process:
        print(f"data: {fetcher.source} at {fetcher.dataset_dir}: {len(train_images)} train / "
              f"{len(valid_images)} valid images (split by car), {len(test_images)} test images")
    stage_done("data")

    # 2-4 with --folds K (carvana.pipeline.folds) or --ensemble: several models, one averaged submission.
    if hp.folds or hp.ensemble:
        folds_summary = None
        if hp.folds:
            result = run_folds(hp, run, train_images + valid_images, train_masks + valid_masks, input_hw, MODELS_DIR,
                               LOGS_DIR, lambda f, md, ld, *files: train_fold(hp, device, input_hw, md, ld, *files, run=run),
                               threshold, auto_threshold)
            threshold, folds_summary, paths = result.threshold, result.summary, result.members
        else:
            paths = member_paths(hp.ensemble)
        stage_done("train")
        predictor = EnsemblePredictor(load_members(paths, parse_weights(hp.ensemble_weights, len(paths)), device,
                                                   hp.amp, hp.channels_last))
        if main_process:
            print(f"prediction: {predictor.describe()}")
        names, output = [p.name for p in test_images], Path(hp.output)
        rows = predict_to_submission(
            predictor, test_images, output, input_hw, threshold=threshold, chunk_size=hp.chunk_size,
            postprocess_workers=hp.postprocess_workers, batch_size=hp.predict_batch_size, loader_workers=hp.workers,
            tta=hp.tta, tag=predictor.tag(),
        )
        stage_done("predict")
        summary: dict[str, Any] = {}
        if main_process:
            report = validate_submission(output, names)
            print(report)
            summary = {"run": run, "data": fetcher.source, "train_images": len(train_images), "test_images": len(names),
                       "ensemble": [str(p) for p in paths], "threshold": threshold,
                       **({"mean_oof_dice": folds_summary["mean_oof_dice"]} if folds_summary else {}),
                       "submission": str(output), "rows": rows, "valid_submission": report.ok, "seconds_per_stage": times}
            if hp.submit:
                if hp.test_sample_size < 1.0:
                    raise SystemExit("not uploading: the submission covers only a sample of the test set (--test-sample-size)")
                upload_submission(output, names, hp.message)
            write_json(log_dir / ("summary.json" if hp.train else "predict_summary.json"), summary)
            print_summary(summary, output, hp.test_sample_size >= 1.0 and report.ok)
        dist.shutdown()
        return 0 if not summary or summary["valid_submission"] else 1

    # 2. model and classifier. Training builds the model the settings describe; a --no-train
    # run rebuilds the one its checkpoint describes (format 2 stores it), whatever main.py says.
    weights = Path(hp.checkpoint) if hp.checkpoint else models_dir / "best.pt"
    if hp.train:
        fresh = not (hp.resume and (models_dir / "last.pt").exists())  # else a checkpoint replaces the encoder's weights
        model, loaded = build_model(model_config, pretrained=fresh), False
    else:
        if not weights.exists() and not hp.checkpoint:  # a missing --checkpoint: load_model names it
            raise SystemExit(f"--no-train needs weights: {weights} does not exist; pass --checkpoint PATH "
                             "or the --run-name of a trained run")
        model, model_config, _ = load_model(weights)
        check_settings_match(model_config, changed_settings(hp, defaults or {}), weights)
        input_hw, loaded = output_size(model_config), True
        if main_process:
            print(f"model: {model_config.describe()} from {weights}")
    classifier = classifier_from_settings(hp, model, model_config, device, threshold=hp.threshold,
                                          loss_fn=binary_loss(hp))
    if main_process:  # the classifier decided the precision (training/precision.py): say it, add it to the record
        print(classifier.precision.describe())
        write_json(log_dir / ("hparams.json" if hp.train else "predict_hparams.json"),
                   {**vars(hp), "precision": classifier.precision.name})
    pin = classifier.device.type == "cuda"
    last_path = models_dir / "last.pt"
    if hp.resume and hp.train:
        if not last_path.exists():  # a typo in --run-name must not silently start a fresh run
            raise CheckpointError(f"--resume: run {run!r} has no {last_path}; check --run-name (runs with a "
                                  f"last.pt: {', '.join(sorted(p.parent.name for p in MODELS_DIR.glob('*/last.pt'))) or 'none'})")
        classifier.load_state_dict(load_checkpoint(last_path, classifier.device), path=str(last_path))
        if main_process:
            print(f"resuming run {run} from {last_path} after epoch {classifier.epoch + 1}")
            if classifier.resumed_from_epochs is not None:
                print(f"--epochs changed from {classifier.resumed_from_epochs} to {hp.epochs}: the cosine LR schedule "
                      f"continues as if the run had been started with {hp.epochs} epochs")

    # 3. train
    if hp.train and classifier.epoch + 1 < hp.epochs:
        augment = train_augmentation(hp.seed, parse_crop(hp.crop, input_hw), hp.augment)
        rles = mask_table_for(fetcher.dataset_dir)  # masks decoded from train_masks.csv rows (GIF fallback)
        if main_process:
            print(f"masks: {f'RLE rows of {rles.path} ({len(rles)} rows; GIFs for images without one)' if rles else 'GIFs'}")
        train_set = TrainImageDataset(train_images, train_masks, input_hw, augment, seed=hp.seed + dist.rank(),
                                      mask_rles=rles)
        train_loader = make_train_loader(train_set, hp, pin)
        valid_loader = make_valid_loader(TrainImageDataset(valid_images, valid_masks, input_hw, full_masks=True,
                                                           mask_rles=rles), hp, pin) if valid_images else None
        callbacks = [ModelSaverCallback(models_dir, vars(hp), resume_hint=f"python main.py --resume --run-name {run}"),
                     ConsoleLogger(), CSVLogger(log_dir), PreviewLogger(log_dir, hp.threshold)]
        classifier.train(train_loader, valid_loader, hp.epochs, callbacks)
    dist.barrier()  # rank 0 has written best.pt before any rank loads it
    stage_done("train")

    # 4. predict with the best weights, streaming rows into the submission
    if not loaded and (weights.exists() or hp.checkpoint):  # a --checkpoint that is missing is an error
        classifier.load_state_dict(load_checkpoint(weights, classifier.device), weights_only=True, path=str(weights))
    names = [p.name for p in test_images]
    output = Path(hp.output)
    rows = predict_to_submission(
        classifier, test_images, output, input_hw, threshold=hp.threshold, chunk_size=hp.chunk_size,
        postprocess_workers=hp.postprocess_workers, batch_size=hp.predict_batch_size, loader_workers=hp.workers,
        tta=hp.tta,
    )
    stage_done("predict")

    # 5. validate (and upload) on rank 0
    summary: dict[str, Any] = {}
    if main_process:
        report = validate_submission(output, names)
        print(report)
        complete = hp.test_sample_size >= 1.0  # a sampled test set cannot be submitted
        summary = {
            "run": run, "data": fetcher.source, "dataset_dir": str(fetcher.dataset_dir),
            "train_images": len(train_images), "valid_images": len(valid_images), "test_images": len(names),
            "epochs_trained": classifier.epoch + 1,
            # best_metric tracks -train_loss when there is no validation set: not a Dice then.
            "best_valid_dice": classifier.best_metric if valid_images and classifier.epoch >= 0 else None,
            "submission": str(output), "rows": rows, "valid_submission": report.ok, "seconds_per_stage": times,
        }
        if hp.submit:
            if not complete:
                raise SystemExit("not uploading: the submission covers only a sample of the test set (--test-sample-size)")
            upload_submission(output, names, hp.message)  # validates again and refuses an invalid file
        stage_done("validate")
        summary["seconds_per_stage"] = times
        write_json(log_dir / ("summary.json" if hp.train else "predict_summary.json"), summary)
        print_summary(summary, output, complete and report.ok)
    dist.shutdown()
    return 0 if not summary or summary["valid_submission"] else 1


def classifier_from_settings(hp: SimpleNamespace, model: torch.nn.Module, model_config: ModelConfig, device: str,
                             **task_specific: Any) -> CarvanaClassifier:
    """A CarvanaClassifier with the training settings every pipeline shares (binary, folds,
    multi-class), in one place so a setting cannot reach one pipeline and miss another, as
    --time-budget once missed the multi-class one; ``task_specific`` adds the rest."""
    return CarvanaClassifier(
        model, model_config=model_config, freeze_encoder_epochs=hp.freeze_encoder_epochs,
        time_budget=hp.time_budget * 60, epochs=hp.epochs, lr=hp.lr, optimizer=hp.optimizer,
        weight_decay=hp.weight_decay, scheduler=hp.scheduler, grad_clip=hp.grad_clip, device=device, amp=hp.amp,
        channels_last=hp.channels_last, compile=hp.compile, sync_batchnorm=hp.sync_batchnorm, **task_specific,
    )


def binary_loss(hp: SimpleNamespace) -> BCEDiceLoss:
    """The binary path's BCE + Dice loss, boundary-weighted as the settings say."""
    return BCEDiceLoss(hp.bce_weight, hp.dice_weight, boundary_weight=hp.boundary_weight,
                       boundary_band=hp.boundary_band, boundary_dice=hp.boundary_dice)


def train_fold(hp: SimpleNamespace, device: str, input_hw: tuple[int, int], models_dir: Path, log_dir: Path,
               train_images: list[Path], train_masks: list[Path], valid_images: list[Path], valid_masks: list[Path],
               run: str) -> CarvanaClassifier:
    """One fold of --folds K: build the model from the settings, resume its last.pt with --resume, train."""
    model_config = make_config(hp.arch, hp.width, 1, input_hw, hp.encoder, hp.encoder_weights)
    fresh = not (hp.resume and (models_dir / "last.pt").exists())
    classifier = classifier_from_settings(hp, build_model(model_config, pretrained=fresh), model_config, device,
                                          threshold=hp.threshold, loss_fn=binary_loss(hp))
    pin = classifier.device.type == "cuda"
    last_path = models_dir / "last.pt"
    if hp.resume and last_path.exists():
        classifier.load_state_dict(load_checkpoint(last_path, classifier.device), path=str(last_path))
        if dist.is_main_process():
            print(f"resuming run {run} from {last_path} after epoch {classifier.epoch + 1}")
    if classifier.epoch + 1 < hp.epochs:
        augment = train_augmentation(hp.seed, parse_crop(hp.crop, input_hw), hp.augment)
        train_set = TrainImageDataset(train_images, train_masks, input_hw, augment, seed=hp.seed + dist.rank())
        valid_loader = make_valid_loader(TrainImageDataset(valid_images, valid_masks, input_hw, full_masks=True), hp, pin)
        callbacks = [ModelSaverCallback(models_dir, vars(hp), resume_hint=f"python main.py --resume --run-name {run}"),
                     ConsoleLogger(), CSVLogger(log_dir), PreviewLogger(log_dir, hp.threshold)]
        classifier.train(make_train_loader(train_set, hp, pin), valid_loader, hp.epochs, callbacks)
    return classifier


def train_model_config(hp: SimpleNamespace) -> ModelConfig:
    """The network --arch/--encoder/--width/--input-size describe; a fresh run resolves its
    encoder weights here (downloaded once, or one clear error offline)."""
    config = make_config(hp.arch, hp.width, 1, parse_size(hp.input_size), hp.encoder, hp.encoder_weights)
    if not hp.resume:
        resolve_encoder_weights(config.encoder, config.encoder_weights)
    return config


def parse_threshold(text: str, folds: int) -> tuple[bool, float]:
    """--threshold: a probability, or 'auto' (chosen on out-of-fold predictions, so --folds K)."""
    if text.strip().lower() == "auto":
        if not folds:
            raise SystemExit("error: --threshold auto chooses on out-of-fold predictions: it needs --folds K (K >= 2)")
        return True, 0.5
    try:
        value = float(text)
    except ValueError:
        raise SystemExit(f"error: --threshold {text!r}: expected a probability in [0, 1] or 'auto'") from None
    if not 0.0 <= value <= 1.0:
        raise SystemExit(f"error: --threshold {value}: expected a probability in [0, 1] or 'auto'")
    return False, value


def parse_crop(text: str, input_hw: tuple[int, int]) -> tuple[int, int] | None:
    """--crop HxW (None when empty); it must fit in the input size."""
    if not text:
        return None
    crop = parse_input_size(text)
    if crop[0] > input_hw[0] or crop[1] > input_hw[1]:
        raise SystemExit(f"error: --crop {text} is larger than --input-size {input_hw[0]}x{input_hw[1]}")
    return crop


def make_valid_loader(dataset, hp: SimpleNamespace, pin: bool) -> DataLoader:
    """In order; under torchrun rank r scores images r, r+W, ...: each image once over all
    ranks (no padding), so the all-reduced Dice is the single-process one (see validate())."""
    return DataLoader(dataset, batch_size=hp.batch_size, sampler=dist.ShardSampler(len(dataset)),
                      num_workers=hp.workers, pin_memory=pin, persistent_workers=hp.workers > 0)


def write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def print_summary(summary: dict[str, Any], output: Path, submittable: bool) -> None:
    print("\n=== summary ===")
    for key, value in summary.items():
        print(f"{key:>18}: {value}")
    if submittable:
        print(f"\nUpload with:  kaggle competitions submit -c carvana-image-masking-challenge -f {output} -m \"...\"\n"
              f"         or:  python main.py --no-train --submit --run-name {summary['run']}")
